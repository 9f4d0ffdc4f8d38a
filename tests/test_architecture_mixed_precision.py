"""A mixed-precision network: float16 activations and weights, BatchNormalization-15 statistics
kept in float32 (as mixed-precision exporters and converters leave them). The fold computes in
float64 from the float32 statistics and writes float16 weights; the result is a valid model that
matches the original within float16 tolerance."""

import numpy as np
import onnx
from onnx import helper

from conftest import assert_folds, bn_stats, run_auto, tensor, make_model, value_info

F16 = np.float16


def conv(inits, rng, name, x, cin, cout, kernel=3, stride=1, groups=1):
    weight = rng.normal(0, (2 / (cin // groups * kernel * kernel)) ** 0.5, [cout, cin // groups, kernel, kernel])
    inits.append(tensor(f"{name}_W", weight.astype(F16)))
    pad = kernel // 2
    return helper.make_node("Conv", [x, f"{name}_W"], [name], name=name, pads=[pad] * 4, strides=[stride] * 2, group=groups)


def bn32(inits, rng, name, x, channels):
    """BN-15 with float16 data and float32 scale/B/mean/var."""
    names = [f"{name}_{p}" for p in ("scale", "B", "mean", "var")]
    inits += [tensor(n, v) for n, v in zip(names, bn_stats(rng, channels, np.float32))]
    return helper.make_node("BatchNormalization", [x, *names], [name], name=name)


def mixed_precision_resnet(rng):
    """Stem Conv-BN-Relu, two residual blocks (one depthwise), pool, Gemm -> BN1d: 6 BN, all foldable."""
    inits, nodes = [], []

    def conv_bn(name, x, cin, cout, relu=True, **kw):
        nodes.extend([conv(inits, rng, f"{name}_conv", x, cin, cout, **kw), bn32(inits, rng, f"{name}_bn", f"{name}_conv", cout)])
        if not relu:
            return f"{name}_bn"
        nodes.append(helper.make_node("Relu", [f"{name}_bn"], [f"{name}_relu"], name=f"{name}_relu"))
        return f"{name}_relu"

    x = conv_bn("stem", "input", 3, 8)
    for block, groups in (("b1", 1), ("b2", 8)):
        y = conv_bn(f"{block}a", x, 8, 8, groups=groups)
        y = conv_bn(f"{block}b", y, 8, 8, relu=False)
        nodes.append(helper.make_node("Add", [x, y], [f"{block}_sum"], name=f"{block}_add"))
        nodes.append(helper.make_node("Relu", [f"{block}_sum"], [f"{block}_out"], name=f"{block}_out"))
        x = f"{block}_out"
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_W", "fc_b"], ["fc"], name="fc", transB=1),
        bn32(inits, rng, "head_bn", "fc", 10),
    ]
    inits += [tensor("fc_W", rng.normal(0, 0.3, [10, 8]).astype(F16)), tensor("fc_b", rng.normal(0, 0.1, 10).astype(F16))]
    return make_model(
        nodes, [value_info("input", F16, ["batch", 3, 16, 16])], [value_info("head_bn", F16, ["batch", 10])], inits, opset=15,
    )


def test_architecture_mixed_precision_folds_to_zero_bn_in_float16(rng):
    model = mixed_precision_resnet(rng)
    result = assert_folds(model, rng, expect_left=0, engine=run_auto, dims={"batch": 3}, rel=1e-2)
    for init in result.model.graph.initializer:  # every folded weight and bias is float16
        assert init.data_type == onnx.TensorProto.FLOAT16, init.name
