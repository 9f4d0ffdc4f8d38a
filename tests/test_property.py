"""Property tests: random ONNX graphs with BatchNormalization, folded, and checked (issues 2 and 6).

tests/strategies.py generates the graphs (chains and DAGs of Conv/ConvTranspose/Gemm/MatMul/Add/
Mul/Relu/Concat/Flatten/Reshape/BN, random shapes, groups, dtypes, opsets, fan-out, shared weights,
graph outputs anywhere). On every example, after `bnfold.fold(model)`:

1. onnx.checker with full_check passes on the result;
2. graph input and output names are unchanged, in order;
3. outputs equal the original's: onnxruntime with ORT_DISABLE_ALL on both sides, or, where
   onnxruntime has no kernel for the original (float64 Conv/ConvTranspose), onnx's reference
   evaluator on both sides with the BatchNormalization below (onnx's own mixes in batch
   statistics before opset 14);
4. the report accounts for every original BN exactly once and bn_after is the result's BN count;
5. nothing foldable is left: folding the result folds nothing, and bnfold.check agrees;
6. nothing unsafe is folded: training_mode=1 and non-constant parameters stay; a BN folds into its
   producer only when the producer's output feeds nothing else and is not a graph output, into its
   reader only when its own output feeds that reader alone and is not a graph output; never into a
   Conv that pads; never into a MatMul whose product / input is not 2-D. And a BN with a plainly
   foldable producer (Conv/ConvTranspose/Gemm/2-D MatMul used by BN alone) is folded.

7. quantized weights (graphs of `graph_cases(quantized=True)`, the quantized model being the
   reference of 3): every layer whose weight a DequantizeLinear makes still reads it from a
   DequantizeLinear after the fold (of the same stored integer type, or still fake-quantized
   through a QuantizeLinear): no silent de-quantization; the report marks exactly the folds into
   such layers `quantized`; and a BN whose producer is such a layer (read by BN alone) folds into
   it exactly when an exact fold exists, as worked out here from the original's integers, scales
   and BN scale (a negative scale on a channel whose integers cannot be negated within their
   type, a per-channel axis other than the output channels, per-tensor scales before opset 13, a
   grouped ConvTranspose, a fake-quantized weight that would round to another integer), else is
   kept with that reason (or folds backward into another layer).

Tolerance, per output: max|folded - original| <= K * u * d * kappa * (max|original| + 1), u the
dtype's machine epsilon and d the ops on the output's longest path from an input. Each op rounds
its result on both sides and a fold changes what is rounded (weights times the BN scale, one
rounding less), so the difference grows by about one rounding per op; float32/float64 kernels
accumulate dot products at working precision, which adds up to ~sqrt(K_dot) roundings (K = 16);
onnxruntime's float16 kernels accumulate in float32 and round once (K = 4). The "+ 1" is the scale
activations have: the generator keeps them O(1) (weights ~ N(0, 1/fan_in), BN scale ~1), so an
output near zero is held to the precision of the values it came from. kappa is the conditioning
of kept training-mode BN upstream: they divide by the batch spread, amplifying a relative input
difference by max|x| / max(max|x - batch mean|, sqrt(batch var + epsilon)) per channel, measured
on the original's run.
A wrong fold is off by O(1) of the output (a misplaced scale, a lost shift); the planted-bug
tests at the bottom show that this tolerance catches one of 1e-4 relative in float32.

Quick profile: QUICK_EXAMPLES examples per property; BNFOLD_PROPERTY_EXAMPLES=N runs N
(benchmarks/fuzz_long.py runs thousands, without stopping at the first failure).
"""

from __future__ import annotations

import collections
import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis.errors import InvalidArgument
from onnx import helper

import bnfold
import bnfold.rules
from bnfold import algebra
from bnfold.graph import node_label
from conftest import bn_node, count_bn, make_model, tensor, value_info
from strategies import BnFacts, GraphCase, QuantFacts, graph_cases

QUICK_EXAMPLES = 300
EXAMPLES = int(os.environ.get("BNFOLD_PROPERTY_EXAMPLES", QUICK_EXAMPLES))
# Drawing a graph takes hundreds of small draws; too_slow would flag that generation, not bnfold.
PROPERTY = settings(
    derandomize=True,
    deadline=None,
    max_examples=EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow],
)
ROUNDINGS_PER_OP = {np.dtype(np.float16): 4.0, np.dtype(np.float32): 16.0, np.dtype(np.float64): 16.0}
# How often the properties met a known bnfold bug they tolerate (benchmarks/fuzz_long.py prints it).
KNOWN_BUGS_SEEN: collections.Counter = collections.Counter()
# A BN rule folds forward (into the op producing BN's input) or backward (into the op reading its
# output); rules for BN written out as arithmetic, if any, are not BN records' business.
DIRECTION = {rule.name: rule.direction for rule in getattr(bnfold.rules, "ALL_RULES", bnfold.rules.RULES)}
MATMUL_RULES = {"bn_into_matmul", "bn_into_matmul_add", "bn_into_next_matmul"}


# --------------------------------------------------------------------------- running models


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # initializers listed as inputs are intended here
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _reference_batchnorm():
    """BatchNormalization by the spec for onnx.reference: inference with the given statistics;
    training mode (BN-14+) with the batch's, and the running statistics as outputs 1-2."""
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=1e-5, momentum=0.9, training_mode=0, **_):
            axes = tuple(i for i in range(x.ndim) if i != 1)
            shape = (-1,) + (1,) * (x.ndim - 2)
            x64 = x.astype(np.float64)
            stats = (x64.mean(axis=axes), x64.var(axis=axes)) if training_mode else (mean, var)
            m, v = (np.asarray(s, np.float64).reshape(shape) for s in stats)
            s, b = (np.asarray(p, np.float64).reshape(shape) for p in (scale, bias))
            y = ((x64 - m) / np.sqrt(v + float(np.float32(epsilon))) * s + b).astype(x.dtype)
            if not training_mode:
                return (y,)
            running = [r * momentum + c * (1 - momentum) for r, c in zip((mean, var), stats)]
            return (y, *(r.astype(mean.dtype) for r in running))[: len(self.onnx_node.output)]

    return BatchNormalization


def run_reference(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=[_reference_batchnorm()]).run(None, feeds)


def ort_refuses():
    """What onnxruntime raises for a valid model it has no kernel for (float64 Conv)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented

    return NotImplemented


def run_one(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    try:
        return run_ort(model, feeds)
    except ort_refuses():
        return run_reference(model, feeds)


def run_both(original: onnx.ModelProto, folded: onnx.ModelProto, feeds: dict):
    """(engine, original's outputs, folded's outputs); onnxruntime unless it has no kernel for
    the original, and then the reference evaluator for both."""
    try:
        expected = run_ort(original, feeds)
    except ort_refuses():
        return "reference", run_reference(original, feeds), run_reference(folded, feeds)
    return "onnxruntime", expected, run_ort(folded, feeds)


# --------------------------------------------------------------------------- the invariants


def record(text: str) -> None:
    """hypothesis's note (printed with a failing example); nothing outside a hypothesis test."""
    try:
        note(text)
    except InvalidArgument:
        pass


def bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def check_valid_and_named(case: GraphCase, folded: onnx.ModelProto) -> None:
    """Invariants 1 and 2."""
    onnx.checker.check_model(folded, full_check=True)
    assert [i.name for i in folded.graph.input] == [i.name for i in case.model.graph.input]
    assert [o.name for o in folded.graph.output] == [o.name for o in case.model.graph.output]


def check_outputs(case: GraphCase, folded: onnx.ModelProto) -> None:
    """Invariant 3, with the tolerance of the module docstring."""
    engine, expected, actual = run_both(case.model, folded, case.feeds)
    kappa = training_amplification(case)
    for out, e, a in zip(case.model.graph.output, expected, actual, strict=True):
        assert e.shape == a.shape and e.dtype == a.dtype, (out.name, e.shape, a.shape, e.dtype, a.dtype)
        if not np.all(np.isfinite(e)):
            record(f"{out.name}: the original is not finite; compared for equal non-finite positions")
            assert np.array_equal(np.isfinite(e), np.isfinite(a)), out.name
            e, a = np.where(np.isfinite(e), e, 0), np.where(np.isfinite(a), a, 0)
        limit = tolerance(case, out.name, e, kappa.get(out.name, 1.0))
        error = float(np.max(np.abs(e.astype(np.float64) - a.astype(np.float64)))) if e.size else 0.0
        record(f"{out.name} ({engine}): max abs error {error:.3g}, limit {limit:.3g}")
        assert error <= limit, f"{out.name}: max abs error {error:.3g} > {limit:.3g} ({engine})"


def tolerance(case: GraphCase, name: str, expected: np.ndarray, kappa: float) -> float:
    dtype = np.dtype(expected.dtype)
    scale = float(np.max(np.abs(expected.astype(np.float64)))) if expected.size else 0.0
    u = float(np.finfo(dtype).eps)
    return ROUNDINGS_PER_OP[dtype] * u * max(case.depth[name], 1) * kappa * (scale + 1.0)


def training_amplification(case: GraphCase) -> dict[str, float]:
    """Per graph output: the product of kappa over the training-mode BN it depends on."""
    training = [n for n in bn_nodes(case.model) if case.bns[n.output[0]].training]
    if not training:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(case.model)
    elem = case.model.graph.input[0].type.tensor_type.elem_type
    names = list(dict.fromkeys(n.input[0] for n in training))
    outputs = {o.name for o in case.model.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, elem, None) for n in names if n not in outputs)
    produced = dict(zip([o.name for o in probe.graph.output], run_one(probe, case.feeds)))
    factors = {out.name: 1.0 for out in case.model.graph.output}
    for node in training:
        x = produced[node.input[0]].astype(np.float64)
        axes = tuple(i for i in range(x.ndim) if i != 1)
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        spread = np.max(np.abs(x - x.mean(axis=axes, keepdims=True)), axis=axes)
        spread = np.maximum(spread, np.sqrt(x.var(axis=axes) + epsilon))  # epsilon bounds the gain
        kappa = float(np.max(np.max(np.abs(x), axis=axes) / spread))
        for out in downstream(case.model, node.output[0]) & factors.keys():
            factors[out] *= max(kappa, 1.0)
    return factors


def downstream(model: onnx.ModelProto, name: str) -> set[str]:
    """Every value computed from `name` (itself included)."""
    reached, changed = {name}, True
    while changed:
        changed = False
        for node in model.graph.node:
            if reached.intersection(node.input) and not reached.issuperset(node.output):
                reached.update(o for o in node.output if o)
                changed = True
    return reached


def check_report(case: GraphCase, result) -> None:
    """Invariant 4: one record per original BN, under its label; bn_after is what is left."""
    report = result.report
    records = bn_records(case, report)
    assert len(records) == len(report.folded) + len(report.kept), "two records for one BN"
    assert sorted(records) == sorted(node_label(n) for n in bn_nodes(case.model)), report.to_dict()
    assert report.bn_before == len(records)
    assert report.bn_after == count_bn(result.model) == len(report.kept), report.to_dict()


def bn_records(case: GraphCase, report) -> dict:
    """The report's records by the label of the BN they are about (as named in the input)."""
    records: dict = {}
    for entry in (*report.folded, *report.kept):
        records.setdefault(entry.bn, entry)
    return records


def check_nothing_left(result) -> None:
    """Invariant 5: the result is a fixed point of fold, and check finds nothing to fold."""
    again = bnfold.fold(result.model)
    assert not again.report.folded, again.report.to_dict()
    assert not bnfold.check(result.model).folded
    assert not again.report.modified, again.report.to_dict()
    assert again.model.SerializeToString() == result.model.SerializeToString()


def check_safety(case: GraphCase, result) -> None:
    """Invariant 6, judged on the original graph (folds keep value names and reader counts)."""
    graph = case.model.graph
    outputs = {o.name for o in graph.output}
    records = bn_records(case, result.report)
    folded = {label: r for label, r in records.items() if isinstance(r, bnfold.Folded)}
    kept = {label: r.reason for label, r in records.items() if isinstance(r, bnfold.Kept)}
    for node in bn_nodes(case.model):
        label, facts = node_label(node), case.bns[node.output[0]]
        x, y = node.input[0], node.output[0]
        forward_ok = x not in outputs and readers(graph, x) == [node]
        backward_ok = y not in outputs and len(readers(graph, y)) == 1
        if facts.training or not facts.constant_params or not (forward_ok or backward_ok):
            assert label in kept, (label, facts, folded.get(label))
            continue
        if label in folded:
            fold = folded[label]
            allowed = {"forward"} if forward_ok else set()
            allowed |= {"backward"} if backward_ok else set()
            assert DIRECTION.get(fold.rule) in allowed, (fold, DIRECTION.get(fold.rule))
            assert not (fold.rule == "bn_into_next_conv" and fold.into in case.padded_convs), fold
            assert not (fold.rule in MATMUL_RULES and len(case.shapes[x]) != 2), fold
        elif plainly_foldable(case, node, forward_ok):
            assert "overflow" in kept[label], (label, kept[label])


def readers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if name in n.input]


def plainly_foldable(case: GraphCase, node: onnx.NodeProto, forward_ok: bool) -> bool:
    """A constant inference BN whose producer is a Conv/ConvTranspose/Gemm (or a MatMul with a
    2-D product) read by it alone: the generator's weights are constants of matching shape. A
    weight a DequantizeLinear makes is check_quantized's business."""
    producer = next((n for n in case.model.graph.node if node.input[0] in n.output), None)
    if not forward_ok or producer is None or producer.name in {*quantized_layers(case.model), *quantized_biases(case.model)}:
        return False
    return producer.op_type in ("Conv", "ConvTranspose", "Gemm") or (
        producer.op_type == "MatMul" and len(case.shapes[node.input[0]]) == 2
    )


def check_invariants(case: GraphCase):
    """All six invariants on one example; returns the fold result."""
    record(case.describe())
    snapshot = case.model.SerializeToString()
    result = bnfold.fold(case.model)
    assert case.model.SerializeToString() == snapshot, "fold() modified its input"
    record(f"report: {result.report.to_dict()}")
    check_valid_and_named(case, result.model)
    check_report(case, result)
    check_safety(case, result)
    check_nothing_left(result)
    if case.quantized:
        check_quantized(case, result)
    check_outputs(case, result.model)
    return result


# --------------------------------------------------------------------------- quantized weights


LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
INTEGER_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255),
                  np.dtype(np.int16): (-(2**15), 2**15 - 1), np.dtype(np.uint16): (0, 2**16 - 1),
                  np.dtype(np.int32): (-(2**31), 2**31 - 1)}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output if o}


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant node outputs, by name."""
    found = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            found[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return found


def constant_types(model: onnx.ModelProto) -> dict[str, int]:
    found = {t.name: t.data_type for t in model.graph.initializer}
    return found | {n.output[0]: n.attribute[0].t.data_type for n in model.graph.node if n.op_type == "Constant"}


def weight_source(made_by: dict, name: str) -> onnx.NodeProto | None:
    """The node making `name`, looking through no-ops (Identity, Dropout, Cast)."""
    node = made_by.get(name)
    while node is not None and node.op_type in ("Identity", "Dropout", "Cast"):
        node = made_by.get(node.input[0])
    return node


def dequantized_inputs(model: onnx.ModelProto) -> dict[tuple[str, int], onnx.NodeProto]:
    """(layer name, input position) -> the DequantizeLinear making that input (through no-ops):
    the weight (1) of Conv / ConvTranspose / Gemm / MatMul, the bias (2) of the first three, and
    the operands of an Add reading a MatMul (a Linear layer's bias)."""
    made_by = producers(model)
    found = {}
    for node in model.graph.node:
        positions = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,)}.get(node.op_type, ())
        if node.op_type == "Add" and any(getattr(made_by.get(i), "op_type", "") == "MatMul" for i in node.input):
            positions = (0, 1)
        for position in positions:
            source = weight_source(made_by, node.input[position]) if position < len(node.input) and node.input[position] else None
            if source is not None and source.op_type == "DequantizeLinear":
                found[(node.name, position)] = source
    return found


def quantized_layers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Layer name -> the DequantizeLinear making its weight (input 1), through no-ops."""
    return {name: dq for (name, position), dq in dequantized_inputs(model).items() if position == 1}


def quantized_biases(model: onnx.ModelProto) -> set[str]:
    """Layers a fold writes a quantized bias for: Conv / ConvTranspose / Gemm with a dequantized
    input 2, a MatMul read by an Add with a dequantized operand."""
    made_by, found = producers(model), set()
    for name, position in dequantized_inputs(model):
        node = next(n for n in model.graph.node if n.name == name)
        if node.op_type == "Add":
            found.update(made_by[i].name for i in node.input if getattr(made_by.get(i), "op_type", "") == "MatMul")
        elif position == 2:
            found.add(name)
    return found


def attr(node: onnx.NodeProto, name: str, default):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def output_layout(layer: onnx.NodeProto) -> tuple[int, int]:
    """(the weight's output-channel axis, groups splitting it)."""
    if layer.op_type == "Conv":
        return 0, 1
    if layer.op_type == "ConvTranspose":
        return 1, attr(layer, "group", 1)
    if layer.op_type == "Gemm":
        return (0 if attr(layer, "transB", 0) else 1), 1
    return 1, 1


def along(vector: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if axis is None or vector.ndim == 0:
        return vector.reshape(())
    dims = [1] * ndim
    dims[axis] = -1
    return vector.reshape(dims)


def quantize_like_onnx(weight, scale, zero_point, axis, low, high) -> np.ndarray:
    """QuantizeLinear by the spec: float32 weight / scale, round half to even, + zero point,
    saturated; as int64."""
    ratio = np.asarray(weight, np.float32) / along(np.asarray(scale, np.float32), axis, weight.ndim)
    return np.clip(np.rint(ratio) + along(zero_point.astype(np.int64), axis, weight.ndim), low, high).astype(np.int64)


def constant_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    """A constant, or what a DequantizeLinear (per tensor) of constants makes of them."""
    values = constants(model)
    if name in values:
        return values[name]
    dq = producers(model)[name]
    assert dq.op_type == "DequantizeLinear", dq
    zero_point = values[dq.input[2]].astype(np.int64) if len(dq.input) > 2 and dq.input[2] else 0
    scale = values[dq.input[1]]
    return ((values[dq.input[0]].astype(np.int64) - zero_point).astype(np.float32) * scale.astype(np.float32)).astype(scale.dtype)


def bn_affine(case: GraphCase, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
    """BN's (scale, shift) in float64 from the original's constants (or dequantized constants)."""
    gamma, beta, mean, var = (constant_value(case.model, name).astype(np.float64) for name in bn.input[1:5])
    s = gamma / np.sqrt(var + np.float64(np.float32(attr(bn, "epsilon", 1e-5))))
    return s, beta - mean * s


def expected_quantized_fold(case: GraphCase, bn: onnx.NodeProto, layer: onnx.NodeProto) -> str | None:
    """None when BN folds exactly into `layer`, whose weight or bias a DequantizeLinear makes,
    else a fragment of the reason it must be kept with; worked out from the original model,
    independently of bnfold, in the order bnfold checks (weight, then bias)."""
    inputs = dequantized_inputs(case.model)
    s, shift = bn_affine(case, bn)
    weight_dq, bias_dq = inputs.get((layer.name, 1)), inputs.get((layer.name, 2))
    reason = expected_weight_reason(case, s, layer, weight_dq) if weight_dq is not None else None
    if reason is None and bias_dq is not None:
        reason = expected_bias_reason(case, s, shift, layer, bias_dq)
    return reason


def expected_weight_reason(case: GraphCase, s: np.ndarray, layer: onnx.NodeProto, dq: onnx.NodeProto) -> str | None:
    values, made_by = constants(case.model), producers(case.model)
    opset = case.model.opset_import[0].version
    out_axis, groups = output_layout(layer)
    scale = values[dq.input[1]]
    zero_point = values[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else None
    quantizer = made_by.get(dq.input[0])
    if quantizer is not None and quantizer.op_type == "QuantizeLinear":  # fake-quantized: over a float W
        if readers(case.model.graph, dq.input[0]) != [dq]:
            return "output is read elsewhere too"
        weight = values[quantizer.input[0]]
        integer = np.dtype(np.uint8) if zero_point is None else zero_point.dtype
    else:
        weight, integer = None, values[dq.input[0]].dtype
    zero_point = np.zeros((), integer) if zero_point is None else zero_point
    low, high = INTEGER_RANGES[integer]
    rank = (weight if weight is not None else values[dq.input[0]]).ndim
    axis = None if scale.size == 1 else attr(dq, "axis", 1) % rank
    ints = (quantize_like_onnx(weight, scale, zero_point, axis, low, high) if weight is not None
            else values[dq.input[0]].astype(np.int64))
    if groups > 1:
        return "grouped along axis 1"
    if axis is not None and axis != out_axis:
        return f"quantized along axis {axis}"
    if axis is None and opset < 13 and not np.all(np.abs(s) == np.abs(s[0])):
        return f"of opset {opset}, which has no per-channel scales"
    new_scale = (np.broadcast_to(scale.astype(np.float64), s.shape) * np.abs(s)).astype(scale.dtype)
    if not np.all(np.isfinite(new_scale)) or np.any(np.abs(new_scale) < np.finfo(scale.dtype).tiny):
        return "the scaled quantization scale leaves the float range"  # or would be flushed to zero as a subnormal
    negated = np.where(along(s < 0, out_axis, rank), 2 * along(zero_point.astype(np.int64), axis, rank) - ints, ints)
    outside = np.moveaxis((negated < low) | (negated > high), out_axis, 0).reshape(len(s), -1).any(axis=1)
    if outside.any():
        return f"BN scale is negative on channel {int(np.flatnonzero(outside)[0])} and its quantized weights there cannot be negated within {integer.name}"
    if weight is not None:
        new_weight = (weight.astype(np.float64) * along(s, out_axis, rank)).astype(weight.dtype)
        new_zero = np.broadcast_to(zero_point, s.shape)
        moved = int(np.count_nonzero(quantize_like_onnx(new_weight, new_scale, new_zero, out_axis, low, high) != negated))
        if moved:
            return f"{moved} quantized weights would move by a step"
    return None


def expected_bias_reason(case: GraphCase, s, shift, layer: onnx.NodeProto, dq: onnx.NodeProto) -> str | None:
    """An int32 bias is quantized again at scale * |s|: refused when not an int32 vector, per
    tensor before opset 13 (unless |s| is one value), or overflowing int32."""
    values, opset = constants(case.model), case.model.opset_import[0].version
    stored, scale = values[dq.input[0]], values[dq.input[1]]
    if stored.dtype != np.int32 or stored.ndim != 1:
        return "other than as an int32 vector"
    if scale.size == 1 and opset < 13 and not np.all(np.abs(s) == np.abs(s[0])):
        return f"of opset {opset}, which has no per-channel scales"
    bias = stored.astype(np.float32) * np.asarray(scale, np.float32)
    beta = attr(layer, "beta", 1.0) if layer.op_type == "Gemm" else 1.0
    folded = np.float64(beta) * bias.astype(np.float64) * s + shift
    new_scale = (np.broadcast_to(scale.astype(np.float64), s.shape) * np.abs(s)).astype(np.float32)
    integers = np.rint(folded / new_scale.astype(np.float64))
    if not np.all(np.isfinite(integers)) or integers.min() < -(2**31) or integers.max() > 2**31 - 1:
        return "overflows int32"
    return None


def check_quantized(case: GraphCase, result) -> None:
    """Invariant 7 (see the module docstring), judged against the original graph."""
    inputs, folded = dequantized_inputs(case.model), {n.name: n for n in result.model.graph.node}
    made_by, made_after = producers(case.model), producers(result.model)
    kinds, kinds_after = constant_types(case.model), constant_types(result.model)
    for (name, position), dq in inputs.items():  # no silent de-quantization
        node = folded[name]
        now = weight_source(made_after, node.input[position])
        assert now is not None and now.op_type == "DequantizeLinear", f"{name}: input {position} {node.input[position]!r} no longer from a DequantizeLinear"
        if getattr(made_by.get(dq.input[0]), "op_type", "") == "QuantizeLinear":
            quantizer = made_after.get(now.input[0])
            assert quantizer is not None and quantizer.op_type == "QuantizeLinear", f"{name}: no longer fake-quantized"
        else:
            assert kinds_after.get(now.input[0]) == kinds[dq.input[0]], f"{name}: stored integers {now.input[0]!r} changed type"
    weights, biases = set(quantized_layers(case.model)), quantized_biases(case.model)
    for fold in result.report.folded:  # the report marks the folds into quantized weights
        forward = DIRECTION.get(fold.rule) == "forward"  # a backward fold writes neither a quantized weight nor bias
        assert fold.quantized == (forward and (fold.into in weights or fold.into in biases)), fold
        assert forward or fold.into not in weights, fold
    records = bn_records(case, result.report)
    graph, outputs = case.model.graph, {o.name for o in case.model.graph.output}
    for bn in bn_nodes(case.model):  # BN after a quantized layer: folded exactly when it can be, else kept with why
        facts, layer = case.bns[bn.output[0]], made_by.get(bn.input[0])
        if facts.training or not facts.constant_params or layer is None or layer.name not in weights | biases:
            continue
        if layer.op_type not in LAYERS or bn.input[0] in outputs or readers(graph, bn.input[0]) != [bn]:
            continue
        if layer.op_type == "MatMul" and len(case.shapes[bn.input[0]]) != 2:
            continue
        expected, record_ = expected_quantized_fold(case, bn, layer), records[node_label(bn)]
        into_layer = isinstance(record_, bnfold.Folded) and record_.into == layer.name
        if expected is None:
            assert into_layer or (isinstance(record_, bnfold.Kept) and "overflow" in record_.reason), (node_label(bn), record_)
        else:
            assert not into_layer, (node_label(bn), expected, record_)
            assert isinstance(record_, bnfold.Folded) or expected in record_.reason, (node_label(bn), expected, record_.reason)


# --------------------------------------------------------------------------- the properties


@PROPERTY
@given(case=graph_cases())
def test_fold_random_graph_all_invariants_hold(case):
    check_invariants(case)


@PROPERTY
@given(case=graph_cases(quantized=True))
def test_fold_random_quantized_graph_all_invariants_hold(case):
    """Layer weights mostly from DequantizeLinear (stored or fake-quantized, per tensor or per
    channel, int8/uint8, low ends, shared): invariants 1-7 against the quantized original."""
    check_invariants(case)


@PROPERTY
@given(case=graph_cases(unsafe=True))
def test_fold_random_graph_unsafe_bn_is_kept(case):
    check_unsafe_kept(case, check_invariants(case))


def check_unsafe_kept(case: GraphCase, result) -> None:
    """The BN of strategies.unsafe_bn (its producer's output is a graph output or feeds another
    op, its own output is a graph output) stays, and the report says why."""
    node = next(n for n in bn_nodes(case.model) if n.output[0] == case.unsafe)
    kept = {k.bn: k.reason for k in result.report.kept}
    assert node_label(node) in kept, result.report.to_dict()
    assert "is a graph output" in kept[node_label(node)] or "fan-out" in kept[node_label(node)], kept[node_label(node)]


# --------------------------------------------------------------------------- the checks can fail


def _conv_bn_case(rng) -> GraphCase:
    """Conv -> BN in float32, the smallest case a planted bug must show in."""
    inits = [tensor("W", rng.normal(0, 0.5, [4, 3, 3, 3]).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node(inits, "c", "y", rng, 4, name="bn")]
    model = make_model(nodes, [value_info("x", np.float32, [2, 3, 5, 5])], [value_info("y", np.float32, [2, 4, 3, 3])], inits)
    return GraphCase(
        model=model,
        feeds={"x": rng.normal(0, 1, [2, 3, 5, 5]).astype(np.float32)},
        dtype=np.dtype(np.float32),
        bns={"y": BnFacts("y", False, True)},
        padded_convs=frozenset(),
        depth={"y": 2},
        shapes={"x": (2, 3, 5, 5), "c": (2, 4, 3, 3), "y": (2, 4, 3, 3)},
        steps=["Conv", "BatchNormalization"],
    )


def test_property_planted_small_fold_error_is_caught(rng, monkeypatch):
    """A fold whose scale is off by 1e-4 (relative) fails the output check in float32."""
    from bnfold import algebra

    case = _conv_bn_case(rng)
    check_invariants(case)  # the honest fold passes
    real = algebra.bn_scale_shift
    monkeypatch.setattr(algebra, "bn_scale_shift", lambda *a, **k: tuple(v * (1 + 1e-4) for v in real(*a, **k)))
    with pytest.raises(AssertionError, match="max abs error"):
        check_outputs(case, bnfold.fold(case.model).model)


def test_property_planted_unsafe_fold_is_caught(rng):
    """A fold into a producer whose output is also a graph output fails the safety check."""
    case = _conv_bn_case(rng)
    case.model.graph.output.append(value_info("c", np.float32, [2, 4, 3, 3]))
    result = bnfold.fold(case.model)
    forged = bnfold.FoldResult(result.model, bnfold.FoldReport(folded=(bnfold.Folded("bn", "conv", "bn_into_conv"),), bn_before=1))
    with pytest.raises(AssertionError):
        check_safety(case, forged)


def _quantized_conv_bn_case(rng, low_end: bool = False) -> GraphCase:
    """_conv_bn_case with W = DequantizeLinear(int8 per output channel, zero point 0), and BN's
    scale negative on channel 0; `low_end`: W's channel 0 holds -128, which cannot be negated."""
    case = _conv_bn_case(rng)
    graph = case.model.graph
    w = next(t for t in graph.initializer if t.name == "W")
    values = onnx.numpy_helper.to_array(w)
    scale = (np.abs(values).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
    q = np.clip(np.rint(values / scale.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
    if low_end:
        q[0, 0, 0, 0] = -128
    graph.initializer.remove(w)
    graph.initializer.extend([tensor("Wq", q), tensor("ws", scale), tensor("wz", np.zeros(4, np.int8))])
    graph.node.insert(0, helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["W"], name="dq", axis=0))
    bn_scale = next(t for t in graph.initializer if t.name == "bn_scale")
    gamma = onnx.numpy_helper.to_array(bn_scale).copy()
    gamma[0] = -abs(gamma[0])
    bn_scale.CopyFrom(onnx.numpy_helper.from_array(gamma, "bn_scale"))
    onnx.checker.check_model(case.model, full_check=True)
    case.quantized = {"W": QuantFacts("dq", False, "int8", "0", 0, low_end)}
    return case


def test_property_planted_dequantized_fold_is_caught(rng, monkeypatch):
    """A fold that writes the quantized weight back as a float initializer (right values, no
    DequantizeLinear left) fails invariant 7."""
    from bnfold.rules.base import Rule

    case = _quantized_conv_bn_case(rng)
    check_invariants(case)  # the honest fold passes
    monkeypatch.setattr(Rule, "scaled_weight", staticmethod(lambda bn, graph, node, position, weight, axis, groups=1:
                                                             algebra.scale_along_axis_cast(weight, bn.scale, axis, groups)))
    with pytest.raises(AssertionError, match="no longer from a DequantizeLinear"):
        check_invariants(case)


def test_property_planted_fold_through_a_low_end_is_caught(rng, monkeypatch):
    """int8 -128 on a channel BN negates: kept; a fold that believes int8 reaches +128 wraps the
    negated -128 around and fails invariant 7 (the BN had to be kept)."""
    from bnfold import weights

    case = _quantized_conv_bn_case(rng, low_end=True)
    result = check_invariants(case)
    assert "cannot be negated within int8" in result.report.kept[0].reason
    monkeypatch.setitem(weights._RANGES, onnx.TensorProto.INT8, (-128, 128))
    with pytest.raises(AssertionError, match="cannot be negated"):
        check_invariants(case)


# --------------------------------------------------------------------------- bugs the properties found


def test_regression_bn_into_matmul_unnamed_bn_keeps_its_label(rng):
    """Regression (found by the property test): the report names a BN by its label in the input;
    an unnamed BN folded by bn_into_matmul (the BN node becomes Add(product, shift)) was reported
    as 'Add(y)', a node the input does not have, and rollback's skip map could not undo it."""
    inits = [tensor("W", rng.normal(0, 0.5, [3, 4]).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul"), bn_node(inits, "m", "y", rng, 4)]
    nodes[1].name = ""
    model = make_model(nodes, [value_info("x", np.float32, [2, 3])], [value_info("y", np.float32, [2, 4])], inits)
    (folded,) = bnfold.fold(model).report.folded
    assert folded.bn == "BatchNormalization(y)"


def test_fold_flatten_matmul_bn_add_is_idempotent(rng):
    """Regression (found by the property test at 94f4cbf, fixed in f6338d4): BN -> Flatten ->
    MatMul -> BN -> Add(k): bn_through_flatten_into_matmul adds a bias Add, bn_into_matmul_add
    folds the second BN into it, and the result, MatMul -> Add -> Add(k), was not a fixed point:
    a second fold merged the two Adds (affine_into_matmul)."""
    inits = [tensor("W", rng.normal(0, 0.5, [12, 4]).astype(np.float32)), tensor("k", rng.normal(0, 1, [4]).astype(np.float32))]
    nodes = [
        bn_node(inits, "x", "b1", rng, 3, name="bn1"),
        helper.make_node("Flatten", ["b1"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "W"], ["m"], name="matmul"),
        bn_node(inits, "m", "b2", rng, 4, name="bn2"),
        helper.make_node("Add", ["b2", "k"], ["y"], name="add"),
    ]
    model = make_model(nodes, [value_info("x", np.float32, [2, 3, 2, 2])], [value_info("y", np.float32, [2, 4])], inits)
    once = bnfold.fold(model)
    assert len(once.report.folded) == 2
    assert not bnfold.fold(once.model).report.modified


def test_regression_bn_into_matmul_after_a_backward_bias_add_folds(rng):
    """Regression (fixed: graph.ModelIndex.value_type places added nodes before inferring): BN -> MatMul -> MatMul -> MatMul -> BN on [N, 3]: the first BN folds backward into the first
    MatMul, which gets a bias Add appended at the end of graph.node (finish() moves it later).
    The second BN needs the rank of the last product, and the lazy shape inference runs on that
    unsorted graph: every value after the Add is untyped, so it is kept ("rank unknown"), and a
    second fold then folds it (found by benchmarks/fuzz_long.py)."""
    inits = [tensor("W1", rng.normal(0, 0.5, [3, 3]).astype(np.float32)), tensor("W2", rng.normal(0, 0.5, [3, 4]).astype(np.float32))]
    nodes = [
        bn_node(inits, "x", "b1", rng, 3, name="bn1"),
        helper.make_node("MatMul", ["b1", "W1"], ["m1"], name="matmul1"),
        helper.make_node("MatMul", ["m1", "W1"], ["m2"], name="matmul2"),
        helper.make_node("MatMul", ["m2", "W2"], ["m3"], name="matmul3"),
        bn_node(inits, "m3", "y", rng, 4, name="bn2"),
    ]
    model = make_model(nodes, [value_info("x", np.float32, ["N", 3])], [value_info("y", np.float32, ["N", 4])], inits)
    result = bnfold.fold(model)
    assert not result.report.kept, result.report.to_dict()
