"""Shared test helpers: a seeded rng, a tiny model builder, and `assert_folds`.

`assert_folds` is the one assertion every rule test uses: the folded model passes onnx.checker,
has the expected number of BN left, and computes the original's outputs in onnxruntime, the
original run with graph optimisations DISABLED (onnxruntime fuses Conv+BN itself otherwise).
It runs onnxruntime directly, independently of bnfold.verify, so the product cannot vouch for itself.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold

OPSET = 17
NP_TO_ONNX = {
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
}


@pytest.fixture
def rng():
    return np.random.default_rng(20261124)


def bn_stats(rng, channels: int, dtype=np.float32) -> list[np.ndarray]:
    """Non-trivial BN parameters (scale, B, mean, var): a wrong fold shows in the outputs."""
    values = (
        rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels),
        rng.normal(0, 1, channels),
        rng.normal(0, 1, channels),
        rng.uniform(0.5, 2.0, channels),
    )
    return [v.astype(dtype) for v in values]


def bn_node(graph_inits: list, x: str, y: str, rng, channels: int, dtype=np.float32, name=None, **attrs):
    """A BatchNormalization node with random statistics added to `graph_inits`."""
    base = name or y
    names = [f"{base}_{p}" for p in ("scale", "B", "mean", "var")]
    for n, value in zip(names, bn_stats(rng, channels, dtype)):
        graph_inits.append(numpy_helper.from_array(value, n))
    return helper.make_node("BatchNormalization", [x, *names], [y], name=base, **attrs)


def tensor(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def value_info(name: str, dtype, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, NP_TO_ONNX[np.dtype(dtype)], shape)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = OPSET, value_infos=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers), value_info=list(value_infos))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    _fill_output_shapes(model)
    onnx.checker.check_model(model)
    return model


def _fill_output_shapes(model: onnx.ModelProto) -> None:
    """Outputs declared without a shape get the inferred one (the checker wants a shape)."""
    missing = [o for o in model.graph.output if not o.type.tensor_type.HasField("shape")]
    if not missing:
        return
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type for vi in (*inferred.graph.output, *inferred.graph.value_info)}
    for out in missing:
        if out.name in types:
            out.type.CopyFrom(types[out.name])


def count_bn(model: onnx.ModelProto) -> int:
    def visit(graph):
        total = 0
        for node in graph.node:
            total += node.op_type == "BatchNormalization"
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    total += visit(attr.g)
        return total

    return visit(model.graph)


def random_inputs(model: onnx.ModelProto, rng, dims: dict | None = None) -> dict[str, np.ndarray]:
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (dims or {}).get(d.dim_param, 2) for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[inp.name] = rng.normal(0, 1, shape).astype(dtype)
    return feeds


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_reference(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)


def run_auto(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """onnxruntime, or onnx's reference evaluator where onnxruntime has no kernel (float64 Conv)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as NoKernel

    try:
        return run_ort(model, feeds)
    except NoKernel:
        return run_reference(model, feeds)


TOLERANCE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5, np.dtype(np.float16): 1e-2}


def assert_same_outputs(original, folded, rng, engine=run_auto, dims=None, rel=None):
    """Outputs equal within the dtype's normwise relative tolerance; returns the max rel error."""
    feeds = random_inputs(original, rng, dims)
    expected = engine(original, feeds)
    actual = engine(folded, feeds)
    worst = 0.0
    for e, a in zip(expected, actual, strict=True):
        assert e.shape == a.shape and e.dtype == a.dtype
        e64, a64 = e.astype(np.float64), a.astype(np.float64)
        err = np.max(np.abs(e64 - a64)) / max(np.max(np.abs(e64)), 1e-30)
        limit = rel if rel is not None else TOLERANCE.get(e.dtype, 5e-2)
        assert err <= limit, f"max relative error {err:.3g} > {limit:.3g}"
        worst = max(worst, err)
    return worst


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of `model` that also outputs the values `names` (type left to onnxruntime)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in present)
    return copy


def assert_same_sites(original, folded, rng, rel=None) -> int:
    """Every BN output of `original` that `folded` still computes (a fold site: the folded layer
    now produces it) equal within tolerance, each against its own scale: an error on one channel
    deep in a network can vanish by the graph outputs. Returns how many sites were compared."""
    produced = {name for node in folded.graph.node for name in node.output}
    sites = [n.output[0] for n in original.graph.node if n.op_type == "BatchNormalization" and n.output[0] in produced]
    assert_same_outputs(with_outputs(original, sites), with_outputs(folded, sites), rng, engine=run_ort, rel=rel)
    return len(sites)


def assert_folds(model, rng, expect_left: int, engine=run_auto, rules=None, dims=None, rel=None, **options):
    """Fold `model`; check validity, BN count, report completeness and numeric equality.
    `options` go to bnfold.fold (remove_noops=False tests a rule on no-ops it crosses itself)."""
    before = count_bn(model)
    snapshot = model.SerializeToString()
    result = bnfold.fold(model, rules=rules, **options)
    assert model.SerializeToString() == snapshot, "fold() modified its input"
    onnx.checker.check_model(result.model, full_check=True)
    assert count_bn(result.model) == expect_left, result.report.to_dict()
    assert len(result.report.folded) + len(result.report.kept) == before
    assert len(result.report.kept) == expect_left
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    assert_same_outputs(model, result.model, rng, engine=engine, dims=dims, rel=rel)
    return result


def kept_reason(result) -> str:
    (kept,) = result.report.kept
    return kept.reason


def assert_kept(model, fragment: str, rules=None):
    """A model whose single BN must be kept: the reason names the cause and nothing changed."""
    result = bnfold.fold(model, rules=rules)
    assert fragment in kept_reason(result), kept_reason(result)
    assert not result.modified
    assert result.model.SerializeToString() == model.SerializeToString()
    return result


def conv_bn_relu_chain(rng, blocks=3, channels=8, batch="batch", size=8) -> onnx.ModelProto:
    """`blocks` x (Conv 3x3 pad 1 -> BN 'bn<i>' -> Relu): every BN foldable into its Conv."""
    inits, nodes, x = [], [], "x"
    for i in range(blocks):
        cin = 3 if i == 0 else channels
        inits.append(tensor(f"W{i}", rng.normal(0, 0.3, [channels, cin, 3, 3]).astype(np.float32)))
        nodes += [
            helper.make_node("Conv", [x, f"W{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
            bn_node(inits, f"c{i}", f"b{i}", rng, channels, name=f"bn{i}"),
            helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        x = f"r{i}"
    inputs = [value_info("x", np.float32, [batch, 3, size, size])]
    return make_model(nodes, inputs, [value_info(x, np.float32, [batch, channels, size, size])], inits)


@pytest.fixture
def reads(monkeypatch):
    """Names of the tensors whose values were read from a file (external data or a lazy load's
    stubs), in order."""
    from bnfold import external

    names = []
    real = external.read_tensor
    monkeypatch.setattr(external, "read_tensor", lambda t, base_dir: (names.append(t.name), real(t, base_dir))[1])
    return names


def hide_ranks(model: onnx.ModelProto) -> None:
    """Make every rank downstream of input "x" unknown: the first node reads x through a Reshape
    to a runtime shape (a new graph input), and the output's declared shape is dropped."""
    model.graph.input.append(helper.make_tensor_value_info("shape", TensorProto.INT64, ["k"]))
    model.graph.node.insert(0, helper.make_node("Reshape", ["x", "shape"], ["x2"], name="reshape_in"))
    model.graph.node[1].input[0] = "x2"
    model.graph.output[0].type.tensor_type.ClearField("shape")
