"""bnfold.graph: constant lookup (memoised, depth- and size-bounded) and the index's edits.

Each test folds a small model and checks the outcome numerically (assert_folds) or the reason a
BN is kept: the constant lookup decides which BN may fold, so its limits show up as reasons.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import bnfold
from bnfold import graph
from tests.conftest import assert_folds, assert_kept, bn_node, make_model, tensor, value_info


def _conv_bn(rng, weight_nodes, weight: str, extra_inits=(), bn_edit=None):
    """x -> Conv(W = `weight`, computed by `weight_nodes`) -> BN -> y, 3 -> 4 channels."""
    inits = list(extra_inits)
    bn = bn_node(inits, "c", "y", rng, 4, name="bn")
    if bn_edit:
        bn_edit(bn, inits)
    nodes = [*weight_nodes, helper.make_node("Conv", ["x", weight], ["c"], name="conv"), bn]
    return make_model(nodes, [value_info("x", np.float32, [1, 3, 4, 4])], [value_info("y", np.float32, [1, 4, 4, 4])], inits)


def _neg_chain(start: str, prefix: str, length: int) -> list:
    """`length` Neg nodes after `start`, named prefix1..prefixN (an even length keeps the value)."""
    names = [start] + [f"{prefix}{i}" for i in range(1, length + 1)]
    return [helper.make_node("Neg", [a], [b], name=b) for a, b in zip(names, names[1:])]


@pytest.mark.parametrize("conv_first", [True, False], ids=["shallow_first", "deep_first"])
def test_constant_depth_limit_independent_of_query_order(rng, conv_first):
    """W is 10 nodes above its initializer; a BN scale 10 Neg further up is 20 above, over
    MAX_CONSTANT_DEPTH. Whichever BN is looked at first, the answers are the same: the depth
    limit is a property of the value (its height), not of the path a query took to it."""
    w = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    s0 = rng.uniform(0.5, 2.0, 4).astype(np.float32)
    inits = [tensor("w0", w), tensor("s0", s0)]
    scale_chain = _neg_chain("s0", "s", 10) + _neg_chain("s10", "t", 10)
    nodes = _neg_chain("w0", "w", 10) + scale_chain
    bn_a = bn_node(inits, "c", "y", rng, 4, name="bn_a")
    bn_b = bn_node(inits, "x2", "y2", rng, 4, name="bn_b")
    bn_a.input[1], bn_b.input[1] = "s10", "t10"
    convs = [helper.make_node("Conv", ["x", "w10"], ["c"], name="conv")]
    body = [*convs, bn_a, bn_b] if conv_first else [bn_b, *convs, bn_a]
    model = make_model(
        [*nodes, *body],
        [value_info("x", np.float32, [1, 3, 4, 4]), value_info("x2", np.float32, [1, 4, 4, 4])],
        [value_info("y", np.float32, [1, 4, 4, 4]), value_info("y2", np.float32, [1, 4, 4, 4])],
        inits,
    )
    result = assert_folds(model, rng, expect_left=1)
    (kept,) = result.report.kept
    assert kept.bn == "bn_b" and "scale is not a constant (it comes from Neg 't10')" in kept.reason
    assert [f.bn for f in result.report.folded] == ["bn_a"]


def test_constant_expand_bomb_kept(rng):
    """BN's B = Expand(0, [2**40]): the size is known from the shape before anything is
    allocated, and it is no BN parameter; kept, at once."""
    def edit(bn, inits):
        inits += [tensor("zero", np.zeros(1, np.float32)), tensor("huge", np.array([2**40], np.int64))]
        bn.input[2] = "big"

    expand = helper.make_node("Expand", ["zero", "huge"], ["big"], name="expand")
    model = _conv_bn(rng, [expand], "W", [tensor("W", rng.normal(size=(4, 3, 1, 1)).astype(np.float32))], edit)
    assert_kept(model, "B is not a constant (it comes from Expand 'expand')")


def test_constant_growth_bound_allows_reshaping_a_large_weight(rng, monkeypatch):
    """The bound is on growth: a Transpose of a weight larger than the bound produces no more
    than it reads, so it stays a constant and the BN folds."""
    monkeypatch.setattr(graph, "MAX_CONSTANT_GROWTH", 8)
    w = rng.normal(size=(3, 4, 1, 1)).astype(np.float32)  # 12 elements > 8
    transpose = helper.make_node("Transpose", ["Wt"], ["W"], name="transpose", perm=[1, 0, 2, 3])
    assert_folds(_conv_bn(rng, [transpose], "W", [tensor("Wt", w)]), rng, expect_left=0)


def test_constant_growth_bound_refuses_broadcast_past_it(rng, monkeypatch):
    """Add([4,1,1,1], [1,3,1,1]) makes 12 elements out of 7: past a bound of 8, not a constant."""
    monkeypatch.setattr(graph, "MAX_CONSTANT_GROWTH", 8)
    a, b = rng.normal(size=(4, 1, 1, 1)), rng.normal(size=(1, 3, 1, 1))
    add = helper.make_node("Add", ["a", "b"], ["W"], name="add")
    model = _conv_bn(rng, [add], "W", [tensor("a", a.astype(np.float32)), tensor("b", b.astype(np.float32))])
    assert_kept(model, "Conv 'conv' weight W is not a constant (it comes from Add 'add')")
    monkeypatch.setattr(graph, "MAX_CONSTANT_GROWTH", 12)
    assert_folds(model, rng, expect_left=0)


def test_constant_shared_input_read_once(rng, monkeypatch):
    """A weight built from one initializer read by 6 nodes is decoded once, not once per reader."""
    reads = []
    real = graph.ModelIndex.read_tensor
    monkeypatch.setattr(graph.ModelIndex, "read_tensor", lambda self, t: (reads.append(t.name), real(self, t))[1])
    w = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Add", ["w0", "w0"], ["a1"], name="a1")]
    nodes += [helper.make_node("Add", [f"a{i}", "w0"], [f"a{i + 1}"], name=f"a{i + 1}") for i in range(1, 5)]
    model = _conv_bn(rng, nodes, "a5", [tensor("w0", w)])
    result = bnfold.fold(model)
    assert len(result.report.folded) == 1
    assert reads.count("w0") == 1, reads


# --- set_constant_input: overwrite an initializer only its node reads, else a new one ---------


def _initializer_names(model) -> list[str]:
    return sorted(t.name for t in model.graph.initializer)


def test_set_constant_input_sole_reader_overwrites_in_place(rng):
    from tests.conftest import conv_bn_relu_chain

    model = conv_bn_relu_chain(rng, blocks=2)
    result = assert_folds(model, rng, expect_left=0)
    names = _initializer_names(result.model)
    assert {"W0", "W1"} <= set(names)  # the weights keep their names, new values
    assert not any(n.startswith("W") and n.endswith("_bnfold") for n in names)


def test_set_constant_input_shared_weight_gets_new_initializer(rng):
    """Two Convs read one weight: the first fold gets a new initializer (the other Conv still
    reads W); after it, W is the second Conv's alone and may be overwritten."""
    inits = [tensor("W", rng.normal(0, 0.3, [8, 3, 3, 3]).astype(np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        bn_node(inits, "c0", "y0", rng, 8, name="bn0"),
        helper.make_node("Conv", ["x", "W"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node(inits, "c1", "y1", rng, 8, name="bn1"),
    ]
    outputs = [value_info(y, np.float32, [2, 8, 6, 6]) for y in ("y0", "y1")]
    model = make_model(nodes, [value_info("x", np.float32, [2, 3, 6, 6])], outputs, inits)
    result = assert_folds(model, rng, expect_left=0)
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert sorted(c.input[1] for c in convs) == ["W", "W_bnfold"]


def test_set_constant_input_bias_of_other_shape_gets_new_initializer(rng):
    """A Gemm bias C of shape [1] becomes a [C] vector: a new initializer, the old one dropped."""
    inits = [tensor("B", rng.normal(0, 0.3, [6, 4]).astype(np.float32)), tensor("C", np.array([0.5], np.float32))]
    nodes = [
        helper.make_node("Gemm", ["x", "B", "C"], ["g"], name="gemm"),
        bn_node(inits, "g", "y", rng, 4, name="bn"),
    ]
    model = make_model(nodes, [value_info("x", np.float32, [3, 6])], [value_info("y", np.float32, [3, 4])], inits)
    result = assert_folds(model, rng, expect_left=0)
    gemm = next(n for n in result.model.graph.node if n.op_type == "Gemm")
    assert gemm.input[1] == "B" and gemm.input[2] != "C"
    assert "C" not in _initializer_names(result.model)
