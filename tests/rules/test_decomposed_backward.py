"""affine_into_next_* (backward): BN written out as arithmetic before Conv / Gemm / MatMul, and
through Flatten into Gemm / MatMul: input normalisation (x - mean) / std folded into the first
layer, under the same conditions as a BN before that layer."""

import numpy as np
import pytest
from onnx import helper

import bnfold
from conftest import assert_folds, make_model, tensor, value_info
from test_decomposed import assert_chain_folds, assert_chain_kept, chain_nodes, keras_bn_steps


def conv_after_model(rng, steps, *, cin=4, cout=6, groups=1, dtype=np.float32, **conv_attrs):
    """x [2, cin, 7, 7] -> `steps` -> Conv (3x3, bias) -> y."""
    inits = [tensor("W", rng.normal(0, 0.5, [cout, cin // groups, 3, 3]).astype(dtype)), tensor("b", rng.normal(size=cout).astype(dtype))]
    nodes, out = chain_nodes("x", steps, inits)
    nodes.append(helper.make_node("Conv", [out, "W", "b"], ["y"], name="conv", group=groups, **conv_attrs))
    x = value_info("x", dtype, [2, cin, 7, 7])
    return make_model(nodes, [x], [helper.make_tensor_value_info("y", x.type.tensor_type.elem_type, None)], inits)


def input_normalisation(rng, channels: int, dtype=np.float32):
    """(x - mean) / std with [1, C, 1, 1] constants, the classic image preprocessing."""
    mean = rng.normal(size=[1, channels, 1, 1]).astype(dtype)
    std = rng.uniform(0.2, 2.0, [1, channels, 1, 1]).astype(dtype)
    return [("Sub", mean, False), ("Div", std, False)]


@pytest.mark.parametrize("groups,cout", [(1, 6), (2, 6), (4, 8)], ids=["g1", "g2", "depthwise_x2"])
def test_affine_into_next_conv_input_normalisation_folds(rng, groups, cout):
    model = conv_after_model(rng, input_normalisation(rng, 4), groups=groups, cout=cout)
    result = assert_chain_folds(model, rng, "affine_into_next_conv", ["Conv"], "Sub+Div")
    assert result.model.graph.node[0].input[0] == "x"


def test_affine_into_next_conv_keras_form_valid_padding_folds(rng):
    model = conv_after_model(rng, keras_bn_steps(rng, 4, [4, 1, 1]), auto_pad="VALID", strides=[2, 2])
    assert_chain_folds(model, rng, "affine_into_next_conv", ["Conv"], "Sub+Div+Mul+Add")


def test_affine_into_next_conv_negation_folds(rng):
    model = conv_after_model(rng, [("Sub", rng.normal(size=[4, 1, 1]).astype(np.float32), True)])
    assert_chain_folds(model, rng, "affine_into_next_conv", ["Conv"], "Sub")


def test_affine_into_next_conv_padded_shift_kept(rng):
    model = conv_after_model(rng, input_normalisation(rng, 4), pads=[1, 1, 1, 1])
    assert_chain_kept(model, "next: Conv 'conv' pads the input with zeros: a shifted input is not a shifted output")


def test_affine_into_next_conv_padded_scale_only_folds(rng):
    """No shift: a padded zero stays zero, so padding does not matter."""
    model = conv_after_model(rng, [("Mul", rng.uniform(0.5, 2, [4, 1, 1]).astype(np.float32), False)], pads=[1, 1, 1, 1])
    assert_chain_folds(model, rng, "affine_into_next_conv", ["Conv"], "Mul")


def test_affine_into_next_conv_w_shaped_constant_kept(rng):
    """x [2, 4, 7, 4]: a [4] constant lies on W, not on the 4 channels."""
    inits = [tensor("W", rng.normal(0, 0.5, [6, 4, 3, 3]).astype(np.float32))]
    nodes, out = chain_nodes("x", [("Mul", rng.uniform(0.5, 2, 4).astype(np.float32), False)], inits)
    nodes.append(helper.make_node("Conv", [out, "W"], ["y"], name="conv"))
    model = make_model(nodes, [value_info("x", np.float32, [2, 4, 7, 4])], [value_info("y", np.float32, [2, 6, 5, 2])], inits)
    assert_chain_kept(model, "constant of shape [4] varies along axis 3 of 'x' [2, 4, 7, 4]")


def test_affine_into_next_conv_chain_output_fanout_kept(rng):
    model = conv_after_model(rng, input_normalisation(rng, 4))
    nodes = [*model.graph.node, helper.make_node("Relu", ["op1_out"], ["r"], name="relu")]
    outputs = [*model.graph.output, helper.make_tensor_value_info("r", 1, None)]
    model = make_model(nodes, model.graph.input, outputs, model.graph.initializer)
    result = bnfold.fold(model)
    (kept,) = result.report.affine_kept
    assert kept.ops == "Sub+Div" and "fan-out: affine chain output 'op1_out' feeds Conv 'conv', Relu 'relu'" in kept.reason
    assert not result.modified


def gemm_after_model(rng, steps, *, flatten=False, op="Gemm"):
    """x [3, 4] (or [3, 2, 2, 3] -> Flatten) -> `steps` before it -> Gemm / MatMul (+ bias Add)."""
    features = 12 if flatten else 4
    inits = [tensor("B", rng.normal(size=[features, 5]).astype(np.float32)), tensor("C", rng.normal(size=5).astype(np.float32))]
    nodes, out = chain_nodes("x", steps, inits)
    if flatten:
        nodes.append(helper.make_node("Flatten", [out], ["f"], name="flatten"))
        out = "f"
    if op == "Gemm":
        nodes.append(helper.make_node("Gemm", [out, "B", "C"], ["y"], name="gemm", alpha=0.5))
    else:
        nodes += [helper.make_node("MatMul", [out, "B"], ["m"], name="matmul"), helper.make_node("Add", ["m", "C"], ["y"], name="add")]
    shape = [3, 2, 2, 3] if flatten else [3, 4]
    return make_model(nodes, [value_info("x", np.float32, shape)], [value_info("y", np.float32, [3, 5])], inits)


@pytest.mark.parametrize("op,rule,left", [("Gemm", "affine_into_next_gemm", ["Gemm"]), ("MatMul", "affine_into_next_matmul", ["MatMul", "Add"])])
def test_affine_into_next_linear_keras_form_folds(rng, op, rule, left):
    model = gemm_after_model(rng, keras_bn_steps(rng, 4, [4]), op=op)
    assert_chain_folds(model, rng, rule, left, "Sub+Div+Mul+Add")


@pytest.mark.parametrize(
    "op,rule,left",
    [("Gemm", "affine_through_flatten_into_gemm", ["Flatten", "Gemm"]), ("MatMul", "affine_through_flatten_into_matmul", ["Flatten", "MatMul", "Add"])],
)
def test_affine_through_flatten_into_linear_folds(rng, op, rule, left):
    model = gemm_after_model(rng, keras_bn_steps(rng, 2, [2, 1, 1]), flatten=True, op=op)
    assert_chain_folds(model, rng, rule, left, "Sub+Div+Mul+Add")


def test_affine_forward_preferred_over_backward(rng):
    """Conv -> Mul -> Add -> Conv: the chain goes into the producer (forward), as a BN would."""
    inits = [tensor("W1", rng.normal(size=[4, 3, 1, 1]).astype(np.float32)), tensor("W2", rng.normal(size=[5, 4, 1, 1]).astype(np.float32))]
    steps = [("Mul", rng.normal(size=[4, 1, 1]).astype(np.float32), False), ("Add", rng.normal(size=[4, 1, 1]).astype(np.float32), False)]
    middle, out = chain_nodes("c1", steps, inits)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1"), *middle, helper.make_node("Conv", [out, "W2"], ["y"], name="conv2")]
    model = make_model(nodes, [value_info("x", np.float32, [2, 3, 4, 4])], [value_info("y", np.float32, [2, 5, 4, 4])], inits)
    result = assert_folds(model, rng, expect_left=0)
    assert [(f.rule, f.into) for f in result.report.affine_folded] == [("affine_into_conv", "conv1")]


def test_affine_into_next_conv_chain_output_graph_output_kept(rng):
    model = conv_after_model(rng, input_normalisation(rng, 4))
    outputs = [*model.graph.output, helper.make_tensor_value_info("op1_out", 1, None)]
    model = make_model(model.graph.node, model.graph.input, outputs, model.graph.initializer)
    record = assert_chain_kept(model, "next: affine chain output 'op1_out' is a graph output")
    assert record.ops == "Sub+Div"
