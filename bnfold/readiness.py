"""Quantization readiness of what a fold writes: per-channel weight spread and subnormals.

Folding scales each output channel of a layer by BN's gamma / sqrt(var + eps); a channel with a
tiny running variance is scaled by up to 1 / sqrt(eps) (about 316 for eps = 1e-5), so the
per-channel ranges of max|W| can spread far apart. Per-tensor int8 quantization sets one step
for the whole tensor from its widest channel (Nagel et al. 2019, "Data-Free Quantization
Through Weight Equalization and Bias Correction"): the narrow channels then round to a few
levels. `Readiness` notes the final weight of every layer a fold wrote into and reports the
layers whose spread exceeds THRESHOLD, so a user knows to quantize those per-channel.

A fold can also make float32 / float16 / bfloat16 subnormals (a tiny weight times a tiny
scale): CPUs handle those in microcode, many times slower, and they are below any quantization
step anyway. Every tensor a fold writes has them flushed to +0 here, and counted.

Pure numpy, no onnx: the layers' weight layouts come from the rules (bnfold.rules.base); the
report's ChannelSpread records are bnfold.report's (which, like the CLI, loads without numpy).
"""

from __future__ import annotations

import math

import numpy as np

from bnfold.report import ChannelSpread

# Per-tensor symmetric int8 has 127 levels on each side, their step set by the widest channel:
# a channel whose max|W| is 1/100 of the widest keeps about 127 / 100 = 1.3 levels, so its
# weights round to -1, 0 or +1 steps and the channel is effectively lost. Below that, ordinary
# layers (spreads of 10 to 30 are common before any fold) would be reported for nothing.
THRESHOLD = 100.0

# The smallest normal magnitude of each dtype flushed; below it (and above 0) is subnormal.
# float64 is left alone: the fold computes in float64, so a float64 subnormal only comes from
# inputs already at the edge of its range, and float64 models are not the ones run fast on CPU.
SMALLEST_NORMAL = {np.dtype(np.float32): 2.0**-126, np.dtype(np.float16): 2.0**-14, "bfloat16": 2.0**-126}

CHUNK_ELEMENTS = 2**17  # values looked at per step: the checks never copy a whole big weight


def flush_subnormals(array):
    """(array with its subnormals set to +0, how many there were), subnormal in the array's
    own dtype (float16 has its own range). Other dtypes, and anything not a plain ndarray,
    come back as they are with 0. The input is never changed: a copy is made when needed."""
    if not isinstance(array, np.ndarray) or not array.size:
        return array, 0
    tiny = SMALLEST_NORMAL.get(array.dtype)  # by dtype: dtype.name costs more than the check
    widen = tiny is None and array.dtype.kind == "V" and array.dtype.name == "bfloat16"  # ml_dtypes'
    tiny = SMALLEST_NORMAL["bfloat16"] if widen else tiny
    if tiny is None:
        return array, 0
    flat, out, count = np.ravel(array), array, 0
    for start in range(0, flat.size, CHUNK_ELEMENTS):
        part = flat[start:start + CHUNK_ELEMENTS]
        part = part.astype(np.float32) if widen else part
        below = np.abs(part) < tiny  # zeros too, told apart only where there is any
        found = int(np.count_nonzero(part[below])) if below.any() else 0
        if found:
            if out is array:
                out = np.array(array, order="C")
            out.reshape(-1)[start:start + CHUNK_ELEMENTS][below & (part != 0)] = 0
            count += found
    return out, count


def channel_maxima(weight: np.ndarray, axis: int, groups: int = 1) -> np.ndarray:
    """float64 [C]: max|W| of each output channel over every other axis.

    With groups > 1 and axis > 0 (ConvTranspose [C_in, C_out/groups, k...]) output channel
    o = g * C_out/groups + j is slice j of `axis` within input-channel block g of axis 0.
    max|W| is exact in the weight's own dtype (bfloat16 through float32), so no float64 copy.
    """
    w = np.asarray(weight)
    if axis == 0:
        groups = 1
    outer = math.prod(w.shape[:axis]) // groups
    per_group, inner = w.shape[axis], math.prod(w.shape[axis + 1:])
    blocks = w.reshape(groups, outer, per_group, inner)
    if w.size <= CHUNK_ELEMENTS:
        return _abs_max(blocks, (1, 3)).reshape(-1)
    maxima = np.zeros((groups, per_group))
    if axis == 0:  # one channel is a row: slices of rows
        rows = max(1, CHUNK_ELEMENTS // max(1, inner))
        for start in range(0, per_group, rows):
            maxima[0, start:start + rows] = _abs_max(blocks[0, 0, start:start + rows], 1)
        return maxima.reshape(-1)
    step = max(1, CHUNK_ELEMENTS // max(1, per_group * inner))
    for g in range(groups):
        for start in range(0, outer, step):
            np.maximum(maxima[g], _abs_max(blocks[g, start:start + step], (0, 2)), out=maxima[g])
    return maxima.reshape(-1)


def _abs_max(values: np.ndarray, axis) -> np.ndarray:
    """max|values| over `axis`, as float64 (0 over no values)."""
    if values.dtype.kind == "V":  # ml_dtypes' bfloat16: through float32, exactly
        values = values.astype(np.float32)
    return np.abs(values).max(axis=axis, initial=0).astype(np.float64)


def spread_of(maxima: np.ndarray) -> float | None:
    """Largest / smallest per-channel max|W|, over the channels that are not all zero: an
    all-zero channel outputs its bias alone and quantizes exactly at any step, so it loses
    nothing. None when no channel has a nonzero weight (nothing to quantize)."""
    nonzero = maxima[maxima > 0]
    if not nonzero.size:
        return None
    return float(nonzero.max() / nonzero.min())


def channel_spread(weight: np.ndarray, out_axis: int, groups: int = 1) -> float | None:
    """The spread (`spread_of`) of a weight's output channels on `out_axis` (see channel_maxima)."""
    return spread_of(channel_maxima(weight, out_axis, groups))


class Readiness:
    """What the folds of one model wrote, for the report: subnormals flushed so far, and the
    per-channel maxima of each layer's latest folded weight. A layer folded twice (a BN before
    and one after it) is written twice, the second time whole: its last write is the final
    weight, so only that one's maxima are kept (C floats, not the weight)."""

    def __init__(self) -> None:
        self.subnormals_flushed = 0
        self._layers: dict[int, tuple[object, str, str, np.ndarray]] = {}

    def flush(self, array):
        """`flush_subnormals`, counted; None and non-ndarrays pass through unchanged."""
        if array is None:
            return None
        array, count = flush_subnormals(array)
        self.subnormals_flushed += count
        return array

    def note_weight(self, node, layer: str, graph: str, weight: np.ndarray, axis: int, groups: int = 1) -> None:
        """Layer `node` (named `layer` in graph `graph`) now has `weight`, output channels on
        `axis`. The node is held, so that its identity stays its own while the fold runs."""
        self._layers[id(node)] = (node, layer, graph, channel_maxima(weight, axis, groups))

    def spreads(self, threshold: float = THRESHOLD) -> tuple[ChannelSpread, ...]:
        """The layers whose final weight's spread exceeds `threshold`, worst first."""
        found = []
        for _, layer, graph, maxima in self._layers.values():
            ratio = spread_of(maxima)
            if ratio is not None and ratio > threshold:
                zero = int(np.count_nonzero(maxima == 0))
                found.append(ChannelSpread(layer, ratio, len(maxima), graph, zero_channels=zero))
        return tuple(sorted(found, key=lambda s: (-s.ratio, s.graph, s.layer)))
