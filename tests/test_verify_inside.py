"""Verification sees inside the model: every fold site is compared besides the graph outputs.

A wrong fold can vanish by the graph outputs: a saturated sigmoid, a softmax over thousands of
classes, an ArgMax, or a branch whose values no output depends on. Each test here builds such a
model, shows that bnfold's right fold passes (so the negative assertion that follows can fail),
then that a fold 1% wrong on one output channel (bnfold's own output edited, or a rule broken
for one BN) fails, and that the failure names the fold site. Also: inconclusive verification
(nothing informative compared), dynamic dims written as -1 / 0, and the float64 shadow that
tells deep-net rounding from a wrong fold.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold import pieces
from bnfold.cli import main
from bnfold.rules.base import WeightAndBiasRule
from bnfold.verify import generate_inputs
from conftest import bn_node, count_bn, make_model, run_ort, tensor, value_info
from corpus import near_identity_chain
from test_cli import invoke

WRONG = 1.01  # a wrong fold: output channel 0 of one folded weight scaled by this


# --------------------------------------------------------------------------- building blocks


def conv_bn_relu(inits, nodes, rng, x: str, i: int, cin: int, cout: int, stride: int = 1) -> str:
    """Conv 3x3 'conv<i>' (pad 1) -> BN 'bn<i>' (output 'b<i>', the fold site) -> Relu: 'r<i>'."""
    inits.append(tensor(f"W{i}", rng.normal(0, np.sqrt(2.0 / (cin * 9)), [cout, cin, 3, 3]).astype(np.float32)))
    nodes += [
        helper.make_node("Conv", [x, f"W{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1], strides=[stride, stride]),
        bn_node(inits, f"c{i}", f"b{i}", rng, cout, name=f"bn{i}"),
        helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}"),
    ]
    return f"r{i}"


def backbone(inits, nodes, rng, blocks: int, channels: int, stride: int = 1, x: str = "x") -> str:
    for i in range(blocks):
        x = conv_bn_relu(inits, nodes, rng, x, i, 3 if i == 0 else channels, channels, stride)
    return x


def sigmoid_head_net(rng, channels: int = 8) -> onnx.ModelProto:
    """A stride-32 backbone (5 x Conv 3x3 stride 2 -> BN -> Relu) over a dynamic H x W, then a 1x1
    Conv to one channel with weights x1000: the Sigmoid saturates to exactly 0 or 1."""
    inits, nodes = [], []
    x = backbone(inits, nodes, rng, 5, channels, stride=2)
    inits.append(tensor("W_head", (1000 * rng.normal(0, 1, [1, channels, 1, 1])).astype(np.float32)))
    nodes += [
        helper.make_node("Conv", [x, "W_head"], ["logit"], name="head"),
        helper.make_node("Sigmoid", ["logit"], ["prob"], name="sigmoid"),
    ]
    inputs = [value_info("x", np.float32, ["N", 3, "H", "W"])]
    return make_model(nodes, inputs, [value_info("prob", np.float32, ["N", 1, None, None])], inits)


def classifier_net(rng, classes: int, head: str, channels: int = 8, blocks: int = 4) -> onnx.ModelProto:
    """Backbone -> GlobalAveragePool -> Flatten -> Gemm to `classes` -> `head` (Softmax or ArgMax)."""
    inits, nodes = [], []
    x = backbone(inits, nodes, rng, blocks, channels)
    inits += [
        tensor("W_fc", rng.normal(0, 1, [channels, classes]).astype(np.float32)),
        tensor("B_fc", rng.normal(0, 0.1, [classes]).astype(np.float32)),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pooled"], name="gap"),
        helper.make_node("Flatten", ["pooled"], ["features"], name="flatten"),
        helper.make_node("Gemm", ["features", "W_fc", "B_fc"], ["logits"], name="fc"),
    ]
    if head == "Softmax":
        nodes.append(helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=1))
        output = value_info("y", np.float32, ["batch", classes])
    else:
        nodes.append(helper.make_node("ArgMax", ["logits"], ["y"], name="argmax", axis=1, keepdims=0))
        output = helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"])
    return make_model(nodes, [value_info("x", np.float32, ["batch", 3, 16, 16])], [output], inits)


def shape_only_branch_net(rng, channels: int = 4) -> onnx.ModelProto:
    """Two branches over x: A (conv0 -> bn0 -> Relu) is the output, reshaped to the shape of
    branch B (convB -> bnB -> Relu), whose values nothing reads: only its Shape is used. A wrong
    fold in B cannot change the graph output."""
    inits, nodes = [], []
    a = conv_bn_relu(inits, nodes, rng, "x", 0, 3, channels)
    inits.append(tensor("W_B", rng.normal(0, 0.3, [channels, 3, 3, 3]).astype(np.float32)))
    nodes += [
        helper.make_node("Conv", ["x", "W_B"], ["cB"], name="convB", pads=[1, 1, 1, 1]),
        bn_node(inits, "cB", "bB", rng, channels, name="bnB"),
        helper.make_node("Relu", ["bB"], ["rB"], name="reluB"),
        helper.make_node("Shape", ["rB"], ["shapeB"], name="shapeB"),
        helper.make_node("Reshape", [a, "shapeB"], ["y"], name="reshape"),
    ]
    inputs = [value_info("x", np.float32, ["batch", 3, 8, 8])]
    return make_model(nodes, inputs, [value_info("y", np.float32, ["batch", channels, 8, 8])], inits)


def constant_net() -> onnx.ModelProto:
    """Conv with all-zero weights to one channel -> BN -> output: the output is BN's shift,
    whatever the input: nothing informative to compare."""
    inits = [tensor("W", np.zeros([1, 3, 3, 3], np.float32))]
    for name, value in (("scale", 1.5), ("B", 0.25), ("mean", 0.5), ("var", 2.0)):
        inits.append(tensor(f"bn_{name}", np.array([value], np.float32)))
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_B", "bn_mean", "bn_var"], ["y"], name="bn"),
    ]
    inputs = [value_info("x", np.float32, ["batch", 3, 8, 8])]
    return make_model(nodes, inputs, [value_info("y", np.float32, ["batch", 1, 8, 8])], inits)


# --------------------------------------------------------------------------- helpers


def fold_right(tmp_path, model, name: str = "net"):
    """(original path, bnfold's folded path): every BN folded, the fold's own verification passed."""
    src = tmp_path / f"{name}.onnx"
    onnx.save(model, src)
    result = bnfold.fold_file(src)
    assert count_bn(onnx.load(result.path)) == 0 and not result.report.kept, result.report.to_dict()
    assert result.verification.status == "passed", result.verification.to_dict()
    return src, result.path


def wrong_copy(folded_path, conv: str, dst, strip_metadata: bool = False):
    """bnfold's output with output channel 0 of `conv`'s folded weight scaled by WRONG."""
    model = onnx.load(folded_path)
    node = next(n for n in model.graph.node if n.name == conv)
    weight = next(t for t in model.graph.initializer if t.name == node.input[1])
    value = numpy_helper.to_array(weight).copy()
    value[0] *= WRONG
    weight.CopyFrom(numpy_helper.from_array(value.astype(np.float32), weight.name))
    if strip_metadata:
        del model.metadata_props[:]
    onnx.save(model, dst)
    return dst


def stripped_copy(path, dst):
    model = onnx.load(path)
    assert any(p.key == "bnfold.fold_sites" for p in model.metadata_props)
    del model.metadata_props[:]
    onnx.save(model, dst)
    return dst


def failing(verification, kind: str | None = None):
    return [c for c in verification.checks if not c.passed and (kind is None or c.kind == kind)]


def first_failing_site(verification):
    """The first site that fails, in the reference's graph order (the order of the checks)."""
    sites = failing(verification, "site")
    assert sites, verification.to_dict()
    return sites[0]


def recorded_sites(path) -> dict[str, str]:
    model = onnx.load(path, load_external_data=False)
    entry = next(p.value for p in model.metadata_props if p.key == "bnfold.fold_sites")
    return json.loads(entry)["sites"]


def verify_json(args, expected_exit: int) -> dict:
    return json.loads(invoke(["verify", *args, "--json"], expected_exit).stdout)


# --------------------------------------------------------------------------- 1. saturated sigmoid


# the float64 shadow re-judging the failed sites runs the saturated Sigmoid in onnx.reference
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_verify_inside_saturated_sigmoid_wrong_fold_fails_at_its_site(tmp_path, rng):
    src, folded = fold_right(tmp_path, sigmoid_head_net(rng))
    assert recorded_sites(folded) == {f"b{i}": f"bn{i} into conv{i}" for i in range(5)}
    right = bnfold.verify(src, folded)
    assert right.status == "passed" and right.count("site") == 5 and right.count("output") == 1
    # dynamic H and W default to 64: 5 stride-2 layers leave a 2 x 2 map, not a vanished one
    assert {c.output: c.informative for c in right.checks if c.kind == "site"} == {f"b{i}": True for i in range(5)}

    wrong = wrong_copy(folded, "conv2", tmp_path / "wrong.onnx")
    result = bnfold.verify(src, wrong)
    assert result.status == "failed" and not result.passed
    site = first_failing_site(result)
    assert (site.output, site.kind, site.fold) == ("b2", "site", "bn2 into conv2")
    assert "bn2" in site.fold
    assert not any(c.output in ("b0", "b1") for c in failing(result)), "the folds before it are right"
    # the premise: the sigmoid saturates, so the graph output is exactly the same
    (output,) = [c for c in result.checks if c.kind == "output"]
    assert output.passed and output.max_abs_err == 0.0
    (prob,) = run_ort(onnx.load(src), generate_inputs(src))  # bnfold's own (seeded) inputs
    assert prob.shape == (2, 1, 2, 2) and set(np.unique(prob)) <= {0.0, 1.0}

    cli = invoke(["verify", src, wrong], 1)
    assert "verification FAILED (onnxruntime): 1 output and 5 fold sites compared" in cli.stderr
    assert "site 'b2' (bn2 into conv2) differs: max abs error" in cli.stderr
    invoke(["verify", src, folded], 0)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_verify_inside_saturated_sigmoid_outputs_only_misses_the_wrong_fold(tmp_path, rng):
    """Why sites matter: comparing the graph output alone cannot see this wrong fold."""
    src, folded = fold_right(tmp_path, sigmoid_head_net(rng))
    wrong = wrong_copy(folded, "conv2", tmp_path / "wrong.onnx")
    invoke(["verify", src, wrong], 1)  # with the sites: caught
    only = bnfold.verify(src, wrong, outputs_only=True)
    assert only.count("site") == 0 and only.count("output") == 1
    (check,) = only.checks
    assert check.passed and check.max_abs_err == 0.0, "the saturated sigmoid hides the error"
    # On the default inputs (batch 2, a 2 x 2 map) the saturated output takes one value only:
    # a constant proves nothing, so the outputs-only verdict is "inconclusive" (exit 1), never
    # "failed": the wrong fold is not caught, only the lack of evidence is reported.
    assert not check.informative and only.status == "inconclusive"
    data = verify_json([src, wrong, "--outputs-only"], 1)
    assert data["status"] == "inconclusive" and data["sites_compared"] == 0 and data["outputs_compared"] == 1
    assert not [c for c in data["checks"] if not c["passed"]], "nothing failed: the wrong fold went unseen"


# --------------------------------------------------------------------------- 2. softmax, 4000 classes


def test_verify_inside_softmax_thousands_of_classes_wrong_fold_fails(tmp_path, rng):
    src, folded = fold_right(tmp_path, classifier_net(rng, 4000, "Softmax"))
    right = verify_json([src, folded], 0)
    assert right["status"] == "passed" and right["sites_compared"] == 4
    wrong = wrong_copy(folded, "conv1", tmp_path / "wrong.onnx")
    # the probabilities alone hide it: their error stays under the float32 bound
    hidden = verify_json([src, wrong, "--outputs-only"], 0)
    assert hidden["status"] == "passed" and hidden["max_rel_err"] < 1e-4
    result = invoke(["verify", src, wrong], 1)
    assert "verification FAILED (onnxruntime): 1 output and 4 fold sites compared" in result.stderr
    assert "site 'b1' (bn1 into conv1) differs" in result.stderr
    assert "site 'b0'" not in result.stderr


# --------------------------------------------------------------------------- 3. ArgMax


def test_verify_inside_argmax_head_right_passes_wrong_fails_at_site(tmp_path, rng):
    src, folded = fold_right(tmp_path, classifier_net(rng, 10, "ArgMax"))
    right = bnfold.verify(src, folded)
    assert right.status == "passed" and right.count("site") == 4
    (output,) = [c for c in right.checks if c.kind == "output"]
    assert output.dtype == "int64" and not output.informative, "the sites are the evidence"
    # the output alone proves nothing about a float fold
    assert bnfold.verify(src, folded, outputs_only=True).status == "inconclusive"

    wrong = wrong_copy(folded, "conv2", tmp_path / "wrong.onnx")
    result = bnfold.verify(src, wrong)
    assert result.status == "failed"
    site = first_failing_site(result)
    assert (site.output, site.kind, site.fold) == ("b2", "site", "bn2 into conv2")
    cli = invoke(["verify", src, wrong], 1)
    assert "site 'b2' (bn2 into conv2) differs" in cli.stderr


# --------------------------------------------------------------------------- 4. a branch no output reads


def test_verify_inside_branch_no_output_depends_on_wrong_fold_fails_via_site(tmp_path, rng):
    src, folded = fold_right(tmp_path, shape_only_branch_net(rng))
    assert recorded_sites(folded) == {"b0": "bn0 into conv0", "bB": "bnB into convB"}
    right = bnfold.verify(src, folded)
    assert right.status == "passed" and right.count("site") == 2

    wrong = wrong_copy(folded, "convB", tmp_path / "wrong.onnx")
    feeds = generate_inputs(src)
    (y_right,), (y_wrong,) = run_ort(onnx.load(folded), feeds), run_ort(onnx.load(wrong), feeds)
    assert np.array_equal(y_right, y_wrong), "no graph output depends on branch B's values"
    only = bnfold.verify(src, wrong, outputs_only=True)
    assert only.status == "passed", "the graph output alone cannot see the wrong fold"
    result = bnfold.verify(src, wrong)
    assert result.status == "failed"
    assert [(c.output, c.kind, c.fold) for c in failing(result)] == [("bB", "site", "bnB into convB")]
    cli = invoke(["verify", src, wrong], 1)
    assert "site 'bB' (bnB into convB) differs" in cli.stderr


# --------------------------------------------------------------------------- 5. dims written -1 / 0


def dynamic_dims_net(rng, spatial: tuple[int, int]) -> onnx.ModelProto:
    """3 x (Conv stride 2 -> BN -> Relu) whose input declares [unnamed, 3, s0, s1], the spatial
    dims written as the numbers `spatial` (-1 or 0: dynamic, as some exporters write them)."""
    inits, nodes = [], []
    x = backbone(inits, nodes, rng, 3, 4, stride=2)
    model = make_model(
        nodes, [value_info("x", np.float32, ["N", 3, "H", "W"])],
        [value_info(x, np.float32, ["N", 4, "h", "w"])], inits,
    )
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].ClearField("dim_param")  # unnamed: neither a name nor a value
    dims[2].dim_value, dims[3].dim_value = spatial
    assert [d.WhichOneof("value") for d in dims] == [None, "dim_value", "dim_value", "dim_value"]
    return model


DYNAMIC_SPATIAL = {
    "minus_one": (-1, -1),
    "minus_one_and_zero": (-1, 0),  # onnxruntime reads 0 as fixed: bnfold clears it for its sessions
}


@pytest.mark.parametrize("spatial", list(DYNAMIC_SPATIAL.values()), ids=list(DYNAMIC_SPATIAL))
def test_verify_inside_dims_minus_one_and_zero_fold_and_verify(tmp_path, rng, spatial):
    model = dynamic_dims_net(rng, spatial)
    assert generate_inputs(model)["x"].shape == (2, 3, 64, 64)  # batch 2, spatial 64
    src = tmp_path / "dyn.onnx"
    onnx.save(model, src)
    result = invoke([src], 0)
    assert "BatchNormalization: 3 -> 0" in result.stderr
    assert "verification passed (onnxruntime): 1 output and 3 fold sites compared" in result.stderr
    folded = tmp_path / "dyn.folded.onnx"
    assert count_bn(onnx.load(folded)) == 0
    assert verify_json([src, folded], 0)["status"] == "passed"
    # and a wrong fold of this model fails (so the pass above could have failed)
    invoke(["verify", src, wrong_copy(folded, "conv1", tmp_path / "wrong.onnx")], 1)


# --------------------------------------------------------------------------- 6. inconclusive


def test_verify_inside_constant_model_inconclusive(tmp_path):
    src = tmp_path / "const.onnx"
    onnx.save(constant_net(), src)
    out = tmp_path / "const.folded.onnx"

    strict = invoke([src, "--strict"], 1)
    assert "INCONCLUSIVE" in strict.stderr
    assert not out.exists(), "--strict writes nothing when verification is inconclusive"

    result = invoke([src], 0)
    assert out.exists() and count_bn(onnx.load(out)) == 0
    assert "verification INCONCLUSIVE (onnxruntime): 1 output compared" in result.stderr
    assert "inconclusive: nothing informative was compared" in result.stderr

    verified = invoke(["verify", src, out], 1)
    assert "verification INCONCLUSIVE" in verified.stderr
    data = verify_json([src, out], 1)
    assert data["status"] == "inconclusive" and data["passed"] is True
    assert [c["informative"] for c in data["checks"]] == [False]

    # a folded model that differs is FAILED, not inconclusive: a constant compares exactly
    wrong = onnx.load(out)
    (bias,) = [t for t in wrong.graph.initializer if t.name == wrong.graph.node[0].input[2]]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(0.5), bias.name))
    onnx.save(wrong, tmp_path / "wrong.onnx")
    assert verify_json([src, tmp_path / "wrong.onnx"], 1)["status"] == "failed"


# --------------------------------------------------------------------------- 7. a broken rule, through `bnfold MODEL`


def break_rule_for(monkeypatch, label: str):
    """The Conv-family rule folds `label` wrongly: output channel 0 of the weight scaled by WRONG."""
    real = WeightAndBiasRule.plan

    def broken(self, bn, node, graph):
        plan = real(self, bn, node, graph)
        if bn.label == label and not isinstance(plan, bnfold.Kept):
            target, position, weight = plan.new_inputs[0]
            weight = weight.copy()
            weight[0] *= WRONG
            plan.new_inputs[0] = (target, position, weight)
        return plan

    monkeypatch.setattr(WeightAndBiasRule, "plan", broken)


def chain(rng, blocks: int = 5):
    inits, nodes = [], []
    x = backbone(inits, nodes, rng, blocks, 6)
    inputs = [value_info("x", np.float32, ["batch", 3, 8, 8])]
    return make_model(nodes, inputs, [value_info(x, np.float32, ["batch", 6, 8, 8])], inits)


def test_verify_inside_fold_with_broken_rule_strict_fails_naming_site(tmp_path, rng, monkeypatch):
    src = tmp_path / "m.onnx"
    onnx.save(chain(rng), src)
    invoke([src, "--strict"], 0)  # the unbroken rule passes, strictly
    (tmp_path / "m.folded.onnx").unlink()

    break_rule_for(monkeypatch, "bn2")
    result = invoke([src, "--strict"], 1)
    assert "verification FAILED (onnxruntime): 1 output and 5 fold sites compared" in result.stderr
    assert "site 'b2' (bn2 into conv2) differs" in result.stderr
    assert "site 'b0'" not in result.stderr and "site 'b1'" not in result.stderr
    assert not (tmp_path / "m.folded.onnx").exists()


def test_verify_inside_fold_with_broken_rule_rolled_back(tmp_path, rng, monkeypatch):
    src = tmp_path / "m.onnx"
    onnx.save(chain(rng), src)
    break_rule_for(monkeypatch, "bn2")
    result = invoke([src, "--json"], 0)
    lines = result.stderr.splitlines()
    assert any(line.startswith("  rolled back: 1 fold failed verification") for line in lines), result.stderr
    assert any(line.startswith("  kept bn2: verification failed") and line.endswith("(rolled back)") for line in lines)
    assert "BatchNormalization: 5 -> 1" in result.stderr
    data = json.loads(result.stdout)
    assert data["rolled_back"] == ["bn2"]
    assert [f["bn"] for f in data["folded"]] == ["bn0", "bn1", "bn3", "bn4"]
    assert data["verification"]["status"] == "passed"
    folded = onnx.load(tmp_path / "m.folded.onnx")
    assert [n.name for n in folded.graph.node if n.op_type == "BatchNormalization"] == ["bn2"]
    monkeypatch.undo()  # what was written verifies independently of the broken rule
    invoke(["verify", src, tmp_path / "m.folded.onnx"], 0)


# --------------------------------------------------------------------------- 8. deep-net rounding: the float64 shadow


@pytest.fixture
def deep(tmp_path, rng):
    src = tmp_path / "deep.onnx"
    onnx.save(near_identity_chain(rng, 50, offset=1000.0), src)
    return src


def test_verify_inside_deep_rounding_passes_by_float64_shadow(deep):
    result = bnfold.fold_file(deep)
    assert result.report.bn_after == 0 and len(result.report.folded) == 50
    assert result.report.rolled_back == ()
    verification = result.verification
    assert verification.status == "passed" and verification.count("site") == 50
    shadowed = [c for c in verification.checks if c.bound == "float64 shadow"]
    assert shadowed, "the plain bound alone would fail this correct fold"
    assert all(c.passed and c.shadow_err is not None and c.shadow_cand_err is not None for c in shadowed)
    # the premise: the plain bound (atol + rtol * max|ref|, max|ref| = abs err / rel err) fails them
    assert all(c.max_abs_err > c.atol + c.rtol * (c.max_abs_err / c.max_rel_err) for c in shadowed)


def test_verify_inside_deep_rounding_explicit_tolerance_no_shadow(deep, tmp_path):
    result = invoke([deep, "--rtol", "1e-4", "--atol", "1e-6", "--strict"], 1)
    assert "verification FAILED" in result.stderr
    assert "float64 shadow" not in result.stderr
    assert not (tmp_path / "deep.folded.onnx").exists()
    # the same with the default tolerances: passed, within the shadow's bound
    default = invoke([deep, "--strict"], 0)
    assert "verification passed" in default.stderr and "within the float64 shadow's bound" in default.stderr


def test_verify_inside_deep_rounding_explicit_tolerance_is_rounding_not_rolled_back(deep, tmp_path):
    """Without the shadow (the user's own bound), the whole drifts past the bound while every
    fold verifies alone: that is rounding; no fold is undone and nothing is written."""
    result = CliRunner().invoke(main, [str(deep), "--rtol", "1e-4", "--atol", "1e-6", "--json"])
    assert result.exit_code == 1, result.stderr
    assert "float64 shadow of the original" in result.stderr
    assert "each fold verifies on its own" in result.stderr and "nothing written" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "deep.folded.onnx").exists()


def test_verify_inside_explicit_tolerance_wrong_fold_still_rolled_back(deep, tmp_path, monkeypatch):
    """The same bound with one wrong fold: that fold fails alone, so it is undone."""
    break_rule_for(monkeypatch, "bn3")
    shallow = tmp_path / "shallow.onnx"
    onnx.save(near_identity_chain(np.random.default_rng(3), 6), shallow)
    result = CliRunner().invoke(main, [str(shallow), "--rtol", "1e-4", "--atol", "1e-6", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["rolled_back"] == ["bn3"]
    assert data["verification"]["status"] == "passed"


@pytest.mark.parametrize("in_pieces", [False, True])
def test_verify_inside_deep_rounding_wrong_fold_fails_at_b25(deep, tmp_path, monkeypatch, in_pieces):
    runs = []
    if in_pieces:  # as a deep graph is verified (bnfold.pieces), here with 150 nodes
        monkeypatch.setattr(pieces, "CUT_ABOVE", 16)
        monkeypatch.setattr(pieces, "PIECE_NODES", 7)
        real_run = pieces.run
        monkeypatch.setattr(pieces, "run", lambda *args: runs.append(1) or real_run(*args))
    result = bnfold.fold_file(deep)
    assert result.verification.passed
    right = bnfold.verify(deep, result.path)
    assert right.status == "passed"
    wrong = wrong_copy(result.path, "conv25", tmp_path / "wrong.onnx")
    verification = bnfold.verify(deep, wrong)
    assert verification.status == "failed"
    site = first_failing_site(verification)
    assert (site.output, site.fold) == ("b25", "bn25 into conv25")
    assert site.bound == "float64 shadow" and site.shadow_cand_err > 4 * site.shadow_err
    assert not any(c.output in {f"b{i}" for i in range(25)} for c in failing(verification))
    assert bool(runs) == in_pieces


# --------------------------------------------------------------------------- 9. a candidate without recorded sites


def test_verify_inside_candidate_without_metadata_compares_values_named_alike(tmp_path, rng):
    src, folded = fold_right(tmp_path, chain(rng, blocks=4))
    bare = stripped_copy(folded, tmp_path / "bare.onnx")
    right = verify_json([src, bare], 0)
    assert right["status"] == "passed" and right["sites_compared"] > 0
    assert {c["output"] for c in right["checks"] if c["kind"] == "site"} >= {"b0", "b1", "b2"}

    wrong = wrong_copy(folded, "conv1", tmp_path / "wrong.onnx", strip_metadata=True)
    assert not onnx.load(wrong).metadata_props
    data = verify_json([src, wrong], 1)
    assert data["status"] == "failed" and data["sites_compared"] > 0
    first = next(c for c in data["checks"] if not c["passed"] and c["kind"] == "site")
    assert first["output"] == "b1"
    cli = invoke(["verify", src, wrong], 1)
    assert "site 'b1' differs" in cli.stderr
