"""bn_into_gemm: transB, alpha/beta, every shape of C."""

import numpy as np
import pytest
from onnx import helper

from conftest import assert_folds, assert_kept, bn_node, make_model, tensor, value_info

C_SHAPES = {"absent": None, "scalar": [], "n": [5], "1n": [1, 5], "mn": [3, 5], "m1": [3, 1]}


def gemm_bn_model(rng, *, trans_b=0, alpha=1.0, beta=1.0, c_shape=(5,), dtype=np.float32):
    inits = [tensor("B", rng.normal(size=[5, 4] if trans_b else [4, 5]).astype(dtype))]
    inputs = ["a", "B"]
    if c_shape is not None:
        inits.append(tensor("C", np.asarray(rng.normal(size=c_shape)).astype(dtype)))
        inputs.append("C")
    nodes = [
        helper.make_node("Gemm", inputs, ["g"], name="gemm", transB=trans_b, alpha=alpha, beta=beta),
        bn_node(inits, "g", "y", rng, 5, dtype, name="bn"),
    ]
    return make_model(nodes, [value_info("a", dtype, [3, 4])], [value_info("y", dtype, [3, 5])], inits)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (1.7, 0.0)])
@pytest.mark.parametrize("c_shape", list(C_SHAPES.values()), ids=list(C_SHAPES))
def test_bn_into_gemm_variants_folds(rng, trans_b, alpha, beta, c_shape):
    model = gemm_bn_model(rng, trans_b=trans_b, alpha=alpha, beta=beta, c_shape=c_shape)
    result = assert_folds(model, rng, expect_left=0)
    assert result.report.folded[0].rule == "bn_into_gemm"


def test_bn_into_gemm_float64_folds(rng):
    assert_folds(gemm_bn_model(rng, dtype=np.float64, alpha=0.3, beta=3.0), rng, expect_left=0)


def test_bn_into_gemm_b_not_constant_kept(rng):
    model = gemm_bn_model(rng)
    del model.graph.initializer[0]
    model.graph.input.append(value_info("B", np.float32, [4, 5]))
    assert_kept(model, "Gemm 'gemm' B is not a constant (it comes from graph input 'B')")


def test_bn_into_gemm_c_not_constant_kept(rng):
    model = gemm_bn_model(rng)
    del model.graph.initializer[1]
    model.graph.input.append(value_info("C", np.float32, [5]))
    assert_kept(model, "C is not a constant")
