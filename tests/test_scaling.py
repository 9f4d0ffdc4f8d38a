"""Work grows linearly with the model: counted, not timed (timings live in benchmarks/).

The fold loop tries each BN once and sweeps the kept ones again only while something still
folds; it never rescans the node list per fold. These tests count what the loop does on chains
of different lengths and check the outputs numerically.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import bnfold
from bnfold import api, graph
from tests.conftest import assert_same_outputs, bn_node, make_model, tensor, value_info


def conv_bn_relu_chain(rng, blocks: int, channels: int = 3):
    """x -> (Conv 1x1 -> BN -> Relu) x blocks -> y."""
    inits, nodes, x = [], [], "x"
    for i in range(blocks):
        inits.append(tensor(f"W{i}", rng.normal(0, 0.5, (channels, channels, 1, 1)).astype(np.float32)))
        nodes += [
            helper.make_node("Conv", [x, f"W{i}"], [f"c{i}"], name=f"conv{i}"),
            bn_node(inits, f"c{i}", f"b{i}", rng, channels, name=f"bn{i}"),
            helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        x = f"r{i}"
    nodes[-1].output[0] = "y"
    shape = [1, channels, 2, 2]
    return make_model(nodes, [value_info("x", np.float32, shape)], [value_info("y", np.float32, shape)], inits)


def bn_stack_before_conv(rng, depth: int, channels: int = 3):
    """x -> BN_1 -> BN_2 -> ... -> BN_depth -> Conv -> y: only the last BN folds at first (into
    the Conv, backward); each fold lets the BN before it reach the Conv."""
    inits = [tensor("W", rng.normal(0, 0.5, (channels, channels, 1, 1)).astype(np.float32))]
    bns = [bn_node(inits, "x" if i == 0 else f"b{i - 1}", f"b{i}", rng, channels, name=f"bn{i}") for i in range(depth)]
    nodes = [*bns, helper.make_node("Conv", [f"b{depth - 1}", "W"], ["y"], name="conv")]
    shape = [1, channels, 2, 2]
    return make_model(nodes, [value_info("x", np.float32, shape)], [value_info("y", np.float32, shape)], inits)


class Counter:
    """Counts calls of the wrapped functions (the real ones still run)."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = {}
        self.monkeypatch = monkeypatch

    def wrap(self, owner, name: str) -> None:
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return real(*args, **kwargs)

        self.monkeypatch.setattr(owner, name, counted)


@pytest.fixture
def counter(monkeypatch):
    c = Counter(monkeypatch)
    c.wrap(api, "fold_one")
    c.wrap(graph.GraphIndex, "live_nodes")
    c.wrap(graph.ModelIndex, "__init__")
    return c


def test_scaling_chain_each_bn_tried_once_folds(rng, counter):
    """A Conv -> BN -> Relu chain: one attempt per BN, and as many passes over the node list
    (and one index) for 200 blocks as for 10 (the old loop rescanned all nodes per pass)."""
    passes = []
    for blocks in (10, 200):
        counter.calls.clear()
        model = conv_bn_relu_chain(rng, blocks)
        result = bnfold.fold(model)
        assert result.report.bn_after == 0 and len(result.report.folded) == blocks
        assert counter.calls["fold_one"] == blocks
        assert counter.calls["__init__"] == 1
        passes.append(counter.calls["live_nodes"])
        assert_same_outputs(model, result.model, rng)
    assert passes[0] == passes[1] <= 4, passes


@pytest.mark.parametrize("depth", [4, 40])
def test_scaling_bn_stack_unlocked_backward_linear_attempts_folds(rng, counter, depth):
    """Each fold unlocks the BN before it, which is re-queued at once: attempts stay linear in
    the depth (passes until nothing changes take one pass per BN: quadratic)."""
    model = bn_stack_before_conv(rng, depth)
    result = bnfold.fold(model)
    assert result.report.bn_after == 0
    assert counter.calls["fold_one"] <= 2 * depth + 1
    assert counter.calls["live_nodes"] <= 4
    assert_same_outputs(model, result.model, rng)


def test_scaling_kept_bn_swept_once_more_kept(rng, counter):
    """BN kept for good (their input is a graph input) are tried once, then once more in the
    final sweep that follows a fold elsewhere; not once per fold."""
    model = conv_bn_relu_chain(rng, 20)
    inits = list(model.graph.initializer)
    extra = [bn_node(inits, "x", f"k{i}", rng, 3, name=f"kept{i}") for i in range(10)]
    model.graph.node.extend(extra)
    model.graph.initializer.extend(inits[len(model.graph.initializer):])
    model.graph.output.extend(value_info(f"k{i}", np.float32, [1, 3, 2, 2]) for i in range(10))
    result = bnfold.fold(model)
    assert len(result.report.folded) == 20 and len(result.report.kept) == 10
    assert counter.calls["fold_one"] <= 20 + 2 * 10
    assert_same_outputs(model, result.model, rng)


def test_scaling_finish_keeps_unchanged_initializers_in_place(rng):
    """Dropping the replaced tensors removes them from the repeated field without rebuilding it:
    the tensors that stay are the same messages (a rebuild would copy every weight)."""
    model = conv_bn_relu_chain(rng, 5)
    model.graph.initializer.add().CopyFrom(tensor("unused_but_kept", np.ones(3, np.float32)))
    index = graph.ModelIndex(model)
    unchanged = index.graphs[0].initializers["unused_but_kept"]
    api.apply_rules(index.graphs[0], api.select_rules(None))
    index.finish()
    assert any(t is unchanged for t in model.graph.initializer)
    assert len(model.graph.initializer) == 5 * 2 + 1  # new W and B per conv, plus the untouched one


def test_scaling_verify_one_session_per_model_and_provider_passes(rng, tmp_path, monkeypatch):
    """Verification builds each onnxruntime session once (reference and candidate, per
    provider) and generates the inputs once, however many outputs are compared; its time is
    reported apart from the fold's."""
    import importlib

    import onnxruntime as ort

    generation = importlib.import_module("bnfold.inputs")
    sessions, inputs = [], []
    real_session, real_inputs = ort.InferenceSession, generation.generate_inputs
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: (sessions.append(1), real_session(*a, **k))[1])
    monkeypatch.setattr(generation, "generate_inputs", lambda *a, **k: (inputs.append(1), real_inputs(*a, **k))[1])
    src = tmp_path / "m.onnx"
    src.write_bytes(conv_bn_relu_chain(rng, 3).SerializeToString())
    result = bnfold.fold_file(src, tmp_path / "out.onnx", providers=["CPUExecutionProvider"])
    assert result.verification.passed
    assert len(sessions) == 2 and len(inputs) == 1
    assert result.verification.seconds > 0 and result.to_dict()["verification"]["seconds"] == result.verification.seconds


class _WorkTracer:
    """Counts the Python work bnfold does: functions entered and lines run in bnfold's own
    modules, per module, with sys.settrace (a loop over the nodes per fold, even a
    comprehension, runs one line event per iteration). Work in C (onnx's checker, protobuf
    parsing) is not seen; what bnfold does per node or per BN is."""

    def __init__(self):
        import collections
        import os

        self.package = os.path.dirname(bnfold.__file__) + os.sep
        self.lines = collections.Counter()
        self.calls = collections.Counter()

    def _global(self, frame, event, arg):
        filename = frame.f_code.co_filename
        if not filename.startswith(self.package):
            return None
        module = filename[len(self.package):]
        self.calls[module] += 1
        lines = self.lines

        def local(frame, event, arg):
            if event == "line":
                lines[module] += 1
            return local

        return local

    def run(self, action):
        import sys
        import threading

        previous = sys.gettrace()
        threading.settrace(self._global)  # work a helper thread does counts too
        sys.settrace(self._global)
        try:
            return action()
        finally:
            sys.settrace(previous)
            threading.settrace(previous)


DEPTHS = (500, 2000)
LINEAR = 4 * 1.1  # 2,000 blocks over 500, with 10% for what does not grow with the model


def test_scaling_depth_work_per_block_constant_whole_file(tmp_path, monkeypatch):
    """The Depth target (Conv3x3 -> BN -> Relu, thousands of blocks), as `bnfold MODEL -o OUT
    --no-verify` runs it: loading and its checks, the fold, the clean-up, the writing. Lines
    run and functions entered in bnfold's modules, and calls of the graph's edit and query
    methods, grow at most linearly with the depth (counted, not timed): a loop over the nodes
    per fold would make the 2,000-block count 16 times the 500-block one, not 4."""
    import onnx

    from tests.corpus import near_identity_chain

    edits = ("set_constant_input", "bypass", "short_circuit", "remove_node", "replace_node", "users",
             "is_used", "constant", "live_nodes", "finish", "_owned_by", "_drop_use", "unique_name")
    runs = []
    for blocks in DEPTHS:
        counted = Counter(monkeypatch)
        for name in edits:
            counted.wrap(graph.ModelIndex if name == "unique_name" else graph.GraphIndex, name)
        counted.wrap(graph, "_drop")
        src = tmp_path / f"chain{blocks}.onnx"
        onnx.save(near_identity_chain(np.random.default_rng(0), blocks), src)
        tracer = _WorkTracer()
        result = tracer.run(lambda: bnfold.fold_file(src, tmp_path / f"out{blocks}.onnx", verify=False))
        assert len(result.report.folded) == blocks and result.report.bn_after == 0
        runs.append((tracer, dict(counted.calls)))
        monkeypatch.undo()
    (small, small_calls), (big, big_calls) = runs
    scale = DEPTHS[1] / DEPTHS[0]
    assert sum(big.lines.values()) > scale * 100, "the tracer saw no work: was bnfold traced at all?"
    growth = {
        f"{what} {module}": (counts[0][module], counts[1][module])
        for what, counts in (("lines", (small.lines, big.lines)), ("calls", (small.calls, big.calls)))
        for module in counts[1]
    }
    growth.update({f"calls of {name}": (small_calls.get(name, 0), n) for name, n in big_calls.items()})
    growth["lines in all"] = (sum(small.lines.values()), sum(big.lines.values()))
    superlinear = {what: f"{a} -> {b}" for what, (a, b) in growth.items() if b > LINEAR * max(a, 1) and b > 100}
    assert not superlinear, f"work grows faster than the depth ({DEPTHS[0]} -> {DEPTHS[1]} blocks): {superlinear}"
