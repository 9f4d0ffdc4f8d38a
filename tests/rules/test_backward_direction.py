"""Forward first, then backward: the direction per BN, the two-sided reasons, whole blocks."""

import numpy as np
import pytest
from onnx import helper

import bnfold
from conftest import assert_folds, assert_kept, bn_node, make_model, tensor, value_info


def conv(rng, inits, x, y, name, cin, cout, pads, kernel=3):
    inits.append(tensor(f"W_{name}", rng.normal(0, 0.3, [cout, cin, kernel, kernel]).astype(np.float32)))
    return helper.make_node("Conv", [x, f"W_{name}"], [y], name=name, pads=[pads] * 4)


def conv_bn_conv(rng, pads=0):
    inits = []
    nodes = [
        conv(rng, inits, "x", "c0", "conv0", 3, 4, 1),
        bn_node(inits, "c0", "c0_bn", rng, 4, name="bn"),
        conv(rng, inits, "c0_bn", "y", "conv1", 4, 5, pads),
    ]
    out = value_info("y", np.float32, [2, 5, 4 + 2 * pads, 4 + 2 * pads])
    return make_model(nodes, [value_info("x", np.float32, [2, 3, 6, 6])], [out], inits)


def test_backward_forward_preferred_folds(rng):
    """Conv -> BN -> Conv with zero pads: both directions work; the producer takes the BN."""
    result = assert_folds(conv_bn_conv(rng), rng, expect_left=0)
    assert [(f.rule, f.into) for f in result.report.folded] == [("bn_into_conv", "conv0")]


def test_backward_only_backward_enabled_folds(rng):
    result = assert_folds(conv_bn_conv(rng), rng, expect_left=0, rules=["bn_into_next_conv"])
    assert [(f.rule, f.into) for f in result.report.folded] == [("bn_into_next_conv", "conv1")]


def test_backward_rule_disabled_kept(rng):
    model = conv_bn_conv(rng)
    model.graph.output.append(value_info("c0", np.float32, [2, 4, 6, 6]))
    result = assert_kept(model, "; next: rule bn_into_next_conv is not enabled", rules=["bn_into_conv"])
    assert result.report.kept[0].reason.startswith("Conv 'conv0' output 'c0' is a graph output")


def test_backward_both_refused_names_both_kept(rng):
    inits = []
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="r"),
        bn_node(inits, "r", "r_bn", rng, 3, name="bn"),
        conv(rng, inits, "r_bn", "y", "c", 3, 4, 1),
    ]
    model = make_model(nodes, [value_info("x", np.float32, [2, 3, 5, 5])], [value_info("y", np.float32, [2, 4, 5, 5])], inits)
    result = assert_kept(model, "")
    assert result.report.kept[0].reason == (
        "no foldable producer: input comes from Relu 'r'; next: Conv 'c' pads the input with zeros: a shifted input is not a shifted output"
    )


def test_backward_neither_side_linear_names_both_kept(rng):
    inits = []
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="r"),
        bn_node(inits, "r", "r_bn", rng, 3, name="bn"),
        helper.make_node("Sigmoid", ["r_bn"], ["y"], name="s"),
    ]
    model = make_model(nodes, [value_info("x", np.float32, [2, 3])], [value_info("y", np.float32, [2, 3])], inits)
    result = assert_kept(model, "")
    assert result.report.kept[0].reason == (
        "no foldable producer: input comes from Relu 'r'; next: output feeds Sigmoid 's', not a Conv, Gemm or MatMul"
    )


def test_backward_only_forward_candidate_keeps_forward_reason_kept(rng):
    """Conv (fan-out) -> BN -> Relu: the Relu says nothing useful, so only the Conv's cause is given."""
    inits = []
    nodes = [
        conv(rng, inits, "x", "c0", "conv0", 3, 4, 1),
        bn_node(inits, "c0", "c0_bn", rng, 4, name="bn"),
        helper.make_node("Relu", ["c0_bn"], ["y"], name="relu"),
    ]
    outputs = [value_info("y", np.float32, [2, 4, 6, 6]), value_info("c0", np.float32, [2, 4, 6, 6])]
    model = make_model(nodes, [value_info("x", np.float32, [2, 3, 6, 6])], outputs, inits)
    assert assert_kept(model, "").report.kept[0].reason == "Conv 'conv0' output 'c0' is a graph output"


def preact_block(rng, inits, x, name, channels=4):
    """Pre-activation residual block: x -> BN -> Relu -> Conv -> BN -> Relu -> Conv, + x."""
    p = name
    return [
        bn_node(inits, x, f"{p}_bn1", rng, channels, name=f"{p}_bn1"),
        helper.make_node("Relu", [f"{p}_bn1"], [f"{p}_r1"], name=f"{p}_relu1"),
        conv(rng, inits, f"{p}_r1", f"{p}_c1", f"{p}_conv1", channels, channels, 1),
        bn_node(inits, f"{p}_c1", f"{p}_bn2", rng, channels, name=f"{p}_bn2"),
        helper.make_node("Relu", [f"{p}_bn2"], [f"{p}_r2"], name=f"{p}_relu2"),
        conv(rng, inits, f"{p}_r2", f"{p}_c2", f"{p}_conv2", channels, channels, 1),
        helper.make_node("Add", [f"{p}_c2", x], [f"{p}_out"], name=f"{p}_add"),
    ]


def test_backward_preactivation_resnet_block_folds(rng):
    inits = []
    nodes = preact_block(rng, inits, "x", "b0") + preact_block(rng, inits, "b0_out", "b1")
    model = make_model(nodes, [value_info("x", np.float32, [2, 4, 6, 6])], [value_info("b1_out", np.float32, [2, 4, 6, 6])], inits)
    result = assert_folds(model, rng, expect_left=2)
    assert [(f.bn, f.rule) for f in result.report.folded] == [("b0_bn2", "bn_into_conv"), ("b1_bn2", "bn_into_conv")]
    reasons = {k.bn: k.reason for k in result.report.kept}
    assert reasons["b0_bn1"] == (
        "no foldable producer: input comes from graph input 'x'; next: output feeds Relu 'b0_relu1', not a Conv, Gemm or MatMul"
    )
    assert set(reasons) == {"b0_bn1", "b1_bn1"}


def test_backward_preactivation_bn_conv_1x1_shortcut_folds(rng):
    """DenseNet-style BN -> Conv 1x1 (no padding) after a residual Add: folds backward."""
    inits = []
    nodes = preact_block(rng, inits, "x", "b0") + [
        bn_node(inits, "b0_out", "t_bn", rng, 4, name="t_bn"),
        conv(rng, inits, "t_bn", "y", "transition", 4, 2, 0, kernel=1),
    ]
    model = make_model(nodes, [value_info("x", np.float32, [2, 4, 6, 6])], [value_info("y", np.float32, [2, 2, 6, 6])], inits)
    result = assert_folds(model, rng, expect_left=1)
    assert ("t_bn", "bn_into_next_conv") in [(f.bn, f.rule) for f in result.report.folded]


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_backward_classifier_head_folds_to_zero_bn(rng, flatten):
    """Conv -> Relu -> BN2d -> Dropout -> Flatten -> Gemm -> BN1d (face-recognition head)."""
    inits = [tensor("B", rng.normal(0, 0.2, [4 * 3 * 3, 5]).astype(np.float32)), tensor("C", rng.normal(size=5).astype(np.float32))]
    inits.append(tensor("shape", np.array([0, -1], np.int64)))
    nodes = [
        conv(rng, inits, "x", "c", "conv", 3, 4, 0),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        bn_node(inits, "r", "r_bn", rng, 4, name="bn2d"),
        helper.make_node("Dropout", ["r_bn"], ["d"], name="dropout"),
        helper.make_node(flatten, ["d", "shape"] if flatten == "Reshape" else ["d"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "B", "C"], ["g"], name="fc"),
        bn_node(inits, "g", "y", rng, 5, name="bn1d"),
    ]
    model = make_model(nodes, [value_info("x", np.float32, ["n", 3, 5, 5])], [value_info("y", np.float32, ["n", 5])], inits)
    result = assert_folds(model, rng, expect_left=0, dims={"n": 3})
    assert sorted((f.bn, f.rule, f.into) for f in result.report.folded) == [
        ("bn1d", "bn_into_gemm", "fc"),
        ("bn2d", "bn_through_flatten_into_gemm", "fc"),
    ]
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu", flatten, "Gemm"]
    assert result.report.noops_removed == {"Dropout": 1}  # inference Dropout computes nothing


def test_backward_two_bn_in_a_row_fold(rng):
    """BN -> BN -> Conv: the second folds backward first, then the first reaches the Conv too."""
    inits = []
    nodes = [
        bn_node(inits, "x", "a", rng, 3, name="bn_a"),
        bn_node(inits, "a", "b", rng, 3, name="bn_b"),
        conv(rng, inits, "b", "y", "c", 3, 4, 0),
    ]
    model = make_model(nodes, [value_info("x", np.float32, [2, 3, 5, 5])], [value_info("y", np.float32, [2, 4, 3, 3])], inits)
    result = assert_folds(model, rng, expect_left=0)
    assert [f.bn for f in result.report.folded] == ["bn_b", "bn_a"]
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]


def test_backward_check_reports_rule_counts(rng):
    report = bnfold.check(conv_bn_conv(rng))
    assert report.rule_counts() == {"bn_into_conv": 1}


def test_backward_in_subgraph_folds(rng):
    """BN -> MatMul inside an If branch: the new bias Add lands in the branch, writing its output."""
    body_inits = [tensor("B", rng.normal(size=[3, 5]).astype(np.float32))]
    body = [bn_node(body_inits, "x", "x_bn", rng, 3, name="bn"), helper.make_node("MatMul", ["x_bn", "B"], ["t"], name="matmul")]
    then_branch = helper.make_graph(body, "then", [], [value_info("t", np.float32, [2, 5])], body_inits)
    else_branch = helper.make_graph([helper.make_node("MatMul", ["x", "B2"], ["e"])], "else", [], [value_info("e", np.float32, [2, 5])])
    inits = [tensor("cond", np.array(True)), tensor("B2", rng.normal(size=[3, 5]).astype(np.float32))]
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch)]
    model = make_model(nodes, [value_info("x", np.float32, [2, 3])], [value_info("y", np.float32, [2, 5])], inits)
    result = assert_folds(model, rng, expect_left=0)
    assert [(f.graph, f.rule) for f in result.report.folded] == [("if/then_branch/", "bn_into_next_matmul")]
    branch = next(a.g for a in result.model.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == ["MatMul", "Add"] and branch.node[1].output[0] == "t"
