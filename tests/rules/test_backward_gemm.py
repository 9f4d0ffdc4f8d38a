"""bn_into_next_gemm: BN [N, C] -> Gemm, transB, alpha/beta, every shape of C; the refusals."""

import numpy as np
import pytest
from onnx import helper

from conftest import assert_folds, assert_kept, bn_node, make_model, tensor, value_info

C_SHAPES = {"absent": None, "scalar": [], "n": [5], "1n": [1, 5], "mn": [3, 5], "m1": [3, 1]}


def bn_gemm_model(rng, *, trans_b=0, alpha=1.0, beta=1.0, c_shape=(5,), dtype=np.float32, relu_first=False):
    """x [3, 4] (-> Relu) -> BN(4) -> Gemm(B [4, 5] or [5, 4]) -> y [3, 5]."""
    inits = [tensor("B", rng.normal(size=[5, 4] if trans_b else [4, 5]).astype(dtype))]
    inputs = ["x_bn", "B"]
    if c_shape is not None:
        inits.append(tensor("C", np.asarray(rng.normal(size=c_shape)).astype(dtype)))
        inputs.append("C")
    nodes = [
        bn_node(inits, "r" if relu_first else "x", "x_bn", rng, 4, dtype, name="bn"),
        helper.make_node("Gemm", inputs, ["y"], name="gemm", transB=trans_b, alpha=alpha, beta=beta),
    ]
    if relu_first:
        nodes.insert(0, helper.make_node("Relu", ["x"], ["r"], name="relu"))
    return make_model(nodes, [value_info("x", dtype, [3, 4])], [value_info("y", dtype, [3, 5])], inits)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (1.7, 0.0)])
@pytest.mark.parametrize("c_shape", list(C_SHAPES.values()), ids=list(C_SHAPES))
def test_bn_into_next_gemm_variants_folds(rng, trans_b, alpha, beta, c_shape):
    model = bn_gemm_model(rng, trans_b=trans_b, alpha=alpha, beta=beta, c_shape=c_shape)
    result = assert_folds(model, rng, expect_left=0)
    (folded,) = result.report.folded
    assert (folded.rule, folded.into) == ("bn_into_next_gemm", "gemm")
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_into_next_gemm_float64_after_relu_folds(rng, trans_b):
    model = bn_gemm_model(rng, trans_b=trans_b, dtype=np.float64, alpha=0.3, beta=3.0, relu_first=True)
    result = assert_folds(model, rng, expect_left=0)
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Gemm"]


def test_bn_into_next_gemm_trans_a_kept(rng):
    """With transA=1, BN's channels (axis 1 of A [K, M]) are the M rows of the product."""
    inits = [tensor("B", rng.normal(size=[4, 5]).astype(np.float32))]
    nodes = [bn_node(inits, "x", "x_bn", rng, 3, name="bn"), helper.make_node("Gemm", ["x_bn", "B"], ["y"], name="gemm", transA=1)]
    model = make_model(nodes, [value_info("x", np.float32, [4, 3])], [value_info("y", np.float32, [3, 5])], inits)
    assert_kept(model, "next: Gemm 'gemm' has transA=1: BN's channels become the product's rows")


def test_bn_into_next_gemm_b_not_constant_kept(rng):
    model = bn_gemm_model(rng)
    del model.graph.initializer[0]
    model.graph.input.append(value_info("B", np.float32, [4, 5]))
    assert_kept(model, "next: Gemm 'gemm' B is not a constant (it comes from graph input 'B')")


def test_bn_into_next_gemm_c_not_constant_kept(rng):
    model = bn_gemm_model(rng)
    del model.graph.initializer[1]
    model.graph.input.append(value_info("C", np.float32, [5]))
    assert_kept(model, "next: Gemm 'gemm' C is not a constant")


def test_bn_into_next_gemm_bn_output_fanout_kept(rng):
    model = bn_gemm_model(rng)
    model.graph.node.append(helper.make_node("Gemm", ["x_bn", "B"], ["z"], name="gemm2"))
    model.graph.output.append(value_info("z", np.float32, [3, 5]))
    assert_kept(model, "fan-out: BN output 'x_bn' feeds Gemm 'gemm', Gemm 'gemm2'")


def test_bn_into_next_gemm_forward_preferred_folds(rng):
    """Gemm -> BN -> Gemm: both directions work; the BN folds into the producer."""
    inits = [tensor("B0", rng.normal(size=[4, 4]).astype(np.float32)), tensor("B", rng.normal(size=[4, 5]).astype(np.float32))]
    nodes = [
        helper.make_node("Gemm", ["x", "B0"], ["g"], name="gemm0"),
        bn_node(inits, "g", "g_bn", rng, 4, name="bn"),
        helper.make_node("Gemm", ["g_bn", "B"], ["y"], name="gemm"),
    ]
    model = make_model(nodes, [value_info("x", np.float32, [3, 4])], [value_info("y", np.float32, [3, 5])], inits)
    result = assert_folds(model, rng, expect_left=0)
    assert [(f.rule, f.into) for f in result.report.folded] == [("bn_into_gemm", "gemm0")]
