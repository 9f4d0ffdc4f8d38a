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
