"""Destinations: what kind of thing an output path is, and how a finished model gets into it.

| destination                 | how the model is written                                            |
| --------------------------- | ------------------------------------------------------------------- |
| regular file, new or not    | staged beside it, renamed into place (`bnfold.staging`): atomic and |
|                             | durable; an existing file keeps its mode and, where allowed, owner  |
| symbolic link               | followed: its final target is replaced as a regular file, staged in |
|                             | the target's folder; the link itself stays                          |
| character or block device   | opened and written into, never created, truncated or replaced       |
| FIFO                        | written into once a reader opens it; it stays a FIFO                |
| `-`                         | standard output (refused when that is a terminal)                   |
| directory, socket, dangling | refused                                                             |
| link                        |                                                                     |

A device, a FIFO or stdout gets the model only once it is complete (and verified), staged in the
system's temporary folder, but such a write cannot be atomic: a failure part-way (a full device,
a reader that goes away) leaves part of the model there. A model that keeps weights in external
data cannot go to one: there is no folder to put its data file in.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import stat
import sys

from bnfold.errors import UsageError, WriteFailed

REGULAR, DEVICE, FIFO, STDOUT = "file", "device", "FIFO", "stdout"
STDOUT_NAME = "-"
CHUNK = 2**20  # bytes per write into a device, FIFO or stdout


@dataclasses.dataclass(frozen=True)
class Destination:
    """An output path, classified. `path` is the file that receives the bytes: a link's final
    target, the device or FIFO node itself; for stdout, `-`."""

    given: pathlib.Path  # as asked for (absolute), or `-`
    kind: str
    path: pathlib.Path

    @property
    def streamed(self) -> bool:
        """Written into as a stream (device, FIFO, stdout), not staged and renamed."""
        return self.kind != REGULAR

    @property
    def label(self) -> str:
        return "<stdout>" if self.kind == STDOUT else str(self.path)


def given_path(dst) -> pathlib.Path:
    """How `dst` is named in a Destination: `-` as is, any other path made absolute."""
    return pathlib.Path(STDOUT_NAME) if str(dst) == STDOUT_NAME else pathlib.Path(dst).absolute()


def classify(dst) -> Destination:
    """What `dst` is; refuses (one line) what cannot receive a model. A Destination is returned
    as is. Nothing is created or opened."""
    if isinstance(dst, Destination):
        return dst
    given = given_path(dst)
    if str(given) == STDOUT_NAME:
        if _stdout_is_terminal():
            raise UsageError("refusing to write a binary model to a terminal: redirect stdout, or pass -o FILE")
        return Destination(given, STDOUT, given)
    try:
        info = given.stat()  # follows links, as writing would
    except FileNotFoundError:
        return Destination(given, REGULAR, _new_file(given))
    except OSError as e:  # a link loop, a folder we may not search
        raise WriteFailed(f"cannot write {given}: {e.strerror or e}") from None
    return Destination(given, _kind(given, info.st_mode), _final_target(given))


def _new_file(given: pathlib.Path) -> pathlib.Path:
    if given.is_symlink():  # as cp does: a dangling link is not written through
        raise WriteFailed(f"cannot write {given}: is a dangling symbolic link (to {os.readlink(given)})")
    if not given.parent.is_dir():
        problem = "is not a folder" if given.parent.exists() else "does not exist"
        raise WriteFailed(f"cannot write {given}: {given.parent} {problem}")
    return given


def _kind(given: pathlib.Path, mode: int) -> str:
    if stat.S_ISREG(mode):
        return REGULAR
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return DEVICE
    if stat.S_ISFIFO(mode):
        return FIFO
    what = "a directory" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file, device or FIFO"
    raise WriteFailed(f"cannot write {given}: is {what}")


def _final_target(given: pathlib.Path) -> pathlib.Path:
    """A link's final target (what is replaced, so the link stays a link); else the path."""
    return pathlib.Path(os.path.realpath(given)) if given.is_symlink() else given


def same_file(destination: Destination, other) -> bool:
    """Whether writing `destination` would overwrite `other` (a hard link, a symlink, `..`)."""
    if destination.kind == STDOUT:
        return False
    try:
        return os.path.samefile(destination.path, other)
    except OSError:  # either does not exist (yet)
        return False


def refuse_external_data(destination: Destination) -> None:
    """A model with external data needs a folder for its data file: a stream has none."""
    raise UsageError(
        f"cannot write {destination.label}: the model keeps weights in external data, which "
        f"cannot go to a {destination.kind}; write it to a file"
    )


def stream(destination: Destination, model_file: pathlib.Path) -> None:
    """Copy the finished model file into a device, FIFO or stdout. OSError on failure (the
    caller words it); part of the model may have been written by then."""
    with open(model_file, "rb") as src:
        if destination.kind == STDOUT:
            _write_stdout(src)
        else:
            _write_node(destination, src)


def _write_node(destination: Destination, src) -> None:
    # O_WRONLY alone: never O_CREAT or O_TRUNC, so the node is written into and stays what it is.
    fd = os.open(destination.path, os.O_WRONLY | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    try:
        if os.isatty(fd):
            raise UsageError(f"refusing to write a binary model to the terminal {destination.path}")
        _copy_all(src, lambda view: os.write(fd, view))
        if stat.S_ISBLK(os.fstat(fd).st_mode):  # a disk: durable like a file; a char device has no such notion
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_stdout(src) -> None:
    sys.stdout.flush()  # whatever text went before stays before the model's bytes
    out = sys.stdout.buffer
    try:
        _copy_all(src, out.write)
        out.flush()
    except BrokenPipeError:
        _detach_stdout()
        raise


def _copy_all(src, write) -> None:
    """Every byte of `src` through `write`, which may take fewer than it is given (a pipe whose
    reader goes away mid-write: the next call then fails with EPIPE, as it must; a buffered
    stream returns the short count instead of raising)."""
    while chunk := src.read(CHUNK):
        view = memoryview(chunk)
        while view:
            view = view[write(view):]


def _detach_stdout() -> None:
    """After a broken pipe, point fd 1 at the null device so that Python's own flush at exit
    does not fail again with a second message (the recipe in Python's signal docs)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real fd 1 (an embedding, a test runner)
        pass


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # closed or replaced stdout
        return False
