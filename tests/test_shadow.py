"""The float64 shadow (bnfold.shadow): the original promoted to float64 computes what it does,
to float32 rounding; what cannot be promoted faithfully has no shadow."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import engines, shadow


def tiny(nodes, inits, y_shape, x_shape=(1, 3, 4, 4)):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run(model, feeds):
    _, values, _ = engines.run_model(model, feeds, ["CPUExecutionProvider"], "test")
    return next(iter(values.values()))["y"]


def conv_resize(rng):
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, [4, 3, 3, 3]).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["c"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Resize", ["f", "", "scales"], ["y"], mode="nearest")]
    return tiny(nodes, inits, [1, 4, 8, 8])


def test_shadow_resize_with_constant_scales_promotes_and_agrees(rng):
    model = conv_resize(rng)
    promoted = shadow.promote(model)
    assert promoted is not None
    assert next(t for t in promoted.graph.initializer if t.name == "scales").data_type == TensorProto.FLOAT
    assert next(n for n in promoted.graph.node if n.op_type == "Cast").attribute[0].i == TensorProto.DOUBLE
    x = rng.normal(size=[1, 3, 4, 4]).astype(np.float32)
    exact, single = run(promoted, shadow.promote_feeds({"x": x})), run(model, {"x": x})
    assert exact.dtype == np.float64 and single.dtype == np.float32
    np.testing.assert_allclose(exact, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["QuantizeLinear", "DequantizeLinear"])
def test_shadow_quantized_op_has_no_shadow(op):
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s")]
    kind = TensorProto.FLOAT
    nodes = [helper.make_node(op, ["x", "s"], ["y"])]
    model = tiny(nodes, inits, [1, 3, 4, 4])
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.UINT8 if op == "QuantizeLinear" else kind
    assert shadow.promote(model) is None
