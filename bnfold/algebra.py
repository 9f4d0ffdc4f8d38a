"""The fold arithmetic, in pure numpy (no onnx here).

Inference-mode BatchNormalization (Ioffe & Szegedy 2015, Algorithm 2) is a per-channel affine map

    y = scale * x + shift,   scale = gamma / sqrt(var + eps),   shift = beta - mean * scale

so a linear producer  z = W x + b  followed by BN becomes  z' = (scale * W) x + (scale * b + shift),
with `scale` applied along W's output-channel axis. A BN *before* the linear op folds the other way:
W (scale * x + shift) + b = (W * scale) x + (b + W shift), with `scale` applied along W's
input-channel axis and W contracted with `shift` into the bias. Everything is computed in float64
and cast back to the dtype of the tensor it replaces exactly once.
"""

from __future__ import annotations

import numpy as np


class BadStatistics(ValueError):
    """BN parameters that would fold into garbage (NaN/Inf, var + eps <= 0)."""


def bn_scale_shift(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, shift) of an inference-mode BN, in float64, from four vectors of one
    size. They are stacked into one array so each check is one numpy call: this runs once per
    BN, and on a 20,000-BN network per-call overhead is the cost."""
    params = np.array((gamma, beta, mean, var), dtype=np.float64).reshape(4, -1)
    if not np.isfinite(params).all():
        bad = int(np.flatnonzero(~np.isfinite(params).all(axis=1))[0])
        raise BadStatistics(f"{('scale', 'B', 'input_mean', 'input_var')[bad]} holds NaN or Inf")
    gamma, beta, mean, var = params
    denom = var + np.float64(eps)
    if (denom <= 0).any():
        raise BadStatistics(f"input_var + epsilon <= 0 (min {denom.min():.3g})")
    scale = gamma / np.sqrt(denom)
    return scale, beta - mean * scale


def scale_along_axis(weight: np.ndarray, scale: np.ndarray, axis: int, groups: int = 1) -> np.ndarray:
    """Multiply `weight` by `scale` along its output-channel axis, in float64.

    With groups > 1 the output channels are split across groups on `axis` while the group index
    lives on axis 0 (ConvTranspose: weight [C_in, C_out/groups, k...], output channel
    o = g * C_out/groups + j for input-channel block g). `axis == 0` needs no group handling.
    """
    w = np.asarray(weight, dtype=np.float64)
    if groups == 1 or axis == 0:
        shape = [1] * w.ndim
        shape[axis] = -1
        return w * scale.reshape(shape)
    cin = w.shape[0]
    per_group = w.reshape((groups, cin // groups) + w.shape[1:])
    shape = [1] * per_group.ndim
    shape[0] = groups
    shape[axis + 1] = w.shape[axis]
    return (per_group * scale.reshape(shape)).reshape(w.shape)


CHUNK_BYTES = 2**20  # float64 work per step of scale_along_axis_cast


def scale_along_axis_cast(weight: np.ndarray, scale: np.ndarray, axis: int, groups: int = 1) -> np.ndarray:
    """`scale_along_axis` cast back to the weight's dtype (`cast_like`), a slice of axis 0 at a
    time: the float64 work then never holds more than about CHUNK_BYTES, where a 9 MB float32
    weight would otherwise need 38 MB at once. Element for element the same arithmetic."""
    per_row = weight.size // weight.shape[0] if weight.ndim and weight.shape[0] else 0
    if (groups > 1 and axis != 0) or not per_row or 8 * weight.size <= CHUNK_BYTES:
        return cast_like(scale_along_axis(weight, scale, axis, groups), weight.dtype)
    out = np.empty(weight.shape, weight.dtype)
    rows = max(1, CHUNK_BYTES // (8 * per_row))
    shape = [1] * weight.ndim
    shape[axis] = -1
    for start in range(0, weight.shape[0], rows):
        factor = scale[start:start + rows] if axis == 0 else scale
        out[start:start + rows] = cast_like(np.asarray(weight[start:start + rows], np.float64) * factor.reshape(shape), weight.dtype)
    return out


def input_channel_table(vector: np.ndarray, out_channels: int, groups: int = 1) -> np.ndarray:
    """[out, in/groups]: entry (o, j) is vector[g(o) * in/groups + j], g(o) = o // (out/groups).

    The per-input-channel value that output channel o sees at position j of its weight slice:
    with groups, output channel o only reads the input channels of its own group.
    """
    per_group = np.asarray(vector, dtype=np.float64).reshape(groups, -1)
    return per_group[np.arange(out_channels) // (out_channels // groups)]


def _out_in_first(weight, in_axis: int) -> np.ndarray:
    """The weight as float64 with the output axis first and the input axis second.

    in_axis 1 is the Conv layout [out, in/groups, k...]; in_axis 0 is a 2-D [in, out] matrix.
    """
    w = np.asarray(weight, dtype=np.float64)
    return w.T if in_axis == 0 else w


def scale_input_channels(weight: np.ndarray, scale: np.ndarray, in_axis: int = 1, groups: int = 1) -> np.ndarray:
    """W'[o, j, k...] = W[o, j, k...] * scale[g(o) * in/groups + j], in float64, same layout."""
    w = _out_in_first(weight, in_axis)
    table = input_channel_table(scale, w.shape[0], groups)
    scaled = w * table.reshape(table.shape + (1,) * (w.ndim - 2))
    return scaled.T if in_axis == 0 else scaled


def shift_through(weight: np.ndarray, shift: np.ndarray, in_axis: int = 1, groups: int = 1) -> np.ndarray:
    """[out]: sum over j, k... of W[o, j, k...] * shift[g(o) * in/groups + j], in float64.

    What a constant per-input-channel shift adds to every output of a linear op (no padding:
    every kernel tap reads a shifted input).
    """
    w = _out_in_first(weight, in_axis)
    taps = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)
    return (taps * input_channel_table(shift, w.shape[0], groups)).sum(axis=1)


def fold_bias(bias, scale: np.ndarray, shift: np.ndarray, channel_axis: int = -1) -> np.ndarray:
    """New bias = scale * bias + shift, broadcasting `bias` against the channel vector.

    `bias` may be None (absent), a scalar, or any shape that broadcasts with the output; the
    channel vector is laid along `channel_axis` of the result.
    """
    if bias is None:
        return shift.copy()
    b = np.asarray(bias, dtype=np.float64)
    ndim = max(b.ndim, 1)
    shape = [1] * ndim
    shape[channel_axis] = -1
    return b * scale.reshape(shape) + shift.reshape(shape)


def cast_like(value: np.ndarray, dtype) -> np.ndarray:
    """Cast a float64 result back to the model's dtype, once; an overflow becomes inf, which the
    rules check for (and keep the BN), so numpy's warning is not needed."""
    with np.errstate(over="ignore"):
        return np.asarray(value).astype(dtype)
