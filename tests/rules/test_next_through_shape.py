"""bn_through_shape_into_next_matmul / _gemm: BN -> Transpose/Squeeze/Unsqueeze/Reshape/... -> MatMul or Gemm.

Folded only when BN's channel axis provably becomes the consumer input's contracted last axis.
"""

import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import assert_folds, assert_kept, bn_node, hide_ranks, make_model, tensor, value_info
from test_through_shape import shape_node

C, K = 5, 3


def next_model(rng, x_shape, ops, *, consumer="matmul", k_in=C, bias=False, opset=17, dtype=np.float32, **gemm_attrs):
    """x -> BN(C) -> ops -> MatMul(B [k_in, K]) (+ Add bias) or Gemm(B [K, k_in], transB=1) -> y."""
    inits = []
    nodes = [bn_node(inits, "x", "x_bn", rng, C, dtype, name="bn")]
    value = "x_bn"
    for i, (op, kw) in enumerate(ops):
        nodes.append(shape_node(op, value, f"s{i}", inits, opset, **kw))
        value = f"s{i}"
    if consumer == "gemm":
        inits += [tensor("B", rng.normal(size=[K, k_in]).astype(dtype)), tensor("bias", rng.normal(size=K).astype(dtype))]
        attrs = {"transB": 1, "alpha": 0.6, "beta": 1.7, **gemm_attrs}
        nodes.append(helper.make_node("Gemm", [value, "B", "bias"], ["y"], name="gemm", **attrs))
    else:
        inits.append(tensor("B", rng.normal(size=[k_in, K]).astype(dtype)))
        nodes.append(helper.make_node("MatMul", [value, "B"], ["m" if bias else "y"], name="matmul"))
        if bias:
            inits.append(tensor("bias", rng.normal(size=K).astype(dtype)))
            nodes.append(helper.make_node("Add", ["m", "bias"], ["y"], name="add"))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE, None)
    return make_model(nodes, [value_info("x", dtype, list(x_shape))], [y], inits, opset=opset)


FOLDS = {
    "bn1d_transpose_matmul": ([2, C, 6], [("Transpose", {"perm": [0, 2, 1]})], "matmul"),
    "bn1d_transpose_dropout_identity_matmul": ([2, C, 6], [("Transpose", {"perm": [0, 2, 1]}), ("Dropout", {}), ("Identity", {})], "matmul"),
    "bn2d_channels_last_matmul": ([2, C, 3, 4], [("Transpose", {"perm": [0, 2, 3, 1]})], "matmul"),
    "bn1d_transpose_reshape_rows_matmul": ([2, C, 6], [("Transpose", {"perm": [0, 2, 1]}), ("Reshape", {"shape": [-1, C]})], "matmul"),
    "bn_unsqueeze_matmul": ([2, C], [("Unsqueeze", {"axes": [1]})], "matmul"),
    "bn2d_squeeze_gemm": ([2, C, 1, 1], [("Squeeze", {"axes": [2, 3]})], "gemm"),
    "bn1d_squeeze_gemm_opset11": ([2, C, 1], [("Squeeze", {"axes": [-1]})], "gemm"),
}


@pytest.mark.parametrize("case", FOLDS, ids=list(FOLDS))
def test_bn_through_shape_into_next_legal_path_folds(rng, case):
    x_shape, ops, consumer = FOLDS[case]
    opset = 11 if case.endswith("opset11") else 17
    result = assert_folds(next_model(rng, x_shape, ops, consumer=consumer, opset=opset), rng, expect_left=0)
    (folded,) = result.report.folded
    assert (folded.rule, folded.into) == (f"bn_through_shape_into_next_{consumer}", consumer)
    assert result.model.graph.node[0].input[0] == "x"


def test_bn_through_shape_into_next_matmul_bias_absorbed_folds(rng):
    """A Linear (MatMul + Add) after the Transpose: shift @ B goes into its bias, no new node."""
    model = next_model(rng, [2, C, 6], [("Transpose", {"perm": [0, 2, 1]})], bias=True)
    result = assert_folds(model, rng, expect_left=0)
    assert [n.op_type for n in result.model.graph.node] == ["Transpose", "MatMul", "Add"]


def test_bn_through_shape_into_next_matmul_symbolic_dims_folds(rng):
    model = next_model(rng, ["n", C, "l"], [("Transpose", {"perm": [0, 2, 1]})])
    assert_folds(model, rng, expect_left=0, dims={"n": 3, "l": 7})


def test_bn_through_shape_into_next_matmul_float64_folds(rng):
    assert_folds(next_model(rng, [2, C, 6], [("Transpose", {"perm": [0, 2, 1]})], dtype=np.float64), rng, expect_left=0)


def test_bn_through_shape_into_next_matmul_channels_not_contracted_kept(rng):
    """BN [2, 5, 6] -> Transpose(0, 1, 2) -> MatMul over the 6 positions: the channels are rows."""
    model = next_model(rng, [2, C, 6], [("Transpose", {"perm": [0, 1, 2]})], k_in=6)
    assert_kept(model, "next: Transpose 'transpose' perm [0, 1, 2] puts BN's channel axis on axis 1, MatMul 'matmul' contracts axis 2")


def test_bn_through_shape_into_next_matmul_channels_merged_kept(rng):
    """[2, 6, 5] -> Reshape [2, 30]: the contracted axis holds (position, channel) pairs, not one channel."""
    ops = [("Transpose", {"perm": [0, 2, 1]}), ("Reshape", {"shape": [2, 6 * C]})]
    model = next_model(rng, [2, C, 6], ops, k_in=6 * C)
    assert_kept(model, "next: BN's channel axis 1 is not provably the contracted axis: Reshape 'reshape' to [2, 30] mixes axis 2 (length 5)")


def test_bn_through_shape_into_next_matmul_rank_unknown_kept(rng):
    model = next_model(rng, [2, C, 6], [("Transpose", {"perm": [0, 2, 1]})])
    hide_ranks(model)
    assert_kept(model, "next: the rank of BN input 'x2' is unknown")


def test_bn_through_shape_into_next_intermediate_fanout_kept(rng):
    model = next_model(rng, [2, C, 6], [("Transpose", {"perm": [0, 2, 1]})])
    model.graph.node.append(helper.make_node("Relu", ["s0"], ["r"], name="relu"))
    model.graph.output.append(value_info("r", np.float32, [2, 6, C]))
    assert_kept(model, "next: fan-out: Transpose 'transpose' output 's0' feeds MatMul 'matmul', Relu 'relu'")


def test_bn_through_shape_into_next_intermediate_graph_output_kept(rng):
    model = next_model(rng, [2, C, 1, 1], [("Squeeze", {"axes": [2, 3]})], consumer="gemm")
    model.graph.output.append(value_info("s0", np.float32, [2, C]))
    assert_kept(model, "next: Squeeze 'squeeze' output 's0' is a graph output")


def test_bn_through_shape_into_next_dropout_training_mode_input_kept(rng):
    model = next_model(rng, [2, C, 6], [("Transpose", {"perm": [0, 2, 1]}), ("Dropout", {})])
    model.graph.input.append(helper.make_tensor_value_info("training", TensorProto.BOOL, []))
    model.graph.node[2].input.extend(["", "training"])
    assert_kept(model, "next: Dropout 'dropout' training_mode is not a constant false")


def test_bn_through_shape_into_next_gemm_trans_a_kept(rng):
    model = next_model(rng, [2, C, 1, 1], [("Squeeze", {"axes": [2, 3]})], consumer="gemm", transA=1, k_in=2)
    model.graph.output[0].CopyFrom(value_info("y", np.float32, [C, K]))
    assert_kept(model, "next: Gemm 'gemm' has transA=1")


def test_bn_through_shape_into_next_matmul_weight_not_constant_kept(rng):
    model = next_model(rng, [2, C, 6], [("Transpose", {"perm": [0, 2, 1]})])
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "B"))
    model.graph.input.append(value_info("B", np.float32, [C, K]))
    assert_kept(model, "next: MatMul 'matmul' weight (second input) is not a constant (it comes from graph input 'B')")
