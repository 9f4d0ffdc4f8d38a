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


@dataclasses.dataclass(frozen=True)
class OutputCheck:
    """One output of the two models compared on one provider."""

    provider: str
    output: str
    dtype: str
    max_abs_err: float
    max_rel_err: float
    rtol: float
    atol: float
    passed: bool
    note: str = ""

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["max_abs_err"] = json_float(self.max_abs_err)
        out["max_rel_err"] = json_float(self.max_rel_err)
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
    return OutputCheck(provider, name, str(dtype), math.inf, math.inf, 0.0, 0.0, False, note)


def _float_errors(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float, str]:
    """(max_abs_err, max|ref|, note) over the finite elements; non-finite ones must match."""
    ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
    finite = np.isfinite(ref64)
    if not np.array_equal(finite, np.isfinite(cand64)) or not np.array_equal(
        ref64[~finite], cand64[~finite], equal_nan=True
    ):
        return math.inf, float(np.abs(ref64[finite]).max(initial=0.0)), "NaN/Inf differ"
    diff = np.abs(cand64[finite] - ref64[finite]).max(initial=0.0)
    return float(diff), float(np.abs(ref64[finite]).max(initial=0.0)), ""


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
    return OutputCheck(provider, name, str(ref.dtype), abs_err, rel_err, rtol, atol, passed, note)


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
