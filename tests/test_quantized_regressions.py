"""Bugs the quantized property test (test_property.py, graph_cases(quantized=True)) found in the
folding of BN into weights that DequantizeLinear makes, each as a minimal failing model.

Each test states what bnfold should do and is marked xfail(strict=True) until bnfold does it;
the property test tolerates each (counted in test_property.KNOWN_BUGS_SEEN) so that it keeps
looking for others.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from conftest import run_ort


def per_tensor_conv_bn(opset: int, gamma) -> onnx.ModelProto:
    """x [1, 1, 4] -> Conv(W = DequantizeLinear(int8 [C, 1, 1], scalar scale 0.05, scalar zero
    point 0)) -> BN(scale `gamma`, B 0.5, mean 0, var 1) -> y: a per-tensor quantized weight."""
    channels = len(gamma)
    inits = [numpy_helper.from_array(np.full([channels, 1, 1], 3, np.int8), "Wq"),
             numpy_helper.from_array(np.array(0.05, np.float32), "ws"),
             numpy_helper.from_array(np.array(0, np.int8), "wzp")]
    params = [np.asarray(gamma), np.full(channels, 0.5), np.zeros(channels), np.ones(channels)]
    inits += [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(["s", "b", "m", "v"], params)]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "ws", "wzp"], ["Wd"], name="dq"),
             helper.make_node("Conv", ["x", "Wd"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.xfail(strict=True, reason="weights.scaled writes a per-channel scale and an axis attribute into a DequantizeLinear-10/12, which has neither")
@pytest.mark.parametrize("opset", [10, 12])
@pytest.mark.parametrize("gamma", [[2.0], [2.0, -2.0]], ids=["one-channel", "equal-magnitudes"])
def test_opset_below_13_per_tensor_weight_stays_per_tensor(opset, gamma):
    """Before opset 13 DequantizeLinear has one scale per tensor and no `axis`. weights.scaled
    lets a BN whose |scale| is the same on every channel (one channel, or +-a) fold into a
    per-tensor weight, rightly, but writes the new scale as a [C] vector with axis=0: the folded
    model fails onnx.checker ("Unrecognized attribute: axis for operator DequantizeLinear") and
    onnxruntime refuses to load it (INVALID_GRAPH). The scale must stay a scalar, scale * |s|,
    without an axis (or the BN be kept)."""
    model = per_tensor_conv_bn(opset, gamma)
    result = bnfold.fold(model)
    assert result.report.bn_after == 0 and result.report.folded[0].quantized
    onnx.checker.check_model(result.model, full_check=True)
    x = {"x": np.arange(4, dtype=np.float32).reshape(1, 1, 4)}
    np.testing.assert_allclose(run_ort(result.model, x)[0], run_ort(model, x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.xfail(strict=True, reason="weights.rebiased writes its per-channel scale with axis=0 into a DequantizeLinear-10/12, which has no axis")
def test_opset_below_13_per_tensor_int32_bias_stays_per_tensor():
    """The same for an int32 bias: x [1, 1, 4] -> Conv(float W [1, 1, 1], B = DequantizeLinear(
    int32 [1000], scalar scale 0.001)) -> BN(one channel, scale 2) at opset 10. weights.rebiased
    quantizes the folded bias again (rightly) but writes scale [1] with axis=0: onnx.checker and
    onnxruntime refuse the folded model."""
    inits = [numpy_helper.from_array(np.full([1, 1, 1], 0.15, np.float32), "W"),
             numpy_helper.from_array(np.array([1000], np.int32), "Bq"), numpy_helper.from_array(np.array(0.001, np.float32), "bs")]
    inits += [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(["s", "b", "m", "v"], [[2.0], [0.5], [0.0], [1.0]])]
    nodes = [helper.make_node("DequantizeLinear", ["Bq", "bs"], ["Bd"], name="dq_b"),
             helper.make_node("Conv", ["x", "W", "Bd"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    result = bnfold.fold(model)
    assert result.report.bn_after == 0 and result.report.folded[0].quantized
    onnx.checker.check_model(result.model, full_check=True)
    x = {"x": np.arange(4, dtype=np.float32).reshape(1, 1, 4)}
    np.testing.assert_allclose(run_ort(result.model, x)[0], run_ort(model, x)[0], rtol=1e-5, atol=1e-5)
