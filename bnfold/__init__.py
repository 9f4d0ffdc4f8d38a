"""bnfold: fold BatchNormalization out of ONNX models, and prove the result with onnxruntime.

    result = bnfold.fold("model.onnx")          # FoldResult: .model, .report
    check = bnfold.verify("model.onnx", result.model)

The API is loaded when first used (PEP 562), so that `bnfold --help` and `import bnfold.cli`
start without onnx and numpy.
"""

import importlib

from bnfold.errors import BnfoldError, InvalidModel, UsageError, VerificationFailed, WriteFailed
from bnfold.report import FoldReport, Folded, Kept

__version__ = "0.1.0"

# name -> the module that defines it, imported on first use
_LAZY = {
    "FoldResult": "bnfold.api",
    "check": "bnfold.api",
    "fold": "bnfold.api",
    "fold_file": "bnfold.api",
    "Verification": "bnfold.verify",
    "verify": "bnfold.verify",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # `bnfold.verify` the function: see bnfold.verify's last lines
    return value


__all__ = [
    "BnfoldError",
    "FoldReport",
    "FoldResult",
    "Folded",
    "InvalidModel",
    "Kept",
    "UsageError",
    "VerificationFailed",
    "Verification",
    "WriteFailed",
    "check",
    "fold",
    "fold_file",
    "verify",
]
