"""Errors a user can cause. Each carries a one-line message; the CLI prints it and exits with
its code (`exit_code_of`)."""

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(value) -> str:
    """`value` as text with control characters escaped: names and paths come from the model or
    the user, and a newline in one must not split a message or forge a line of a report."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(value))


def one_line(text: str, limit: int = 300) -> str:
    """A library's multi-line message (onnx's checker, numpy) folded into one line, cut at `limit`."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class BnfoldError(Exception):
    """Base of every error bnfold raises on bad input or a failed promise.

    The message is kept on one line whatever names it quotes (see `printable`).
    """

    exit_code = 2

    def __init__(self, message="", *args):
        super().__init__(printable(message), *args)


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


def exit_code_of(err: BaseException) -> int:
    """The CLI's exit code for `err`, the same for one model alone and for one file of a batch:
    a BnfoldError's own (1 verification failed, 2 bad input), 130 when interrupted, and 2 for
    anything else (out of memory: a size in the model asks too much; or a bug of ours)."""
    if isinstance(err, BnfoldError):
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return 130
    return 2


def describe(err: BaseException) -> str:
    """The one-line text of an error, the same for one model alone and for one file of a batch:
    a BnfoldError's message, "out of memory" (with what Python said, if anything), or an
    internal error naming its type."""
    if isinstance(err, BnfoldError):
        return printable(err)
    if isinstance(err, MemoryError):
        return f"out of memory{': ' + printable(err) if str(err) else ''}"
    return f"internal error: {type(err).__name__}: {printable(err)}"
