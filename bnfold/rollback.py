"""Prove each fold: when the folded model fails verification, find the folds responsible, undo
exactly those and keep their BN with the reason.

When a fold site fails, the first failing one in graph order names its fold (`blame_by_site`);
unless the float64 shadow judged it, the caller confirms that by verifying the fold alone. Otherwise the culprits are found by group
testing over the applied folds: a set of folds that verifies as a whole is innocent; a failing
set is split in halves and each half tested alone. With k culprits among n folds that costs
O(k log n) verifications instead of n.

A wrong fold fails on its own. When both halves of a failing set pass alone, no fold in it is
wrong: the whole differs from the original by the float rounding its folds accumulate (a deep
net judged without the float64 shadow), and undoing folds would only trade one rounding for
another. No culprit is named; the caller reports the failure as rounding and writes nothing.
"""

from __future__ import annotations

from typing import Callable, Sequence

from bnfold.compare import SHADOW_BOUND
from bnfold.report import ROLLED_BACK, Folded

# A trial: apply only `folds`, verify, return (passed, max abs error).
Trial = Callable[[Sequence[Folded]], tuple[bool, float]]


def blame_by_site(folds: Sequence[Folded], verification) -> tuple[dict[Folded, float], bool]:
    """The fold whose site is the first to fail, in graph order, with its error ({} when no
    failing site belongs to a fold), and whether that is proof enough. Every site before it
    verified, so the values reaching that fold were right: judged against the float64 shadow
    (beyond the original's own rounding), its own fold is wrong. Judged by a plain bound, the
    site may fail by rounding that earlier folds accumulate: the caller verifies that fold alone
    first. (The sites after it may fail only because it does; the caller verifies again and
    blames the next one.)"""
    by_site = {f.site: f for f in folds if f.site and not f.graph}
    for check in verification.checks:
        if not check.passed and check.kind == "site" and check.output in by_site:
            return {by_site[check.output]: check.max_abs_err}, check.bound == SHADOW_BOUND
    return {}, False


def find_failing_folds(folds: Sequence[Folded], trial: Trial, error: float) -> dict[Folded, float]:
    """The folds to undo, each with the max abs error of the smallest failing set it was in.

    The caller has verified all of `folds` together: they fail with max abs error `error`.
    """
    failing: dict[Folded, float] = {}
    _bisect(list(folds), trial, error, failing)
    return failing


def _bisect(folds: list[Folded], trial: Trial, error: float | None, failing: dict) -> None:
    """`folds` fails (with `error`, None when not yet measured): record its culprits."""
    if error is None:
        passed, error = trial(folds)
        if passed:
            return
    if len(folds) == 1:
        failing[folds[0]] = error
        return
    half = len(folds) // 2
    for part in (folds[:half], folds[half:]):
        _bisect(part, trial, None, failing)
    # nothing added: each half verifies alone, only the combination fails: rounding: each half verifies alone, only the combination fails: rounding


def skip_map(records, errors: dict[Folded, float] | None = None) -> dict[tuple[str, str], str]:
    """fold_model's `skip` keeping the BN of `records` (Folded or Kept): with the rollback reason
    when `errors` is given, else a neutral one (a trial that leaves them out)."""
    return {
        (r.graph, r.bn): rollback_reason(errors[r]) if errors else "left out of a verification trial"
        for r in records
    }


def rollback_reason(error: float) -> str:
    if error == float("inf"):
        return f"verification failed: the model with this fold did not run {ROLLED_BACK}"
    return f"verification failed: max abs error {error:.3g} when folded {ROLLED_BACK}"
