"""bn_into_next_matmul: BN [N, C] -> MatMul(B [C, K]); the bias goes into a following Add or a new one."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import assert_folds, assert_kept, bn_node, make_model, tensor, value_info


def bn_matmul_model(rng, *, bias_shape=None, bias_first=False, dtype=np.float32, rank=2):
    """x [3, 4] -> BN(4) -> MatMul(B [4, 5]) (-> Add(bias)) -> y; rank 3: x [3, 4, 6], B [6, 5]."""
    inits = [tensor("B", rng.normal(size=[4 if rank == 2 else 6, 5]).astype(dtype))]
    nodes = [bn_node(inits, "x", "x_bn", rng, 4, dtype, name="bn"), helper.make_node("MatMul", ["x_bn", "B"], ["m"], name="matmul")]
    out = "m"
    if bias_shape is not None:
        inits.append(tensor("bias", np.asarray(rng.normal(size=bias_shape)).astype(dtype)))
        nodes.append(helper.make_node("Add", ["bias", "m"] if bias_first else ["m", "bias"], ["y"], name="add"))
        out = "y"
    x_shape, y_shape = ([3, 4], [3, 5]) if rank == 2 else ([3, 4, 6], [3, 4, 5])
    return make_model(nodes, [value_info("x", dtype, x_shape)], [value_info(out, dtype, y_shape)], inits)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bn_into_next_matmul_new_add_folds(rng, dtype):
    """The product 'm' is a graph output: the new Add writes that name, the MatMul a fresh one."""
    result = assert_folds(bn_matmul_model(rng, dtype=dtype), rng, expect_left=0)
    assert result.report.folded[0].rule == "bn_into_next_matmul"
    matmul, add = result.model.graph.node
    assert (matmul.op_type, add.op_type) == ("MatMul", "Add")
    assert list(matmul.input)[0] == "x" and add.input[0] == matmul.output[0] and list(add.output) == ["m"]


@pytest.mark.parametrize("bias_shape", [[5], [1, 5], [], [3, 5], [3, 1]], ids=["n", "1n", "scalar", "mn", "m1"])
@pytest.mark.parametrize("bias_first", [False, True], ids=["mm_first", "bias_first"])
def test_bn_into_next_matmul_bias_absorbed_folds(rng, bias_shape, bias_first):
    result = assert_folds(bn_matmul_model(rng, bias_shape=bias_shape, bias_first=bias_first), rng, expect_left=0)
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add"]
    assert [n.name for n in result.model.graph.node] == ["matmul", "add"]


def test_bn_into_next_matmul_add_of_runtime_value_gets_new_add_folds(rng):
    """MatMul -> Add(residual from the graph input): the bias cannot go there; a new Add does."""
    model = bn_matmul_model(rng)
    model.graph.input.append(value_info("res", np.float32, [3, 5]))
    model.graph.node.append(helper.make_node("Add", ["m", "res"], ["y"], name="add"))
    model.graph.output[0].CopyFrom(value_info("y", np.float32, [3, 5]))
    result = assert_folds(model, rng, expect_left=0)
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add", "Add"]


def test_bn_into_next_matmul_then_bn_folds_to_one_add(rng):
    """BN -> MatMul -> BN (a Linear between two BN1d): both fold, one bias Add is left."""
    inits = [tensor("B", rng.normal(size=[4, 5]).astype(np.float32))]
    nodes = [
        bn_node(inits, "x", "x_bn", rng, 4, name="bn"),
        helper.make_node("MatMul", ["x_bn", "B"], ["m"], name="matmul"),
        bn_node(inits, "m", "y", rng, 5, name="bn2"),
    ]
    model = make_model(nodes, [value_info("x", np.float32, [3, 4])], [value_info("y", np.float32, [3, 5])], inits)
    result = assert_folds(model, rng, expect_left=0)
    assert [(f.bn, f.rule) for f in result.report.folded] == [("bn", "bn_into_next_matmul"), ("bn2", "bn_into_matmul_add")]
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add"]


def test_bn_into_next_matmul_rank3_kept(rng):
    """BN over axis 1 of [N, L, C] is per-L, not per-row of B: folding into B would be wrong."""
    assert_kept(bn_matmul_model(rng, rank=3), "next: MatMul input has rank 3: BN normalises axis 1, not the contracted last axis")


def test_bn_into_next_matmul_rank_unknown_kept(rng):
    model = bn_matmul_model(rng)
    model.graph.input[0].type.tensor_type.ClearField("shape")
    model.graph.output[0].type.tensor_type.ClearField("shape")
    assert_kept(model, "cannot prove the MatMul input is 2-D [N, C] (rank unknown)")


def test_bn_into_next_matmul_weight_not_constant_kept(rng):
    model = bn_matmul_model(rng)
    del model.graph.initializer[0]
    model.graph.input.append(value_info("B", np.float32, [4, 5]))
    assert_kept(model, "next: MatMul 'matmul' weight (second input) is not a constant")


def test_bn_into_next_matmul_bn_output_read_as_weight_kept(rng):
    inits = [tensor("A", rng.normal(size=[5, 3]).astype(np.float32))]
    nodes = [bn_node(inits, "x", "x_bn", rng, 4, name="bn"), helper.make_node("MatMul", ["A", "x_bn"], ["y"], name="matmul")]
    model = make_model(nodes, [value_info("x", np.float32, [3, 4])], [value_info("y", np.float32, [5, 4])], inits)
    assert_kept(model, "MatMul 'matmul' reads 'x_bn' other than as its data input 0")


def test_bn_into_next_matmul_metadata_reader_rewired_folds(rng):
    """A Shape of BN's output survives the fold, reading BN's input (same shape)."""
    model = bn_matmul_model(rng, bias_shape=[5])
    model.graph.node.append(helper.make_node("Shape", ["x_bn"], ["s"], name="shape"))
    model.graph.output.append(helper.make_tensor_value_info("s", TensorProto.INT64, [2]))
    result = assert_folds(model, rng, expect_left=0)
    assert list(next(n for n in result.model.graph.node if n.name == "shape").input) == ["x"]
