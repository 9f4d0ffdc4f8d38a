"""BatchNormalization-15 with float16 / bfloat16 data and float32 statistics (its T / T1 / T2 types).

The folded weights must be in the producer's (the data's) dtype, computed in float64, and the
model must stay valid (onnx.checker, full check) and compute the original's outputs.
"""

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import assert_folds, bn_node, make_model, run_reference, tensor, value_info

FLOAT16 = onnx.TensorProto.FLOAT16


def stats_dtypes(inits: list, bn: str, scale_dtype, var_dtype) -> None:
    """BN-15: scale/B share T1, mean/var share T2, each independent of the data's T."""
    for t in inits:
        for suffix, dtype in (("scale", scale_dtype), ("B", scale_dtype), ("mean", var_dtype), ("var", var_dtype)):
            if t.name == f"{bn}_{suffix}":
                t.CopyFrom(tensor(t.name, onnx.numpy_helper.to_array(t).astype(dtype)))


def conv_model(rng, *, backward=False, scale_dtype=np.float32, var_dtype=np.float32, dtype=np.float16, opset=15):
    """float16 Conv (bias) with a BN after it, or before it (backward, no padding)."""
    cin, cout = 4, 6
    inits = [tensor("W", rng.normal(0, 0.5, [cout, cin, 3, 3]).astype(dtype)), tensor("b", rng.normal(0, 1, cout).astype(dtype))]
    if backward:
        nodes = [bn_node(inits, "x", "x_bn", rng, cin, np.float32, name="bn"), helper.make_node("Conv", ["x_bn", "W", "b"], ["y"], name="conv")]
    else:
        nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn_node(inits, "c", "y", rng, cout, np.float32, name="bn")]
    stats_dtypes(inits, "bn", scale_dtype, var_dtype)
    x = value_info("x", np.float32, [2, cin, 5, 5])
    x.type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return make_model(nodes, [x], [helper.make_tensor_value_info("y", x.type.tensor_type.elem_type, None)], inits, opset=opset)


def assert_data_dtype(result, elem_type: int = FLOAT16) -> None:
    """Every tensor the fold wrote (and every one left) is in the data's dtype."""
    assert {t.data_type for t in result.model.graph.initializer} == {elem_type}


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("scale_dtype,var_dtype", [(np.float32, np.float32), (np.float16, np.float32), (np.float32, np.float16)], ids=["f32_f32", "f16_f32", "f32_f16"])
def test_mixed_precision_conv_float16_data_float32_stats_folds(rng, backward, scale_dtype, var_dtype):
    model = conv_model(rng, backward=backward, scale_dtype=scale_dtype, var_dtype=var_dtype)
    result = assert_folds(model, rng, expect_left=0)
    assert result.report.folded[0].rule == ("bn_into_next_conv" if backward else "bn_into_conv")
    assert_data_dtype(result)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_mixed_precision_conv_bfloat16_data_float32_stats_folds(rng, backward):
    import ml_dtypes

    # Conv takes bfloat16 from opset 22; onnxruntime has no bfloat16 Conv on CPU: reference evaluator.
    model = conv_model(rng, backward=backward, dtype=ml_dtypes.bfloat16, opset=22)
    result = assert_folds(model, rng, expect_left=0, engine=run_reference, rel=5e-2)
    assert_data_dtype(result, onnx.TensorProto.BFLOAT16)


def linear_model(rng, op: str, *, backward=False):
    """float16 [3, 4] -> Gemm / MatMul [4, 5] with a float32-statistics BN after (or before) it."""
    k, n = 4, 5
    inits = [tensor("B", rng.normal(size=[k, n]).astype(np.float16))]
    inputs = ["x_bn" if backward else "x", "B"]
    if op == "Gemm":
        inits.append(tensor("C", rng.normal(size=[n]).astype(np.float16)))
        inputs.append("C")
    layer = helper.make_node(op, inputs, ["y" if backward else "z"], name="layer")
    bn = bn_node(inits, "x" if backward else "z", "x_bn" if backward else "y", rng, k if backward else n, np.float32, name="bn")
    nodes = [bn, layer] if backward else [layer, bn]
    return make_model(nodes, [value_info("x", np.float16, [3, k])], [value_info("y", np.float16, [3, n])], inits, opset=15)


@pytest.mark.parametrize("op,backward,rule", [
    ("Gemm", False, "bn_into_gemm"), ("MatMul", False, "bn_into_matmul"),
    ("Gemm", True, "bn_into_next_gemm"), ("MatMul", True, "bn_into_next_matmul"),
])
def test_mixed_precision_linear_float16_data_float32_stats_folds(rng, op, backward, rule):
    result = assert_folds(linear_model(rng, op, backward=backward), rng, expect_left=0)
    assert result.report.folded[0].rule == rule
    assert_data_dtype(result)
