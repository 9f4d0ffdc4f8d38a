"""Hypothesis strategies: random valid ONNX graphs with BatchNormalization, for the property tests.

`graph_cases()` builds a DAG step by step from a pool of values whose static shapes the builder
tracks: Conv (1-D/2-D/3-D, groups incl. depthwise, pads/strides/dilations/auto_pad, bias or not),
ConvTranspose (groups), Gemm (transA/transB, alpha/beta, C absent/scalar/[N]/[1,N]/[M,N]/[M,1]),
MatMul (2-D and rank-3, optionally + Add bias), Add, Mul, Relu, Identity, Concat, Flatten,
Reshape and BatchNormalization (opset 9/13 = BN-9, 14, 15/17 = BN-15) before and after them.
Inputs are mostly the newest value (chains), sometimes an older one (DAG, fan-out); some linear ops
reuse an existing weight (shared initializers); graph outputs are every unread value plus random
intermediates (producer and BN outputs included), in random order.

With `quantized=True` (float32, or float16 from opset 19), layer weights (Conv W, ConvTranspose W,
Gemm B, MatMul B) mostly come from DequantizeLinear instead (`quantize_weight`): stored int8 /
uint8 integers, or a fake-quantized float W through QuantizeLinear -> DequantizeLinear; per tensor,
or per channel along the layer's output-channel axis (opset 13+); zero point 0, 128 or another
one, sometimes absent; sometimes an integer at the type's low end (a channel a negative BN scale
cannot negate); sometimes one DequantizeLinear read by two layers, or two reading one
QuantizeLinear; float32 biases sometimes int32 through DequantizeLinear. The quantized model is
the reference: its outputs are what the folded model must compute.

Structure comes from hypothesis draws (so failures shrink); tensor contents come from a numpy rng
seeded by one drawn integer. The builder records what the property test must know and cannot
read back reliably from the model: each BN's mode and whether its parameters are constant, and
which Conv nodes pad.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from conftest import NP_TO_ONNX, make_model

DTYPES = (np.float32, np.float64, np.float16)
OPSETS = (9, 13, 14, 15, 17)  # BN-9 (9, 13), BN-14, BN-15 (15, 17)
# With quantized weights: DequantizeLinear exists from opset 10 (per tensor only before 13), and
# reads float16 scales (so makes float16 weights) from 19; float64 has no DequantizeLinear.
QUANTIZED_OPSETS = (10, 13, 13, 14, 15, 17, 19, 21)
QUANTIZED_FLOAT16_OPSETS = (19, 21)
MAX_CHANNELS = 12
MAX_SPATIAL = 9
MAX_STEPS = 12


@dataclasses.dataclass
class Value:
    name: str
    shape: tuple[int, ...]
    depth: int  # ops on the longest path from a graph input (tolerance grows with it)


@dataclasses.dataclass(frozen=True)
class BnFacts:
    """What the generator put in: a BN's mode and whether all four parameters are constants."""

    output: str  # the BN's output 0, which names it
    training: bool
    constant_params: bool


@dataclasses.dataclass(frozen=True)
class QuantFacts:
    """What the generator put behind a quantized layer weight (DequantizeLinear `dq`)."""

    dq: str  # the DequantizeLinear's node name
    fake: bool  # QuantizeLinear(float W) -> DequantizeLinear, else stored integers
    integer: str  # "int8" or "uint8"
    zero_point: str  # "0", "128", "per channel", "absent" (0 of the integers' type) ...
    axis: int | None  # the per-channel axis (negative as written; 1 where left to the default); None: per tensor
    low_end: bool  # some integers were set to the type's low end


@dataclasses.dataclass
class GraphCase:
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    dtype: np.dtype
    bns: dict[str, BnFacts]  # by output name
    padded_convs: frozenset[str]  # Conv labels with non-zero padding (explicit pads or SAME)
    depth: dict[str, int]  # graph output -> ops on its longest path
    shapes: dict[str, tuple[int, ...]]  # every activation's static shape (as fed)
    steps: list[str]
    unsafe: str | None = None  # output of a BN that must stay (see unsafe_bn)
    quantized: dict[str, QuantFacts] = dataclasses.field(default_factory=dict)  # by the DequantizeLinear's output

    def describe(self) -> str:
        """The steps, the model in ONNX text form (onnx.parser reads it back) and the feeds: a
        failing example rebuilt from this alone."""
        feeds = {k: (v.dtype.name, list(v.shape), v.reshape(-1).tolist()) for k, v in self.feeds.items()}
        return f"steps: {self.steps}\n{onnx.printer.to_text(self.model)}\nfeeds (dtype, shape, values): {feeds}"


class Builder:
    """A growing graph: nodes, initializers, inputs, the value pool and the facts recorded."""

    def __init__(self, draw, dtype, opset: int, rng: np.random.Generator, quantize: bool = False):
        self.draw, self.dtype, self.opset, self.rng = draw, np.dtype(dtype), opset, rng
        self.quantize = quantize  # layer weights may come from DequantizeLinear (layer_weight)
        self.quantized: dict[str, QuantFacts] = {}  # by DequantizeLinear output
        self.dequantized: dict[str, tuple] = {}  # DequantizeLinear output -> (inputs, attributes, facts, shape)
        self.scales: dict[tuple, list] = {}  # per-tensor (scale name, value, zero point names) by (dtype, integer, zero point)
        self.side_outputs: list[Value] = []  # DequantizeLinear outputs that are graph outputs too
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.feeds: dict[str, np.ndarray] = {}
        self.values: list[Value] = []
        self.readers: dict[str, int] = {}
        self.weights: dict[tuple, list[str]] = {}  # (role, shape, dtype) -> initializer names
        self.bns: dict[str, BnFacts] = {}
        self.padded: set[str] = set()
        self.steps: list[str] = []
        self.forced_outputs: set[str] = set()
        self.unsafe: str | None = None
        self.count = 0

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def constant(self, value: np.ndarray, prefix: str, role: str | None = None) -> str:
        """An initializer (or, sometimes, a Constant node) holding `value`; with a `role`, an
        existing constant of the same role and shape is sometimes reused (shared weights)."""
        key = (role, value.shape, value.dtype.str)
        if role and self.weights.get(key) and self.draw(st.integers(0, 3)) == 0:
            return self.draw(st.sampled_from(self.weights[key]))
        name = self.fresh(prefix)
        if self.draw(st.integers(0, 9)) == 0:
            tensor = numpy_helper.from_array(value, f"{name}_value")
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const", value=tensor))
        else:
            self.inits.append(numpy_helper.from_array(value, name))
        if role:
            self.weights.setdefault(key, []).append(name)
        return name

    def layer_weight(self, value: np.ndarray, prefix: str, role: str, out_axis: int, per_channel: bool = True) -> str:
        """A layer's weight `value`: a float constant (`constant`), or, when the builder quantizes,
        usually a DequantizeLinear output (`quantize_weight`), sometimes one an earlier layer of the
        same role and shape reads too. `out_axis`: the weight's output-channel axis; `per_channel`:
        whether a per-channel quantization along it fits the layer."""
        if not self.quantize or self.draw(st.integers(0, 3)) == 0:
            return self.constant(value, prefix, role)
        key = (f"quantized {role}", value.shape, value.dtype.str)
        if self.weights.get(key) and self.draw(st.integers(0, 2)) == 0:
            earlier = self.draw(st.sampled_from(self.weights[key]))
            return dequantize_again(self, earlier, prefix) if self.draw(st.integers(0, 2)) == 0 else earlier
        name = quantize_weight(self, value, prefix, out_axis, per_channel)
        self.weights.setdefault(key, []).append(name)
        return name

    def layer_bias(self, value: np.ndarray, prefix: str, role: str | None = None) -> str:
        """A layer's bias: a float constant, or, when the builder quantizes a float32 model,
        sometimes an int32 DequantizeLinear output (`quantize_bias`)."""
        if not self.quantize or self.dtype != np.float32 or self.draw(st.integers(0, 2)):
            return self.constant(value, prefix, role)
        return quantize_bias(self, value, prefix)

    def random(self, shape, scale=1.0) -> np.ndarray:
        return (self.rng.normal(0, scale, shape)).astype(self.dtype)

    def node(self, op: str, inputs: list[str], shape, depth: int, label=None, n_outputs=1, **attrs) -> Value:
        outputs = [self.fresh("v")] + [self.fresh("aux") for _ in range(n_outputs - 1)]
        name = label if label is not None else self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name or None, **attrs))
        for i in inputs:
            self.readers[i] = self.readers.get(i, 0) + 1
        value = Value(outputs[0], tuple(int(d) for d in shape), depth)
        self.values.append(value)
        self.steps.append(f"{op}{list(value.shape)}")
        return value

    def pick(self, ok=lambda v: True) -> Value | None:
        """The newest value that fits (a chain), or sometimes an older one (a DAG, fan-out)."""
        fits = [v for v in self.values if ok(v)]
        if not fits:
            return None
        if len(fits) == 1 or self.draw(st.integers(0, 2)):
            return fits[-1]
        return self.draw(st.sampled_from(fits))

    def partner(self, v: Value, same=lambda a, b: a.shape == b.shape) -> Value | None:
        """Another value (or `v` itself: fan-out) that can be combined with `v`."""
        fits = [w for w in self.values if same(v, w)]
        return self.draw(st.sampled_from(fits)) if fits else None


# --------------------------------------------------------------------------- linear ops


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def conv(b: Builder, v: Value) -> Value | None:
    cin, spatial = v.shape[1], v.shape[2:]
    groups = b.draw(st.sampled_from(_divisors(cin)))
    cout = groups * b.draw(st.integers(1, max(1, min(3, MAX_CHANNELS // groups))))
    if cout > MAX_CHANNELS:
        return None
    mode = b.draw(st.sampled_from(["unpadded", "unpadded", "padded", "padded", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    attrs, kernel, out, padded = _conv_geometry(b, spatial, mode)
    w = b.layer_weight(b.random([cout, cin // groups, *kernel], 1 / math.sqrt(cin // groups * math.prod(kernel))), "W", "conv", 0)
    inputs = [v.name, w]
    if b.draw(st.booleans()):
        inputs.append(b.layer_bias(b.random([cout]), "B", "conv_bias"))
    if groups > 1 or b.draw(st.booleans()):
        attrs["group"] = groups
    result = b.node("Conv", inputs, (v.shape[0], cout, *out), v.depth + 1, **attrs)
    if padded:
        b.padded.add(b.nodes[-1].name)
    return result


def _conv_geometry(b: Builder, spatial, mode: str):
    """Conv attributes, kernel, output size, and whether it pads (explicit pads or SAME)."""
    auto_pad = mode if mode in ("VALID", "SAME_UPPER", "SAME_LOWER") else "NOTSET"
    kernel, strides, dilations, pads, out = [], [], [], [], []
    for size in spatial:
        stride = b.draw(st.sampled_from([1, 1, 2]))
        dilation = 1 if auto_pad != "NOTSET" else b.draw(st.sampled_from([1, 1, 1, 2]))
        grows = mode == "padded" and size < MAX_SPATIAL  # padding may grow the size by 2
        begin, end = (b.draw(st.integers(0, 1)), b.draw(st.integers(0, 1))) if grows else (0, 0)
        room = size + begin + end
        k = b.draw(st.integers(1, max(1, min(3, (room - 1) // dilation + 1))))
        extent = (k - 1) * dilation + 1
        if auto_pad.startswith("SAME"):
            n = math.ceil(size / stride)
            total = max(0, (n - 1) * stride + extent - size)
            begin, end = total - total // 2, total // 2
        else:
            n = (room - extent) // stride + 1
        kernel.append(k), strides.append(stride), dilations.append(dilation), pads.append((begin, end)), out.append(n)
    attrs = {"kernel_shape": kernel} if b.draw(st.booleans()) else {}
    if any(s != 1 for s in strides) or b.draw(st.booleans()):
        attrs["strides"] = strides
    if any(d != 1 for d in dilations):
        attrs["dilations"] = dilations
    if auto_pad != "NOTSET":
        attrs["auto_pad"] = auto_pad
    elif any(p != (0, 0) for p in pads) or b.draw(st.booleans()):
        attrs["pads"] = [p[0] for p in pads] + [p[1] for p in pads]
    padded = any(p != (0, 0) for p in pads)
    return attrs, kernel, out, padded


def conv_transpose(b: Builder, v: Value) -> Value | None:
    cin, spatial = v.shape[1], v.shape[2:]
    if max(spatial) >= MAX_SPATIAL:
        return None
    # float64 runs on onnx.reference (onnxruntime has no float64 ConvTranspose kernel), whose
    # ConvTranspose crashes or is wrong with group > 1: grouped ones are float32/float16 only.
    groups = 1 if b.dtype == np.float64 else b.draw(st.sampled_from(_divisors(cin)))
    cout = groups * b.draw(st.integers(1, max(1, min(3, MAX_CHANNELS // groups))))
    if cout > MAX_CHANNELS:
        return None
    kernel, strides, pads, extra, out = [], [], [], [], []
    for size in spatial:
        stride = b.draw(st.sampled_from([1, 2])) if size * 2 <= MAX_SPATIAL else 1
        k = b.draw(st.integers(1, 3))
        begin, end = b.draw(st.integers(0, k - 1)), b.draw(st.integers(0, k - 1))
        output_padding = b.draw(st.integers(0, stride - 1))
        n = stride * (size - 1) + output_padding + k - begin - end
        if n < 1 or n > MAX_SPATIAL + 2:
            begin, end, output_padding, n = 0, 0, 0, stride * (size - 1) + k
        kernel.append(k), strides.append(stride), pads.append((begin, end)), extra.append(output_padding), out.append(n)
    # Per channel along axis 1 fits group 1 only (with groups, axis 1 holds C_out/group channels).
    w = b.layer_weight(b.random([cin, cout // groups, *kernel], 1 / math.sqrt(cin // groups)), "Wt", "deconv", 1, groups == 1)
    inputs = [v.name, w] + ([b.layer_bias(b.random([cout]), "Bt", "deconv_bias")] if b.draw(st.booleans()) else [])
    attrs = {"strides": strides, "pads": [p[0] for p in pads] + [p[1] for p in pads]}
    if any(extra):
        attrs["output_padding"] = extra
    if groups > 1 or b.draw(st.booleans()):
        attrs["group"] = groups
    return b.node("ConvTranspose", inputs, (v.shape[0], cout, *out), v.depth + 1, **attrs)


GEMM_C = ("absent", "scalar", "[N]", "[1,N]", "[M,N]", "[M,1]")
COEFFICIENTS = (1.0, 1.0, 0.5, 2.0, -1.5, 0.25)


def gemm(b: Builder, v: Value) -> Value:
    trans_a, trans_b = b.draw(st.booleans()), b.draw(st.booleans())
    m, k = (v.shape[1], v.shape[0]) if trans_a else v.shape
    n = b.draw(st.integers(1, 8))
    weight = b.layer_weight(b.random([n, k] if trans_b else [k, n], 1 / math.sqrt(k)), "Wg", "gemm", 0 if trans_b else 1)
    c_kind = b.draw(st.sampled_from(GEMM_C if b.opset >= 11 else GEMM_C[1:]))  # C is required before Gemm-11
    c_shape = {"scalar": [], "[N]": [n], "[1,N]": [1, n], "[M,N]": [m, n], "[M,1]": [m, 1]}.get(c_kind)
    inputs = [v.name, weight] + ([] if c_shape is None else [b.layer_bias(b.random(c_shape), "C")])
    attrs = {"alpha": b.draw(st.sampled_from(COEFFICIENTS)), "beta": b.draw(st.sampled_from(COEFFICIENTS))}
    attrs = {key: val for key, val in attrs.items() if val != 1.0 or b.draw(st.booleans())}
    if trans_a or b.draw(st.booleans()):
        attrs["transA"] = int(trans_a)
    if trans_b or b.draw(st.booleans()):
        attrs["transB"] = int(trans_b)
    out = b.node("Gemm", inputs, (m, n), v.depth + 1, **attrs)
    b.steps[-1] += f"(C {c_kind}, transA {int(trans_a)}, transB {int(trans_b)})"
    return out


def matmul(b: Builder, v: Value) -> Value:
    """x [.., K] @ W [K, N], any rank; sometimes + a bias (a Linear layer), either operand order.
    On rank 3 and more, N is often axis 1's size: a BN after it then has matching channels but
    normalises axis 1, not N (the fold that must not happen)."""
    k, n = v.shape[-1], b.draw(st.integers(1, 8))
    if len(v.shape) > 2 and b.draw(st.booleans()):
        n = v.shape[1]
    weight = b.layer_weight(b.random([k, n], 1 / math.sqrt(k)), "Wm", "matmul", 1)
    product = b.node("MatMul", [v.name, weight], (*v.shape[:-1], n), v.depth + 1)
    if not b.draw(st.booleans()):
        return product
    bias = b.layer_bias(b.random([n]), "bias")
    operands = [product.name, bias] if b.draw(st.booleans()) else [bias, product.name]
    return b.node("Add", operands, product.shape, product.depth + 1)


# --------------------------------------------------------------------------- quantized weights

INTEGERS = {"int8": (np.int8, -128, 127), "uint8": (np.uint8, 0, 255), "int16": (np.int16, -(2**15), 2**15 - 1),
            "uint16": (np.uint16, 0, 2**16 - 1)}
# (integer type, zero point): symmetric int8; uint8 around 128; another zero point (a random one,
# per channel when the scale is); none at all (0 of the integers' type: uint8 for QuantizeLinear);
# 16-bit from DequantizeLinear-21 (float32 models).
QUANT_SCHEMES = ("int8 0", "int8 0", "int8 absent", "uint8 128", "uint8 128", "uint8 other", "int8 other", "uint8 absent")
QUANT_SCHEMES_21 = QUANT_SCHEMES + ("int16 0", "uint16 32768")
NOOPS_AFTER_DQ = ("Identity", "Dropout", "Cast")


def quantize_weight(b: Builder, w: np.ndarray, prefix: str, out_axis: int, per_channel_fits: bool) -> str:
    """`w` quantized, as the output of a new DequantizeLinear: stored integers, or (fake-quantized)
    QuantizeLinear over a float W that dequantizes to the same integers. Per channel along
    `out_axis` (opset 13+, where `per_channel_fits`), rarely along another axis of the weight, or
    per tensor (sometimes with the scale of an earlier per-tensor weight); the scale spreads the
    channel's (or tensor's) largest |w| over the levels its zero point leaves. Sometimes an
    integer is set to the type's low end (int8 -128, uint8 0): a negative BN scale cannot negate
    its channel. Sometimes the DequantizeLinear's output is a graph output too, or reaches the
    layer through a no-op (Identity, Dropout, Cast to its own type), which bnfold removes first.
    The model computes the dequantized values: they, not `w`, are the reference."""
    per_channel = b.opset >= 13 and b.draw(st.booleans())
    axis = out_axis if per_channel_fits else None
    if per_channel and (axis is None or b.draw(st.integers(0, 7)) == 0):  # along an axis the BN does not scale
        axis = b.draw(st.sampled_from([a for a in range(w.ndim) if a != out_axis]))
    per_channel = per_channel and axis is not None
    channels = w.shape[axis] if per_channel else 1
    fake = b.draw(st.booleans())
    # 16-bit integers need float32 scales: max|w| / 32767 is below float16's normal range.
    schemes = QUANT_SCHEMES_21 if b.opset >= 21 and b.dtype == np.float32 else QUANT_SCHEMES
    integer, zp_kind = b.draw(st.sampled_from(schemes)).split()
    if fake and zp_kind == "absent":
        integer = "uint8"  # QuantizeLinear without a zero point makes uint8
    np_type, low, high = INTEGERS[integer]
    shape = [channels] if per_channel else []
    if zp_kind == "other":
        zp = b.rng.integers(96, 161, shape) if integer == "uint8" else b.rng.integers(-6, 7, shape)
    else:
        zp = np.full(shape, 0 if zp_kind == "absent" else int(zp_kind))
    zp = np.asarray(zp, np.int64)

    def along(vector):
        if not per_channel:
            return vector
        dims = [1] * w.ndim
        dims[axis] = -1
        return vector.reshape(dims)

    shared = b.scales.get((b.dtype.str, integer, zp_kind)) if not per_channel and zp_kind != "other" else None
    if shared and b.draw(st.integers(0, 3)) == 0:  # an earlier weight's per-tensor scale (and zero point) constants
        scale_name, scale, zp_names = b.draw(st.sampled_from(shared))
    else:
        rows = np.moveaxis(w.astype(np.float64), axis if per_channel else 0, 0).reshape(channels if per_channel else 1, -1)
        peak = np.maximum(np.abs(rows).max(axis=1), 1e-3).reshape(shape)
        room = np.minimum(high - zp, zp - low)
        levels = np.where(room > 0, room, high - zp)  # uint8 with zero point 0: negatives clip to 0
        scale = np.asarray(peak / levels).astype(b.dtype)
        scale_name = b.constant(scale, f"{prefix}_scale")
        zp_names = [b.constant(zp.astype(np_type), f"{prefix}_zp")] if zp_kind != "absent" else []
        if not per_channel:
            b.scales.setdefault((b.dtype.str, integer, zp_kind), []).append((scale_name, scale, zp_names))
    # What QuantizeLinear computes: float32 w / scale, round half to even, + zero point, saturated.
    q = np.clip(np.rint(w.astype(np.float32) / along(scale).astype(np.float32)) + along(zp), low, high).astype(np.int64)
    low_end = b.draw(st.integers(0, 3)) == 0
    planted = b.rng.choice(q.size, size=min(q.size, int(b.rng.integers(1, 3))), replace=False) if low_end else []
    q.flat[planted] = low
    attrs = {}
    if per_channel:
        written = b.draw(st.sampled_from([axis, axis, axis - w.ndim] + ([None] if axis == 1 else [])))
        if written is not None:
            attrs["axis"] = written
    if fake:
        on_grid = ((q - along(zp)).astype(np.float32) * along(scale).astype(np.float32)).astype(b.dtype)
        if b.draw(st.booleans()):  # the trained float weights, off the grid, the low end planted
            source = w.copy()
            source.flat[planted] = on_grid.flat[planted]
        else:  # weights already on the grid, as a QAT export after the last step often has them
            source = on_grid
        quantized = b.fresh(f"{prefix}_q")
        weight = b.constant(source, prefix)
        q_scale = scale_name if b.draw(st.integers(0, 3)) else b.constant(scale, f"{prefix}_qscale")  # equal, not the same constant
        b.nodes.append(helper.make_node("QuantizeLinear", [weight, q_scale, *zp_names], [quantized], name=b.fresh("quantize"), **attrs))
    else:
        quantized = b.constant(q.astype(np_type), f"{prefix}_int")
    zp_text = "per channel" if zp_kind == "other" and per_channel else str(int(zp.reshape(-1)[0])) if zp_kind != "absent" else "absent"
    facts = QuantFacts("", fake, integer, zp_text, attrs.get("axis", 1) if per_channel else None, low_end)
    where = f"axis {attrs.get('axis', 1)}" if per_channel else "per tensor"
    b.steps.append(f"DequantizeLinear({'fake ' if fake else ''}{integer} zp {zp_text}, {where}{', low end' if low_end else ''})")
    return dequantize(b, [quantized, scale_name, *zp_names], attrs, facts, w.shape, prefix)


def quantize_bias(b: Builder, bias: np.ndarray, prefix: str) -> str:
    """`bias` as int32 through DequantizeLinear, per tensor or (a vector, opset 13+) per channel,
    zero point absent or 0. The scale (largest |bias| / 2**22) makes a step about one float32
    rounding of the bias: a fold quantizes the new bias again, half a step off at most, and the
    outputs must still match within the float tolerance (a real model's bias scale, input scale x
    weight scale, is coarser; the property is about the fold's arithmetic, not the steps)."""
    per_channel = bias.ndim == 1 and bias.size > 1 and b.opset >= 13 and b.draw(st.booleans())
    peak = np.maximum(np.abs(bias.astype(np.float64)) if per_channel else np.abs(bias.astype(np.float64)).max(initial=0), 1e-3)
    scale = np.asarray(peak / 2**22, np.float32)
    q = np.rint(bias.astype(np.float32) / scale).astype(np.int32)
    inputs = [b.constant(q, f"{prefix}_int"), b.constant(scale, f"{prefix}_scale")]
    if b.draw(st.booleans()):
        inputs.append(b.constant(np.zeros(scale.shape, np.int32), f"{prefix}_zp"))
    attrs = {"axis": b.draw(st.sampled_from([0, -1]))} if per_channel else {}
    b.nodes.append(helper.make_node("DequantizeLinear", inputs, [out := b.fresh(f"{prefix}_dq")], name=b.fresh("dequantize"), **attrs))
    b.steps.append(f"DequantizeLinear(int32 bias{list(bias.shape)}, {'per channel' if per_channel else 'per tensor'})")
    return out


def quantize_bn_param(b: Builder, value: np.ndarray, prefix: str) -> str:
    """A BN parameter through DequantizeLinear, per tensor, as onnxruntime's quantizer writes
    them: int8 (the variance uint8 with zero point 0, kept at one step at least, so positive)."""
    variance = prefix == "var"
    low, high, np_type = (1, 255, np.uint8) if variance else (-127, 127, np.int8)
    scale = np.asarray(max(float(np.abs(value.astype(np.float64)).max()), 1e-3) / high, value.dtype)
    q = np.clip(np.rint(value.astype(np.float32) / np.float32(scale)), low, high).astype(np_type)
    inputs = [b.constant(q, f"{prefix}_int"), b.constant(scale, f"{prefix}_scale")]
    if b.draw(st.booleans()):
        inputs.append(b.constant(np.zeros((), np_type), f"{prefix}_zp"))
    out = b.fresh(f"{prefix}_dq")
    b.nodes.append(helper.make_node("DequantizeLinear", inputs, [out], name=b.fresh("dequantize")))
    b.steps.append(f"DequantizeLinear(BN {prefix})")
    return out


def dequantize(b: Builder, inputs: list[str], attrs: dict, facts: QuantFacts, shape, prefix: str) -> str:
    """A DequantizeLinear of `inputs`; sometimes its output is also a graph output, or reaches
    the layer through a no-op. Returns what the layer reads."""
    out, label = b.fresh(f"{prefix}_dq"), b.fresh("dequantize")
    b.nodes.append(helper.make_node("DequantizeLinear", inputs, [out], name=label, **attrs))
    b.quantized[out] = dataclasses.replace(facts, dq=label)
    b.dequantized[out] = (inputs, attrs, facts, shape)
    if b.draw(st.integers(0, 7)) == 0:
        b.side_outputs.append(Value(out, tuple(shape), 0))
    if b.draw(st.integers(0, 7)) == 0:
        kind = b.draw(st.sampled_from(NOOPS_AFTER_DQ))
        extra = {"to": NP_TO_ONNX[b.dtype]} if kind == "Cast" else {}
        read = b.fresh(f"{prefix}_{kind.lower()}")
        b.nodes.append(helper.make_node(kind, [out], [read], name=b.fresh(kind.lower()), **extra))
        b.steps.append(f"{kind} after DequantizeLinear")
        b.dequantized[read] = b.dequantized[out]
        return read
    return out


def dequantize_again(b: Builder, earlier: str, prefix: str) -> str:
    """A second DequantizeLinear of the QuantizeLinear (or stored integers) an earlier quantized
    weight reads, with the same scale and zero point: two layers share the integers, not the
    DequantizeLinear."""
    inputs, attrs, facts, shape = b.dequantized[earlier]
    b.steps.append("DequantizeLinear(again, of an earlier weight's integers)")
    return dequantize(b, inputs, attrs, facts, shape, prefix)


# --------------------------------------------------------------------------- BatchNormalization


def batchnorm(b: Builder, v: Value, plain: bool = False) -> Value:
    """BN over axis 1 of `v`; `plain`: inference mode with constant parameters."""
    channels = v.shape[1]
    # Training mode normalises with the batch statistics; with few values per channel the batch
    # variance can be tiny and (x - mean) / std ill-conditioned, amplifying the rounding
    # differences folds upstream legitimately make (the test measures what is left: kappa).
    # 8 values per channel at least.
    per_channel = math.prod(v.shape) // channels
    training = not plain and b.opset >= 14 and per_channel >= 8 and b.draw(st.integers(0, 9)) == 0
    # A training-mode BN gets statistics of its own: onnxruntime writes its running statistics
    # into the input buffers (microsoft/onnxruntime#29878), which other readers would then see.
    params, constant = _bn_params(b, channels, share=not training, plain=plain)
    attrs = {}
    epsilon = b.draw(st.sampled_from([None, 1e-5, 1e-3, 0.1, 1e-6]))
    if epsilon is not None:
        attrs["epsilon"] = epsilon
    if b.opset >= 14 and (training or b.draw(st.booleans())):
        attrs["training_mode"] = int(training)
    label = b.fresh("bn") if b.draw(st.integers(0, 4)) else ""  # unnamed: the label is its output
    outputs = 3 if training else 1  # ONNX wants the running statistics in training mode
    out = b.node("BatchNormalization", [v.name, *params], v.shape, v.depth + 1, label=label, n_outputs=outputs, **attrs)
    b.bns[out.name] = BnFacts(out.name, training, constant)
    b.steps[-1] += "(training)" if training else "" if constant else "(non-constant)"
    return out


def _bn_params(b: Builder, channels: int, share: bool, plain: bool) -> tuple[list[str], bool]:
    """(scale, B, mean, var) names and whether all are constants the fold may rely on.

    Non-trivial statistics; sometimes wide ones (scale up to ~300, not for float16, whose outputs
    would overflow); float32 statistics with float16 data where the opset allows (BN-14: mean/var,
    BN-15: each pair). Sometimes a parameter is not a constant: an initializer that is also a graph
    input (overridable), or a graph input fed at run time.
    """
    rng, wide = b.rng, b.dtype != np.float16 and b.draw(st.integers(0, 5)) == 0
    gamma = rng.uniform(0.1, 10, channels) if wide else rng.uniform(0.5, 2.0, channels)
    var = 10 ** rng.uniform(-3, 3, channels) if wide else rng.uniform(0.5, 2.0, channels)
    values = [gamma * rng.choice([-1, 1], channels), rng.normal(0, 1, channels), rng.normal(0, 3 if wide else 1, channels), var]
    if b.quantize and b.draw(st.integers(0, 2)) == 0:  # a positive scale: no channel to negate, and through Relu
        values[0] = gamma
    dtypes = [b.dtype] * 4
    if b.dtype == np.float16 and b.opset >= 14 and b.draw(st.booleans()):
        dtypes[2:] = [np.dtype(np.float32)] * 2
    if b.dtype == np.float16 and b.opset >= 15 and b.draw(st.booleans()):
        dtypes[:2] = [np.dtype(np.float32)] * 2
    mode = "constant" if plain else b.draw(st.sampled_from(["constant"] * 8 + ["overridable", "fed"]))
    position = -1 if mode == "constant" else b.draw(st.integers(0, 3 if mode == "overridable" else 1))
    names = []
    for i, (value, dt, p) in enumerate(zip(values, dtypes, ("scale", "B", "mean", "var"))):
        if i != position and b.quantize and b.draw(st.integers(0, 5)) == 0:
            names.append(quantize_bn_param(b, value.astype(dt), p))
            continue
        if i != position:
            names.append(b.constant(value.astype(dt), p, f"bn_{p}" if share else None))
            continue
        name = b.fresh("bn_param_in")
        b.inputs.append(helper.make_tensor_value_info(name, NP_TO_ONNX[dt], [channels]))
        if mode == "fed":  # scale or B only: any value is valid
            b.feeds[name] = value.astype(dt)
        else:
            b.inits.append(numpy_helper.from_array(value.astype(dt), name))
        names.append(name)
    return names, mode == "constant"


# --------------------------------------------------------------------------- element-wise and shape ops


def relu(b: Builder, v: Value) -> Value:
    return b.node(b.draw(st.sampled_from(["Relu", "Relu", "Identity"])), [v.name], v.shape, v.depth + 1)


def noop(b: Builder, v: Value) -> Value:
    """A node that computes nothing, as exporters write them (bnfold.noops removes it first)."""
    kind = b.draw(st.sampled_from(["Identity", "Dropout", "Cast", "Mul", "Add"]))
    if kind == "Cast":
        return b.node("Cast", [v.name], v.shape, v.depth, to=helper.np_dtype_to_tensor_dtype(np.dtype(b.dtype)))
    if kind in ("Mul", "Add"):
        neutral = b.constant(np.full([1] * min(len(v.shape), 2), 1.0 if kind == "Mul" else 0.0, b.dtype), kind.lower())
        return b.node(kind, [v.name, neutral], v.shape, v.depth)
    return b.node(kind, [v.name], v.shape, v.depth)


def binary(b: Builder, v: Value) -> Value:
    """Add or Mul with another value of the same shape (v itself: fan-out), or with a constant
    that broadcasts (per channel, scalar, or over the last axis)."""
    op = b.draw(st.sampled_from(["Add", "Mul"]))
    other = b.partner(v) if b.draw(st.booleans()) else None
    if other is None:
        shape = b.draw(st.sampled_from([[v.shape[1]] + [1] * (len(v.shape) - 2), [], [v.shape[-1]]]))
        const = b.random(shape) if op == "Add" else (b.rng.uniform(0.5, 1.5, shape) * b.rng.choice([-1, 1], shape)).astype(b.dtype)
        name = b.constant(np.asarray(const, b.dtype), "k")
    else:
        name = other.name
    operands = [v.name, name] if b.draw(st.booleans()) else [name, v.name]
    return b.node(op, operands, v.shape, max(v.depth, other.depth if other else 0) + 1)


def concat(b: Builder, v: Value) -> Value | None:
    def same_but_channels(a: Value, c: Value) -> bool:
        return len(a.shape) == len(c.shape) and a.shape[:1] + a.shape[2:] == c.shape[:1] + c.shape[2:]

    other = b.partner(v, same_but_channels)
    if other is None or v.shape[1] + other.shape[1] > MAX_CHANNELS:
        return None
    shape = (v.shape[0], v.shape[1] + other.shape[1], *v.shape[2:])
    return b.node("Concat", [v.name, other.name], shape, max(v.depth, other.depth) + 1, axis=1)


def flatten(b: Builder, v: Value) -> Value:
    axis = b.draw(st.sampled_from([1, 1, 1, 2, 0])) if len(v.shape) > 2 else 1
    shape = (math.prod(v.shape[:axis]), math.prod(v.shape[axis:]))
    return b.node("Flatten", [v.name], shape, v.depth + 1, axis=axis)


def reshape(b: Builder, v: Value) -> Value:
    """To rows: [N, -1], [0, -1], [-1, F], [N, F], or [N*C, -1] (rows are not samples);
    a 2-D value to [M, F, 1, 1] (features as channels)."""
    n, total = v.shape[0], math.prod(v.shape)
    if len(v.shape) == 2:
        target, shape = [0, v.shape[1], 1, 1], (n, v.shape[1], 1, 1)
    else:
        target = b.draw(st.sampled_from([[n, -1], [0, -1], [-1, total // n], [n, total // n], [n * v.shape[1], -1]]))
        shape = (total // (total // n), total // n) if target[0] == -1 else (target[0] or n, total // (target[0] or n))
    shape_name = b.constant(np.asarray(target, np.int64), "shape")
    return b.node("Reshape", [v.name, shape_name], shape, v.depth + 1)


def shared_linear(b: Builder, v: Value) -> Value | None:
    """A copy of an existing linear node applied to a value of its input's shape: shared weights."""
    shapes = {x.name: x.shape for x in b.values} | {i.name: _input_shape(i) for i in b.inputs}
    for node in reversed(b.nodes):
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and shapes.get(node.input[0]) == v.shape:
            out = next(x for x in b.values if x.name == node.output[0])
            copy = b.node(node.op_type, [v.name, *node.input[1:]], out.shape, v.depth + 1)
            b.nodes[-1].attribute.extend(node.attribute)
            if node.name in b.padded:
                b.padded.add(b.nodes[-1].name)
            return copy
    return None


def _input_shape(info: onnx.ValueInfoProto) -> tuple:
    return tuple(d.dim_value for d in info.type.tensor_type.shape.dim)


def linear(b: Builder, v: Value) -> Value | None:
    """A linear op that fits `v`: Conv/ConvTranspose on [N, C, ...], MatMul also on rank 3,
    Gemm/MatMul on [N, F]."""
    ops = {2: (gemm, matmul), 3: (conv, conv, conv_transpose, matmul)}.get(len(v.shape), (conv, conv, conv_transpose))
    return b.draw(st.sampled_from(ops))(b, v)


def linear_bn(b: Builder, v: Value) -> None:
    """The forward pattern: linear op -> BN (usually) -> Relu (sometimes)."""
    out = linear(b, v)
    if out is not None and b.draw(st.integers(0, 5)):
        out = batchnorm(b, out)
        if b.draw(st.integers(0, 2)) == 0:
            relu(b, out)


def bn_linear(b: Builder, v: Value) -> None:
    """The backward pattern: BN -> linear op, or BN [N, C, ...] -> Flatten/Reshape -> Gemm/MatMul."""
    out = batchnorm(b, v)
    if len(out.shape) > 2 and b.draw(st.integers(0, 2)) == 0:
        out = b.draw(st.sampled_from([flatten, reshape]))(b, out)
    linear(b, out)


SPATIAL_OPS = (conv, conv_transpose, batchnorm, flatten, reshape)
FLAT_OPS = (gemm, matmul, batchnorm, reshape)
ANY_OPS = (batchnorm, relu, binary, binary, concat, shared_linear, noop)


def single(b: Builder, v: Value) -> None:
    ops = SPATIAL_OPS if len(v.shape) > 2 else FLAT_OPS
    b.draw(st.sampled_from(ops + ANY_OPS))(b, v)


def step(b: Builder) -> None:
    """One pattern on a random (mostly the newest) value."""
    pattern = b.draw(st.sampled_from([linear_bn, linear_bn, bn_linear, single, single]))
    pattern(b, b.pick())


# --------------------------------------------------------------------------- the strategy


def unsafe_bn(b: Builder) -> None:
    """A BN that no rule may fold: its producer's output is also a graph output or feeds another
    op, and its own output is a graph output (so folding it backward is no way out either)."""
    v = b.pick()
    producer = linear(b, v) or matmul(b, v)  # MatMul fits any rank
    bn = batchnorm(b, producer, plain=True)
    if b.draw(st.booleans()):
        b.forced_outputs.add(producer.name)
    else:
        relu(b, producer)
    b.forced_outputs.add(bn.name)
    if b.draw(st.booleans()):  # BN's output also read by a linear op
        linear(b, bn)
    b.unsafe = bn.name


@st.composite
def graph_cases(draw, unsafe: bool = False, quantized: bool = False) -> GraphCase:
    """A random graph with at least one BN; with `unsafe`, it ends with `unsafe_bn`; with
    `quantized`, layer weights mostly come from DequantizeLinear (quantize_weight)."""
    if quantized:
        dtype = draw(st.sampled_from((np.float32, np.float32, np.float16)))
        opset = draw(st.sampled_from(QUANTIZED_FLOAT16_OPSETS if dtype == np.float16 else QUANTIZED_OPSETS))
    else:
        dtype = draw(st.sampled_from(DTYPES))
        opset = draw(st.sampled_from(OPSETS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b = Builder(draw, dtype, opset, rng, quantize=quantized)
    _add_inputs(b)
    for _ in range(draw(st.integers(0 if unsafe else 1, MAX_STEPS))):
        step(b)
    if unsafe:
        unsafe_bn(b)
    if not b.bns:  # every case exercises at least one BN
        batchnorm(b, b.pick())
    return _finish(b)


def _add_inputs(b: Builder) -> None:
    """One input, sometimes two of the same shape; spatial rank 3-5 or 2-D, batch sometimes symbolic."""
    rank = b.draw(st.sampled_from([2, 3, 4, 4, 5]))
    batch = b.draw(st.integers(1, 3))
    channels = b.draw(st.integers(1, 6))
    limit = {2: 8, 3: 8, 4: 6, 5: 4}[rank]
    spatial = [b.draw(st.integers(2 if rank == 5 else 1, limit)) for _ in range(rank - 2)]
    shape = (batch, channels, *spatial)
    symbolic = b.draw(st.booleans())
    for i in range(b.draw(st.sampled_from([1, 1, 1, 2]))):
        name = f"x{i}"
        dims = ["N" if symbolic else batch, *shape[1:]]
        b.inputs.append(helper.make_tensor_value_info(name, NP_TO_ONNX[b.dtype], dims))
        b.feeds[name] = b.rng.normal(0, 1, shape).astype(b.dtype)
        b.values.append(Value(name, shape, 0))


def _finish(b: Builder) -> GraphCase:
    """Outputs: every unread value and random intermediates, shuffled; build and check the model."""
    inputs = {i.name for i in b.inputs}
    chosen = [
        v for v in b.values
        if v.name not in inputs and (not b.readers.get(v.name) or v.name in b.forced_outputs or b.draw(st.integers(0, 5)) == 0)
    ]
    chosen = b.draw(st.permutations(chosen + b.side_outputs))
    outputs = [helper.make_tensor_value_info(v.name, NP_TO_ONNX[b.dtype], None) for v in chosen]
    model = make_model(b.nodes, b.inputs, outputs, b.inits, opset=b.opset)
    onnx.checker.check_model(model, full_check=True)  # a generator bug shows here, not as a fold bug
    return GraphCase(
        model=model,
        feeds=b.feeds,
        dtype=b.dtype,
        bns=dict(b.bns),
        padded_convs=frozenset(b.padded),
        depth={v.name: v.depth for v in chosen},
        shapes={v.name: v.shape for v in (*b.values, *b.side_outputs)},
        steps=b.steps,
        unsafe=b.unsafe,
        quantized=dict(b.quantized),
    )
