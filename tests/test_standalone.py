"""--standalone affine: a BN with no foldable neighbour becomes Mul + Add (bnfold.standalone)."""

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfold
from conftest import assert_same_outputs, bn_node, count_bn, make_model, run_reference, tensor, value_info
from test_cli import invoke


def lonely_bn_model(rng, *, rank=4, channels=3, dtype=np.float32, stats_dtype=None, opset=17, shape=True, **bn_attrs):
    """x -> Relu -> BN -> Sigmoid: no neighbour a rule folds into."""
    inits = []
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        bn_node(inits, "r", "b", rng, channels, stats_dtype or dtype, name="bn", **bn_attrs),
        helper.make_node("Sigmoid", ["b"], ["y"], name="sigmoid"),
    ]
    dims = [2, channels, *[3 + i for i in range(rank - 2)]]
    x = value_info("x", dtype, dims)
    model = make_model(nodes, [x], [helper.make_tensor_value_info("y", x.type.tensor_type.elem_type, dims)], inits, opset=opset)
    if not shape:
        model.graph.input[0].type.tensor_type.ClearField("shape")
    return model


def fold_affine(model, rng, engine=None, **kwargs):
    """Fold with standalone="affine": valid, no BN left, the BN reported as standalone_affine,
    outputs equal to the original's."""
    result = bnfold.fold(model, standalone="affine", **kwargs)
    onnx.checker.check_model(result.model, full_check=True)
    assert count_bn(result.model) == 0 and result.report.kept == ()
    assert (result.report.bn_before, result.report.bn_after) == (1, 0)
    assert_same_outputs(model, result.model, rng, **({"engine": engine} if engine else {}))
    return result


def constants(model) -> dict:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_standalone_affine_ranks_becomes_mul_add(rng, rank):
    model = lonely_bn_model(rng, rank=rank)
    result = fold_affine(model, rng)
    (record,) = result.report.folded
    assert (record.bn, record.rule) == ("bn", "standalone_affine")
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Mul", "Add", "Sigmoid"]
    mul, add = result.model.graph.node[1:3]
    values = constants(result.model)
    assert values[mul.input[1]].shape == values[add.input[1]].shape == (3,) + (1,) * (rank - 2)
    assert list(add.output) == ["b"] and mul.input[0] == "r"


def test_standalone_keep_default_leaves_bn(rng):
    model = lonely_bn_model(rng)
    result = bnfold.fold(model)
    assert "no foldable producer" in result.report.kept[0].reason
    assert result.model.SerializeToString() == model.SerializeToString()


def test_standalone_affine_float16_data_float32_stats_becomes_mul_add(rng):
    """BatchNormalization-15: float16 X, float32 statistics. Mul/Add need the data's dtype."""
    model = lonely_bn_model(rng, dtype=np.float16, stats_dtype=np.float32, opset=15)
    result = fold_affine(model, rng)
    assert {t.data_type for t in result.model.graph.initializer} == {onnx.TensorProto.FLOAT16}


def test_standalone_affine_float64_becomes_mul_add(rng):
    result = fold_affine(lonely_bn_model(rng, dtype=np.float64), rng)
    assert {t.data_type for t in result.model.graph.initializer} == {onnx.TensorProto.DOUBLE}


def test_standalone_affine_empty_optional_outputs_becomes_mul_add(rng):
    """Trailing empty (absent) training outputs; onnxruntime refuses such a BN: reference evaluator."""
    model = lonely_bn_model(rng, opset=15)
    model.graph.node[1].output.extend(["", ""])
    onnx.checker.check_model(model)
    result = fold_affine(model, rng, engine=run_reference)
    assert list(result.model.graph.node[1].output) != ["", ""] and len(result.model.graph.node[1].output) == 1


def test_standalone_affine_foldable_bn_still_folded_by_rule(rng):
    inits = [tensor("W", rng.normal(size=[3, 2, 1, 1]).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node(inits, "c", "y", rng, 3, name="bn")]
    model = make_model(nodes, [value_info("x", np.float32, [2, 2, 4, 4])], [value_info("y", np.float32, [2, 3, 4, 4])], inits)
    result = fold_affine(model, rng)
    assert result.report.folded[0].rule == "bn_into_conv"
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]


def test_standalone_affine_training_mode_kept(rng):
    model = lonely_bn_model(rng, opset=15, training_mode=1)
    result = bnfold.fold(model, standalone="affine")
    assert "training_mode=1" in result.report.kept[0].reason and result.report.folded == ()
    assert result.model.SerializeToString() == model.SerializeToString()


def test_standalone_affine_rank_unknown_kept(rng):
    model = lonely_bn_model(rng, shape=False)
    result = bnfold.fold(model, standalone="affine")
    (kept,) = result.report.kept
    assert kept.reason.startswith("no foldable producer")
    assert "; standalone: the rank or dtype of 'r' is unknown: cannot lay the constants along axis 1" in kept.reason
    assert result.model.SerializeToString() == model.SerializeToString()


def test_standalone_affine_opset6_kept(rng):
    model = lonely_bn_model(rng, opset=6, is_test=1)
    result = bnfold.fold(model, standalone="affine")
    assert "standalone: Mul/Add with broadcasting need opset >= 7 (model has 6)" in result.report.kept[0].reason
    assert not result.modified


def test_standalone_affine_rolled_back_kept(rng):
    """A conversion that verification rolled back stays a BN (bnfold.rollback's skip map)."""
    model = lonely_bn_model(rng)
    result = bnfold.api.fold_model(model, standalone="affine", skip={("", "bn"): "verification failed (rolled back)"})
    assert result.report.kept[0].reason == "verification failed (rolled back)" and count_bn(result.model) == 1


def test_standalone_affine_in_subgraph_becomes_mul_add(rng):
    then_inits = []
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), bn_node(then_inits, "r", "t", rng, 3, name="bn")],
        "then", [], [value_info("t", np.float32, [2, 3, 4])], then_inits,
    )
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [value_info("e", np.float32, [2, 3, 4])])
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph)
    inputs = [value_info("x", np.float32, [2, 3, 4]), helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])]
    model = make_model([node], inputs, [value_info("y", np.float32, [2, 3, 4])])
    result = bnfold.fold(model, standalone="affine")
    onnx.checker.check_model(result.model, full_check=True)
    assert [(f.rule, f.graph) for f in result.report.folded] == [("standalone_affine", "if/then_branch/")]
    feeds = {"x": rng.normal(size=[2, 3, 4]).astype(np.float32), "cond": np.array(True)}
    expected, actual = run_reference(model, feeds)[0], run_reference(result.model, feeds)[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_standalone_bad_mode_usage_error(rng):
    with pytest.raises(bnfold.UsageError, match="standalone must be one of keep, affine, got 'mul'"):
        bnfold.fold(lonely_bn_model(rng), standalone="mul")


def test_standalone_cli_affine_writes_mul_add(rng, tmp_path):
    path = tmp_path / "net.onnx"
    model = lonely_bn_model(rng)
    onnx.save(model, path)
    result = invoke([path, "--standalone", "affine"], 0)
    assert "BatchNormalization: 1 -> 0 (standalone_affine 1)" in result.stderr and "verification passed" in result.stderr
    folded = onnx.load(tmp_path / "net.folded.onnx")
    assert count_bn(folded) == 0
    assert_same_outputs(model, folded, rng)


def test_standalone_cli_default_keeps_and_bad_value_exit_2(rng, tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(lonely_bn_model(rng), path)
    assert "kept bn: no foldable producer" in invoke([path], 0).stderr
    assert "Invalid value for '--standalone'" in invoke([path, "--standalone", "mul"], 2).stderr


def test_regression_bn_into_matmul_empty_optional_outputs_dropped(rng):
    """bn_into_matmul turned a BN with outputs [y, '', ''] into an Add with 3 outputs (invalid)."""
    inits = [tensor("W", rng.normal(size=[4, 6]).astype(np.float32))]
    bn = bn_node(inits, "c", "y", rng, 6, name="bn")
    bn.output.extend(["", ""])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["c"], name="mm"), bn]
    model = make_model(nodes, [value_info("x", np.float32, [2, 4])], [value_info("y", np.float32, [2, 6])], inits, opset=14)
    result = bnfold.fold(model)
    onnx.checker.check_model(result.model, full_check=True)
    assert [f.rule for f in result.report.folded] == ["bn_into_matmul"]
    assert [list(n.output) for n in result.model.graph.node if n.op_type == "Add"] == [["y"]]


def test_standalone_affine_bfloat16_data_float32_stats_becomes_mul_add(rng):
    """BatchNormalization-15 with bfloat16 X (onnxruntime has no bfloat16 BN on CPU: reference)."""
    import ml_dtypes

    model = lonely_bn_model(rng, dtype=np.float32, stats_dtype=np.float32, opset=15)
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.elem_type = onnx.TensorProto.BFLOAT16
    result = bnfold.fold(model, standalone="affine")
    onnx.checker.check_model(result.model, full_check=True)
    assert [f.rule for f in result.report.folded] == ["standalone_affine"]
    assert {t.data_type for t in result.model.graph.initializer} == {onnx.TensorProto.BFLOAT16}
    feeds = {"x": rng.normal(size=[2, 3, 3, 4]).astype(ml_dtypes.bfloat16)}
    expected, actual = (run_reference(m, feeds)[0].astype(np.float64) for m in (model, result.model))
    assert np.max(np.abs(expected - actual)) <= 2e-2 * np.max(np.abs(expected))
