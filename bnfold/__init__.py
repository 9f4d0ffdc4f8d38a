"""bnfold: fold BatchNormalization out of ONNX models, and prove the result with onnxruntime.

    result = bnfold.fold("model.onnx")          # FoldResult: .model, .report
    check = bnfold.verify("model.onnx", result.model)
"""

from bnfold.api import FoldResult, check, fold, fold_file
from bnfold.errors import BnfoldError, InvalidModel, UsageError, VerificationFailed, WriteFailed
from bnfold.report import FoldReport, Folded, Kept

__version__ = "0.1.0"


def verify(reference, candidate, **options):
    """Compare two models' outputs in onnxruntime; see bnfold.verify.verify for the options."""
    from bnfold.verify import verify as run_verify

    return run_verify(reference, candidate, **options)


__all__ = [
    "BnfoldError",
    "FoldReport",
    "FoldResult",
    "Folded",
    "InvalidModel",
    "Kept",
    "UsageError",
    "VerificationFailed",
    "WriteFailed",
    "check",
    "fold",
    "fold_file",
    "verify",
]
