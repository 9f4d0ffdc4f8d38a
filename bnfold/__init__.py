"""bnfold: fold BatchNormalization out of ONNX models, and prove the result with onnxruntime.

    result = bnfold.fold("model.onnx")          # FoldResult: .model, .report
    check = bnfold.verify("model.onnx", result.model)
"""

from bnfold.api import FoldResult, check, fold, fold_file
from bnfold.errors import BnfoldError, InvalidModel, UsageError, VerificationFailed, WriteFailed
from bnfold.report import FoldReport, Folded, Kept

__version__ = "0.1.0"

# The function shadows the submodule name on purpose: `bnfold.verify(...)` is the API, and
# `from bnfold.verify import ...` still reaches the module. onnxruntime is imported lazily there.
from bnfold.verify import Verification, verify  # noqa: E402


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
