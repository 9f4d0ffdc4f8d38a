"""Errors a user can cause. Each carries a one-line message; the CLI prints it and exits 2."""


class BnfoldError(Exception):
    """Base of every error bnfold raises on bad input or a failed promise."""

    exit_code = 2


class InvalidModel(BnfoldError):
    """The file is missing, unreadable, not ONNX, truncated, or its external data is broken."""


class UsageError(BnfoldError):
    """Arguments that cannot work together (bad --dim, unknown rule, unreadable .npz, ...)."""


class VerificationFailed(BnfoldError):
    """The folded model's outputs differ from the original's beyond tolerance."""

    exit_code = 1

    def __init__(self, message: str, verification=None):
        super().__init__(message)
        self.verification = verification


class WriteFailed(BnfoldError):
    """The output could not be written (unwritable folder, disk full, ...); nothing was left behind."""
