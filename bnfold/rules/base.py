"""What every fold rule shares: the BN checks, the neighbour checks, and the graph edit.

A forward rule says which producer op it absorbs BN into and where that op keeps its weight's
output-channel axis and its bias; a backward rule says which op reading BN's output absorbs it
and where that op keeps its weight's input-channel axis. The checks that apply to every rule live
here, once: inference mode, no training outputs, constant parameters, float dtypes, finite
statistics; forward: the producer's output feeds only the BN and is not a graph output; backward:
BN's output (and every pass-through op after it) feeds only the next op, as its data input, and
is not a graph output.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from bnfold import algebra, weights
from bnfold.graph import DEFAULT_DOMAINS, GraphIndex, attribute, node_label, reads_only_metadata
from bnfold.report import Kept

FLOAT_TYPES = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})
BN_PARAMS = ("scale", "B", "input_mean", "input_var")


def is_float(array: np.ndarray) -> bool:
    return array.dtype in FLOAT_TYPES or array.dtype.name == "bfloat16"


class _read_once:
    """functools.cached_property without its lock (Python 3.11 takes one on every first read,
    three per BN): the value goes into the instance's __dict__, which later reads find first."""

    def __init__(self, read):
        self.read, self.name = read, read.__name__

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.read(instance)
        return value


@dataclasses.dataclass(frozen=True)
class BatchNorm:
    """An inference-mode BN that passed the shared checks, as a per-channel affine map."""

    node: onnx.NodeProto
    scale: np.ndarray  # float64 [C]
    shift: np.ndarray  # float64 [C]
    what = "BN"  # how reasons name it (an affine chain reads the same rules)

    # Read once per match (a BatchNorm lives for one attempt, before any edit): each protobuf
    # read costs a wrapper, and the rules ask for these many times.
    @_read_once
    def label(self) -> str:
        return node_label(self.node)

    @property
    def channels(self) -> int:
        return self.scale.shape[0]

    @_read_once
    def x(self) -> str:
        return self.node.input[0]

    @_read_once
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
        source = weights.quantized_source(graph, value_name) if value is None else None
        if isinstance(source, weights.Quantized):  # quantized parameters (quantize_static writes them): their values
            value = source.values
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
    # epsilon is a float32 attribute; its default too, as runtimes apply it (var = -1e-5 + 1e-5 is 0).
    eps = float(np.float32(attribute(node, "epsilon", 1e-5)))
    try:
        scale, shift = algebra.bn_scale_shift(*params, eps=eps)
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
        layer = _behind_activation_quantizer(graph, producer, "backward")
        if layer is not None:
            return Kept(bn.label, activation_quantizer_reason(layer, "and BN"), graph.path)
        return Kept(bn.label, f"no foldable producer: input comes from {graph.describe_source(bn.x)}", graph.path)
    return check_sole_use(bn, graph, producer, bn.x, bn.node)


LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _behind_activation_quantizer(graph: GraphIndex, node, way: str):
    """The layer on the far side of a QuantizeLinear -> DequantizeLinear pair of activations,
    `node` being the pair's end on this side (the DequantizeLinear going backward, the
    QuantizeLinear going forward); None when there is no such layer."""
    first, second = ("DequantizeLinear", "QuantizeLinear") if way == "backward" else ("QuantizeLinear", "DequantizeLinear")
    if node is None or node.op_type != first or node.domain not in DEFAULT_DOMAINS or not node.input:
        return None
    if way == "backward":
        pair = graph.producer.get(node.input[0])
        far = graph.producer.get(pair.input[0]) if pair is not None and pair.input else None
    else:
        readers = graph.users(node.output[0])
        pair = readers[0] if len(readers) == 1 else None
        readers = graph.users(pair.output[0]) if pair is not None else []
        far = readers[0] if len(readers) == 1 else None
    if pair is None or pair.op_type != second or far is None or far.op_type not in LAYER_OPS:
        return None
    return far


def activation_quantizer_reason(layer, where: str) -> str:
    return (f"an activation QuantizeLinear/DequantizeLinear pair lies between {layer.op_type} '{node_label(layer)}' "
            f"{where}: a per-channel scale cannot pass a per-tensor activation quantizer exactly; {weights.FOLD_BEFORE_QUANTIZING}")


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
    so a half-applied fold never exists. A forward plan removes BN by letting `into` write BN's
    output (or turns BN into an Add); a backward plan removes BN by letting its readers read its
    input, and may add a bias Add after `into`.
    """

    bn: BatchNorm
    into: onnx.NodeProto
    new_inputs: list[tuple[onnx.NodeProto, int, np.ndarray]]
    attributes: list[tuple[onnx.NodeProto, str, object]] = dataclasses.field(default_factory=list)
    bn_becomes_add: np.ndarray | None = None  # MatMul: BN turns into Add(x, shift)
    backward: bool = False  # BN folded into its consumer: readers of BN's output read its input
    bias_after: np.ndarray | None = None  # backward MatMul: Add(product, bias) inserted after `into`


def finite_or_kept(bn: BatchNorm, graph: GraphIndex, plan: Plan) -> Plan | Kept:
    """Refuse a fold whose cast-back tensors overflowed (float16 weights times a large scale)."""
    arrays = [getattr(a, "value", a) for _, _, a in plan.new_inputs]  # a QuantizedWrite's: what the layer reads
    arrays += [a for a in (plan.bn_becomes_add, plan.bias_after) if a is not None]
    if all(_all_finite(a) for a in arrays):
        return plan
    return Kept(bn.label, "folded weights overflow their dtype", graph.path)


def _all_finite(array: np.ndarray) -> bool:
    """isfinite on the array's own dtype (float16/32/64); others (bfloat16) through float64."""
    if array.dtype not in FLOAT_TYPES:
        array = array.astype(np.float64)
    return bool(np.isfinite(array).all())


def plan_site(plan: Plan) -> str:
    """The value both models name alike that the fold changes how to compute (see Folded.site):
    BN's output, or for a backward fold the output of the layer that absorbed it, or of the Add
    after it when the shift went into that Add's constant (the layer's own output no longer
    carries it)."""
    if not plan.backward:
        return plan.bn.y
    product = plan.into.output[0]
    for node, _, _ in plan.new_inputs:
        if node is not plan.into and node.op_type == "Add" and product in node.input:
            return node.output[0]
    return product


def plan_changes(plan: Plan) -> list[str]:
    """The values the plan's nodes write before it is applied: the layer's output and those of
    the nodes whose constants it replaces. An earlier fold compared at one of them no longer
    can be (see GraphIndex.moved_sites)."""
    nodes = {id(plan.into): plan.into, **{id(node): node for node, _, _ in plan.new_inputs}}
    return [node.output[0] for node in nodes.values() if node.output]


def apply_plan(plan: Plan, graph: GraphIndex) -> None:
    """Mutate the graph: new constants in, BN out (or turned into Add), names preserved."""
    apply_new_tensors(plan, graph)
    if plan.backward:
        graph.short_circuit(plan.bn.node)
    elif plan.bn_becomes_add is not None:
        shift_name = graph.model.unique_name(f"{plan.bn.y}_bnfold_shift")
        graph.graph.initializer.append(onnx.numpy_helper.from_array(plan.bn_becomes_add, shift_name))
        graph.initializers[shift_name] = graph.graph.initializer[-1]
        graph.replace_node(plan.bn.node, "Add", [plan.bn.x, shift_name])
    else:
        graph.bypass(plan.bn.node, plan.bn.y)


def apply_new_tensors(plan: Plan, graph: GraphIndex) -> None:
    """The plan's new constants and attributes, and its bias Add after `into` (if any).

    Every new tensor goes through here: their float32/16 subnormals are flushed to zero and
    counted, and the layer's new weight is noted for the quantization report (bnfold.readiness).
    """
    readiness = graph.model.readiness
    plan.bn_becomes_add, plan.bias_after = readiness.flush(plan.bn_becomes_add), readiness.flush(plan.bias_after)
    for node, position, value in plan.new_inputs:
        value = readiness.flush(value)
        if node is plan.into and position == 1:
            note_layer_weight(readiness, node, getattr(value, "value", value), graph.path)
        if isinstance(value, weights.QuantizedWrite):  # written where the weight comes from
            value.apply(graph, node, position)
            continue
        old = node.input[position] if position < len(node.input) else ""
        graph.set_constant_input(node, position, value, f"{old or node_label(node)}_bnfold")
    for node, name, value in plan.attributes:
        graph.set_attribute(node, name, value)
    if plan.bias_after is not None:
        graph.add_bias_after(plan.into, plan.bias_after, f"{plan.into.output[0]}_bnfold_bias")


def note_layer_weight(readiness, layer: onnx.NodeProto, weight: np.ndarray, graph_path: str) -> None:
    """Tell `readiness` the new weight (input 1) of a Conv / ConvTranspose / Gemm / MatMul."""
    layout = output_channel_layout(layer, weight)
    if layout is not None:
        readiness.note_weight(layer, node_label(layer), graph_path, weight, *layout)


def output_channel_layout(layer: onnx.NodeProto, weight: np.ndarray) -> tuple[int, int] | None:
    """(axis, groups) of a layer weight's output channels, or None for another op or shape.

    Conv [C_out, C_in/group, k...]: axis 0. ConvTranspose [C_in, C_out/group, k...]: axis 1
    within each of `group` input-channel blocks. Gemm B: [K, N] (axis 1), or [N, K] with
    transB=1 (axis 0). MatMul B [..., K, N]: the last axis.
    """
    op, ndim = layer.op_type, weight.ndim
    if op == "Conv" and ndim >= 1:
        return 0, 1
    if op == "ConvTranspose" and ndim >= 2:
        groups = attribute(layer, "group", 1)
        return (1, groups) if groups >= 1 and weight.shape[0] % groups == 0 else None
    if op == "Gemm" and ndim == 2:
        return (0 if attribute(layer, "transB", 0) else 1), 1
    if op == "MatMul" and ndim >= 2:
        return ndim - 1, 1
    return None


class Rule:
    """What both directions share: a name, and reading the neighbour's constant inputs."""

    name = ""
    direction = ""
    # Whether the rule writes its weight through bnfold.weights, and so may fold into a weight
    # that a DequantizeLinear makes; else why not (the reason a quantized weight is kept with).
    quantized_weights = False
    quantized_refusal = "this rule does not fold into quantized weights"

    def targets(self, bn: BatchNorm, graph: GraphIndex) -> bool:
        """Read-only: whether BN's neighbour in this rule's direction is the op this rule folds into."""
        raise NotImplementedError

    def match(self, bn: BatchNorm, graph: GraphIndex) -> Plan | Kept:
        raise NotImplementedError

    @classmethod
    def weight(cls, bn: BatchNorm, graph: GraphIndex, node: onnx.NodeProto, position: int, what: str) -> np.ndarray | Kept:
        """An input of the op BN folds into that must be a float constant (a weight), or
        (`quantized_weights`) what a DequantizeLinear of constants makes of one."""
        name = node.input[position] if position < len(node.input) else ""
        value = graph.constant(name) if name else None
        if value is None:
            layer = f"{node.op_type} '{node_label(node)}' {what}"
            source = weights.quantized_source(graph, name) if name else None
            if isinstance(source, weights.Quantized):
                if cls.quantized_weights:
                    return source.values
                return Kept(bn.label, f"{layer} is quantized ({source.label}): {cls.quantized_refusal}", graph.path)
            if isinstance(source, str):
                return Kept(bn.label, f"{layer} is quantized, but {source}", graph.path)
            where = graph.describe_source(name) if name else "nowhere"
            return Kept(bn.label, f"{layer} is not a constant (it comes from {where})", graph.path)
        if not is_float(value):
            return Kept(bn.label, f"{node.op_type} '{node_label(node)}' {what} has non-float dtype {value.dtype}", graph.path)
        return value

    @classmethod
    def optional_weight(cls, bn, graph, node, position: int, what: str) -> np.ndarray | Kept | None:
        """An optional input (a bias): None when absent, else as `weight`."""
        if position >= len(node.input) or not node.input[position]:
            return None
        return cls.weight(bn, graph, node, position, what)

    @staticmethod
    def scaled_weight(bn: BatchNorm, graph: GraphIndex, node, position: int, weight: np.ndarray, axis: int, groups: int = 1):
        """Input `position` of `node` (read as `weight`) times BN's scale along `axis`, written
        where it comes from (bnfold.weights): a new array, a QuantizedWrite, or Kept."""
        source = weights.quantized_source(graph, node.input[position])
        if not isinstance(source, weights.Quantized):
            return algebra.scale_along_axis_cast(weight, bn.scale, axis=axis, groups=groups)
        write = weights.scaled(source, bn.scale, axis, groups)
        return Kept(bn.label, f"{node.op_type} '{node_label(node)}' weight: {write}", graph.path) if isinstance(write, str) else write

    @staticmethod
    def new_bias(bn: BatchNorm, graph: GraphIndex, node, position: int, bias64: np.ndarray, dtype):
        """The folded bias `bias64` (float64) for input `position` of `node`: cast to `dtype`,
        or quantized again where a DequantizeLinear makes the old one (or Kept)."""
        name = node.input[position] if position < len(node.input) else ""
        source = weights.quantized_source(graph, name) if name else None
        if not isinstance(source, weights.Quantized):
            return algebra.cast_like(bias64, dtype)
        write = weights.rebiased(source, np.asarray(bias64, np.float64).reshape(-1), bn.scale)
        return Kept(bn.label, f"{node.op_type} '{node_label(node)}' bias: {write}", graph.path) if isinstance(write, str) else write


class ForwardRule(Rule):
    """Base of the rules that fold a BN into the linear op that produces its input."""

    direction = "forward"
    producer_ops: tuple[str, ...] = ()

    def targets(self, bn: BatchNorm, graph: GraphIndex) -> bool:
        producer = graph.producer.get(bn.x)
        return producer is not None and producer.domain in DEFAULT_DOMAINS and producer.op_type in self.producer_ops

    def match(self, bn: BatchNorm, graph: GraphIndex) -> Plan | Kept:
        producer = match_producer(bn, graph, self.producer_ops)
        if isinstance(producer, Kept):
            return producer
        plan = self.plan(bn, producer, graph)
        return plan if isinstance(plan, Kept) else finite_or_kept(bn, graph, plan)

    def plan(self, bn: BatchNorm, producer: onnx.NodeProto, graph: GraphIndex) -> Plan | Kept:
        raise NotImplementedError

    @staticmethod
    def channel_mismatch(bn: BatchNorm, graph: GraphIndex, node: onnx.NodeProto, channels: int) -> Kept | None:
        if channels == bn.channels:
            return None
        return Kept(bn.label, f"channel mismatch: {node.op_type} '{node_label(node)}' has {channels} output channels, BN has {bn.channels}", graph.path)


class WeightAndBiasRule(ForwardRule):
    """Producers with a weight input 1 and an optional per-channel bias input 2 (Conv family).
    Their weight and bias may be quantized (bnfold.weights).

    Subclasses only say where the output channels lie in the weight: `weight_layout` returns
    (axis, groups), the output-channel count being weight.shape[axis] * groups for axis > 0.
    """

    quantized_weights = True

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
        new_weight = self.scaled_weight(bn, graph, node, 1, weight, axis, groups)
        if isinstance(new_weight, Kept):
            return new_weight
        new_bias = self.new_bias(bn, graph, node, 2, algebra.fold_bias(bias, bn.scale, bn.shift), weight.dtype)
        if isinstance(new_bias, Kept):
            return new_bias
        return Plan(bn, into=node, new_inputs=[(node, 1, new_weight), (node, 2, new_bias)])


# Ops between BN and the op it folds into that keep the values element for element (in inference),
# and the shape ops that turn [N, C, ...] into [N, C*...] rows, at most one of them on the way.
PASS_THROUGH_OPS = frozenset({"Dropout", "Identity"})
FLATTEN_OPS = frozenset({"Flatten", "Reshape"})


@dataclasses.dataclass(frozen=True)
class Path:
    """BN output -> Dropout/Identity/at most one Flatten or Reshape -> `consumer`, each single-use."""

    consumer: onnx.NodeProto
    value: str  # what `consumer` reads: BN's output, or the last pass-through op's
    flatten: onnx.NodeProto | None = None


def match_consumer(bn: BatchNorm, graph: GraphIndex) -> Path | Kept:
    """The op BN's output leads to, through single-use pass-through ops (checked on the way);
    which op it is and whether a rule folds into it is left to the rules."""
    node, value, flatten = bn.node, bn.y, None
    while True:
        reader = sole_reader(bn, graph, node, value)
        if isinstance(reader, Kept):
            return reader
        passes = reader.op_type in PASS_THROUGH_OPS or (reader.op_type in FLATTEN_OPS and flatten is None)
        if reader.domain not in DEFAULT_DOMAINS or not passes:
            return Path(reader, value, flatten)
        reason = data_input_reason(reader, value) or dropout_mode_reason(reader, graph)
        if reason:
            return Kept(bn.label, reason, graph.path)
        flatten = reader if reader.op_type in FLATTEN_OPS else flatten
        node, value = reader, reader.output[0]


def sole_reader(bn: BatchNorm, graph: GraphIndex, node: onnx.NodeProto, value: str) -> onnx.NodeProto | Kept:
    """The one op reading `value` (output of BN or of a pass-through op): folding changes `value`."""
    what = bn.what if node is bn.node else f"{node.op_type} '{node_label(node)}'"
    if graph.is_graph_output(value):
        return Kept(bn.label, f"{what} output '{value}' is a graph output", graph.path)
    # Readers of only dtype/shape (Shape, CastLike's target) see the same after a fold.
    readers = [n for n in graph.users(value) if not reads_only_metadata(n, value)]
    if len(readers) == 1:
        return readers[0]
    if not readers:
        return Kept(bn.label, f"{what} output '{value}' is not read by any op", graph.path)
    names = ", ".join(f"{n.op_type} '{node_label(n)}'" for n in readers[:3])
    return Kept(bn.label, f"fan-out: {what} output '{value}' feeds {names}", graph.path)


def data_input_reason(node: onnx.NodeProto, value: str) -> str:
    """Why `node` does not read `value` as its data input 0 only (a weight or shape input), or ""."""
    if node.input and node.input[0] == value and value not in list(node.input)[1:]:
        return ""
    return f"{node.op_type} '{node_label(node)}' reads '{value}' other than as its data input 0"


def dropout_mode_reason(node: onnx.NodeProto, graph: GraphIndex) -> str:
    """Why a Dropout may drop values (training mode), or "" (also for non-Dropout ops)."""
    if node.op_type != "Dropout":
        return ""
    opset = graph.model.opset(node.domain)
    if opset < 7 and not attribute(node, "is_test", 0):
        return f"Dropout '{node_label(node)}' has is_test=0 (training mode)"
    mode = node.input[2] if len(node.input) > 2 else ""
    value = graph.constant(mode) if mode else np.array(False)
    if value is None or value.size != 1 or bool(value.reshape(-1)[0]):
        return f"Dropout '{node_label(node)}' training_mode is not a constant false"
    return ""


class BackwardRule(Rule):
    """Base of the rules that fold a BN into the linear op reading its output (BN *before* it).

    The consumer L(y) = W y + b of y = scale * x + shift computes (W * scale) x + (b + W shift):
    subclasses say how to scale W along its input-channel axis and where the bias goes (`plan`).
    With a Flatten/Reshape on the way (`through_flatten`), `input_affine` expands the per-channel
    (scale, shift) over the flattened features first.
    """

    direction = "backward"
    consumer_ops: tuple[str, ...] = ()
    through_flatten = False
    quantized_refusal = (
        "a BN before the layer scales its input channels, which the weight's quantization (per tensor or "
        f"per output channel) cannot absorb exactly; {weights.FOLD_BEFORE_QUANTIZING}"
    )

    def accepts(self, path: Path) -> bool:
        return (
            path.consumer.domain in DEFAULT_DOMAINS
            and path.consumer.op_type in self.consumer_ops
            and (path.flatten is not None) == self.through_flatten
        )

    def targets(self, bn: BatchNorm, graph: GraphIndex) -> bool:
        path = match_consumer(bn, graph)
        return not isinstance(path, Kept) and self.accepts(path)

    def match(self, bn: BatchNorm, graph: GraphIndex) -> Plan | Kept:
        path = match_consumer(bn, graph)
        if isinstance(path, Kept):
            return path
        if not self.accepts(path):
            return no_consumer_reason(bn, graph, path, list(self.consumer_ops))
        reason = data_input_reason(path.consumer, path.value)
        if reason:
            return Kept(bn.label, reason, graph.path)
        affine = self.input_affine(bn, path, graph)
        if isinstance(affine, Kept):
            return affine
        plan = self.plan(bn, path.consumer, *affine, graph)
        return plan if isinstance(plan, Kept) else finite_or_kept(bn, graph, plan)

    def input_affine(self, bn: BatchNorm, path: Path, graph: GraphIndex) -> tuple[np.ndarray, np.ndarray] | Kept:
        """(scale, shift) per input channel of the consumer; BN's own vectors when nothing reshapes."""
        return bn.scale, bn.shift

    def plan(self, bn: BatchNorm, consumer: onnx.NodeProto, scale, shift, graph: GraphIndex) -> Plan | Kept:
        raise NotImplementedError

    @staticmethod
    def input_mismatch(bn: BatchNorm, graph: GraphIndex, node: onnx.NodeProto, channels: int, expected: int) -> Kept | None:
        if channels == expected:
            return None
        what = f"{node.op_type} '{node_label(node)}' has {channels} input channels, BN feeds {expected}"
        return Kept(bn.label, f"channel mismatch: {what}", graph.path)


def no_consumer_reason(bn: BatchNorm, graph: GraphIndex, path: Path | Kept, ops: list[str]) -> Kept:
    """Why no backward rule applies: the walk's own reason, or what BN's output leads to."""
    if isinstance(path, Kept):
        return path
    layer = _behind_activation_quantizer(graph, path.consumer, "forward")
    if layer is not None:
        return Kept(bn.label, activation_quantizer_reason(layer, "and the BN before it"), graph.path)
    node = f"{path.consumer.op_type} '{node_label(path.consumer)}'"
    if path.flatten is not None:
        node = f"{path.flatten.op_type} '{node_label(path.flatten)}' then {node}"
    wanted = " or ".join(filter(None, [", ".join(ops[:-1]), ops[-1]])) if ops else "foldable op"
    return Kept(bn.label, f"output feeds {node}, not a {wanted}", graph.path)
