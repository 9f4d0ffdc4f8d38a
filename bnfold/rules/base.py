"""What every fold rule shares: the BN checks, the producer checks, and the graph edit.

A rule only says which producer op it absorbs BN into and where that op keeps its weight's
output-channel axis and its bias. The checks that apply to every rule live here, once:
inference mode, no training outputs, constant parameters, float dtypes, matching channel count,
finite statistics; the producer's output feeds only the BN and is not a graph output.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from bnfold import algebra
from bnfold.graph import DEFAULT_DOMAINS, GraphIndex, attribute, node_label, reads_only_metadata
from bnfold.report import Kept

FLOAT_TYPES = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})
BN_PARAMS = ("scale", "B", "input_mean", "input_var")


def is_float(array: np.ndarray) -> bool:
    return array.dtype in FLOAT_TYPES or array.dtype.name == "bfloat16"


@dataclasses.dataclass(frozen=True)
class BatchNorm:
    """An inference-mode BN that passed the shared checks, as a per-channel affine map."""

    node: onnx.NodeProto
    scale: np.ndarray  # float64 [C]
    shift: np.ndarray  # float64 [C]

    @property
    def label(self) -> str:
        return node_label(self.node)

    @property
    def channels(self) -> int:
        return self.scale.shape[0]

    @property
    def x(self) -> str:
        return self.node.input[0]

    @property
    def y(self) -> str:
        return self.node.output[0]


def match_batchnorm(node: onnx.NodeProto, graph: GraphIndex) -> BatchNorm | Kept:
    """The shared BN checks; a BatchNorm to fold or Kept with the reason."""
    reason = _mode_reason(node, graph.model.opset(node.domain))
    if reason:
        return Kept(node_label(node), reason, graph.path)
    params = []
    for name, value_name in zip(BN_PARAMS, list(node.input)[1:5]):
        value = graph.constant(value_name)
        if value is None:
            source = graph.describe_source(value_name)
            return Kept(node_label(node), f"{name} is not a constant (it comes from {source})", graph.path)
        if not is_float(value):
            return Kept(node_label(node), f"{name} has non-float dtype {value.dtype}", graph.path)
        params.append(value)
    if len(params) != 4:
        return Kept(node_label(node), "BatchNormalization needs 5 inputs", graph.path)
    shapes = {p.shape for p in params}
    if len(shapes) != 1 or params[0].ndim != 1:
        return Kept(node_label(node), f"parameter shapes {sorted(shapes)} are not one [C] vector", graph.path)
    try:
        scale, shift = algebra.bn_scale_shift(*params, eps=attribute(node, "epsilon", 1e-5))
    except algebra.BadStatistics as err:
        return Kept(node_label(node), f"bad statistics: {err}", graph.path)
    return BatchNorm(node, scale, shift)


def _mode_reason(node: onnx.NodeProto, opset: int) -> str:
    """Why this BN is not an inference-mode BN, or ""."""
    if opset >= 14 and attribute(node, "training_mode", 0):
        return "training_mode=1 (batch statistics are used, not the running ones)"
    if opset < 7 and not attribute(node, "is_test", 0):
        return f"is_test=0: BatchNormalization-{opset} in training mode"
    if opset < 9 and attribute(node, "spatial", 1) == 0:
        return "spatial=0: per-activation statistics, not per-channel"
    extra = [o for o in list(node.output)[1:] if o]
    if extra:
        return f"training outputs {extra} (running mean/var) are produced"
    return ""


def match_producer(bn: BatchNorm, graph: GraphIndex, op_types: tuple[str, ...]) -> onnx.NodeProto | Kept:
    """The node computing BN's input, if it is one of `op_types` and BN is its only user."""
    producer = graph.producer.get(bn.x)
    if producer is None or producer.domain not in DEFAULT_DOMAINS or producer.op_type not in op_types:
        return Kept(bn.label, f"no foldable producer: input comes from {graph.describe_source(bn.x)}", graph.path)
    return check_sole_use(bn, graph, producer, bn.x, bn.node)


def check_sole_use(bn: BatchNorm, graph: GraphIndex, producer, value: str, reader) -> onnx.NodeProto | Kept:
    """Folding changes `value`; only allowed when `reader` (on the way to BN) is its only user."""
    if graph.is_graph_output(value):
        return Kept(bn.label, f"{producer.op_type} '{node_label(producer)}' output '{value}' is a graph output", graph.path)
    # Readers of only dtype/shape (Shape, CastLike's target) see the same after a fold.
    others = [n for n in graph.users(value) if n is not reader and not reads_only_metadata(n, value)]
    if others:
        names = ", ".join(f"{n.op_type} '{node_label(n)}'" for n in others[:3])
        return Kept(bn.label, f"fan-out: {producer.op_type} '{node_label(producer)}' output also feeds {names}", graph.path)
    return producer


@dataclasses.dataclass
class Plan:
    """A checked fold, with every new tensor already computed in the model's dtypes.

    `new_inputs` maps (node, input position) to the new constant. Applying a plan cannot fail,
    so a half-applied fold never exists.
    """

    bn: BatchNorm
    into: onnx.NodeProto
    new_inputs: list[tuple[onnx.NodeProto, int, np.ndarray]]
    attributes: list[tuple[onnx.NodeProto, str, object]] = dataclasses.field(default_factory=list)
    bn_becomes_add: np.ndarray | None = None  # MatMul: BN turns into Add(x, shift)


def finite_or_kept(bn: BatchNorm, graph: GraphIndex, plan: Plan) -> Plan | Kept:
    """Refuse a fold whose cast-back tensors overflowed (float16 weights times a large scale)."""
    arrays = [a for _, _, a in plan.new_inputs]
    if plan.bn_becomes_add is not None:
        arrays.append(plan.bn_becomes_add)
    if all(np.all(np.isfinite(a.astype(np.float64))) for a in arrays):
        return plan
    return Kept(bn.label, "folded weights overflow their dtype", graph.path)


def apply_plan(plan: Plan, graph: GraphIndex) -> None:
    """Mutate the graph: new constants in, BN out (or turned into Add), names preserved."""
    for node, position, value in plan.new_inputs:
        old = node.input[position] if position < len(node.input) else ""
        graph.set_constant_input(node, position, value, f"{old or node_label(node)}_bnfold")
    for node, name, value in plan.attributes:
        graph.set_attribute(node, name, value)
    if plan.bn_becomes_add is not None:
        shift_name = graph.model.unique_name(f"{plan.bn.y}_bnfold_shift")
        graph.graph.initializer.append(onnx.numpy_helper.from_array(plan.bn_becomes_add, shift_name))
        graph.initializers[shift_name] = graph.graph.initializer[-1]
        graph.replace_node(plan.bn.node, "Add", [plan.bn.x, shift_name])
    else:
        graph.bypass(plan.bn.node, plan.bn.y)


class ForwardRule:
    """Base of the rules that fold a BN into the linear op that produces its input."""

    name = ""
    producer_ops: tuple[str, ...] = ()

    def match(self, bn: BatchNorm, graph: GraphIndex) -> Plan | Kept:
        producer = match_producer(bn, graph, self.producer_ops)
        if isinstance(producer, Kept):
            return producer
        plan = self.plan(bn, producer, graph)
        return plan if isinstance(plan, Kept) else finite_or_kept(bn, graph, plan)

    def plan(self, bn: BatchNorm, producer: onnx.NodeProto, graph: GraphIndex) -> Plan | Kept:
        raise NotImplementedError

    @staticmethod
    def weight(bn: BatchNorm, graph: GraphIndex, node: onnx.NodeProto, position: int, what: str) -> np.ndarray | Kept:
        """A producer input that must be a float constant."""
        name = node.input[position] if position < len(node.input) else ""
        value = graph.constant(name) if name else None
        if value is None:
            where = graph.describe_source(name) if name else "nowhere"
            return Kept(bn.label, f"{node.op_type} '{node_label(node)}' {what} is not a constant (it comes from {where})", graph.path)
        if not is_float(value):
            return Kept(bn.label, f"{node.op_type} '{node_label(node)}' {what} has non-float dtype {value.dtype}", graph.path)
        return value

    @classmethod
    def optional_weight(cls, bn, graph, node, position: int, what: str) -> np.ndarray | Kept | None:
        """An optional producer input (a bias): None when absent, else as `weight`."""
        if position >= len(node.input) or not node.input[position]:
            return None
        return cls.weight(bn, graph, node, position, what)

    @staticmethod
    def channel_mismatch(bn: BatchNorm, graph: GraphIndex, node: onnx.NodeProto, channels: int) -> Kept | None:
        if channels == bn.channels:
            return None
        return Kept(bn.label, f"channel mismatch: {node.op_type} '{node_label(node)}' has {channels} output channels, BN has {bn.channels}", graph.path)


class WeightAndBiasRule(ForwardRule):
    """Producers with a weight input 1 and an optional per-channel bias input 2 (Conv family).

    Subclasses only say where the output channels lie in the weight: `weight_layout` returns
    (axis, groups), the output-channel count being weight.shape[axis] * groups for axis > 0.
    """

    def weight_layout(self, bn: BatchNorm, node: onnx.NodeProto, weight: np.ndarray, graph: GraphIndex):
        raise NotImplementedError

    def plan(self, bn: BatchNorm, node: onnx.NodeProto, graph: GraphIndex) -> Plan | Kept:
        weight = self.weight(bn, graph, node, 1, "weight W")
        if isinstance(weight, Kept):
            return weight
        layout = self.weight_layout(bn, node, weight, graph)
        if isinstance(layout, Kept):
            return layout
        axis, groups = layout
        channels = weight.shape[axis] * (groups if axis else 1) if weight.ndim > axis else 0
        bias = self.channel_mismatch(bn, graph, node, channels) or self.optional_weight(bn, graph, node, 2, "bias B")
        if isinstance(bias, Kept):
            return bias
        new_weight = algebra.scale_along_axis(weight, bn.scale, axis=axis, groups=groups)
        new_bias = algebra.fold_bias(bias, bn.scale, bn.shift)
        return Plan(
            bn,
            into=node,
            new_inputs=[
                (node, 1, algebra.cast_like(new_weight, weight.dtype)),
                (node, 2, algebra.cast_like(new_bias, weight.dtype)),
            ],
        )
