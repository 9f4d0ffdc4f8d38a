"""bn_into_conv: numeric folds for 1-D/2-D/3-D, groups, bias, dtypes; one refusal per check."""

import numpy as np
import pytest
from onnx import helper

from conftest import assert_folds, assert_kept, bn_node, kept_reason, make_model, run_reference, tensor, value_info


def conv_bn_model(rng, *, spatial=2, cin=4, cout=6, groups=1, bias=True, dtype=np.float32, opset=17, bn_attrs=None):
    k = [3] * spatial
    inits = [tensor("W", rng.normal(0, 0.5, [cout, cin // groups, *k]).astype(dtype))]
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(tensor("b", rng.normal(0, 1, cout).astype(dtype)))
        conv_inputs.append("b")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], name="conv", group=groups, pads=[1] * 2 * spatial),
        bn_node(inits, "c", "y", rng, cout, dtype, name="bn", **(bn_attrs or {})),
    ]
    shape = [2, cin, *([5] * spatial)]
    return make_model(nodes, [value_info("x", dtype, shape)], [value_info("y", dtype, [2, cout, *([5] * spatial)])], inits, opset=opset)


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("groups,cin,cout", [(1, 4, 6), (2, 4, 6), (4, 4, 4), (4, 4, 8)], ids=["g1", "g2", "depthwise", "depthwise_x2"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_bn_into_conv_shapes_groups_bias_folds(rng, spatial, groups, cin, cout, bias):
    model = conv_bn_model(rng, spatial=spatial, cin=cin, cout=cout, groups=groups, bias=bias)
    result = assert_folds(model, rng, expect_left=0)
    assert result.report.folded[0].rule == "bn_into_conv"
    assert result.report.folded[0].into == "conv"


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_bn_into_conv_dtypes_folds(rng, dtype):
    model = conv_bn_model(rng, dtype=dtype)
    result = assert_folds(model, rng, expect_left=0)
    weights = {t.name: t for t in result.model.graph.initializer}
    assert all(t.data_type == model.graph.initializer[0].data_type for t in weights.values())


def test_bn_into_conv_bfloat16_folds(rng):
    import ml_dtypes

    model = conv_bn_model(rng, dtype=np.float32, opset=22)  # Conv takes bfloat16 from opset 22
    for t in model.graph.initializer:
        arr = np.frombuffer(t.raw_data, np.float32) if t.raw_data else np.array(t.float_data, np.float32)
        t.CopyFrom(tensor(t.name, arr.reshape(tuple(t.dims)).astype(ml_dtypes.bfloat16)))
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.elem_type = 16  # BFLOAT16
    # onnxruntime has no bfloat16 Conv on CPU: the reference evaluator checks this one.
    assert_folds(model, rng, expect_left=0, engine=run_reference, rel=5e-2)


@pytest.mark.parametrize("opset", [7, 9, 14, 15])
def test_bn_into_conv_bn_opsets_folds(rng, opset):
    assert_folds(conv_bn_model(rng, opset=opset), rng, expect_left=0)


def test_bn_into_conv_opset6_is_test_folds_with_reference(rng):
    model = conv_bn_model(rng, opset=6, bn_attrs={"is_test": 1})
    assert_folds(model, rng, expect_left=0, engine=run_reference)


def test_bn_into_conv_opset6_training_kept(rng):
    # (onnx's reference evaluator cannot run BN-6 in training mode; the graph is left as is.)
    assert_kept(conv_bn_model(rng, opset=6), "is_test=0")


def test_bn_into_conv_spatial0_kept(rng):
    assert_kept(conv_bn_model(rng, opset=7, bn_attrs={"spatial": 0}), "spatial=0")


def test_bn_into_conv_training_mode_kept(rng):
    assert_kept(conv_bn_model(rng, opset=15, bn_attrs={"training_mode": 1}), "training_mode=1")


def test_bn_into_conv_weight_not_constant_kept(rng):
    model = conv_bn_model(rng)
    model.graph.input.append(value_info("W", np.float32, [6, 4, 3, 3]))
    del model.graph.initializer[0]
    result = assert_folds(model, rng, expect_left=1)
    assert "weight W is not a constant" in kept_reason(result)


def test_bn_into_conv_channel_mismatch_kept(rng):
    # BN over 1 channel broadcasts; a [1] vector against 6 conv channels is not per-channel.
    model = conv_bn_model(rng, cout=6)
    for t in list(model.graph.initializer):
        if t.name.startswith("bn_"):
            t.CopyFrom(tensor(t.name, np.array([1.5 if t.name.endswith("var") else 0.7], np.float32)))
    assert_kept(model, "channel mismatch")


def test_bn_into_conv_shared_weight_copied(rng):
    model = conv_bn_model(rng)
    model.graph.node.append(helper.make_node("Conv", ["x", "W", "b"], ["z"], name="conv2", pads=[1, 1, 1, 1]))
    model.graph.output.append(value_info("z", np.float32, [2, 6, 5, 5]))
    result = assert_folds(model, rng, expect_left=0)
    conv2 = next(n for n in result.model.graph.node if n.name == "conv2")
    assert list(conv2.input) == ["x", "W", "b"]
    original_w = next(t for t in model.graph.initializer if t.name == "W")
    assert next(t for t in result.model.graph.initializer if t.name == "W") == original_w
