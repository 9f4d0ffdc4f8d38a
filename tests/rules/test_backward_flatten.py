"""bn_through_flatten_into_gemm / _matmul: BN [N, C, H, W] -> (Dropout) -> Flatten/Reshape -> Linear."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import assert_folds, assert_kept, bn_node, make_model, tensor, value_info

C, H, W, K = 3, 4, 2, 5


def head_model(rng, *, flatten="flatten", linear="gemm", dropout=True, x_shape=(2, C, H, W), opset=17, dtype=np.float32, trans_b=0, **attrs):
    """x -> BN(C) -> Dropout -> Flatten (or Reshape to `flatten`, a shape) -> Gemm/MatMul+Add -> y [2, K]."""
    features = C * H * W
    inits = [
        tensor("B", rng.normal(0, 0.3, [K, features] if trans_b else [features, K]).astype(dtype)),
        tensor("bias", rng.normal(size=K).astype(dtype)),
    ]
    nodes = [bn_node(inits, "x", "x_bn", rng, C, dtype, name="bn")]
    value = "x_bn"
    if dropout:
        nodes.append(helper.make_node("Dropout", [value], ["d"], name="dropout"))
        value = "d"
    if flatten == "flatten":
        nodes.append(helper.make_node("Flatten", [value], ["f"], name="flatten", **attrs))
    else:
        inits.append(tensor("shape", np.array(flatten, np.int64)))
        nodes.append(helper.make_node("Reshape", [value, "shape"], ["f"], name="reshape", **attrs))
    if linear == "gemm":
        nodes.append(helper.make_node("Gemm", ["f", "B", "bias"], ["y"], name="gemm", transB=trans_b, alpha=0.7, beta=1.3))
    else:
        nodes += [helper.make_node("MatMul", ["f", "B"], ["m"], name="matmul"), helper.make_node("Add", ["m", "bias"], ["y"], name="add")]
    return make_model(nodes, [value_info("x", dtype, list(x_shape))], [value_info("y", dtype, [x_shape[0], K])], inits, opset=opset)


@pytest.mark.parametrize("linear", ["gemm", "matmul"])
@pytest.mark.parametrize(
    "flatten", ["flatten", [0, -1], [-1, C * H * W], [2, -1], [0, C * H * W]], ids=["flatten", "0_-1", "-1_chw", "n_-1", "0_chw"]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bn_through_flatten_shapes_folds(rng, linear, flatten, dtype):
    result = assert_folds(head_model(rng, flatten=flatten, linear=linear, dtype=dtype), rng, expect_left=0)
    (folded,) = result.report.folded
    assert (folded.rule, folded.into) == (f"bn_through_flatten_into_{linear}", linear)
    assert result.report.noops_removed == {"Dropout": 1}  # inference Dropout computes nothing
    assert result.model.graph.node[0].op_type == ("Flatten" if flatten == "flatten" else "Reshape")
    assert result.model.graph.node[0].input[0] == "x"


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_through_flatten_into_gemm_trans_b_no_dropout_folds(rng, trans_b):
    assert_folds(head_model(rng, trans_b=trans_b, dropout=False), rng, expect_left=0)


def test_bn_through_flatten_rank3_and_negative_axis_folds(rng):
    """BN1d over [N, C, L] -> Flatten(axis=-2): the same expansion over L positions."""
    inits = [tensor("B", rng.normal(size=[C * H, K]).astype(np.float32))]
    nodes = [
        bn_node(inits, "x", "x_bn", rng, C, name="bn"),
        helper.make_node("Flatten", ["x_bn"], ["f"], name="flatten", axis=-2),
        helper.make_node("Identity", ["f"], ["i"], name="identity"),
        helper.make_node("MatMul", ["i", "B"], ["y"], name="matmul"),
    ]
    model = make_model(nodes, [value_info("x", np.float32, ["n", C, H])], [value_info("y", np.float32, ["n", K])], inits)
    result = assert_folds(model, rng, expect_left=0, dims={"n": 3})
    assert result.report.folded[0].rule == "bn_through_flatten_into_matmul"


def test_bn_through_flatten_dropout_training_false_folds(rng):
    model = head_model(rng, opset=13)
    model.graph.initializer.extend([tensor("ratio", np.array(0.5, np.float32)), tensor("training", np.array(False))])
    model.graph.node[1].input.extend(["ratio", "training"])
    assert_folds(model, rng, expect_left=0)


def test_bn_through_flatten_dynamic_spatial_kept(rng):
    model = head_model(rng, x_shape=(2, C, "h", "w"))
    assert_kept(model, "cannot expand BN over the flattened features: the spatial size of 'x' is not static (shape [2, 3, ?, ?])")


def test_bn_through_flatten_axis2_kept(rng):
    model = head_model(rng, axis=2, linear="matmul")
    model.graph.initializer[0].CopyFrom(tensor("B", rng.normal(size=[H * W, K]).astype(np.float32)))
    model.graph.output[0].CopyFrom(value_info("y", np.float32, [2 * C, K]))
    assert_kept(model, "next: Flatten 'flatten' has axis=2, not 1: its rows are not the samples")


def test_bn_through_reshape_other_rows_kept(rng):
    """Reshape to [N*C, H*W]: the rows are not the samples."""
    model = head_model(rng, flatten=[-1, H * W], linear="matmul")
    model.graph.initializer[0].CopyFrom(tensor("B", rng.normal(size=[H * W, K]).astype(np.float32)))
    model.graph.output[0].CopyFrom(value_info("y", np.float32, [2 * C, K]))
    assert_kept(model, f"Reshape 'reshape' target shape [-1, {H * W}] is not [N, C*H*W] = [N, {C * H * W}]")


def test_bn_through_reshape_runtime_shape_kept(rng):
    model = head_model(rng, flatten=[0, -1])
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "shape"))
    model.graph.input.append(helper.make_tensor_value_info("shape", TensorProto.INT64, [2]))
    assert_kept(model, "Reshape 'reshape' target shape is not a constant and its output shape is unknown")


def test_bn_through_flatten_dropout_training_mode_input_kept(rng):
    model = head_model(rng, opset=13)
    model.graph.input.append(helper.make_tensor_value_info("training", TensorProto.BOOL, []))
    model.graph.node[1].input.extend(["", "training"])
    assert_kept(model, "next: Dropout 'dropout' training_mode is not a constant false")


def test_bn_through_flatten_flatten_output_is_graph_output_kept(rng):
    model = head_model(rng)
    model.graph.output.append(value_info("f", np.float32, [2, C * H * W]))
    assert_kept(model, "next: Flatten 'flatten' output 'f' is a graph output")


def test_bn_through_flatten_dropout_fanout_kept(rng):
    model = head_model(rng)
    model.graph.node.append(helper.make_node("Relu", ["d"], ["r"], name="relu"))
    model.graph.output.append(value_info("r", np.float32, [2, C, H, W]))
    assert_kept(model, "next: fan-out: BN output 'x_bn' feeds Flatten 'flatten', Relu 'relu'")  # past the Dropout


def test_bn_through_flatten_into_relu_kept(rng):
    """Flatten then a non-linear op: no rule folds through it; the reason names the path."""
    model = head_model(rng)
    model.graph.node[-1].CopyFrom(helper.make_node("Relu", ["f"], ["y"], name="relu"))
    model.graph.output[0].CopyFrom(value_info("y", np.float32, [2, C * H * W]))
    assert_kept(model, "next: output feeds Flatten 'flatten' then Relu 'relu', not a Conv, Gemm or MatMul")


def opset6_head(rng, dropout_is_test):
    inits = [tensor("B", rng.normal(size=[C * H * W, K]).astype(np.float32))]
    nodes = [
        bn_node(inits, "x", "x_bn", rng, C, name="bn", is_test=1),
        helper.make_node("Dropout", ["x_bn"], ["d"], name="dropout", is_test=dropout_is_test),
        helper.make_node("Flatten", ["d"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "B"], ["y"], name="matmul"),
    ]
    return make_model(nodes, [value_info("x", np.float32, [2, C, H, W])], [value_info("y", np.float32, [2, K])], inits, opset=6)


def test_bn_through_flatten_dropout6_training_kept(rng):
    assert_kept(opset6_head(rng, dropout_is_test=0), "next: Dropout 'dropout' has is_test=0 (training mode)")


def test_bn_through_flatten_into_matmul_opset6_no_broadcast_add_kept(rng):
    assert_kept(opset6_head(rng, dropout_is_test=1), "next: adding the bias needs Add with broadcasting (opset >= 7)")
