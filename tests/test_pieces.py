"""A deep graph run in pieces (bnfold.pieces) computes exactly what the whole graph computes.

The cut is made tiny here (a few nodes a piece) so that every kind of value crosses it: skip
connections read many pieces later, a subgraph reading outer-scope values, an initializer that is
also an overridable input, graph outputs made early, extra values asked for. The outputs must be
bit-identical to the whole graph's: same kernels, optimisations off, values crossing unchanged.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import bnfold
from bnfold import engines, pieces
from conftest import tensor, value_info


@pytest.fixture
def tiny_pieces(monkeypatch):
    monkeypatch.setattr(pieces, "CUT_ABOVE", 4)
    monkeypatch.setattr(pieces, "PIECE_NODES", 3)


def branchy(rng) -> onnx.ModelProto:
    """x -> 12 Conv/Relu pairs with a skip from the first Relu to the last Add, an If whose
    branches read outer values made pieces earlier, and `gain`: an initializer that is also an
    input (a caller may feed it)."""
    inits = [tensor("gain", np.full([1, 3, 1, 1], 1.5, np.float32))]
    nodes, x = [], "x"
    for i in range(12):
        inits.append(tensor(f"W{i}", rng.normal(0, 0.4, [3, 3, 3, 3]).astype(np.float32)))
        nodes += [
            helper.make_node("Conv", [x, f"W{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    nodes.append(helper.make_node("Add", [x, "r0"], ["skip"]))
    nodes.append(helper.make_node("Mul", ["skip", "gain"], ["scaled"]))
    nodes.append(helper.make_node("ReduceSum", ["c3"], ["total"], keepdims=0))
    nodes.append(helper.make_node("Greater", ["total", "zero"], ["positive"]))
    inits.append(tensor("zero", np.zeros([], np.float32)))
    then = helper.make_graph([helper.make_node("Add", ["scaled", "r5"], ["t"])], "then", [], [value_info("t", np.float32, [2, 3, 6, 6])])
    other = helper.make_graph([helper.make_node("Sub", ["scaled", "r7"], ["e"])], "else", [], [value_info("e", np.float32, [2, 3, 6, 6])])
    nodes.append(helper.make_node("If", ["positive"], ["y"], then_branch=then, else_branch=other))
    graph = helper.make_graph(
        nodes, "branchy", [value_info("x", np.float32, [2, 3, 6, 6]), value_info("gain", np.float32, [1, 3, 1, 1])],
        [value_info("y", np.float32, [2, 3, 6, 6]), value_info("r1", np.float32, [2, 3, 6, 6])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run(model, feeds, outputs=()) -> tuple[dict, engines.OrtSource]:
    with contextlib.ExitStack() as stack:
        source = engines.ort_source(model, stack, outputs)
        session = engines.ort_session(source, engines.CPU, "model")
        return engines.run_ort(session, feeds, "model", engines.CPU), source


def assert_identical(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype and np.array_equal(got[name], expected[name]), name


@pytest.mark.parametrize("fed_gain", [False, True])
def test_pieces_compute_what_the_whole_computes(rng, monkeypatch, fed_gain):
    model = branchy(rng)
    feeds = {"x": rng.normal(size=[2, 3, 6, 6]).astype(np.float32)}
    if fed_gain:
        feeds["gain"] = rng.uniform(0.5, 2, [1, 3, 1, 1]).astype(np.float32)
    asked = ["c2", "r9", "skip"]
    whole, source = run(model, feeds, asked)
    assert source.pieces is None
    monkeypatch.setattr(pieces, "CUT_ABOVE", 4)
    monkeypatch.setattr(pieces, "PIECE_NODES", 3)
    cut, source = run(model, feeds, asked)
    assert source.pieces is not None and len(source.pieces.pieces) == 10
    assert_identical(cut, whole)
    if fed_gain:  # the fed value was used, not the initializer's default
        default, _ = run(model, {"x": feeds["x"]}, asked)
        assert not np.array_equal(default["y"], cut["y"])


def test_pieces_from_a_file_with_external_data(rng, tmp_path, tiny_pieces):
    model = branchy(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    feeds = {"x": rng.normal(size=[2, 3, 6, 6]).astype(np.float32)}
    cut, source = run(path, feeds, ["c4"])
    assert source.pieces is not None
    pieces.CUT_ABOVE = 10**9
    whole, source = run(path, feeds, ["c4"])
    assert source.pieces is None
    assert_identical(cut, whole)


def test_pieces_values_dropped_after_their_last_reader(rng, tiny_pieces):
    model = branchy(rng)
    cut = pieces.split(model, ["y", "r1"])
    last = {name: index for index, piece in enumerate(cut) for name in piece.last_use}
    assert last["r0"] == len(cut) - 2  # the skip's Add: read in the next-to-last piece
    assert last["c3"] == len(cut) - 2
    assert "r1" not in last  # asked for: kept to the end
    made_early = [p for p in cut if "r1" in p.outputs]
    assert len(made_early) == 1


def test_pieces_output_no_node_makes_runs_whole(rng, tiny_pieces):
    model = branchy(rng)
    model.graph.output.append(value_info("zero", np.float32, []))  # an initializer as a graph output
    feeds = {"x": rng.normal(size=[2, 3, 6, 6]).astype(np.float32)}
    with pytest.raises(pieces.Unsplittable):
        pieces.split(model, [o.name for o in model.graph.output])
    got, source = run(model, feeds)
    assert source.pieces is None
    assert got["zero"] == 0 and got["y"].shape == (2, 3, 6, 6)


def test_pieces_non_tensor_crossing_a_cut_runs_whole(rng, tiny_pieces):
    """A sequence made in one piece and read in the next cannot be typed as a piece input."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"]),
             helper.make_node("SequenceConstruct", ["a", "b"], ["seq"])]
    nodes += [helper.make_node("Identity", ["seq"], [f"seq{i}"]) for i in range(3)]
    nodes += [helper.make_node("ConcatFromSequence", ["seq2"], ["y"], axis=0)]
    graph = helper.make_graph(nodes, "seq", [value_info("x", np.float32, [2, 3])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=[2, 3]).astype(np.float32)
    got, source = run(model, {"x": x})
    assert source.pieces is not None  # cut, then run whole when the sequence reached a cut
    np.testing.assert_array_equal(got["y"], np.concatenate([np.maximum(x, 0), -x]))


def test_sequence_graph_output_left_out_of_the_comparison(rng, tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("SequenceConstruct", ["a", "x"], ["seq"])]
    sequence = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "seq", [value_info("x", np.float32, [2, 3])],
                              [value_info("a", np.float32, [2, 3]), helper.make_value_info("seq", sequence)])
    path = tmp_path / "seq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    verification = bnfold.verify(path, path)
    assert verification.status == "passed" and [c.output for c in verification.checks] == ["a"]
