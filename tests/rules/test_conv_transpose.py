"""bn_into_conv_transpose: the output channel is axis 1 of the weight, per group."""

import numpy as np
import pytest
from onnx import helper

from conftest import assert_folds, assert_kept, bn_node, make_model, tensor, value_info


def deconv_bn_model(rng, *, spatial=2, cin=4, cout_per_group=3, groups=1, bias=True, dtype=np.float32):
    cout = cout_per_group * groups
    k = [3] * spatial
    inits = [tensor("W", rng.normal(0, 0.5, [cin, cout_per_group, *k]).astype(dtype))]
    inputs = ["x", "W"]
    if bias:
        inits.append(tensor("b", rng.normal(0, 1, cout).astype(dtype)))
        inputs.append("b")
    nodes = [
        helper.make_node("ConvTranspose", inputs, ["c"], name="deconv", group=groups, strides=[2] * spatial),
        bn_node(inits, "c", "y", rng, cout, dtype, name="bn"),
    ]
    out = [2, cout, *([9] * spatial)]
    return make_model(nodes, [value_info("x", dtype, [2, cin, *([4] * spatial)])], [value_info("y", dtype, out)], inits)


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("groups,cin,per_group", [(1, 4, 3), (2, 4, 3), (4, 4, 1), (4, 4, 2)], ids=["g1", "g2", "depthwise", "depthwise_x2"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_bn_into_conv_transpose_groups_folds(rng, spatial, groups, cin, per_group, bias):
    model = deconv_bn_model(rng, spatial=spatial, cin=cin, cout_per_group=per_group, groups=groups, bias=bias)
    result = assert_folds(model, rng, expect_left=0)
    assert result.report.folded[0].rule == "bn_into_conv_transpose"


def test_bn_into_conv_transpose_float64_folds(rng):
    # onnxruntime has no float64 ConvTranspose on CPU and onnx's reference evaluator mishandles
    # group > 1 for it, so float64 is checked with one group.
    assert_folds(deconv_bn_model(rng, groups=1, dtype=np.float64), rng, expect_left=0)


def test_bn_into_conv_transpose_axis0_scaling_would_be_wrong(rng):
    """Regression guard: scaling axis 0 (as for Conv) instead of axis 1 per group changes outputs."""
    from bnfold import algebra

    w = rng.normal(size=(4, 3, 2, 2))
    s = rng.uniform(0.5, 2, 6)
    right = algebra.scale_along_axis(w, s, axis=1, groups=2)
    for g in range(2):
        for j in range(3):
            np.testing.assert_allclose(right[g * 2:(g + 1) * 2, j], w[g * 2:(g + 1) * 2, j] * s[g * 3 + j])


def test_bn_into_conv_transpose_channel_mismatch_kept(rng):
    model = deconv_bn_model(rng, groups=2)
    # A weight that claims 2 channels per group while BN has 6: refuse, don't guess.
    w = next(t for t in model.graph.initializer if t.name == "W")
    w.CopyFrom(tensor("W", rng.normal(size=(4, 2, 3, 3)).astype(np.float32)))
    assert_kept(model, "channel mismatch")
