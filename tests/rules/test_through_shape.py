"""bn_through_shape_into_*: producer -> Identity/Dropout/Transpose/Reshape/Flatten/Squeeze/Unsqueeze -> BN.

Each case folds only when the producer's channel axis provably lands on BN's axis 1; the same
graphs with the channels elsewhere are kept with the path in the reason.
"""

import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import NP_TO_ONNX, assert_folds, assert_kept, bn_node, hide_ranks, make_model, tensor, value_info

C = 5  # producer channels, distinct from every other dim below


def conv(rng, inits, x_shape, dtype, channels=C):
    """Conv (k=3, pad 1: same spatial size) with a bias: [N, Cin, S...] -> [N, channels, S...]."""
    kernel = [3] * (len(x_shape) - 2)
    inits += [
        tensor("W", rng.normal(0, 0.5, [channels, x_shape[1], *kernel]).astype(dtype)),
        tensor("bias", rng.normal(size=channels).astype(dtype)),
    ]
    return [helper.make_node("Conv", ["x", "W", "bias"], ["p"], name="conv", pads=[1] * 2 * len(kernel))]


def deconv(rng, inits, x_shape, dtype, channels=C):
    inits += [
        tensor("W", rng.normal(0, 0.5, [x_shape[1], channels, 3, 3]).astype(dtype)),
        tensor("bias", rng.normal(size=channels).astype(dtype)),
    ]
    return [helper.make_node("ConvTranspose", ["x", "W", "bias"], ["p"], name="deconv", pads=[1, 1, 1, 1])]


def gemm(rng, inits, x_shape, dtype, channels=C):
    inits += [
        tensor("B", rng.normal(size=[channels, x_shape[1]]).astype(dtype)),
        tensor("bias", rng.normal(size=channels).astype(dtype)),
    ]
    return [helper.make_node("Gemm", ["x", "B", "bias"], ["p"], name="gemm", transB=1, alpha=0.7, beta=1.3)]


def matmul(rng, inits, x_shape, dtype, channels=C):
    inits.append(tensor("B", rng.normal(size=[x_shape[-1], channels]).astype(dtype)))
    return [helper.make_node("MatMul", ["x", "B"], ["p"], name="matmul")]


def linear(rng, inits, x_shape, dtype, channels=C):
    """MatMul + Add(bias): how exporters write a Linear layer on a rank-3 input."""
    inits += [
        tensor("B", rng.normal(size=[x_shape[-1], channels]).astype(dtype)),
        tensor("bias", rng.normal(size=channels).astype(dtype)),
    ]
    return [helper.make_node("MatMul", ["x", "B"], ["m"], name="matmul"), helper.make_node("Add", ["m", "bias"], ["p"], name="add")]


PRODUCERS = {"conv": conv, "deconv": deconv, "gemm": gemm, "matmul": matmul, "linear": linear}


def shape_node(op, value, out, inits, opset, name=None, **kw):
    """One shape-only op; a Reshape target and (opset >= 13) Squeeze/Unsqueeze axes become constant inputs."""
    inputs = [value]
    if op == "Reshape":
        inits.append(tensor(f"{out}_shape", np.array(kw.pop("shape"), np.int64)))
        inputs.append(f"{out}_shape")
    if op in ("Squeeze", "Unsqueeze") and opset >= 13 and "axes" in kw:
        inits.append(tensor(f"{out}_axes", np.array(kw.pop("axes"), np.int64)))
        inputs.append(f"{out}_axes")
    return helper.make_node(op, inputs, [out], name=name or op.lower(), **kw)


def chain_model(rng, producer, x_shape, ops, *, bn_channels=C, opset=17, dtype=np.float32, channels=C, y_shape=None):
    """x -> producer -> ops (each (op_type, kwargs)) -> BN(bn_channels) -> y (shape inferred unless given)."""
    inits = []
    nodes = PRODUCERS[producer](rng, inits, x_shape, dtype, channels=channels)
    value = "p"
    for i, (op, kw) in enumerate(ops):
        nodes.append(shape_node(op, value, f"s{i}", inits, opset, **kw))
        value = f"s{i}"
    attrs = {"is_test": 1} if opset < 7 else {}
    nodes.append(bn_node(inits, value, "y", rng, bn_channels, dtype, name="bn", **attrs))
    y = helper.make_tensor_value_info("y", NP_TO_ONNX[np.dtype(dtype)], y_shape)
    return make_model(nodes, [value_info("x", dtype, list(x_shape))], [y], inits, opset=opset)


FOLDS = {
    "gemm_unsqueeze": ("gemm", [2, 7], [("Unsqueeze", {"axes": [2, 3]})], 17),
    "gemm_unsqueeze_opset11": ("gemm", [2, 7], [("Unsqueeze", {"axes": [2, 3]})], 11),
    "gemm_unsqueeze_negative_axis": ("gemm", [2, 7], [("Unsqueeze", {"axes": [-1]})], 17),
    "gemm_reshape_nc11": ("gemm", [2, 7], [("Reshape", {"shape": [-1, C, 1, 1]})], 17),
    "matmul_transpose": ("matmul", [2, 6, 7], [("Transpose", {"perm": [0, 2, 1]})], 17),
    "matmul_transpose_unsqueeze": ("matmul", [2, 6, 7], [("Transpose", {"perm": [0, 2, 1]}), ("Unsqueeze", {"axes": [3]})], 17),
    "matmul_rank4_transpose": ("matmul", [2, 3, 6, 7], [("Transpose", {"perm": [0, 3, 1, 2]})], 17),
    "linear_transpose": ("linear", [2, 6, 7], [("Transpose", {"perm": [0, 2, 1]})], 17),
    "linear_flatten": ("linear", [2, 6, 7], [("Flatten", {"axis": 2})], 17),
    "conv_reshape_copy_rest": ("conv", [2, 3, 4, 6], [("Reshape", {"shape": [0, 0, -1]})], 17),
    "conv_reshape_explicit": ("conv", [2, 3, 4, 6], [("Reshape", {"shape": [2, C, 24]})], 17),
    "conv_reshape_minus1_channels": ("conv", [2, 3, 4, 6], [("Reshape", {"shape": [2, -1, 24]})], 17),
    "conv_reshape_split_spatial": ("conv", [2, 3, 4, 6], [("Reshape", {"shape": [2, C, 2, 2, 6]})], 17),
    "conv1x1_flatten": ("conv", [2, 3, 1, 1], [("Flatten", {})], 17),
    "conv1x1_squeeze": ("conv", [2, 3, 1, 1], [("Squeeze", {"axes": [2, 3]})], 17),
    "conv1x1_squeeze_opset11": ("conv", [2, 3, 1, 1], [("Squeeze", {"axes": [2, 3]})], 11),
    "conv1x1_squeeze_all": ("conv", [2, 3, 1, 1], [("Squeeze", {})], 17),
    "conv1d_transpose_twice": (
        "conv", [2, 3, 8], [("Transpose", {"perm": [0, 2, 1], "name": "t1"}), ("Identity", {}), ("Transpose", {"perm": [0, 2, 1], "name": "t2"})], 17,
    ),
    "conv_identity_dropout": ("conv", [2, 3, 4, 6], [("Identity", {}), ("Dropout", {})], 17),
    "deconv_reshape": ("deconv", [2, 3, 4, 6], [("Reshape", {"shape": [0, C, -1]})], 17),
}


@pytest.mark.parametrize("case", FOLDS, ids=list(FOLDS))
def test_bn_through_shape_legal_path_folds(rng, case):
    producer, x_shape, ops, opset = FOLDS[case]
    model = chain_model(rng, producer, x_shape, ops, opset=opset)
    result = assert_folds(model, rng, expect_left=0, remove_noops=False)  # the rule crosses Identity/Dropout itself
    (folded,) = result.report.folded
    rule = {"matmul": "matmul", "linear": "matmul_add", "deconv": "conv_transpose"}.get(producer, producer)
    assert folded.rule == f"bn_through_shape_into_{rule}"
    assert [n.op_type for n in result.model.graph.node][-len(ops):] == [op for op, _ in ops]


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_bn_through_shape_into_matmul_dtypes_folds(rng, dtype):
    model = chain_model(rng, "linear", [2, 6, 7], [("Transpose", {"perm": [0, 2, 1]})], dtype=dtype)
    assert_folds(model, rng, expect_left=0)


def test_bn_through_shape_into_matmul_shift_added_after_product_folds(rng):
    """MatMul has no bias: the shift becomes an Add on the product's feature axis, before the Transpose."""
    model = chain_model(rng, "matmul", [2, 6, 7], [("Transpose", {"perm": [0, 2, 1]})])
    result = assert_folds(model, rng, expect_left=0)
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add", "Transpose"]
    assert result.model.graph.node[-1].output[0] == "y"


def test_bn_through_shape_symbolic_batch_folds(rng):
    model = chain_model(rng, "linear", ["n", 6, 7], [("Transpose", {"perm": [0, 2, 1]})])
    assert_folds(model, rng, expect_left=0, dims={"n": 3})


def test_bn_through_shape_reshape_copying_channel_symbolic_spatial_folds(rng):
    """Reshape [0, 0, -1] copies N and C: the rest multiplies to H*W whatever H and W are."""
    model = chain_model(rng, "conv", [2, 3, "h", "w"], [("Reshape", {"shape": [0, 0, -1]})])
    assert_folds(model, rng, expect_left=0, dims={"h": 3, "w": 5})


def test_bn_through_shape_dropout_training_false_folds(rng):
    model = chain_model(rng, "conv", [2, 3, 4, 6], [("Dropout", {})])
    model.graph.initializer.extend([tensor("ratio", np.array(0.5, np.float32)), tensor("training", np.array(False))])
    model.graph.node[1].input.extend(["ratio", "training"])
    assert_folds(model, rng, expect_left=0)


# --- kept: the channels land elsewhere ---------------------------------------------------------


def test_bn_through_shape_transpose_identity_perm_kept(rng):
    """MatMul [N, L, C] -> Transpose(0, 1, 2) -> BN over L: the features stay on axis 2."""
    model = chain_model(rng, "matmul", [2, 6, 7], [("Transpose", {"perm": [0, 1, 2]})], bn_channels=6)
    assert_kept(model, "Transpose 'transpose' perm [0, 1, 2] puts MatMul 'matmul' feature axis 2 on axis 2, BN normalises axis 1")


def test_bn_through_shape_linear_transpose_to_axis0_kept(rng):
    model = chain_model(rng, "linear", [2, 6, 7], [("Transpose", {"perm": [2, 1, 0]})], bn_channels=6)
    assert_kept(model, "Transpose 'transpose' perm [2, 1, 0] puts Add 'add' feature axis 2 on axis 0, BN normalises axis 1")


def test_bn_through_shape_reshape_mixing_channels_kept(rng):
    """Conv [2, 5, 4, 6] -> Reshape [2, 20, 6]: BN's 20 channels are (channel, row) pairs."""
    model = chain_model(rng, "conv", [2, 3, 4, 6], [("Reshape", {"shape": [2, C * 4, 6]})], bn_channels=C * 4)
    assert_kept(model, "Conv 'conv' channel axis 1 is not provably BN's channel axis 1: Reshape 'reshape' to [2, 20, 6] mixes axis 1 (length 5) of [2, 5, 4, 6] with other axes")


def test_bn_through_shape_flatten_spatial_kept(rng):
    model = chain_model(rng, "conv", [2, 3, 4, 6], [("Flatten", {})], bn_channels=C * 24)
    assert_kept(model, "Flatten 'flatten' axis=1 to [2, 120] mixes axis 1")


def test_bn_through_shape_flatten_dynamic_spatial_kept(rng):
    model = chain_model(rng, "conv", [2, 3, "h", "w"], [("Flatten", {})], bn_channels=C * 24)
    assert_kept(model, "Flatten 'flatten' axis=1 input shape [2, 5, ?, ?] is not static after axis 1")


def runtime_reshape(rng, target_shape):
    model = chain_model(rng, "conv", [2, 3, 4, 6], [("Reshape", {"shape": [0, 0, -1]})])
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "s0_shape"))
    model.graph.input.append(helper.make_tensor_value_info("s0_shape", TensorProto.INT64, target_shape))
    return model


def test_bn_through_shape_reshape_runtime_target_kept(rng):
    assert_kept(runtime_reshape(rng, ["k"]), "Reshape 'reshape' target shape is not a constant and its output shape is unknown")


def test_bn_through_shape_reshape_runtime_target_of_known_length_kept(rng):
    """Shape inference knows the rank from the target's length, not the dims."""
    assert_kept(runtime_reshape(rng, [3]), "Reshape 'reshape' output shape [?, ?, ?] is not static")


def test_bn_through_shape_squeeze_channel_axis_kept(rng):
    """Conv with one channel -> Squeeze(axes=[1]) -> BN over the rows."""
    model = chain_model(rng, "conv", [2, 3, 4, 6], [("Squeeze", {"axes": [1]})], channels=1, bn_channels=4)
    assert_kept(model, "Squeeze 'squeeze' removes axis 1, the followed channel axis")


def test_bn_through_shape_squeeze_all_dynamic_kept(rng):
    """Squeeze without axes of [n, 5, 1, 1]: with n == 1 it would drop the batch axis too."""
    model = chain_model(rng, "conv", ["n", 3, 1, 1], [("Squeeze", {})], y_shape=["n", C])
    assert_kept(model, "Squeeze 'squeeze' removes every axis of length 1 and shape [?, 5, 1, 1] is not static")


def test_bn_through_shape_runtime_axes_kept(rng):
    model = chain_model(rng, "gemm", [2, 7], [("Unsqueeze", {"axes": [2, 3]})])
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "s0_axes"))
    model.graph.input.append(helper.make_tensor_value_info("s0_axes", TensorProto.INT64, [2]))
    assert_kept(model, "Unsqueeze 'unsqueeze' axes are not a constant (they come from graph input 's0_axes')")


def test_bn_through_shape_matmul_rank_unknown_kept(rng):
    """The MatMul reads a Reshape to a runtime shape: the product's rank, so its feature axis, is unknown."""
    model = chain_model(rng, "matmul", [2, 6, 7], [("Transpose", {"perm": [0, 2, 1]})])
    hide_ranks(model)
    assert_kept(model, "the rank of MatMul 'matmul' output is unknown")


# --- kept: the shared checks on the way ----------------------------------------------------------


def test_bn_through_shape_intermediate_fanout_kept(rng):
    model = chain_model(rng, "matmul", [2, 6, 7], [("Transpose", {"perm": [0, 2, 1]}), ("Identity", {})])
    model.graph.node.append(helper.make_node("Relu", ["s0"], ["r"], name="relu"))
    model.graph.output.append(value_info("r", np.float32, [2, C, 6]))
    assert_kept(model, "fan-out: Transpose 'transpose' output also feeds Relu 'relu'")


def test_bn_through_shape_intermediate_graph_output_kept(rng):
    model = chain_model(rng, "gemm", [2, 7], [("Unsqueeze", {"axes": [2, 3]})])
    model.graph.output.append(value_info("s0", np.float32, [2, C, 1, 1]))
    assert_kept(model, "Unsqueeze 'unsqueeze' output 's0' is a graph output")


def test_bn_through_shape_producer_fanout_kept(rng):
    model = chain_model(rng, "gemm", [2, 7], [("Unsqueeze", {"axes": [2, 3]})])
    model.graph.node.append(helper.make_node("Relu", ["p"], ["r"], name="relu"))
    model.graph.output.append(value_info("r", np.float32, [2, C]))
    assert_kept(model, "fan-out: Gemm 'gemm' output also feeds Relu 'relu'")


def test_bn_through_shape_dropout_training_mode_input_kept(rng):
    model = chain_model(rng, "conv", [2, 3, 4, 6], [("Dropout", {})])
    model.graph.input.append(helper.make_tensor_value_info("training", TensorProto.BOOL, []))
    model.graph.node[1].input.extend(["", "training"])
    assert_kept(model, "Dropout 'dropout' training_mode is not a constant false")


def test_bn_through_shape_residual_add_kept(rng):
    """MatMul + a run-time tensor (a residual Add): no bias to fold the shift into."""
    model = chain_model(rng, "linear", [2, 6, 7], [("Transpose", {"perm": [0, 2, 1]})])
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "bias"))
    model.graph.input.append(value_info("bias", np.float32, [2, 6, C]))
    assert_kept(model, "Add 'add' bias is not a constant (it comes from graph input 'bias')")


def test_bn_through_shape_matmul_batched_weight_kept(rng):
    model = chain_model(rng, "matmul", [2, 6, 7], [("Transpose", {"perm": [0, 2, 1]})])
    model.graph.initializer[0].CopyFrom(tensor("B", rng.normal(size=[2, 7, C]).astype(np.float32)))
    assert_kept(model, "MatMul 'matmul' weight has rank 3, expected 2")


def test_bn_through_shape_into_matmul_opset6_no_broadcast_add_kept(rng):
    model = chain_model(rng, "matmul", [2, 6, 7], [("Transpose", {"perm": [0, 2, 1]})], opset=6)
    assert_kept(model, "adding the shift needs Add with broadcasting (opset >= 7)")


def test_bn_into_matmul_rank3_without_shape_ops_still_kept(rng):
    """The proof is what allows rank 3: MatMul [N, L, C] -> BN over L stays a refusal."""
    model = chain_model(rng, "matmul", [2, 6, 7], [], bn_channels=6)
    assert_kept(model, "MatMul product has rank 3")
