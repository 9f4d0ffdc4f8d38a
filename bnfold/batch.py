"""Batch mode: fold many model files, optionally in parallel processes.

One bad model never stops the others: each file's outcome (its result, or the one-line error
and exit code it would have had alone) is collected, and the caller prints one summary at the
end. Workers are spawned processes, not forked ones: onnxruntime's thread pools do not survive
a fork. The folded ModelProto stays in the worker (it is already written); only the report and
the verification travel back.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import pathlib
from typing import Callable, Iterable

from bnfold.errors import UsageError, VerificationFailed, describe, exit_code_of


@dataclasses.dataclass(frozen=True)
class FileOutcome:
    """What happened to one model file: a FoldResult (without its model) or an error."""

    path: str
    exit_code: int  # as `bnfold MODEL` alone would exit: 0 ok, 1 verification failed, 2 bad input
    result: object | None = None  # bnfold.api.FoldResult with model=None
    error: str = ""
    verification: object | None = None  # the failed Verification, when there was one

    def to_dict(self) -> dict:
        data = {"input": self.path, "exit_code": self.exit_code}
        if self.result is not None:
            data.update(self.result.to_dict())
        else:
            data["error"] = self.error
            data["verification"] = self.verification.to_dict() if self.verification is not None else None
        return data


def expand_models(args: Iterable[str]) -> list[pathlib.Path]:
    """Files as given; a directory stands for the .onnx files directly in it (not bnfold's own
    *.folded.onnx outputs), in name order."""
    paths: list[pathlib.Path] = []
    for arg in args:
        path = pathlib.Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.onnx") if p.is_file() and not p.name.endswith(".folded.onnx"))
            if not found:
                raise UsageError(f"directory {path} holds no .onnx model")
            paths += found
        else:
            paths.append(path)
    return list(dict.fromkeys(paths))


def fold_file_outcome(path: pathlib.Path, options: dict) -> FileOutcome:
    """fold_file on one file, its failure turned into data (runs in a worker process)."""
    import warnings

    from bnfold import api

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = api.fold_file(path, **options)
    except Exception as err:  # noqa: BLE001 - a bad file, or a bug of ours, must not stop the others
        verification = err.verification if isinstance(err, VerificationFailed) else None
        return FileOutcome(str(path), exit_code_of(err), error=describe(err), verification=verification)
    return FileOutcome(str(path), 0, result=dataclasses.replace(result, model=None))


def fold_files(
    paths: list[pathlib.Path],
    options: dict,
    jobs: int = 1,
    on_done: Callable[[FileOutcome, int], None] | None = None,
) -> list[FileOutcome]:
    """Fold every file; outcomes in the order of `paths`. `on_done(outcome, n_done)` as each ends."""
    done = on_done or (lambda outcome, count: None)
    if jobs <= 1 or len(paths) <= 1:
        outcomes = []
        for path in paths:
            outcomes.append(fold_file_outcome(path, options))
            done(outcomes[-1], len(outcomes))
        return outcomes
    context = multiprocessing.get_context("spawn")
    by_path: dict[str, FileOutcome] = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(fold_file_outcome, path, options): path for path in paths}
        for future in concurrent.futures.as_completed(futures):
            path = futures[future]
            try:
                outcome = future.result()
            except Exception as err:  # noqa: BLE001 - the worker died (killed, out of memory)
                outcome = FileOutcome(str(path), exit_code_of(err), error=f"worker process failed: {type(err).__name__}")
            by_path[str(path)] = outcome
            done(outcome, len(by_path))
    return [by_path[str(p)] for p in paths]


def batch_exit_code(outcomes: list[FileOutcome]) -> int:
    """2 if any file was bad input, else 1 if any failed verification, else 0."""
    codes = {o.exit_code for o in outcomes}
    return 2 if 2 in codes else 1 if 1 in codes else 0
