"""Where a layer's constant input comes from, read and written through one abstraction.

A rule reads a layer's weight as the float values the layer sees, and writes the folded weight
as "the old weight times a per-channel factor along an axis" (`scaled`) and a bias as new float
values with the factor that scaled the weight (`rebiased`). Where the values come from decides
how the write is made, and whether it can be made exactly:

- a constant (initializer, Constant node, constant subgraph): a new float tensor;
- `DequantizeLinear(q, scale, zero_point)` of stored integers (QDQ exports, onnxruntime's
  quantize_static): the factor's magnitude goes into the scale (a per-tensor scale becomes
  per-channel along the layer's output-channel axis), the integers keep their grid, and a negative
  factor negates a channel's integers about its zero point, where they stay in range;
- `DequantizeLinear(QuantizeLinear(W, scale, zero_point), ...)` over a float W (fake-quantized,
  as quantization-aware training exports it): W and both scales take the factor, and the integers
  QuantizeLinear will compute are checked to be the old ones (negated where the factor is);
- an int32 bias through its own DequantizeLinear is quantized again with the scale scaled the
  same way (scale = input scale x weight scale); the shift rounds to its nearest step.

A write that cannot be exact returns the reason instead, and the rule keeps the BN with it. A
DequantizeLinear (or QuantizeLinear) that other nodes read as well is copied, never changed for
them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from bnfold import algebra
from bnfold.graph import DEFAULT_DOMAINS, GraphIndex, attribute, node_label

# The integer types a DequantizeLinear may read, with their ranges.
_RANGES = {
    onnx.TensorProto.INT8: (-128, 127), onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT16: (-(2**15), 2**15 - 1), onnx.TensorProto.UINT16: (0, 2**16 - 1),
    onnx.TensorProto.INT4: (-8, 7), onnx.TensorProto.UINT4: (0, 15),
    onnx.TensorProto.INT32: (-(2**31), 2**31 - 1),
}
_NP_TO_ONNX = {np.dtype(np.int8): onnx.TensorProto.INT8, np.dtype(np.uint8): onnx.TensorProto.UINT8,
               np.dtype(np.int16): onnx.TensorProto.INT16, np.dtype(np.uint16): onnx.TensorProto.UINT16,
               np.dtype(np.int32): onnx.TensorProto.INT32}
FOLD_BEFORE_QUANTIZING = "fold before quantizing: run bnfold on the float model, then quantize"


def _integer_type(array: np.ndarray) -> int | None:
    found = _NP_TO_ONNX.get(array.dtype)
    if found is None and array.dtype.name in ("int4", "uint4"):
        return onnx.TensorProto.INT4 if array.dtype.name == "int4" else onnx.TensorProto.UINT4
    return found


@dataclasses.dataclass(frozen=True)
class Quantized:
    """A layer input made by DequantizeLinear: y = (q - zero_point) * scale, per tensor or per
    channel along `axis`. `q_node` is the QuantizeLinear over a float constant `float_weight`
    (fake-quantized), else None and `stored` is the integer initializer."""

    dq: onnx.NodeProto
    q_node: onnx.NodeProto | None
    stored: np.ndarray  # the integers: the initializer's, or what QuantizeLinear makes of W
    float_weight: np.ndarray | None
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int | None  # None: per tensor
    integer_type: int
    opset: int

    @property
    def label(self) -> str:
        return f"DequantizeLinear '{node_label(self.dq)}'"

    @property
    def values(self) -> np.ndarray:
        """What the layer reads, computed as onnxruntime does: int32 difference times the scale."""
        return dequantize(self.stored, self.scale, self.zero_point, self.axis)


def dequantize(stored: np.ndarray, scale: np.ndarray, zero_point, axis: int | None) -> np.ndarray:
    q = np.asarray(stored).astype(np.int64)
    if zero_point is not None:
        q = q - _along(np.asarray(zero_point).astype(np.int64), axis, q.ndim)
    return (q.astype(np.float32) * _along(np.asarray(scale, np.float32), axis, q.ndim)).astype(scale.dtype)


def quantize(weight: np.ndarray, scale: np.ndarray, zero_point, axis: int | None, integer_type: int) -> np.ndarray:
    """What QuantizeLinear computes, as int64: round half to even of weight / scale in float32,
    plus the zero point, saturated to the type's range."""
    low, high = _RANGES[integer_type]
    ratio = np.asarray(weight, np.float32) / _along(np.asarray(scale, np.float32), axis, np.ndim(weight))
    q = np.rint(ratio).astype(np.int64)
    if zero_point is not None:
        q = q + _along(np.asarray(zero_point).astype(np.int64), axis, q.ndim)
    return np.clip(q, low, high)


def _along(vector: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast along `axis` (None: a per-tensor value)."""
    if axis is None or vector.ndim == 0:
        return vector.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def quantized_source(graph: GraphIndex, name: str) -> Quantized | str | None:
    """The DequantizeLinear making `name`, read as a Quantized; a reason (str) when it is one
    this module does not fold through; None when `name` is not made by a DequantizeLinear."""
    dq = graph.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in DEFAULT_DOMAINS:
        return None
    opset = graph.model.opset(dq.domain)
    label = f"DequantizeLinear '{node_label(dq)}'"
    if attribute(dq, "block_size", 0):
        return f"{label} is blocked (block_size {attribute(dq, 'block_size', 0)}), which is not folded"
    scale = graph.constant(dq.input[1]) if len(dq.input) > 1 else None
    zero_point = graph.constant(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if scale is None or scale.dtype not in (np.float32, np.float16):
        return f"{label} scale is not a float32/float16 constant"
    if len(dq.input) > 2 and dq.input[2] and zero_point is None:
        return f"{label} zero point is not a constant"
    q_node, float_weight, stored = None, None, graph.constant(dq.input[0])
    if stored is None:
        q_node = graph.producer.get(dq.input[0])
        fake = _fake_quantized(graph, dq, q_node, scale, zero_point)
        if isinstance(fake, str):
            return fake
        float_weight = fake
    integer_type = _integer_type(zero_point if zero_point is not None else stored) if stored is not None else None
    if float_weight is not None:
        integer_type = _integer_type(zero_point) if zero_point is not None else onnx.TensorProto.UINT8
    if integer_type is None:
        kind = (zero_point if zero_point is not None else stored).dtype
        return f"{label} reads {kind} values, which are not folded"
    rank = np.ndim(float_weight if float_weight is not None else stored)
    axis = None  # a scale of one value is per tensor, whatever its rank
    if scale.size > 1:
        axis = attribute(dq, "axis", 1)
        axis = axis + rank if axis < 0 else axis
        if scale.ndim != 1 or not 0 <= axis < rank or np.shape(float_weight if float_weight is not None else stored)[axis] != scale.size:
            return f"{label} scale of shape {list(scale.shape)} does not fit axis {attribute(dq, 'axis', 1)}"
    if float_weight is not None:
        stored = quantize(float_weight, scale, zero_point, axis, integer_type)
    return Quantized(dq, q_node, np.asarray(stored), float_weight, scale, zero_point, axis, integer_type, opset)


def _fake_quantized(graph: GraphIndex, dq, q_node, scale, zero_point) -> np.ndarray | str:
    """W of DequantizeLinear(QuantizeLinear(W, s, z), s, z) over a float constant W, or why not."""
    label = f"DequantizeLinear '{node_label(dq)}'"
    if q_node is None or q_node.op_type != "QuantizeLinear" or q_node.domain not in DEFAULT_DOMAINS:
        return f"{label} input is not a constant (it comes from {graph.describe_source(dq.input[0])})"
    weight = graph.constant(q_node.input[0])
    if weight is None or weight.dtype not in (np.float32, np.float16):
        return f"{label} input comes from QuantizeLinear '{node_label(q_node)}' of a non-constant"
    if attribute(q_node, "block_size", 0) or attribute(q_node, "output_dtype", 0) or attribute(q_node, "saturate", 1) != 1:
        return f"QuantizeLinear '{node_label(q_node)}' has attributes this fold does not model"
    q_scale = graph.constant(q_node.input[1]) if len(q_node.input) > 1 else None
    has_zp = len(q_node.input) > 2 and bool(q_node.input[2])
    q_zero = graph.constant(q_node.input[2]) if has_zp else None
    same_zero = (q_zero is None and zero_point is None) or (
        q_zero is not None and zero_point is not None and q_zero.dtype == zero_point.dtype and np.array_equal(q_zero, zero_point))
    if q_scale is None or not np.array_equal(q_scale, scale) or not same_zero or (has_zp and q_zero is None):
        return f"QuantizeLinear '{node_label(q_node)}' and {label} differ in scale or zero point"
    if attribute(q_node, "axis", 1) != attribute(dq, "axis", 1) and scale.size > 1:
        return f"QuantizeLinear '{node_label(q_node)}' and {label} differ in axis"
    readers = [n for n in graph.users(dq.input[0]) if n is not dq]
    if readers or graph.is_graph_output(dq.input[0]):
        return f"QuantizeLinear '{node_label(q_node)}' output is read elsewhere too"
    return weight


# ------------------------------------------------------------------------------------ writes


@dataclasses.dataclass(frozen=True)
class QuantizedWrite:
    """New constants for a Quantized source; `value` is what the layer then reads."""

    source: Quantized
    value: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int | None
    stored: np.ndarray | None = None  # new integers (stored source), None: unchanged
    float_weight: np.ndarray | None = None  # new W (fake-quantized source)
    rounding: float | None = None  # a bias quantized again: its largest rounding, in steps (<= 0.5)

    def apply(self, graph: GraphIndex, node: onnx.NodeProto, position: int) -> None:
        """Rewrite the DequantizeLinear (and QuantizeLinear) that feed input `position` of
        `node`, copying them first when other nodes read them."""
        dq, q_node = self.source.dq, self.source.q_node
        if any(n is not node for n in graph.users(dq.output[0])) or graph.is_graph_output(dq.output[0]):
            if q_node is not None:
                q_node = graph.copy_node(q_node)
            dq = graph.copy_node(dq)
            if q_node is not None:
                graph.set_input(dq, 0, q_node.output[0])
            graph.set_input(node, position, dq.output[0])
        base = node_label(dq)
        if self.float_weight is not None:
            graph.set_constant_input(q_node, 0, self.float_weight, f"{q_node.input[0]}_bnfold")
        elif self.stored is not None:
            graph.set_constant_input(dq, 0, self.stored, f"{dq.input[0]}_bnfold")
        for quantizer in (q_node, dq):
            if quantizer is None:
                continue
            graph.set_constant_input(quantizer, 1, self.scale, f"{base}_scale_bnfold")
            if self.zero_point is not None:
                graph.set_constant_input(quantizer, 2, self.zero_point, f"{base}_zero_point_bnfold")
            if self.axis is not None:
                graph.set_attribute(quantizer, "axis", self.axis)


def scaled(source: Quantized, factor: np.ndarray, axis: int, groups: int = 1) -> QuantizedWrite | str:
    """The source times `factor` along `axis` (the layer's output channels), exactly, or why not."""
    if groups > 1 and axis != 0:
        return f"weight is quantized ({source.label}) and grouped along axis {axis}, which is not folded"
    if source.axis is not None and source.axis != axis:
        return f"weight is quantized along axis {source.axis} ({source.label}), but BN scales axis {axis}"
    if source.axis is None and source.opset < 13 and not np.all(np.abs(factor) == abs(factor[0])):
        return f"weight is quantized per tensor by {source.label} of opset {source.opset}, which has no per-channel scales (opset 13 has)"
    channels = source.stored.shape[axis]
    if factor.shape != (channels,):
        return f"weight has {channels} channels along axis {axis}, BN {factor.shape[0]}"
    magnitude = np.abs(factor)
    if not np.all(magnitude > 0):
        return f"BN scale is 0 on channel {int(np.flatnonzero(magnitude == 0)[0])}: a quantization scale cannot be 0"
    # per channel along the layer's axis; before opset 13 (no per-channel scales) the magnitude
    # is the same on every channel (checked above) and the scale stays one value
    per_channel = source.axis is not None or source.opset >= 13
    out_axis = axis if per_channel else None
    scale64 = np.asarray(source.scale, np.float64) * (magnitude if per_channel else magnitude[0])
    scale = algebra.cast_like(np.broadcast_to(scale64, (channels,)) if per_channel else scale64, source.scale.dtype)
    if not np.all(np.isfinite(scale)) or not np.all(np.abs(scale) >= np.finfo(scale.dtype).tiny):
        return "the scaled quantization scale leaves the float range"
    zero_point = source.zero_point
    if zero_point is not None and per_channel and source.axis is None:  # per channel too, as the scale now is
        zero_point = np.full(channels, source.zero_point.reshape(()))
    negative = factor < 0
    expected = _negated(source, negative, axis)
    if isinstance(expected, str):
        return expected
    if source.float_weight is not None:
        new_weight = algebra.scale_along_axis_cast(source.float_weight, factor, axis)
        got = quantize(new_weight, scale, zero_point, out_axis, source.integer_type)
        moved = int(np.count_nonzero(got != expected))
        if moved:
            return f"{moved} quantized weights would move by a step when folded ({source.label})"
        value = dequantize(got, scale, zero_point, out_axis)
        return QuantizedWrite(source, value, scale, zero_point, out_axis, float_weight=new_weight)
    stored = expected.astype(source.stored.dtype) if negative.any() else None
    value = dequantize(expected, scale, zero_point, out_axis)
    return QuantizedWrite(source, value, scale, zero_point, out_axis, stored=stored)


def _negated(source: Quantized, negative: np.ndarray, axis: int) -> np.ndarray | str:
    """The integers (int64) with the channels `negative` along `axis` negated about the zero
    point, q' = 2 * zp - q; why not when one leaves the integer type's range."""
    stored = source.stored.astype(np.int64)
    if not negative.any():
        return stored
    zero = np.asarray(source.zero_point if source.zero_point is not None else 0).astype(np.int64)
    flipped = np.where(_along(negative, axis, stored.ndim), 2 * _along(zero, source.axis, stored.ndim) - stored, stored)
    low, high = _RANGES[source.integer_type]
    outside = (flipped < low) | (flipped > high)
    if outside.any():
        channel = int(np.flatnonzero(np.moveaxis(outside, axis, 0).reshape(negative.size, -1).any(axis=1))[0])
        return (f"BN scale is negative on channel {channel} and its quantized weights there cannot be negated "
                f"within {onnx.TensorProto.DataType.Name(source.integer_type).lower()} (zero point or the range's low end)")
    return flipped


def rebiased(source: Quantized, bias64: np.ndarray, factor: np.ndarray) -> QuantizedWrite | str:
    """An int32 bias quantized again: scale' = scale * |factor| (the weight's scale changed so),
    integers = round(new bias / scale'); the shift moves by at most half a step."""
    if source.float_weight is not None or source.stored.ndim != 1 or source.integer_type != onnx.TensorProto.INT32:
        return f"bias is quantized ({source.label}) other than as an int32 vector"
    if source.zero_point is not None and np.any(source.zero_point != 0):
        return f"bias is quantized ({source.label}) with a non-zero zero point"
    channels = bias64.shape[0]
    if source.axis is None and source.opset < 13 and not np.all(np.abs(factor) == abs(factor[0])):
        return f"bias is quantized per tensor by {source.label} of opset {source.opset}, which has no per-channel scales"
    magnitude = np.abs(factor)
    if not np.all(magnitude > 0):
        return "BN scale is 0 on a channel: a quantization scale cannot be 0"
    per_channel = source.axis is not None or source.opset >= 13  # else one scale (same magnitudes)
    scale64 = np.asarray(source.scale, np.float64) * (magnitude if per_channel else magnitude[0])
    scale = algebra.cast_like(np.broadcast_to(scale64, (channels,)) if per_channel else scale64, source.scale.dtype)
    integers = np.rint(bias64 / np.broadcast_to(scale.astype(np.float64), (channels,)))
    low, high = _RANGES[onnx.TensorProto.INT32]
    if not np.all(np.isfinite(integers)) or integers.min() < low or integers.max() > high:
        return "the folded bias overflows int32 at its quantization scale"
    stored = integers.astype(np.int32)
    zero_point = source.zero_point
    if zero_point is not None and per_channel:
        zero_point = np.zeros(channels, np.int32)
    axis = 0 if per_channel else None
    value = dequantize(stored, scale, zero_point, axis)
    rounding = float(np.abs(bias64 / np.broadcast_to(scale.astype(np.float64), (channels,)) - integers).max(initial=0.0))
    return QuantizedWrite(source, value, scale, zero_point, axis, stored=stored, rounding=rounding)
