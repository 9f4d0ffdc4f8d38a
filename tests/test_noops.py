"""No-op nodes as exporters write them (bnfold.noops): removed before the rules, so that a BN
behind them folds; kept where removing them would change the graph's interface, and left in
place when nothing folds."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import bnfold
from conftest import assert_folds, assert_same_outputs, bn_node, count_bn, make_model, tensor, value_info
from test_cli import invoke

C = 4


def path_model(rng, steps, producer="Conv", opset=17, output_identity=False):
    """x [2, 3, 5, 5] -> producer -> steps -> BN -> Relu -> y; each step (op, extra inputs as
    {name: array}, attrs) reads the previous value."""
    inits, nodes = [], []
    if producer == "Conv":
        inits.append(tensor("W", rng.normal(0, 0.5, [C, 3, 3, 3]).astype(np.float32)))
        nodes.append(helper.make_node("Conv", ["x", "W"], ["p"], name="conv", pads=[1, 1, 1, 1]))
    else:
        inits.append(tensor("W", rng.normal(0, 0.5, [C, 3, 3, 3]).astype(np.float32)))
        nodes.append(helper.make_node("ConvTranspose", ["x", "W"], ["p"], name="deconv", pads=[1, 1, 1, 1]))
        inits[0] = tensor("W", rng.normal(0, 0.5, [3, C, 3, 3]).astype(np.float32))
    value = "p"
    for i, (op, extra, attrs) in enumerate(steps):
        for name, array in extra.items():
            inits.append(tensor(f"{name}{i}", array))
        inputs = [value, *(f"{name}{i}" for name in extra)]
        nodes.append(helper.make_node(op, inputs, [f"s{i}"], name=f"{op.lower()}{i}", **attrs))
        value = f"s{i}"
    nodes.append(bn_node(inits, value, "b", rng, C, name="bn"))
    nodes.append(helper.make_node("Relu", ["b"], ["r" if output_identity else "y"], name="relu"))
    if output_identity:
        nodes.append(helper.make_node("Identity", ["r"], ["y"], name="out_identity"))
    x = value_info("x", np.float32, [2, 3, 5, 5])
    return make_model(nodes, [x], [value_info("y", np.float32, [2, C, 5, 5])], inits, opset=opset)


BIAS = {"bias": np.linspace(-1, 1, C, dtype=np.float32).reshape(1, C, 1, 1)}
NOOPS = {
    "identity": [("Identity", {}, {})],
    "dropout": [("Dropout", {}, {})],
    "dropout_training_false": [("Dropout", {"ratio": np.array(0.5, np.float32), "train": np.array(False)}, {})],
    "cast_same": [("Cast", {}, {"to": TensorProto.FLOAT})],
    "reshape_same": [("Reshape", {"shape": np.array([2, C, 5, 5], np.int64)}, {})],
    "expand_same": [("Expand", {"shape": np.array([1, 1, 1, 1], np.int64)}, {})],
    "add_zero": [("Add", {"zero": np.zeros([1, C, 1, 1], np.float32)}, {})],
    "mul_one": [("Mul", {"one": np.ones([C, 1, 1], np.float32)}, {})],
    "identity_bias_identity": [("Identity", {}, {}), ("Add", BIAS, {}), ("Identity", {}, {})],
    "everything": [
        ("Identity", {}, {}), ("Cast", {}, {"to": TensorProto.FLOAT}), ("Dropout", {}, {}),
        ("Mul", {"one": np.ones([1], np.float32)}, {}), ("Identity", {}, {}),
    ],
}


@pytest.mark.parametrize("producer", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("case", NOOPS, ids=list(NOOPS))
def test_noops_between_layer_and_bn_removed_bn_folds(rng, case, producer):
    model = path_model(rng, NOOPS[case], producer=producer)
    result = assert_folds(model, rng, expect_left=0)
    removed = sum(result.report.noops_removed.values())
    assert removed == sum(op != "Add" or "zero" in extra for op, extra, _ in NOOPS[case])
    assert not {"Identity", "Dropout", "Cast", "Expand"} & {n.op_type for n in result.model.graph.node}


def test_noops_bias_add_behind_identity_deconv_folds(rng):
    """ConvTranspose -> Identity -> Add(bias [1,C,1,1]) -> Identity -> BN -> Relu: the exporter
    habit that kept every BN of a detector's neck."""
    model = path_model(rng, NOOPS["identity_bias_identity"], producer="ConvTranspose")
    result = assert_folds(model, rng, expect_left=0)
    assert result.report.noops_removed == {"Identity": 2}


@pytest.mark.parametrize("case, step", [
    ("cast_other_type", [("Cast", {}, {"to": TensorProto.DOUBLE}), ("Cast", {}, {"to": TensorProto.FLOAT})]),
    ("reshape_other_shape", [("Reshape", {"shape": np.array([2, C, 25, 1], np.int64)}, {})]),
    ("add_nonzero", [("Add", {"c": np.full([1, C, 1, 1], 0.5, np.float32)}, {})]),
    ("dropout_training", [("Dropout", {"ratio": np.array(0.5, np.float32), "train": np.array(True)}, {})]),
])
def test_noops_not_a_noop_stays(rng, case, step):
    """Nodes that compute something are not taken for no-ops (whatever the rules then do)."""
    model = path_model(rng, step)
    result = bnfold.fold(model)
    assert result.report.noops_removed == {}
    if case == "dropout_training":  # random at run time: compared by structure, not values
        assert "Dropout" in [n.op_type for n in result.model.graph.node] and count_bn(result.model) == 1
    else:
        assert_same_outputs(model, result.model, rng)


def test_noops_add_zero_that_broadcasts_larger_stays(rng):
    """x [1, C, 1, 1] + zeros [1, C, 5, 5] is a different shape, not x."""
    inits = [tensor("W", rng.normal(0, 0.5, [C, 3, 1, 1]).astype(np.float32)), tensor("zero", np.zeros([1, C, 5, 5], np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["p"], name="conv"),
        helper.make_node("Add", ["p", "zero"], ["s"], name="add"),
        bn_node(inits, "s", "y", rng, C, name="bn"),
    ]
    model = make_model(nodes, [value_info("x", np.float32, [1, 3, 1, 1])], [value_info("y", np.float32, [1, C, 5, 5])], inits)
    result = bnfold.fold(model)
    assert result.report.noops_removed == {} and "Add" in [n.op_type for n in result.model.graph.node]
    assert_same_outputs(model, result.model, rng)


def test_noops_graph_output_identity_kept_name_and_order_unchanged(rng):
    model = path_model(rng, NOOPS["identity"], output_identity=True)
    result = assert_folds(model, rng, expect_left=0)
    assert result.report.noops_removed == {"Identity": 1}  # the one before the BN; the output's stays
    assert result.model.graph.node[-1].op_type == "Identity" and result.model.graph.node[-1].output[0] == "y"


def test_noops_nothing_folds_model_unchanged(rng):
    """A BN that no rule can fold (its producer's output also feeds the graph output): the
    Identity in front of it is not removed for nothing; the reason is the one past it."""
    model = path_model(rng, NOOPS["identity"])
    model.graph.output.append(value_info("p", np.float32, [2, C, 5, 5]))
    result = bnfold.fold(model)
    assert count_bn(result.model) == 1 and not result.modified and result.report.noops_removed == {}
    assert result.model.SerializeToString() == model.SerializeToString()
    assert "graph output" in result.report.kept[0].reason


def test_noops_keep_noops_flag_keeps_them_and_the_bn(rng, tmp_path):
    onnx.save(path_model(rng, NOOPS["cast_same"]), tmp_path / "m.onnx")  # no rule crosses a Cast itself
    kept = invoke([tmp_path / "m.onnx", "--keep-noops", "--json"], 0)
    assert json.loads(kept.stdout)["bn_after"] == 1 and "input comes from Cast" in kept.stderr
    folded = invoke([tmp_path / "m.onnx", "--json"], 0)
    report = json.loads(folded.stdout)
    assert report["bn_after"] == 0 and report["noops_removed"] == {"Cast": 1}
    assert "no-op nodes removed: 1 (Cast 1)" in folded.stderr
    assert "verification passed" in folded.stderr


def test_noops_inside_subgraph_removed(rng):
    """An If whose then-branch is Conv -> Identity -> BN: folded inside the subgraph too."""
    branch_model = path_model(rng, NOOPS["identity"])
    branch = branch_model.graph
    then_graph = helper.make_graph(list(branch.node), "then", [], [value_info("y", np.float32, [2, C, 5, 5])], list(branch.initializer))
    else_graph = helper.make_graph([helper.make_node("Identity", ["z"], ["y2"])], "else", [], [value_info("y2", np.float32, [2, C, 5, 5])])
    nodes = [helper.make_node("If", ["cond"], ["out"], name="if", then_branch=then_graph, else_branch=else_graph)]
    inputs = [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), value_info("x", np.float32, [2, 3, 5, 5]), value_info("z", np.float32, [2, C, 5, 5])]
    model = make_model(nodes, inputs, [value_info("out", np.float32, [2, C, 5, 5])])
    result = bnfold.fold(model)
    assert count_bn(result.model) == 0 and result.report.noops_removed == {"Identity": 1}
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {"cond": np.array(True), "x": rng.normal(size=[2, 3, 5, 5]).astype(np.float32), "z": np.zeros([2, C, 5, 5], np.float32)}
    from conftest import run_ort

    np.testing.assert_allclose(run_ort(result.model, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)
