"""bn_into_matmul and bn_into_matmul_add: only where the product is provably 2-D [N, C]."""

import numpy as np
import pytest
from onnx import TensorProto, helper

import bnfold
from conftest import assert_folds, assert_kept, assert_same_outputs, bn_node, make_model, tensor, value_info


def matmul_bn_model(rng, *, rank=2, bias_shape=None, bias_first=False, dtype=np.float32):
    """x [3, 4] or [3, 4, 4] @ B [4, C] (+ bias) -> BN over axis 1."""
    channels = 4 if rank == 3 else 5  # rank 3: BN's axis 1 has length 4 == L, so it *can* run
    in_shape = [3, 4] if rank == 2 else [3, 4, 4]
    out_shape = [3, channels] if rank == 2 else [3, 4, channels]
    inits = [tensor("B", rng.normal(size=[4, channels]).astype(dtype))]
    nodes = [helper.make_node("MatMul", ["x", "B"], ["m"], name="matmul")]
    bn_in = "m"
    if bias_shape is not None:
        inits.append(tensor("bias", np.asarray(rng.normal(size=bias_shape)).astype(dtype)))
        operands = ["bias", "m"] if bias_first else ["m", "bias"]
        nodes.append(helper.make_node("Add", operands, ["a"], name="add"))
        bn_in = "a"
    nodes.append(bn_node(inits, bn_in, "y", rng, 4 if rank == 3 else channels, dtype, name="bn"))
    return make_model(nodes, [value_info("x", dtype, in_shape)], [value_info("y", dtype, out_shape)], inits)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bn_into_matmul_2d_folds(rng, dtype):
    result = assert_folds(matmul_bn_model(rng, dtype=dtype), rng, expect_left=0)
    assert result.report.folded[0].rule == "bn_into_matmul"
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add"]


@pytest.mark.parametrize("bias_shape", [[5], [1, 5], [], [3, 5], [3, 1]], ids=["n", "1n", "scalar", "mn", "m1"])
@pytest.mark.parametrize("bias_first", [False, True], ids=["mm_first", "bias_first"])
def test_bn_into_matmul_add_folds(rng, bias_shape, bias_first):
    model = matmul_bn_model(rng, bias_shape=bias_shape, bias_first=bias_first)
    result = assert_folds(model, rng, expect_left=0)
    assert result.report.folded[0].rule == "bn_into_matmul_add"
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add"]


def test_bn_into_matmul_rank3_kept(rng):
    """BN over axis 1 of [N, L, C] is per-L, not per-column of B: folding into B would be wrong."""
    model = matmul_bn_model(rng, rank=3)
    assert_kept(model, "MatMul product has rank 3")


def test_bn_into_matmul_rank3_naive_fold_is_wrong(rng):
    """Why the refusal matters: folding into B's columns would change the outputs."""
    model = matmul_bn_model(rng, rank=3)
    b = np.frombuffer(model.graph.initializer[0].raw_data, np.float32).reshape(4, 4)
    gamma, beta, mean, var = (np.frombuffer(t.raw_data, np.float32) for t in model.graph.initializer[1:5])
    scale = gamma / np.sqrt(var + 1e-5)
    x = rng.normal(size=(3, 4, 4)).astype(np.float32)
    correct = (x @ b) * scale[None, :, None] + (beta - mean * scale)[None, :, None]
    naive = x @ (b * scale[None, :]) + (beta - mean * scale)
    assert np.max(np.abs(correct - naive)) > 1e-2


def test_bn_into_matmul_rank_unknown_kept(rng):
    """The MatMul input comes from a Reshape to a runtime shape of unknown length."""
    model = matmul_bn_model(rng)
    model.graph.input.append(helper.make_tensor_value_info("shape", TensorProto.INT64, ["k"]))
    model.graph.node.insert(0, helper.make_node("Reshape", ["x", "shape"], ["x2"], name="reshape"))
    model.graph.node[1].input[0] = "x2"
    model.graph.output[0].type.tensor_type.ClearField("shape")
    model.graph.output[0].type.tensor_type.shape.SetInParent()
    assert_kept(model, "rank unknown")


def test_bn_into_matmul_rank_inferred_folds(rng):
    """No value_info for the product: the rank comes from ONNX shape inference."""
    model = matmul_bn_model(rng)
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    model.graph.output[0].type.tensor_type.ClearField("shape")
    result = bnfold.fold(model)
    assert result.report.bn_after == 0
    assert_same_outputs(model, result.model, rng)


def test_bn_into_matmul_add_product_is_graph_output_kept(rng):
    model = matmul_bn_model(rng, bias_shape=[5])
    model.graph.output.append(value_info("m", np.float32, [3, 5]))
    assert_kept(model, "MatMul 'matmul' output 'm' is a graph output")


def test_bn_into_matmul_add_product_fanout_kept(rng):
    model = matmul_bn_model(rng, bias_shape=[5])
    model.graph.node.insert(2, helper.make_node("Relu", ["m"], ["r"], name="relu"))
    model.graph.output.append(value_info("r", np.float32, [3, 5]))
    assert_kept(model, "fan-out: MatMul 'matmul' output also feeds Relu 'relu'")


def test_bn_into_matmul_add_residual_add_is_not_a_candidate(rng):
    """A BN after a residual Add (two activations) has no foldable producer: the reason says so."""
    inits = []
    nodes = [helper.make_node("Add", ["x", "x2"], ["a"], name="residual"), bn_node(inits, "a", "y", rng, 4, name="bn")]
    model = make_model(
        nodes,
        [value_info("x", np.float32, [3, 4]), value_info("x2", np.float32, [3, 4])],
        [value_info("y", np.float32, [3, 4])],
        inits,
    )
    assert_kept(model, "no foldable producer: input comes from Add 'residual'")
