"""The checks every rule shares (rules/base.py) and the graph edits (graph.py), through Conv -> BN."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import bnfold
from conftest import assert_folds, assert_kept, bn_node, count_bn, make_model, tensor, value_info

X = value_info("x", np.float32, [2, 3, 5, 5])


def conv_bn(rng, inits, x="x", out="y", name="", channels=4, cin=3):
    w = f"W{name}"
    inits.append(tensor(w, rng.normal(0, 0.5, [channels, cin, 3, 3]).astype(np.float32)))
    return [
        helper.make_node("Conv", [x, w], [f"c{name}"], name=f"conv{name}", pads=[1, 1, 1, 1]),
        bn_node(inits, f"c{name}", out, rng, channels, name=f"bn{name}"),
    ]


def single(rng, **kw):
    inits = []
    nodes = conv_bn(rng, inits)
    return make_model(nodes, [X], [value_info("y", np.float32, [2, 4, 5, 5])], inits, **kw)


def test_shared_conv_output_fanout_kept(rng):
    inits = []
    nodes = conv_bn(rng, inits) + [helper.make_node("Relu", ["c"], ["r"], name="relu")]
    model = make_model(nodes, [X], [value_info("y", np.float32, [2, 4, 5, 5]), value_info("r", np.float32, [2, 4, 5, 5])], inits)
    assert_kept(model, "fan-out: Conv 'conv' output also feeds Relu 'relu'")


def test_shared_conv_output_is_graph_output_kept(rng):
    model = single(rng)
    model.graph.output.append(value_info("c", np.float32, [2, 4, 5, 5]))
    assert_kept(model, "Conv 'conv' output 'c' is a graph output")


def test_shared_conv_output_read_by_subgraph_kept(rng):
    """A value an If branch reads from the outer scope is a use like any other."""
    inits = []
    nodes = conv_bn(rng, inits)
    branch = helper.make_graph([helper.make_node("Identity", ["c"], ["t"])], "then", [], [value_info("t", np.float32, [2, 4, 5, 5])])
    other = helper.make_graph([helper.make_node("Identity", ["y"], ["e"])], "else", [], [value_info("e", np.float32, [2, 4, 5, 5])])
    inits.append(tensor("cond", np.array(True)))
    nodes.append(helper.make_node("If", ["cond"], ["z"], name="if", then_branch=branch, else_branch=other))
    model = make_model(nodes, [X], [value_info("z", np.float32, [2, 4, 5, 5])], inits)
    assert_kept(model, "fan-out: Conv 'conv' output also feeds If 'if'")


def test_shared_bn_after_relu_kept(rng):
    inits = []
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node(inits, "r", "y", rng, 3, name="bn")]
    model = make_model(nodes, [X], [value_info("y", np.float32, [2, 3, 5, 5])], inits)
    assert_kept(model, "no foldable producer: input comes from Relu 'relu'")


def test_shared_bn_on_graph_input_kept(rng):
    inits = []
    model = make_model([bn_node(inits, "x", "y", rng, 3, name="bn")], [X], [value_info("y", np.float32, [2, 3, 5, 5])], inits)
    assert_kept(model, "no foldable producer: input comes from graph input 'x'")


def test_shared_bn_stats_graph_input_kept(rng):
    model = single(rng)
    var = next(t for t in model.graph.initializer if t.name == "bn_var")
    model.graph.initializer.remove(var)
    model.graph.input.append(value_info("bn_var", np.float32, [4]))
    assert_kept(model, "input_var is not a constant (it comes from graph input 'bn_var')")


def test_shared_initializer_listed_as_input_kept(rng):
    """IR < 4: an initializer that is also a graph input is only a default; it can be overridden."""
    model = single(rng)
    model.graph.input.append(value_info("bn_B", np.float32, [4]))
    assert_kept(model, "B is not a constant")


@pytest.mark.parametrize("value,reason", [(np.nan, "NaN or Inf"), (np.inf, "NaN or Inf"), (-1.0, "input_var + epsilon <= 0")])
def test_shared_bad_statistics_kept(rng, value, reason):
    model = single(rng)
    var = next(t for t in model.graph.initializer if t.name == "bn_var")
    var.CopyFrom(tensor("bn_var", np.array([1.0, value, 1.0, 1.0], np.float32)))
    assert_kept(model, reason)


def test_shared_extra_training_outputs_kept(rng):
    model = single(rng, opset=9)
    bn = model.graph.node[1]
    bn.output.extend(["mean_out", "var_out"])
    assert_kept(model, "training outputs ['mean_out', 'var_out']")


def test_shared_params_through_constant_and_identity_folds(rng):
    """TorchScript feeds de-duplicated tensors through Identity; others use Constant nodes."""
    model = single(rng)
    inits = {t.name: t for t in model.graph.initializer}
    model.graph.initializer.remove(inits["W"])
    model.graph.initializer.remove(inits["bn_scale"])
    model.graph.node.insert(0, helper.make_node("Constant", [], ["W_c"], value=inits["W"]))
    model.graph.node.insert(1, helper.make_node("Identity", ["W_c"], ["W"]))
    model.graph.node.insert(2, helper.make_node("Constant", [], ["bn_scale"], value=inits["bn_scale"]))
    result = assert_folds(model, rng, expect_left=0)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"], "orphaned Identity/Constant left behind"


def test_shared_bias_from_constant_subgraph_folds(rng):
    """The dynamo exporter (optimize=False) builds a Conv bias from Expand/CastLike of constants."""
    model = single(rng)
    nodes = [
        helper.make_node("Constant", [], ["zero"], value=tensor("zero", np.array(0.25, np.float64))),
        helper.make_node("CastLike", ["zero", "W"], ["zero32"]),
        helper.make_node("Constant", [], ["n"], value=tensor("n", np.array([4], np.int64))),
        helper.make_node("Expand", ["zero32", "n"], ["bias"]),
    ]
    for i, node in enumerate(nodes):
        model.graph.node.insert(i, node)
    model.graph.node[4].input.append("bias")
    result = assert_folds(model, rng, expect_left=0)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]


def test_shared_weight_from_runtime_shape_kept(rng):
    """A 'constant' computed from a dynamic dimension of a graph input is not a constant."""
    model = single(rng)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.node.insert(0, helper.make_node("Shape", ["x"], ["xs"]))
    model.graph.node.insert(1, helper.make_node("Cast", ["xs"], ["xsf"], to=TensorProto.FLOAT))
    model.graph.node.insert(2, helper.make_node("Slice", ["xsf", "one", "two"], ["bias"]))
    model.graph.initializer.extend([tensor("one", np.array([0], np.int64)), tensor("two", np.array([1], np.int64))])
    model.graph.node[3].input.append("bias")
    result = bnfold.fold(model)
    assert "bias B is not a constant (it comes from Slice" in result.report.kept[0].reason


def test_shared_chain_of_two_bn_folds(rng):
    inits = []
    nodes = conv_bn(rng, inits, out="y1") + [bn_node(inits, "y1", "y", rng, 4, name="bn2")]
    model = make_model(nodes, [X], [value_info("y", np.float32, [2, 4, 5, 5])], inits)
    result = assert_folds(model, rng, expect_left=0)
    assert [f.bn for f in result.report.folded] == ["bn", "bn2"]


def test_shared_mixed_types_bn15_fp16_data_fp32_stats_folds(rng):
    inits = [tensor("W", rng.normal(0, 0.5, [4, 3, 3, 3]).astype(np.float16))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node(inits, "c", "y", rng, 4, np.float32, name="bn"),
    ]
    model = make_model(nodes, [value_info("x", np.float16, [2, 3, 5, 5])], [value_info("y", np.float16, [2, 4, 5, 5])], inits, opset=15)
    result = assert_folds(model, rng, expect_left=0)
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.FLOAT16}


def test_shared_subgraph_bn_folds(rng):
    inits = []
    body_inits = []
    body_nodes = conv_bn(rng, body_inits, out="t")
    then_branch = helper.make_graph(body_nodes, "then", [], [value_info("t", np.float32, [2, 4, 5, 5])], body_inits)
    else_nodes = conv_bn(rng, inits, out="e", name="2")
    else_branch = helper.make_graph(else_nodes, "else", [], [value_info("e", np.float32, [2, 4, 5, 5])])
    inits.append(tensor("cond", np.array(True)))
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch)]
    model = make_model(nodes, [X], [value_info("y", np.float32, [2, 4, 5, 5])], inits)
    result = assert_folds(model, rng, expect_left=0)
    assert {f.graph for f in result.report.folded} == {"if/then_branch/", "if/else_branch/"}
    assert count_bn(result.model) == 0


def test_shared_stale_value_info_dropped(rng):
    model = single(rng)
    model.graph.value_info.append(value_info("c", np.float32, [2, 4, 5, 5]))
    result = assert_folds(model, rng, expect_left=0)
    assert [vi.name for vi in result.model.graph.value_info] == []


def test_shared_rules_option_disables_rule(rng):
    result = bnfold.fold(single(rng), rules=["bn_into_gemm"])
    assert "rule bn_into_conv is not enabled" in result.report.kept[0].reason


def test_shared_unknown_rule_is_usage_error(rng):
    with pytest.raises(bnfold.UsageError, match="unknown rule"):
        bnfold.fold(single(rng), rules=["bn_into_nothing"])


def test_shared_names_stay_unique_across_subgraphs(rng):
    model = single(rng)
    result = bnfold.fold(model)
    names = [t.name for t in result.model.graph.initializer]
    assert len(names) == len(set(names))
    onnx.checker.check_model(result.model, full_check=True)


def test_shared_dynamo_affine_false_params_from_conv_metadata_folds(rng):
    """Regression: the dynamo exporter (optimize=False) builds the scale/B of BatchNorm(affine=False)
    as Expand(CastLike(1.0, conv_out), Shape(conv_out, start=1, end=2)). Those read only the Conv
    output's dtype and static shape: constants, and not a fan-out of the Conv."""
    model = single(rng)
    for param, fill in (("bn_scale", 1.0), ("bn_B", 0.0)):
        model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == param))
        model.graph.node.insert(1, helper.make_node("Expand", [f"{param}_v", f"{param}_n"], [param]))
        model.graph.node.insert(1, helper.make_node("Shape", ["c"], [f"{param}_n"], start=1, end=2))
        model.graph.node.insert(1, helper.make_node("CastLike", [f"{param}_c", "c"], [f"{param}_v"]))
        model.graph.node.insert(1, helper.make_node("Constant", [], [f"{param}_c"], value=tensor("v", np.array(fill, np.float64))))
    model.graph.value_info.append(value_info("c", np.float32, [2, 4, 5, 5]))
    onnx.checker.check_model(model)
    result = assert_folds(model, rng, expect_left=0)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]


def test_shared_metadata_reader_kept_alive_is_rewired(rng):
    """A Shape of the Conv output that feeds something else survives the fold, reading the new name."""
    model = single(rng)
    model.graph.node.append(helper.make_node("Shape", ["c"], ["shape_c"], name="shape"))
    model.graph.output.append(helper.make_tensor_value_info("shape_c", TensorProto.INT64, [4]))
    result = assert_folds(model, rng, expect_left=0)
    shape = next(n for n in result.model.graph.node if n.name == "shape")
    assert list(shape.input) == ["y"]
