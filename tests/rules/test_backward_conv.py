"""bn_into_next_conv: BN -> Conv, groups, dtypes, strides/dilations; padding refusals and the proofs."""

import numpy as np
import pytest
from onnx import helper

from conftest import assert_folds, assert_kept, bn_node, make_model, tensor, value_info


def bn_conv_model(rng, *, cin=4, cout=6, groups=1, kernel=3, spatial=2, size=5, bias=True, dtype=np.float32, shift_zero=False, **attrs):
    """x [2, cin, size...] -> BN(cin) -> Conv; the output shape comes from shape inference."""
    inits = [tensor("W", rng.normal(0, 0.5, [cout, cin // groups, *[kernel] * spatial]).astype(dtype))]
    conv_inputs = ["x_bn", "W"]
    if bias:
        inits.append(tensor("b", rng.normal(0, 1, cout).astype(dtype)))
        conv_inputs.append("b")
    nodes = [
        bn_node(inits, "x", "x_bn", rng, cin, dtype, name="bn"),
        helper.make_node("Conv", conv_inputs, ["y"], name="conv", group=groups, **attrs),
    ]
    if shift_zero:
        for t in inits:
            if t.name in ("bn_B", "bn_mean"):
                t.CopyFrom(tensor(t.name, np.zeros(cin, dtype)))
    x = value_info("x", dtype, [2, cin, *([size] * spatial)] if isinstance(size, int) else [2, cin, *size])
    return make_model(nodes, [x], [helper.make_tensor_value_info("y", x.type.tensor_type.elem_type, None)], inits)


@pytest.mark.parametrize("spatial", [1, 2])
@pytest.mark.parametrize("groups,cin,cout", [(1, 4, 6), (2, 4, 6), (4, 4, 4), (4, 4, 8)], ids=["g1", "g2", "depthwise", "depthwise_x2"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_bn_into_next_conv_groups_bias_folds(rng, spatial, groups, cin, cout, bias):
    model = bn_conv_model(rng, spatial=spatial, cin=cin, cout=cout, groups=groups, bias=bias)
    result = assert_folds(model, rng, expect_left=0)
    (folded,) = result.report.folded
    assert (folded.rule, folded.into) == ("bn_into_next_conv", "conv")
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert result.model.graph.node[0].input[0] == "x"


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("groups", [1, 2])
def test_bn_into_next_conv_dtypes_folds(rng, dtype, groups):
    result = assert_folds(bn_conv_model(rng, groups=groups, dtype=dtype), rng, expect_left=0)
    assert {t.data_type for t in result.model.graph.initializer} == {result.model.graph.input[0].type.tensor_type.elem_type}


@pytest.mark.parametrize(
    "attrs",
    [{"strides": [2, 2]}, {"dilations": [2, 1]}, {"pads": [0, 0, 0, 0]}, {"auto_pad": "VALID", "strides": [2, 1]}],
    ids=["strides", "dilations", "zero_pads", "valid"],
)
def test_bn_into_next_conv_unpadded_variants_folds(rng, attrs):
    assert_folds(bn_conv_model(rng, size=7, **attrs), rng, expect_left=0)


@pytest.mark.parametrize(
    "kernel,size,attrs",
    [
        (1, 5, {"auto_pad": "SAME_UPPER"}),
        (1, 5, {"auto_pad": "SAME_LOWER", "strides": [3, 3]}),  # total pad (2-1)*3+1-5 = -1: none
        (2, 6, {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),  # (3-1)*2+2-6 = 0
    ],
    ids=["1x1", "1x1_stride3", "2x2_stride2_even"],
)
def test_bn_into_next_conv_same_without_padding_folds(rng, kernel, size, attrs):
    assert_folds(bn_conv_model(rng, kernel=kernel, size=size, **attrs), rng, expect_left=0)


def test_bn_into_next_conv_same_1x1_unknown_size_folds(rng):
    """A kernel extent of 1 never pads, whatever the input size."""
    model = bn_conv_model(rng, kernel=1, size=["h", "w"], auto_pad="SAME_UPPER", strides=[2, 2])
    assert_folds(model, rng, expect_left=0, dims={"h": 5, "w": 4})


def test_bn_into_next_conv_zero_shift_padded_folds(rng):
    """Padding is harmless when BN's shift is exactly zero: the padded 0 stays 0."""
    assert_folds(bn_conv_model(rng, pads=[1, 1, 1, 1], shift_zero=True), rng, expect_left=0)


def test_bn_into_next_conv_padded_kept(rng):
    model = bn_conv_model(rng, pads=[1, 1, 1, 1])
    result = assert_kept(model, "next: Conv 'conv' pads the input with zeros: a shifted input is not a shifted output")
    assert result.report.kept[0].reason.startswith("no foldable producer: input comes from graph input 'x'; ")


def test_bn_into_next_conv_same_padding_kept(rng):
    assert_kept(bn_conv_model(rng, auto_pad="SAME_LOWER"), "Conv 'conv' pads the input with zeros (auto_pad=SAME_LOWER)")


def test_bn_into_next_conv_same_unknown_size_kept(rng):
    model = bn_conv_model(rng, size=["h", "w"], auto_pad="SAME_UPPER", strides=[2, 2])
    assert_kept(model, "uses auto_pad=SAME_UPPER on an input of unknown size")


def test_bn_into_next_conv_weight_not_constant_kept(rng):
    model = bn_conv_model(rng)
    del model.graph.initializer[0]
    model.graph.input.append(value_info("W", np.float32, [6, 4, 3, 3]))
    assert_kept(model, "next: Conv 'conv' weight W is not a constant (it comes from graph input 'W')")


def test_bn_into_next_conv_bn_output_fanout_kept(rng):
    model = bn_conv_model(rng)
    model.graph.node.append(helper.make_node("Relu", ["x_bn"], ["r"], name="relu"))
    model.graph.output.append(value_info("r", np.float32, [2, 4, 5, 5]))
    assert_kept(model, "next: fan-out: BN output 'x_bn' feeds Conv 'conv', Relu 'relu'")


def test_bn_into_next_conv_bn_output_is_graph_output_kept(rng):
    model = bn_conv_model(rng)
    model.graph.output.append(value_info("x_bn", np.float32, [2, 4, 5, 5]))
    assert_kept(model, "next: BN output 'x_bn' is a graph output")


def test_bn_into_next_conv_bn_output_as_weight_kept(rng):
    """BN feeding a Conv's weight input is not BN before a linear layer."""
    inits = [tensor("W", rng.normal(size=[4, 1, 3, 3]).astype(np.float32))]
    nodes = [bn_node(inits, "W", "W_bn", rng, 1, name="bn"), helper.make_node("Conv", ["x", "W_bn"], ["y"], name="conv")]
    model = make_model(nodes, [value_info("x", np.float32, [2, 1, 5, 5])], [value_info("y", np.float32, [2, 4, 3, 3])], inits)
    assert_kept(model, "Conv 'conv' reads 'W_bn' other than as its data input 0")


def test_bn_into_next_conv_shared_weight_copied(rng):
    model = bn_conv_model(rng)
    model.graph.node.append(helper.make_node("Conv", ["x", "W", "b"], ["z"], name="conv2"))
    model.graph.output.append(value_info("z", np.float32, [2, 6, 3, 3]))
    result = assert_folds(model, rng, expect_left=0)
    conv2 = next(n for n in result.model.graph.node if n.name == "conv2")
    assert list(conv2.input) == ["x", "W", "b"]
    original = {t.name: t for t in model.graph.initializer}
    assert all(original[t.name] == t for t in result.model.graph.initializer if t.name in ("W", "b"))


def test_bn_into_next_conv_padded_naive_fold_is_wrong(rng, monkeypatch):
    """Why the padding refusal matters: folding anyway changes the border outputs."""
    from bnfold.rules import next_conv

    monkeypatch.setattr(next_conv, "padding_reason", lambda *args: "")
    with pytest.raises(AssertionError, match="max relative error"):
        assert_folds(bn_conv_model(rng, pads=[1, 1, 1, 1]), rng, expect_left=0)


def test_bn_into_next_conv_channel_mismatch_kept(rng):
    """BN over 1 channel broadcasts over 4 input channels: not a per-input-channel scale of W."""
    model = bn_conv_model(rng)
    for t in model.graph.initializer:
        if t.name.startswith("bn_"):
            t.CopyFrom(tensor(t.name, np.array([1.5 if t.name.endswith("var") else 0.7], np.float32)))
    assert_kept(model, "channel mismatch: Conv 'conv' has 4 input channels, BN feeds 1")


def test_bn_into_next_conv_float16_overflow_kept(rng):
    model = bn_conv_model(rng, dtype=np.float16, bias=False)
    for t in model.graph.initializer:
        if t.name == "W":
            t.CopyFrom(tensor("W", np.full([6, 4, 3, 3], 60000, np.float16)))
        if t.name == "bn_scale":
            t.CopyFrom(tensor("bn_scale", np.full(4, 4.0, np.float16)))
    assert_kept(model, "folded weights overflow their dtype")
