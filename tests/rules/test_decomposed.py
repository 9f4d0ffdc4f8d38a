"""affine_into_* (forward): BN written out as arithmetic after Conv / ConvTranspose / Gemm / MatMul.

Every positive case runs the folded model against the unfused original in onnxruntime; every
refusal asserts its reason and that the model was left as it was.
"""

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfold
from conftest import assert_folds, assert_same_outputs, bn_node, bn_stats, make_model, run_ort, tensor, value_info

EPS = 1e-3


def chain_nodes(data: str, steps, inits: list, prefix: str = "op") -> tuple[list, str]:
    """Nodes applying `steps` [(op, constant, constant_first)] to `data`; returns (nodes, output)."""
    nodes = []
    for i, (op, value, constant_first) in enumerate(steps):
        name = f"{prefix}{i}"
        inits.append(tensor(f"{name}_c", value))
        inputs = [f"{name}_c", data] if constant_first else [data, f"{name}_c"]
        nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name))
        data = f"{name}_out"
    return nodes, data


def keras_bn_steps(rng, channels: int, shape, dtype=np.float32):
    """Sub(mean) -> Div(sqrt(var + eps)) -> Mul(gamma) -> Add(beta), constants of `shape`."""
    gamma, beta, mean, var = bn_stats(rng, channels, np.float64)
    std = np.sqrt(var + EPS)
    return [(op, v.reshape(shape).astype(dtype), False) for op, v in (("Sub", mean), ("Div", std), ("Mul", gamma), ("Add", beta))]


def conv_model(rng, steps, *, cin=4, cout=6, size=(5, 5), groups=1, dtype=np.float32, transpose=False, extra_outputs=(), reader=None):
    """x [2, cin, *size] -> Conv (pads 1, bias) or ConvTranspose -> `steps`; `reader`: an extra op
    reading the Conv output (fan-out)."""
    k = [3] * len(size)
    w_shape = [cin, cout // groups, *k] if transpose else [cout, cin // groups, *k]
    inits = [tensor("W", rng.normal(0, 0.5, w_shape).astype(dtype)), tensor("b", rng.normal(0, 1, cout).astype(dtype))]
    op = "ConvTranspose" if transpose else "Conv"
    nodes = [helper.make_node(op, ["x", "W", "b"], ["c"], name="conv", group=groups, pads=[1] * 2 * len(size))]
    more, out = chain_nodes("c", steps, inits)
    nodes += more
    outputs = [out, *extra_outputs]
    if reader is not None:
        nodes.append(helper.make_node(reader, ["c"], ["other"], name="other"))
        outputs.append("other")
    x = value_info("x", dtype, [2, cin, *size])
    elem = x.type.tensor_type.elem_type
    return make_model(nodes, [x], [helper.make_tensor_value_info(o, elem, None) for o in outputs], inits)


def assert_chain_folds(model, rng, rule: str, ops_left: list[str], ops: str, **kwargs):
    """Folded by `rule` (one chain record, counted apart from BN), numerically equal; returns the result."""
    result = assert_folds(model, rng, expect_left=0, **kwargs)
    (record,) = result.report.affine_folded
    assert (record.rule, record.ops) == (rule, ops), result.report.to_dict()
    assert result.report.affine_kept == ()
    assert [n.op_type for n in result.model.graph.node] == ops_left
    assert result.report.bn_before == result.report.bn_after + len(result.report.folded)
    return result


def assert_chain_kept(model, fragment: str, **kwargs):
    """One chain kept with a reason naming the cause, and the model left exactly as it was."""
    result = bnfold.fold(model, **kwargs)
    (record,) = result.report.affine_kept
    assert fragment in record.reason, record.reason
    assert not result.modified and result.report.affine_folded == ()
    assert result.model.SerializeToString() == model.SerializeToString()
    return record


@pytest.mark.parametrize(
    "size,shape",
    [((5, 5), [6, 1, 1]), ((5, 5), [1, 6, 1, 1]), ((5,), [6, 1]), ((5,), [1, 6, 1]), ((4, 4, 4), [6, 1, 1, 1])],
    ids=["2d_c11", "2d_1c11", "1d_c1", "1d_1c1", "3d_c111"],
)
def test_affine_into_conv_keras_bn_form_folds(rng, size, shape):
    model = conv_model(rng, keras_bn_steps(rng, 6, shape), size=size)
    result = assert_chain_folds(model, rng, "affine_into_conv", ["Conv"], "Sub+Div+Mul+Add")
    assert result.report.affine_folded[0].bn == "op0" and result.report.affine_folded[0].into == "conv"
    assert result.report.bn_before == 0 and result.report.folded == ()


@pytest.mark.parametrize("mul_first,add_first", [(False, False), (True, True)], ids=["x_op_c", "c_op_x"])
def test_affine_into_conv_mul_add_operand_order_folds(rng, mul_first, add_first):
    scale, shift = rng.normal(size=[6, 1, 1]).astype(np.float32), rng.normal(size=[6, 1, 1]).astype(np.float32)
    model = conv_model(rng, [("Mul", scale, mul_first), ("Add", shift, add_first)])
    assert_chain_folds(model, rng, "affine_into_conv", ["Conv"], "Mul+Add")


def test_affine_into_conv_constant_minus_data_negation_folds(rng):
    """c - x is -x + c: scale -1 (a wrong sign would show at once in the outputs)."""
    c = rng.normal(size=[1, 6, 1, 1]).astype(np.float32)
    model = conv_model(rng, [("Sub", c, True), ("Mul", rng.uniform(0.5, 2, [6, 1, 1]).astype(np.float32), False)])
    assert_chain_folds(model, rng, "affine_into_conv", ["Conv"], "Sub+Mul")


@pytest.mark.parametrize("op,value", [("Mul", 1.7), ("Div", -2.5), ("Add", 0.3), ("Sub", 1.1)])
def test_affine_into_conv_scalar_constant_folds(rng, op, value):
    for shape in ((), (1,), (1, 1, 1, 1)):
        model = conv_model(rng, [(op, np.full(shape, value, np.float32), False)])
        assert_chain_folds(model, rng, "affine_into_conv", ["Conv"], op)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_affine_into_conv_dtypes_folds(rng, dtype):
    result = assert_chain_folds(conv_model(rng, keras_bn_steps(rng, 6, [6, 1, 1], dtype), dtype=dtype), rng, "affine_into_conv", ["Conv"], "Sub+Div+Mul+Add")
    assert {t.data_type for t in result.model.graph.initializer} == {result.model.graph.input[0].type.tensor_type.elem_type}


def test_affine_into_conv_followed_by_bn_both_fold(rng):
    """Conv -> Mul -> Add -> BN: the chain folds, then the BN into the same Conv."""
    scale, shift = rng.normal(size=[6, 1, 1]).astype(np.float32), rng.normal(size=[6, 1, 1]).astype(np.float32)
    model = conv_model(rng, [("Mul", scale, False), ("Add", shift, False)])
    inits = list(model.graph.initializer)
    bn = bn_node(inits, "op1_out", "y", rng, 6, name="bn")
    model = make_model([*model.graph.node, bn], model.graph.input, [helper.make_tensor_value_info("y", 1, None)], inits)
    result = assert_folds(model, rng, expect_left=0)
    assert [f.rule for f in result.report.folded] == ["bn_into_conv"]
    assert [f.rule for f in result.report.affine_folded] == ["affine_into_conv"]
    assert (result.report.bn_before, result.report.bn_after) == (1, 0)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]


@pytest.mark.parametrize("groups", [1, 2])
def test_affine_into_conv_transpose_groups_folds(rng, groups):
    model = conv_model(rng, keras_bn_steps(rng, 6, [6, 1, 1]), groups=groups, transpose=True)
    assert_chain_folds(model, rng, "affine_into_conv_transpose", ["ConvTranspose"], "Sub+Div+Mul+Add")


def gemm_model(rng, steps, *, trans_b=0, with_c=True, dtype=np.float32):
    """x [3, 4] -> Gemm (alpha 0.7, beta 1.3) -> `steps` on [3, 5]."""
    inits = [tensor("B", rng.normal(size=[5, 4] if trans_b else [4, 5]).astype(dtype))]
    inputs = ["x", "B"]
    if with_c:
        inits.append(tensor("C", rng.normal(size=[5]).astype(dtype)))
        inputs.append("C")
    nodes = [helper.make_node("Gemm", inputs, ["g"], name="gemm", transB=trans_b, alpha=0.7, beta=1.3)]
    more, out = chain_nodes("g", steps, inits)
    return make_model(nodes + more, [value_info("x", dtype, [3, 4])], [value_info(out, dtype, [3, 5])], inits)


@pytest.mark.parametrize("shape", [[5], [1, 5]])
@pytest.mark.parametrize("trans_b,with_c", [(0, True), (1, False)], ids=["plain", "transB_noC"])
def test_affine_into_gemm_folds(rng, shape, trans_b, with_c):
    model = gemm_model(rng, keras_bn_steps(rng, 5, shape), trans_b=trans_b, with_c=with_c)
    assert_chain_folds(model, rng, "affine_into_gemm", ["Gemm"], "Sub+Div+Mul+Add")


def matmul_model(rng, steps, rank=2, dtype=np.float32):
    """x [3, 4] (or [3, 2, 4]) -> MatMul(B [4, 5]) -> `steps`."""
    inits = [tensor("B", rng.normal(size=[4, 5]).astype(dtype))]
    more, out = chain_nodes("m", steps, inits)
    lead = [3] if rank == 2 else [3, 2]
    nodes = [helper.make_node("MatMul", ["x", "B"], ["m"], name="matmul"), *more]
    return make_model(nodes, [value_info("x", dtype, [*lead, 4])], [value_info(out, dtype, [*lead, 5])], inits)


def test_affine_into_matmul_keras_form_leaves_one_add_folds(rng):
    result = assert_chain_folds(matmul_model(rng, keras_bn_steps(rng, 5, [5])), rng, "affine_into_matmul", ["MatMul", "Add"], "Sub+Div+Mul+Add")
    assert list(result.model.graph.node[1].output) == ["op3_out"]


def test_affine_into_matmul_scale_only_leaves_no_add_folds(rng):
    model = matmul_model(rng, [("Mul", rng.normal(size=[1, 5]).astype(np.float32), True)])
    assert_chain_folds(model, rng, "affine_into_matmul", ["MatMul"], "Mul")


def test_affine_into_matmul_single_bias_add_untouched(rng):
    """MatMul -> Add(bias) is already the folded form: nothing to fold, nothing to report."""
    model = matmul_model(rng, [("Add", rng.normal(size=[5]).astype(np.float32), False)])
    result = bnfold.fold(model)
    assert not result.modified and result.report.affine_kept == ()
    assert result.model.SerializeToString() == model.SerializeToString()


def test_affine_into_matmul_rank3_not_reported(rng):
    """A rank-3 Linear's Add/Mul on the last axis is not BN written out: left alone, silently."""
    model = matmul_model(rng, [("Add", rng.normal(size=[5]).astype(np.float32), False), ("Mul", np.float32(0.5), False)], rank=3)
    result = bnfold.fold(model)
    assert not result.modified and result.report.affine_kept == ()


def test_affine_into_conv_w_shaped_constant_kept(rng):
    """Conv output [2, 6, 5, 6]: a [6] constant broadcasts along W (the last axis), not along the
    6 channels. The chain is kept; folding it as a channel scale would change the outputs."""
    w_scale = rng.uniform(0.5, 2.0, 6).astype(np.float32)
    model = conv_model(rng, [("Mul", w_scale, False)], size=(5, 6))
    assert model.graph.output[0].type.tensor_type.shape.dim[3].dim_value == 6  # W == C
    record = assert_chain_kept(model, "constant of shape [6] varies along axis 3 of 'c' [2, 6, 5, 6], not only the channel axis 1")
    assert (record.bn, record.ops) == ("op0", "Mul")
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    weights = {t.name: t for t in wrong.graph.initializer}
    w, b = (onnx.numpy_helper.to_array(weights[n]) for n in ("W", "b"))
    weights["W"].CopyFrom(tensor("W", w * w_scale[:, None, None, None]))
    weights["b"].CopyFrom(tensor("b", b * w_scale))
    del wrong.graph.node[1]
    wrong.graph.node[0].output[0] = "op0_out"
    feeds = {"x": rng.normal(size=[2, 4, 5, 6]).astype(np.float32)}
    expected, folded_wrongly = run_ort(model, feeds)[0], run_ort(wrong, feeds)[0]
    assert np.max(np.abs(expected - folded_wrongly)) > 0.1 * np.max(np.abs(expected))


@pytest.mark.parametrize(
    "shape,fragment",
    [
        ([2, 6, 1, 1], "varies along axis 0"),
        ([1, 1, 5, 5], "varies along axis 3"),
        ([6, 5, 1], "varies along axis 2"),
        ([1, 1, 6, 1, 1], "has more axes than 'c' [2, 6, 5, 5]: it changes the output shape"),
    ],
    ids=["per_sample", "spatial", "channel_and_height", "more_axes"],
)
def test_affine_into_conv_not_per_channel_constant_kept(rng, shape, fragment):
    assert_chain_kept(conv_model(rng, [("Add", rng.normal(size=shape).astype(np.float32), False)]), fragment)


def test_affine_into_conv_constant_over_data_kept(rng):
    c = rng.uniform(1, 2, [6, 1, 1]).astype(np.float32)
    assert_chain_kept(conv_model(rng, [("Div", c, True)]), "Div 'op0' divides a constant by its input (c / x is not affine)")


def test_affine_into_conv_divide_by_zero_kept(rng):
    c = rng.uniform(1, 2, [6, 1, 1]).astype(np.float32)
    c[2] = 0
    assert_chain_kept(conv_model(rng, [("Div", c, False)]), "Div 'op0' divides by a constant containing zero")


def test_affine_into_conv_nan_constant_kept(rng):
    c = rng.normal(size=[6, 1, 1]).astype(np.float32)
    c[1] = np.nan
    assert_chain_kept(conv_model(rng, [("Mul", c, False)]), "Mul 'op0' constant holds NaN or Inf")


def test_affine_into_conv_producer_fanout_kept(rng):
    model = conv_model(rng, [("Mul", rng.normal(size=[6, 1, 1]).astype(np.float32), False)], reader="Relu")
    assert_chain_kept(model, "fan-out: Conv 'conv' output also feeds Relu 'other'")


def test_affine_into_conv_producer_graph_output_kept(rng):
    model = conv_model(rng, [("Mul", rng.normal(size=[6, 1, 1]).astype(np.float32), False)], extra_outputs=["c"])
    assert_chain_kept(model, "Conv 'conv' output 'c' is a graph output")


def test_affine_into_conv_intermediate_graph_output_splits_chain(rng):
    """The Sub's output is a graph output: the chain stops there. Sub folds (the Conv now writes
    that output, with the same values); Div -> Mul -> Add then follows a Conv whose output is a
    graph output and is kept."""
    model = conv_model(rng, keras_bn_steps(rng, 6, [6, 1, 1]), extra_outputs=["op0_out"])
    result = assert_folds(model, rng, expect_left=0)
    assert [(f.ops, f.rule) for f in result.report.affine_folded] == [("Sub", "affine_into_conv")]
    (kept,) = result.report.affine_kept
    assert kept.ops == "Div+Mul+Add" and "output 'op0_out' is a graph output" in kept.reason
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Div", "Mul", "Add"]


def test_affine_into_conv_intermediate_fanout_splits_chain(rng):
    model = conv_model(rng, keras_bn_steps(rng, 6, [6, 1, 1]))
    nodes = [*model.graph.node, helper.make_node("Relu", ["op1_out"], ["r"], name="relu")]
    outputs = [*model.graph.output, helper.make_tensor_value_info("r", 1, None)]
    model = make_model(nodes, model.graph.input, outputs, model.graph.initializer)
    result = assert_folds(model, rng, expect_left=0)
    assert [f.ops for f in result.report.affine_folded] == ["Sub+Div"]
    (kept,) = result.report.affine_kept
    assert kept.ops == "Mul+Add" and "fan-out: Conv 'conv' output also feeds Relu 'relu'" in kept.reason


def test_affine_into_conv_rank_unknown_kept(rng):
    model = conv_model(rng, [("Mul", rng.normal(size=[6, 1, 1]).astype(np.float32), False)])
    model.graph.input[0].type.tensor_type.ClearField("shape")
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    assert_chain_kept(model, "the rank of 'c' is unknown")


def test_affine_into_conv_rule_not_enabled_kept(rng):
    model = conv_model(rng, [("Mul", rng.normal(size=[6, 1, 1]).astype(np.float32), False)])
    assert_chain_kept(model, "rule affine_into_conv is not enabled", rules=["bn_into_conv"])


def test_affine_into_conv_rolled_back_kept(rng):
    """A chain fold that verification rolled back is kept with that reason (bnfold.rollback)."""
    model = conv_model(rng, [("Mul", rng.normal(size=[6, 1, 1]).astype(np.float32), False)])
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    result = bnfold.api.fold_model(copy, skip={("", "op0"): "verification failed: max abs error 1 when folded (rolled back)"})
    (kept,) = result.report.affine_kept
    assert kept.reason.startswith("verification failed") and not result.modified


def test_affine_unrelated_arithmetic_not_reported(rng):
    """Relu -> Mul(const) -> Sigmoid: arithmetic, but no neighbour a rule folds into."""
    inits = [tensor("k", np.float32(2.0))]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mul", ["r", "k"], ["m"]),
        helper.make_node("Sigmoid", ["m"], ["y"]),
    ]
    model = make_model(nodes, [value_info("x", np.float32, [2, 3])], [value_info("y", np.float32, [2, 3])], inits)
    result = bnfold.fold(model)
    assert not result.modified and result.report.affine_kept == () and result.report.affine_folded == ()


def test_affine_report_json_keeps_bn_schema(rng):
    model = conv_model(rng, keras_bn_steps(rng, 6, [6, 1, 1]))
    data = bnfold.fold(model).report.to_dict()
    assert (data["bn_before"], data["bn_after"], data["folded"], data["rules"]) == (0, 0, [], {})
    assert data["affine_rules"] == {"affine_into_conv": 1}
    assert data["affine_folded"] == [
        {"bn": "op0", "status": "folded", "into": "conv", "rule": "affine_into_conv", "graph": "", "site": "op3_out", "ops": "Sub+Div+Mul+Add"}
    ]


def test_affine_into_conv_chain_output_name_preserved(rng):
    model = conv_model(rng, keras_bn_steps(rng, 6, [6, 1, 1]))
    result = bnfold.fold(model)
    assert list(result.model.graph.node[0].output) == ["op3_out"]
    assert_same_outputs(model, result.model, rng)


def test_affine_keras_style_conv_net_folds_as_far_as_legal(rng):
    """A Keras/tf2onnx-style net with BN written out as arithmetic everywhere: input
    normalisation before a padded Conv (kept: the padding would see the shift), Sub/Div/Mul/Add
    and Mul/Add after Convs and a Gemm (folded), a [W] Mul with W == C right after a Conv's
    Mul/Add (that chain folds, the [W] Mul is kept). Verified by
    bnfold.verify as well as by the independent onnxruntime check."""
    inits = [
        tensor("W1", rng.normal(0, 0.5, [4, 3, 3, 3]).astype(np.float32)),
        tensor("W2", rng.normal(0, 0.5, [4, 4, 3, 3]).astype(np.float32)),
        tensor("G", rng.normal(0, 0.5, [4, 5]).astype(np.float32)),
    ]
    norm, x_n = chain_nodes("x", [("Sub", rng.normal(size=[1, 3, 1, 1]).astype(np.float32), False), ("Div", rng.uniform(0.5, 2, [1, 3, 1, 1]).astype(np.float32), False)], inits, "norm")
    bn1, b1 = chain_nodes("c1", keras_bn_steps(rng, 4, [4, 1, 1]), inits, "bn1_")
    bn2, b2 = chain_nodes("c2", [("Mul", rng.normal(size=[4, 1, 1]).astype(np.float32), False), ("Add", rng.normal(size=[4, 1, 1]).astype(np.float32), False)], inits, "bn2_")
    w_mul, wm = chain_nodes(b2, [("Mul", rng.uniform(0.5, 2, 4).astype(np.float32), False)], inits, "wmul")
    head, y = chain_nodes("g", keras_bn_steps(rng, 5, [5]), inits, "bn3_")
    nodes = [
        *norm, helper.make_node("Conv", [x_n, "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]), *bn1,
        helper.make_node("Relu", [b1], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]), *bn2,
        *w_mul, helper.make_node("Relu", [wm], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "G"], ["g"], name="gemm"), *head,
    ]
    model = make_model(nodes, [value_info("x", np.float32, [2, 3, 4, 4])], [value_info(y, np.float32, [2, 5])], inits)
    result = assert_folds(model, rng, expect_left=0)
    assert sorted((f.ops, f.rule) for f in result.report.affine_folded) == [
        ("Mul+Add", "affine_into_conv"), ("Sub+Div+Mul+Add", "affine_into_conv"), ("Sub+Div+Mul+Add", "affine_into_gemm"),
    ]
    kept = {k.bn: k.reason for k in result.report.affine_kept}
    assert kept.keys() == {"norm0", "wmul0"}
    assert "next: Conv 'conv1' pads the input with zeros" in kept["norm0"]
    assert "varies along axis 3 of 'bn2_1_out' [2, 4, 4, 4]" in kept["wmul0"]
    assert len(result.model.graph.node) == len(nodes) - 10
    check = bnfold.verify(model, result.model)
    assert check.passed, check.to_dict()


def test_affine_into_conv_wrong_fold_rolled_back(rng, tmp_path, monkeypatch):
    """Prove each fold: a chain fold that fails verification is found among the folds, undone,
    and reported kept; the others stay folded and the written model matches the original."""
    from bnfold.rules.base import WeightAndBiasRule

    inits, nodes, x = [], [], "x"
    for i in range(3):
        inits.append(tensor(f"W{i}", rng.normal(0, 0.3, [4, 4, 3, 3]).astype(np.float32)))
        steps = [("Mul", rng.uniform(0.5, 2, [4, 1, 1]).astype(np.float32), False), ("Add", rng.normal(size=[4, 1, 1]).astype(np.float32), False)]
        chain, out = chain_nodes(f"c{i}", steps, inits, f"block{i}_")
        nodes += [helper.make_node("Conv", [x, f"W{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]), *chain, helper.make_node("Relu", [out], [f"r{i}"])]
        x = f"r{i}"
    model = make_model(nodes, [value_info("x", np.float32, [1, 4, 5, 5])], [value_info(x, np.float32, [1, 4, 5, 5])], inits)
    real = WeightAndBiasRule.plan

    def wrong_plan(self, bn, node, graph):
        plan = real(self, bn, node, graph)
        if bn.label == "block1_0" and not isinstance(plan, bnfold.Kept):
            n, position, bias = plan.new_inputs[1]
            plan.new_inputs[1] = (n, position, (bias + 0.5).astype(bias.dtype))
        return plan

    monkeypatch.setattr(WeightAndBiasRule, "plan", wrong_plan)
    src = tmp_path / "net.onnx"
    onnx.save(model, src)
    result = bnfold.fold_file(src)
    assert [f.bn for f in result.report.affine_folded] == ["block0_0", "block2_0"]
    (kept,) = result.report.affine_kept
    assert kept.bn == "block1_0" and kept.reason.startswith("verification failed: max abs error")
    assert result.verification.passed
    assert_same_outputs(model, onnx.load(result.path), rng)


def test_affine_into_matmul_after_backward_bn_fold_reaches_fixed_point(rng):
    """BN -> MatMul -> Mul(s): the BN folds backward and adds Add(bias) after the MatMul, whose
    product gets a fresh, untyped name; the chain Add(bias) -> Mul(s) still folds in the same
    run (the product's type comes from inferring the MatMul alone), so a second fold finds
    nothing (regression: it did, found by tests/test_property.py)."""
    inits = [tensor("B", rng.normal(size=[4, 5]).astype(np.float32))]
    nodes = [bn_node(inits, "x", "x_bn", rng, 4, name="bn"), helper.make_node("MatMul", ["x_bn", "B"], ["m"], name="matmul")]
    more, out = chain_nodes("m", [("Mul", rng.uniform(0.5, 2, 5).astype(np.float32), False)], inits)
    model = make_model(nodes + more, [value_info("x", np.float32, [3, 4])], [value_info(out, np.float32, [3, 5])], inits)
    result = assert_folds(model, rng, expect_left=0)
    assert [f.rule for f in result.report.folded] == ["bn_into_next_matmul"]
    assert [(f.rule, f.ops) for f in result.report.affine_folded] == [("affine_into_matmul", "Add+Mul")]
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add"]
    assert not bnfold.fold(result.model).report.modified


def test_affine_into_conv_constant_widens_channels_kept(rng):
    """A 1-channel Conv output times a [3, 1, 1] constant becomes 3 channels: not a channel scale."""
    model = conv_model(rng, [("Mul", rng.normal(size=[3, 1, 1]).astype(np.float32), False)], cout=1)
    assert_chain_kept(model, "constant of shape [3, 1, 1] has 3 values on axis 1, 'c' has 1 channels")
