"""Recognise BN written out as arithmetic: chains of Mul / Add / Sub / Div by per-channel constants.

TensorFlow / Keras exports and hand-written normalisation leave BN as separate ops,
((x - mean) / sqrt(var + eps)) * gamma + beta, or x * scale + shift. An op with one constant
operand c and the data x is a per-channel affine map x -> s * x + t:

    x * c, c * x -> (c, 0)        x + c, c + x -> (1, c)        x - c -> (1, -c)
    c - x        -> (-1, c)       x / c        -> (1/c, 0), c without zeros
    c / x        -> not affine

and a chain of them composes, (s2, t2) after (s1, t1) = (s2 * s1, s2 * t1 + t2), in float64: the
chain is then folded exactly like a BN with that (scale, shift) (bnfold.rules.decomposed).

c is per-channel only if its broadcast against the data lands on BN's channel axis 1: aligned to
the data's rank from the right (numpy/ONNX broadcasting), every axis but 1 has length 1 and axis
1 has length 1 or C. So [C, 1, 1] and [1, C, 1, 1] after a 4-D Conv output, [C] and [1, C] on
[N, C], a scalar anywhere. A [W] constant after a Conv lies on the last (spatial) axis, even when
W == C: not a channel scale. A constant with more axes than the data would change the output
shape. Proving this needs the data's static rank and channel count (graph types).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from bnfold.graph import DEFAULT_DOMAINS, GraphIndex, node_label, reads_only_metadata
from bnfold.rules.base import BatchNorm, is_float

ARITHMETIC_OPS = ("Mul", "Add", "Sub", "Div")


@dataclasses.dataclass(frozen=True)
class AffineOp:
    """One arithmetic op with a constant operand: its per-channel map, or why it is not one."""

    node: onnx.NodeProto
    data: int  # position of the data operand (the other one is the constant)
    scale: np.ndarray | None = None  # float64 [C]
    shift: np.ndarray | None = None
    reason: str = ""  # why it is not a per-channel affine map of its data ("" when it is)

    @property
    def x(self) -> str:
        return self.node.input[self.data]


@dataclasses.dataclass(frozen=True)
class AffineChain(BatchNorm):
    """Consecutive AffineOps read as one BN: `node` is the first op (the reader of `x`), `y` the
    last op's output. A chain whose first op is not affine has `reason` and no scale."""

    ops: tuple[AffineOp, ...] = ()
    reason: str = ""
    what = "affine chain"  # how reasons name it (BN's "BN output ...")

    @property
    def x(self) -> str:
        return self.ops[0].x

    @property
    def y(self) -> str:
        return self.ops[-1].node.output[0]

    @property
    def op_types(self) -> str:
        return "+".join(op.node.op_type for op in self.ops)


def match_affine_op(node: onnx.NodeProto, graph: GraphIndex) -> AffineOp | None:
    """An arithmetic op with exactly one float constant operand, else None (not our business)."""
    if node.op_type not in ARITHMETIC_OPS or node.domain not in DEFAULT_DOMAINS or len(node.input) != 2:
        return None
    values = [graph.constant(name) for name in node.input]
    constants = [i for i, v in enumerate(values) if v is not None]
    if len(constants) != 1 or not is_float(values[constants[0]]) or node.input[0] == node.input[1]:
        return None
    data = 1 - constants[0]
    found = per_channel(node, data, values[constants[0]], graph)
    if isinstance(found, str):
        return AffineOp(node, data, reason=found)
    return AffineOp(node, data, *found)


def per_channel(node, data: int, constant: np.ndarray, graph: GraphIndex) -> tuple[np.ndarray, np.ndarray] | str:
    """(scale, shift) [C] of `node` as a map of its data operand, or why it is not per-channel."""
    what = f"{node.op_type} '{node_label(node)}'"
    if node.op_type == "Div" and data == 1:
        return f"{what} divides a constant by its input (c / x is not affine)"
    vector = channel_vector(what, node.input[data], constant, graph)
    if isinstance(vector, str):
        return vector
    if not np.all(np.isfinite(vector)):
        return f"{what} constant holds NaN or Inf"
    ones, zeros = np.ones_like(vector), np.zeros_like(vector)
    if node.op_type == "Mul":
        return vector, zeros
    if node.op_type == "Add":
        return ones, vector
    if node.op_type == "Sub":
        return (ones, -vector) if data == 0 else (-ones, vector)
    if np.any(vector == 0):
        return f"{what} divides by a constant containing zero"
    return 1.0 / vector, zeros


def channel_vector(what: str, x: str, constant: np.ndarray, graph: GraphIndex) -> np.ndarray | str:
    """The constant as a float64 [C] vector along the data's axis 1, or why its broadcast against
    `x` does not land on axis 1 alone."""
    dims = value_dims(x, graph)
    shape = list(constant.shape)
    if dims is None:
        return f"{what}: the rank of '{x}' is unknown, so the constant's axes cannot be placed"
    if len(dims) < 2:
        return f"{what}: '{x}' has rank {len(dims)}, no channel axis 1"
    if len(shape) > len(dims):
        return f"{what} constant of shape {shape} has more axes than '{x}' {_text(dims)}: it changes the output shape"
    aligned = [1] * (len(dims) - len(shape)) + shape
    spread = [axis for axis, n in enumerate(aligned) if n != 1 and axis != 1]
    if spread:
        return (
            f"{what} constant of shape {shape} varies along axis {spread[-1]} of '{x}' {_text(dims)}, "
            "not only the channel axis 1: not a per-channel scale or shift"
        )
    channels = dims[1]
    if channels is None:
        return f"{what}: the channel count (axis 1) of '{x}' {_text(dims)} is unknown"
    if aligned[1] not in (1, channels):
        return f"{what} constant of shape {shape} has {aligned[1]} values on axis 1, '{x}' has {channels} channels"
    return np.broadcast_to(constant.astype(np.float64).reshape(-1), (channels,)).copy()


def value_dims(name: str, graph: GraphIndex) -> tuple | None:
    """Static dims of `name` from the model's type info; for a value a fold created (the product
    of a MatMul that got a bias Add after it), ONNX's inference of its producer alone."""
    found = graph.model.value_type(name)
    if found is not None:
        return found[1]
    producer = graph.producer.get(name)
    return None if producer is None else _infer_output(producer, name, graph)


def _infer_output(node: onnx.NodeProto, name: str, graph: GraphIndex) -> tuple | None:
    types = {}
    for value in filter(None, node.input):
        found = graph.model.value_type(value)
        if found is None:  # a constant a fold wrote (W_bnfold): its own dtype and shape
            constant = graph.constant(value)
            if constant is None:
                return None
            found = (onnx.helper.np_dtype_to_tensor_dtype(constant.dtype), constant.shape)
        elem, dims = found
        types[value] = onnx.helper.make_tensor_type_proto(elem, None if dims is None else list(dims))
    try:
        schema = onnx.defs.get_schema(node.op_type, graph.model.opset(node.domain), node.domain)
        inferred = onnx.shape_inference.infer_node_outputs(schema, node, types)
    except Exception:  # best effort, as whole-model inference: unknown only means "keep"
        return None
    tensor = inferred[name].tensor_type if name in inferred else None
    if tensor is None or not tensor.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)


def _text(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def next_affine_op(op: AffineOp, graph: GraphIndex) -> AffineOp | None:
    """The affine op that is the only reader of `op`'s output (not a graph output), reading it as
    its data: the chain goes on through it."""
    value = op.node.output[0]
    if graph.is_graph_output(value):
        return None
    readers = [n for n in graph.users(value) if not reads_only_metadata(n, value)]
    if len(readers) != 1:
        return None
    following = match_affine_op(readers[0], graph)
    if following is None or following.reason or following.x != value:
        return None
    return following


def match_chain(node: onnx.NodeProto, graph: GraphIndex) -> AffineChain | None:
    """The chain starting at `node`, or None when `node` does not start one (not an arithmetic op
    with a constant, or it continues the chain of the affine op before it)."""
    first = match_affine_op(node, graph)
    if first is None or _continues(first, graph):
        return None
    if first.reason:
        return AffineChain(node, np.zeros(0), np.zeros(0), ops=(first,), reason=first.reason)
    ops = [first]
    while (following := next_affine_op(ops[-1], graph)) is not None:
        ops.append(following)
    scale, shift = np.ones_like(first.scale), np.zeros_like(first.shift)
    for op in ops:
        scale, shift = op.scale * scale, op.scale * shift + op.shift
    reason = "" if np.all(np.isfinite(scale)) and np.all(np.isfinite(shift)) else "the composed constants overflow"
    return AffineChain(node, scale, shift, ops=tuple(ops), reason=reason)


def _continues(op: AffineOp, graph: GraphIndex) -> bool:
    """Whether `op` is a later link of the chain through the affine op producing its data."""
    producer = graph.producer.get(op.x)
    before = None if producer is None else match_affine_op(producer, graph)
    if before is None or before.reason:
        return False
    following = next_affine_op(before, graph)
    return following is not None and following.node is op.node
