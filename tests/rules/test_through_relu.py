"""bn_scale_through_relu: producer -> Relu / LeakyRelu -> BN with a positive scale on every channel."""

import numpy as np
import pytest
from onnx import helper, numpy_helper

from conftest import assert_folds, assert_kept, bn_node, make_model, tensor, value_info

C = 4


def producer_nodes(rng, kind, inits, dtype):
    """x -> producer -> 'p'; (nodes, x shape, p shape)."""
    if kind in ("conv", "deconv"):
        op, w_shape = ("Conv", [C, 3, 3, 3]) if kind == "conv" else ("ConvTranspose", [3, C, 3, 3])
        inits += [tensor("W", rng.normal(0, 0.5, w_shape).astype(dtype)), tensor("b", rng.normal(size=C).astype(dtype))]
        return [helper.make_node(op, ["x", "W", "b"], ["p"], name=kind, pads=[1, 1, 1, 1])], [2, 3, 5, 5], [2, C, 5, 5]
    inits.append(tensor("W", rng.normal(size=[6, C]).astype(dtype)))
    if kind == "gemm":
        inits.append(tensor("b", rng.normal(size=C).astype(dtype)))
        return [helper.make_node("Gemm", ["x", "W", "b"], ["p"], name="gemm", alpha=0.5, beta=2.0)], [3, 6], [3, C]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["p" if kind == "matmul" else "m"], name="matmul")]
    if kind == "linear":
        inits.append(tensor("b", rng.normal(size=C).astype(dtype)))
        nodes.append(helper.make_node("Add", ["m", "b"], ["p"], name="add"))
    return nodes, [3, 6], [3, C]


def relu_model(rng, kind="conv", activation="Relu", dtype=np.float32, scale_sign=1.0, opset=17, **act_attrs):
    """x -> producer -> activation -> BN (scale = scale_sign * |gamma| / sqrt(var + eps)) -> y."""
    inits = []
    nodes, x_shape, p_shape = producer_nodes(rng, kind, inits, dtype)
    nodes.append(helper.make_node(activation, ["p"], ["r"], name=activation.lower(), **act_attrs))
    nodes.append(bn_node(inits, "r", "y", rng, C, dtype, name="bn", **({"is_test": 1} if opset < 7 else {})))
    gamma = next(t for t in inits if t.name == "bn_scale")
    gamma.CopyFrom(tensor("bn_scale", (np.abs(numpy_helper.to_array(gamma)) * scale_sign).astype(dtype)))
    return make_model(nodes, [value_info("x", dtype, x_shape)], [value_info("y", dtype, p_shape)], inits, opset=opset)


@pytest.mark.parametrize("kind", ["conv", "deconv", "gemm", "matmul", "linear"])
@pytest.mark.parametrize("activation", ["Relu", "LeakyRelu"])
def test_bn_scale_through_relu_positive_scale_folds(rng, kind, activation):
    result = assert_folds(relu_model(rng, kind, activation, alpha=0.2) if activation == "LeakyRelu" else relu_model(rng, kind), rng, expect_left=0)
    (folded,) = result.report.folded
    assert folded.rule == "bn_scale_through_relu"
    assert folded.into == {"deconv": "deconv", "linear": "matmul"}.get(kind, kind)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops[-2:] == [activation, "Add"] and "BatchNormalization" not in ops


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_bn_scale_through_relu_dtypes_folds(rng, dtype):
    assert_folds(relu_model(rng, "conv", dtype=dtype), rng, expect_left=0)


def test_bn_scale_through_relu_zero_shift_removes_bn_folds(rng):
    """beta = mean = 0: no shift is left, the Relu writes BN's output and no Add is added."""
    model = relu_model(rng, "conv")
    for name in ("bn_B", "bn_mean"):
        next(t for t in model.graph.initializer if t.name == name).CopyFrom(tensor(name, np.zeros(C, np.float32)))
    result = assert_folds(model, rng, expect_left=0)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu"]
    assert result.model.graph.node[-1].output[0] == "y"


def test_bn_scale_through_relu_negative_scale_kept(rng):
    model = relu_model(rng, "conv", scale_sign=-1.0)
    assert_kept(model, "scale is not positive on 4 of 4 channels (channel 0: -")


def test_bn_scale_through_relu_one_negative_channel_kept(rng):
    model = relu_model(rng, "gemm")
    gamma = next(t for t in model.graph.initializer if t.name == "bn_scale")
    values = numpy_helper.to_array(gamma).copy()
    values[2] = -values[2]
    gamma.CopyFrom(tensor("bn_scale", values))
    assert_kept(model, "scale is not positive on 1 of 4 channels (channel 2: ")


def test_bn_scale_through_relu_zero_scale_kept(rng):
    model = relu_model(rng, "conv", scale_sign=0.0)
    assert_kept(model, "scale is not positive on 4 of 4 channels (channel 0: 0): only a positive scale moves through Relu 'relu'")


def test_bn_scale_through_relu_activation_fanout_kept(rng):
    model = relu_model(rng, "conv")
    model.graph.node.append(helper.make_node("Neg", ["r"], ["n"], name="neg"))
    model.graph.output.append(value_info("n", np.float32, [2, C, 5, 5]))
    assert_kept(model, "fan-out: Relu 'relu' output also feeds Neg 'neg'")


def test_bn_scale_through_relu_activation_graph_output_kept(rng):
    model = relu_model(rng, "conv")
    model.graph.output.append(value_info("r", np.float32, [2, C, 5, 5]))
    assert_kept(model, "Relu 'relu' output 'r' is a graph output")


def test_bn_scale_through_relu_producer_fanout_kept(rng):
    model = relu_model(rng, "conv")
    model.graph.node.append(helper.make_node("Neg", ["p"], ["n"], name="neg"))
    model.graph.output.append(value_info("n", np.float32, [2, C, 5, 5]))
    assert_kept(model, "fan-out: Conv 'conv' output also feeds Neg 'neg'")


def test_bn_scale_through_relu_producer_graph_output_kept(rng):
    model = relu_model(rng, "gemm")
    model.graph.output.append(value_info("p", np.float32, [3, C]))
    assert_kept(model, "Gemm 'gemm' output 'p' is a graph output")


def test_bn_scale_through_relu_matmul_rank3_kept(rng):
    """The producer's own checks still apply: BN over axis 1 of [N, L, C] is not per column."""
    inits = [tensor("W", rng.normal(size=[6, C]).astype(np.float32))]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["p"], name="matmul"),
        helper.make_node("Relu", ["p"], ["r"], name="relu"),
        bn_node(inits, "r", "y", rng, 3, name="bn"),
    ]
    gamma = next(t for t in inits if t.name == "bn_scale")
    gamma.CopyFrom(tensor("bn_scale", np.abs(numpy_helper.to_array(gamma))))
    model = make_model(nodes, [value_info("x", np.float32, [2, 3, 6])], [value_info("y", np.float32, [2, 3, C])], inits)
    assert_kept(model, "MatMul product has rank 3")


def test_bn_scale_through_relu_opset6_no_broadcast_add_kept(rng):
    model = relu_model(rng, "conv", opset=6)
    assert_kept(model, "adding the shift needs Add with broadcasting (opset >= 7)")


def next_conv_model(rng, pads):
    """Conv -> Relu -> BN -> Conv(pads): the BN can also fold backward when nothing is padded."""
    model = relu_model(rng, "conv")
    inits = [tensor("W2", rng.normal(0, 0.5, [2, C, 3, 3]).astype(np.float32))]
    model.graph.initializer.extend(inits)
    model.graph.node.append(helper.make_node("Conv", ["y", "W2"], ["z"], name="conv2", pads=[pads] * 4))
    del model.graph.output[:]
    side = 5 + 2 * pads - 2
    model.graph.output.append(value_info("z", np.float32, [2, 2, side, side]))
    return model


def test_bn_scale_through_relu_defers_to_full_backward_fold_folds(rng):
    """A backward fold leaves no Add behind: preferred."""
    result = assert_folds(next_conv_model(rng, pads=0), rng, expect_left=0)
    assert result.report.folded[0].rule == "bn_into_next_conv"
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu", "Conv"]


def test_bn_scale_through_relu_when_next_conv_pads_folds(rng):
    """The next Conv reads zero padding, so BN cannot fold backward: the scale moves through the Relu."""
    result = assert_folds(next_conv_model(rng, pads=1), rng, expect_left=0)
    assert result.report.folded[0].rule == "bn_scale_through_relu"
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu", "Add", "Conv"]


def test_bn_scale_through_relu_backward_rule_disabled_kept(rng):
    """With --rules leaving out the preferred backward rule, the BN is kept and both reasons given."""
    model = next_conv_model(rng, pads=0)
    assert_kept(model, "bn_into_next_conv folds it entirely, preferred to moving the scale through Relu 'relu'", rules=["bn_scale_through_relu"])
