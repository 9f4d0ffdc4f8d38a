"""Comparing one tensor of the candidate with the reference's: errors, bounds, verdicts.

Each tensor is compared normwise,

    max_abs_err = max|cand - ref|        max_rel_err = max_abs_err / max(max|ref|, tiny)

and passes when ``max_abs_err <= atol + rtol * max|ref|`` (per-element relative errors explode
near zero, which a fold legitimately moves around). NaN/Inf must sit at the same positions with
the same values; integer and bool tensors must be equal.
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np

_TOLERANCES = {
    np.dtype(np.float64): (1e-9, 1e-12),
    np.dtype(np.float32): (1e-4, 1e-6),
    np.dtype(np.float16): (1e-2, 1e-3),
    np.dtype(ml_dtypes.bfloat16): (5e-2, 1e-2),
}


def json_float(value: float) -> float | None:
    """JSON has no NaN/Infinity; a non-finite error is reported as null (the check has failed)."""
    return float(value) if math.isfinite(value) else None


OUTPUT, SITE = "output", "site"
DTYPE_BOUND, SHADOW_BOUND = "dtype", "float64 shadow"
# A failed float comparison is re-judged against the float64 shadow (the original evaluated in
# float64, the exact answer to within float32 rounding): the candidate passes when it is no
# further from it than SHADOW_FACTOR times the original's own float32 result, or than the dtype
# bound. A correct fold of a deep net rounds about as much as the original; a wrong one does not.
SHADOW_FACTOR = 4.0


@dataclasses.dataclass(frozen=True)
class OutputCheck:
    """One tensor of the two models compared on one provider: a graph output, or a fold site
    (`kind`), with the fold made there (`fold`, e.g. "bn3 into conv3")."""

    provider: str
    output: str
    dtype: str
    max_abs_err: float
    max_rel_err: float
    rtol: float
    atol: float
    passed: bool
    note: str = ""
    kind: str = OUTPUT
    fold: str = ""
    # Evidence: a float tensor whose reference takes at least two finite values. A constant
    # (all zeros, a saturated sigmoid), non-finite, integer or bool tensor proves no float fold.
    informative: bool = True
    bound: str = DTYPE_BOUND  # how the bound was set
    shadow_err: float | None = None  # float64 shadow bound: the original's own error against it
    shadow_cand_err: float | None = None  # ... and the candidate's

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("max_abs_err", "max_rel_err", "shadow_err", "shadow_cand_err"):
            out[key] = json_float(out[key]) if out[key] is not None else None
        return out



# ---------------------------------------------------------------- dtypes and tolerances


def is_float(dtype: np.dtype) -> bool:
    """numpy does not count ml_dtypes' bfloat16/float8 as np.floating; finfo knows them all."""
    if dtype.kind == "f":
        return True
    try:
        ml_dtypes.finfo(dtype)
    except (ValueError, TypeError):
        return False
    return dtype.kind == "V"


def default_tolerance(dtype) -> tuple[float, float]:
    """(rtol, atol) for an output dtype: loose enough for the rounding a fold moves, no looser."""
    dtype = np.dtype(dtype)
    if dtype in _TOLERANCES:
        return _TOLERANCES[dtype]
    if is_float(dtype):  # float8 and friends: scale with the format's precision
        eps = float(ml_dtypes.finfo(dtype).eps)
        return (8 * eps, 8 * eps)
    return (0.0, 0.0)


def mismatch(provider, name, dtype, note) -> OutputCheck:
    return OutputCheck(provider, name, str(dtype), math.inf, math.inf, 0.0, 0.0, False, note, informative=False)


def _informative(ref: np.ndarray) -> bool:
    if not is_float(ref.dtype) or ref.size < 2:
        return False
    values = ref if ref.dtype in (np.float32, np.float64) else ref.astype(np.float64)
    low, high = values.min(), values.max()
    if np.isfinite(low) and np.isfinite(high):
        return bool(low != high)
    finite = values[np.isfinite(values)]
    return finite.size > 1 and bool(finite.min() != finite.max())


def _float_errors(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float, str]:
    """(max_abs_err, max|ref|, note) over the finite elements; non-finite ones must match.
    float32/float64 are compared as they are (one pass when all is finite), others in float64."""
    if ref.dtype not in (np.float32, np.float64):
        ref, cand = ref.astype(np.float64), cand.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: the slow path below sorts it out
        diff = np.abs(cand - ref)
    worst = diff.max(initial=0.0)
    if np.isfinite(worst):  # no NaN or Inf on either side (inf - inf is nan, x - inf is inf)
        return float(worst), float(np.abs(ref).max(initial=0.0)), ""
    finite = np.isfinite(ref)
    if not np.array_equal(finite, np.isfinite(cand)) or not np.array_equal(ref[~finite], cand[~finite], equal_nan=True):
        return math.inf, float(np.abs(ref[finite]).max(initial=0.0)), "NaN/Inf differ"
    return float(diff[finite].max(initial=0.0)), float(np.abs(ref[finite]).max(initial=0.0)), ""


def _tolerance(dtype: np.dtype, rtol, atol) -> tuple[float, float]:
    """Explicit tolerances override the per-dtype defaults; integer/bool outputs stay exact."""
    default_rtol, default_atol = default_tolerance(dtype)
    if not is_float(dtype):
        return default_rtol, default_atol
    return (default_rtol if rtol is None else float(rtol), default_atol if atol is None else float(atol))


def _compare_output(provider, name, ref, cand, rtol, atol) -> OutputCheck:
    if ref.dtype != cand.dtype:
        return mismatch(provider, name, ref.dtype, f"dtype {cand.dtype}, expected {ref.dtype}")
    if ref.shape != cand.shape:
        return mismatch(provider, name, ref.dtype, f"shape {cand.shape}, expected {ref.shape}")
    rtol, atol = _tolerance(ref.dtype, rtol, atol)
    if is_float(ref.dtype):
        abs_err, scale, note = _float_errors(ref, cand)
        tiny = float(ml_dtypes.finfo(ref.dtype).tiny)
        passed = not note and abs_err <= atol + rtol * scale
    else:
        equal = np.array_equal(ref, cand)
        delta = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
        abs_err, scale, tiny, note = float(delta.max(initial=0.0)), float(np.abs(ref).max(initial=0)), 1.0, ""
        passed = equal
    rel_err = abs_err / max(scale, tiny)
    return OutputCheck(provider, name, str(ref.dtype), abs_err, rel_err, rtol, atol, passed, note, informative=_informative(ref))


def judge_by_shadow(check: OutputCheck, ref: np.ndarray, cand: np.ndarray, shadow: np.ndarray) -> OutputCheck:
    """A float check that failed on magnitude alone, judged again against the float64 shadow
    (see SHADOW_FACTOR); other checks, or a shadow of another shape, are returned as they are."""
    if check.passed or check.note or not is_float(ref.dtype) or shadow.shape != ref.shape:
        return check
    exact = shadow.astype(np.float64)
    finite = np.isfinite(exact) & np.isfinite(ref.astype(np.float64))
    if not finite.any():
        return check
    ref_err = float(np.abs(ref.astype(np.float64)[finite] - exact[finite]).max())
    cand_err = float(np.abs(cand.astype(np.float64)[finite] - exact[finite]).max())
    bound = max(SHADOW_FACTOR * ref_err, check.atol + check.rtol * float(np.abs(exact[finite]).max()))
    return dataclasses.replace(
        check, passed=cand_err <= bound, bound=SHADOW_BOUND, shadow_err=ref_err, shadow_cand_err=cand_err
    )


def compare_all(provider, ref_out: dict, cand_out: dict, rtol, atol) -> list[OutputCheck]:
    checks = []
    for name, ref in ref_out.items():
        if name not in cand_out:
            checks.append(mismatch(provider, name, ref.dtype, "missing from the candidate"))
        else:
            checks.append(_compare_output(provider, name, ref, cand_out[name], rtol, atol))
    for name, cand in cand_out.items():
        if name not in ref_out:
            checks.append(mismatch(provider, name, cand.dtype, "not an output of the reference"))
    return checks



def compare_outputs(provider: str, expected: dict, actual: dict, rtol=None, atol=None) -> list[OutputCheck]:
    """Per-output checks of `actual` against `expected` ({name: array}), with verify's tolerances."""
    return compare_all(provider, expected, actual, rtol, atol)
