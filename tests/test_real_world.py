"""Models as real exporters write them: outputs of unknown rank (tf2onnx), IR 3 models whose
weights are also graph inputs (Caffe2; the onnx package's model-zoo graphs), overridable
initializers (IR >= 4), old BN opsets; and the truly malformed, still refused."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfold
from conftest import assert_same_outputs, assert_same_sites, bn_node, conv_bn_relu_chain, count_bn, tensor, value_info
from corpus import ZOO_WITH_BN, unshaped_outputs, zoo_model
from test_cli import invoke


def ir3_conv_bn(rng, opset: int = 9) -> onnx.ModelProto:
    """Conv (no bias) -> BN -> Relu at IR 3: every initializer is also a graph input, and the
    data input stands between weights (nothing says it comes first)."""
    inits = [tensor("W", rng.normal(0, 0.5, [4, 3, 3, 3]).astype(np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node(inits, "c", "b", rng, 4, name="bn", **({"is_test": 1} if opset < 7 else {})),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    weights = [value_info(t.name, np.float32, list(t.dims)) for t in inits]
    inputs = [weights[0], value_info("x", np.float32, [2, 3, 5, 5]), *weights[1:]]
    graph = helper.make_graph(nodes, "ir3", inputs, [value_info("y", np.float32, [2, 4, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    return model


def assert_lists_every_initializer(model: onnx.ModelProto, data_inputs: list[str]) -> None:
    """IR 3's rule, and the data inputs still there in their order."""
    names = [i.name for i in model.graph.input]
    assert set(names) == {t.name for t in model.graph.initializer} | set(data_inputs)
    assert [n for n in names if n in data_inputs] == data_inputs
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("opset", [6, 7, 9])
def test_real_world_ir3_initializer_inputs_fold_and_stay_listed(rng, opset):
    model = ir3_conv_bn(rng, opset)
    result = bnfold.fold(model)
    assert count_bn(result.model) == 0 and result.model.ir_version == 3
    assert result.report.constant_inputs_reason == "IR 3 model"
    assert set(result.report.constant_inputs) == {t.name for t in model.graph.initializer}
    assert_lists_every_initializer(result.model, ["x"])
    assert [i.name for i in result.model.graph.input].index("x") == 1  # not moved
    assert_same_outputs(model, result.model, rng)


@pytest.mark.parametrize("name", ZOO_WITH_BN)
def test_real_world_onnx_zoo_ir3_graphs_fold(rng, tmp_path, name):
    """onnx's own model-zoo test graphs (Caffe2 exports, IR 3, opset 9) with random weights."""
    model = zoo_model(name, rng)
    onnx.save(model, tmp_path / "m.onnx")
    result = bnfold.fold_file(tmp_path / "m.onnx", tmp_path / "out.onnx")
    folded = onnx.load(tmp_path / "out.onnx")
    assert result.verification.passed
    assert len(result.report.folded) == count_bn(model) - count_bn(folded) > 0
    if name != "densenet121":  # pre-activation blocks: BN after a Concat, before a Relu, stays
        assert count_bn(folded) == 0
    data = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    assert_lists_every_initializer(folded, data)
    assert_same_outputs(model, folded, rng)
    assert assert_same_sites(model, folded, rng) == count_bn(model)  # a 1% error on one channel vanishes by the logits


def overridable_conv_bn(rng) -> onnx.ModelProto:
    """IR 8: the Conv weight and a BN's var are initializers that are also graph inputs."""
    inits = [tensor("W", rng.normal(0, 0.5, [4, 3, 3, 3]).astype(np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node(inits, "c", "y", rng, 4, name="bn"),
    ]
    extra = [value_info(n, np.float32, [4]) for n in ("bn_var",)] + [value_info("W", np.float32, [4, 3, 3, 3])]
    inputs = [value_info("x", np.float32, [2, 3, 5, 5]), *extra, value_info("unused", np.float32, [1])]
    inits.append(tensor("unused", np.ones(1, np.float32)))
    graph = helper.make_graph(nodes, "g", inputs, [value_info("y", np.float32, [2, 4, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_real_world_overridable_initializer_kept_by_default(rng):
    result = bnfold.fold(overridable_conv_bn(rng))
    assert count_bn(result.model) == 1
    assert "an initializer a caller may override (--freeze-initializer-inputs folds it)" in result.report.kept[0].reason
    assert result.report.constant_inputs == ()


def test_real_world_freeze_initializer_inputs_folds_and_names_them(rng):
    model = overridable_conv_bn(rng)
    result = bnfold.fold(model, freeze_initializer_inputs=True)
    assert count_bn(result.model) == 0
    assert result.report.constant_inputs_reason == "--freeze-initializer-inputs"
    assert set(result.report.unlisted_inputs) == {"W", "bn_var"}  # the fold changed or removed them
    assert [i.name for i in result.model.graph.input] == ["x", "unused"]  # untouched ones stay
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model, rng)


def test_real_world_freeze_initializer_inputs_through_cli(rng, tmp_path):
    onnx.save(overridable_conv_bn(rng), tmp_path / "m.onnx")
    result = invoke([tmp_path / "m.onnx", "--freeze-initializer-inputs", "--json"], 0)
    report = json.loads(result.stdout)
    assert report["bn_after"] == 0 and set(report["constant_inputs"]["no_longer_inputs"]) == {"W", "bn_var"}
    assert "no longer inputs (the fold changed them): " in result.stderr
    assert invoke(["check", tmp_path / "m.onnx"], 0).stderr.count("not foldable") == 1
    invoke(["check", tmp_path / "m.onnx", "--freeze-initializer-inputs"], 1)


@pytest.fixture
def unshaped(rng, tmp_path):
    model = unshaped_outputs(conv_bn_relu_chain(rng))
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "m.onnx")
    return model


def test_real_world_unshaped_outputs_fold_with_warning(unshaped, rng, tmp_path):
    result = invoke([tmp_path / "m.onnx", "--json"], 0)
    warning = "graph output 'r2' declares no shape (unknown rank)"
    assert f"bnfold: warning: {tmp_path / 'm.onnx'}: {warning}" in result.stderr
    assert json.loads(result.stdout)["warnings"] == [warning]
    folded = onnx.load(tmp_path / "m.folded.onnx")
    assert count_bn(folded) == 0 and not folded.graph.output[0].type.tensor_type.HasField("shape")
    assert_same_outputs(unshaped, folded, rng)


def test_real_world_unshaped_outputs_check_and_verify_accept(unshaped, tmp_path):
    check = invoke(["check", tmp_path / "m.onnx"], 1)  # foldable BN left: CI's signal
    assert "declares no shape" in check.stderr and "3 foldable" in check.stderr
    invoke([tmp_path / "m.onnx"], 0)
    verify = invoke(["verify", tmp_path / "m.onnx", tmp_path / "m.folded.onnx"], 0)
    assert verify.stderr.count("declares no shape") == 2


@pytest.mark.parametrize("command", [[], ["check"], ["verify"]])
def test_real_world_check_model_flag_refuses_checker_findings(unshaped, tmp_path, command):
    path = tmp_path / "m.onnx"
    args = [*command, path, *([path] if command == ["verify"] else []), "--check-model"]
    result = invoke(args, 2)
    assert "onnx checker: Field 'shape' of 'type' is required but missing" in result.stderr
    assert not (tmp_path / "m.folded.onnx").exists()


def dangling_edge(model: onnx.ModelProto) -> None:
    model.graph.node[1].input[0] = "nobody_makes_this"


def cycle(model: onnx.ModelProto) -> None:
    model.graph.node[0].input[0] = model.graph.node[2].output[0]


def unknown_op(model: onnx.ModelProto) -> None:
    model.graph.node[2].op_type = "NoSuchOp"


@pytest.mark.parametrize("breakage", [dangling_edge, cycle, unknown_op])
def test_real_world_malformed_model_still_refused(rng, tmp_path, breakage):
    model = unshaped_outputs(conv_bn_relu_chain(rng))  # a tolerated finding does not hide a fatal one
    breakage(model)
    onnx.save(model, tmp_path / "m.onnx")
    result = invoke([tmp_path / "m.onnx"], 2)
    assert "onnx checker:" in result.stderr and "onnxruntime refuses it too" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.folded.onnx").exists()
    with pytest.raises(bnfold.InvalidModel):
        bnfold.check(tmp_path / "m.onnx")


def pooled_head(rng) -> onnx.ModelProto:
    """Dynamic H and W, a stride-32 layer and a fixed 7x7 average pool (as classifiers exported
    for 224x224 have): onnxruntime cannot run it at the default size 64, only at 224."""
    inits = [tensor("W", rng.normal(0, 0.1, [8, 3, 32, 32]).astype(np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", strides=[32, 32]),
        bn_node(inits, "c", "b", rng, 8, name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("AveragePool", ["r"], ["y"], name="pool", kernel_shape=[7, 7]),
    ]
    graph = helper.make_graph(nodes, "pooled", [value_info("x", np.float32, ["N", 3, "H", "W"])], [value_info("y", np.float32, ["N", 8, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_real_world_reference_runs_only_at_224_next_size_tried(rng, tmp_path):
    onnx.save(pooled_head(rng), tmp_path / "m.onnx")
    result = invoke([tmp_path / "m.onnx"], 0)
    assert "inputs at spatial size 224 (the original did not run at 64)" in result.stderr
    assert count_bn(onnx.load(tmp_path / "m.folded.onnx")) == 0
    pinned = invoke([tmp_path / "m.onnx", "--dim", "H=64", "--dim", "W=64"], 2)  # the user's size stands
    assert "pass --dim NAME=SIZE" in pinned.stderr and "sizes tried" not in pinned.stderr


def fpn_neck(rng) -> onnx.ModelProto:
    """A detector neck over dynamic H and W: a deep map resized to a skip connection's shape
    (Resize with sizes from Shape), added, then Conv -> Identity -> BN -> Relu."""
    inits = [tensor("W1", rng.normal(0, 0.3, [8, 3, 3, 3]).astype(np.float32)),
             tensor("W2", rng.normal(0, 0.2, [8, 8, 3, 3]).astype(np.float32)),
             tensor("W3", rng.normal(0, 0.2, [8, 8, 3, 3]).astype(np.float32)),
             tensor("start", np.array([2], np.int64)), tensor("end", np.array([4], np.int64))]
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["skip"], name="c1", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["skip", "W2"], ["deep"], name="c2", strides=[2, 2], pads=[1, 1, 1, 1]),
        bn_node(inits, "deep", "deep_bn", rng, 8, name="bn_deep"),
        helper.make_node("Shape", ["skip"], ["skip_shape"], name="shape"),
        helper.make_node("Slice", ["skip_shape", "start", "end"], ["hw"], name="slice"),
        helper.make_node("Shape", ["deep_bn"], ["deep_shape"], name="shape_deep"),
        helper.make_node("Slice", ["deep_shape", "zero_start", "start"], ["nc"], name="slice_nc"),
        helper.make_node("Concat", ["nc", "hw"], ["sizes"], name="sizes", axis=0),
        helper.make_node("Resize", ["deep_bn", "", "", "sizes"], ["up"], name="resize", mode="nearest"),
        helper.make_node("Add", ["up", "skip"], ["merged"], name="merge"),
        helper.make_node("Conv", ["merged", "W3"], ["c3"], name="c3", pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["c3"], ["c3_id"], name="identity"),
        bn_node(inits, "c3_id", "c3_bn", rng, 8, name="bn_neck"),
        helper.make_node("Relu", ["c3_bn"], ["y"], name="relu"),
    ]
    inits.append(tensor("zero_start", np.array([0], np.int64)))
    graph = helper.make_graph(nodes, "fpn", [value_info("x", np.float32, ["N", 3, "H", "W"])], [value_info("y", np.float32, ["N", 8, "h", "w"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_real_world_fpn_neck_dynamic_hw_folds_and_verifies(rng, tmp_path):
    model = fpn_neck(rng)
    onnx.save(model, tmp_path / "m.onnx")
    result = invoke([tmp_path / "m.onnx", "--json"], 0)
    report = json.loads(result.stdout)
    assert report["bn_after"] == 0 and report["noops_removed"] == {"Identity": 1}
    assert report["verification"]["status"] == "passed" and report["verification"]["sites_compared"] == 2
    folded = onnx.load(tmp_path / "m.folded.onnx")
    onnx.checker.check_model(folded, full_check=True)
    assert_same_outputs(model, folded, rng, dims={"N": 2, "H": 64, "W": 64})
