"""Quantized graphs: BN folds into a weight a DequantizeLinear makes, exactly, or is kept with why.

Each model is built by hand with onnx.helper or by onnxruntime's own quantizer (QDQ format, per
channel and per tensor). A fold must verify in onnxruntime (optimisations off) against the
unfolded quantized original, and the integers it writes are checked exactly against what the
paper's transform demands: the weight's scale takes |BN scale| per output channel, its integers
stay, negated about the zero point on channels where BN's scale is negative.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.verify import generate_inputs
from test_cli import invoke

C, K = 8, 4  # output, input channels


def bn_params(rng, channels: int, negative: bool):
    scale = rng.uniform(0.5, 1.5, channels) * (np.where(np.arange(channels) % 3 == 0, -1.0, 1.0) if negative else 1.0)
    return [scale, rng.normal(0, 0.1, channels), rng.normal(0, 0.1, channels), rng.uniform(0.5, 2, channels)]


def quantized_conv_bn(rng, *, source="stored", negative=False, per_channel=True, opset=17, zero_point=0,
                      dtype=np.int8, low_end=False, bias=None):
    """x -> Conv(W from DequantizeLinear 'dq') -> BN 'bn' -> y. `source`: "stored" (integer
    initializer 'Wq') or "fake" (QuantizeLinear 'q' over the float initializer 'W'). `bias`:
    None, "float" or "int32" (through DequantizeLinear 'dq_b', scale = x scale * weight scale)."""
    w = rng.normal(0, 0.3, [C, K, 3, 3]).astype(np.float32)
    info = np.iinfo(dtype)
    levels = (info.max - zero_point) if zero_point >= 0 else info.max
    if per_channel:
        ws = (np.abs(w).reshape(C, -1).max(axis=1) / levels).astype(np.float32)
        zp = np.full(C, zero_point, dtype)
    else:
        ws, zp = np.float32(np.abs(w).max() / levels), np.array(zero_point, dtype)
    axis = {"axis": 0} if per_channel and opset >= 13 else {}
    shaped = ws.reshape(-1, 1, 1, 1) if per_channel else ws
    q = np.clip(np.rint(w / shaped) + zero_point, info.min, info.max).astype(dtype)
    if low_end:
        q[0, 0, 0, 0] = info.min  # channel 0 has a negative BN scale when `negative`
    inits = [numpy_helper.from_array(np.asarray(ws), "ws"), numpy_helper.from_array(zp, "wzp")]
    nodes = []
    if source == "stored":
        inits.append(numpy_helper.from_array(q, "Wq"))
    else:
        inits.append(numpy_helper.from_array(((q.astype(np.float32) - zero_point) * shaped).astype(np.float32), "W"))
        nodes.append(helper.make_node("QuantizeLinear", ["W", "ws", "wzp"], ["Wq"], name="q", **axis))
    nodes.append(helper.make_node("DequantizeLinear", ["Wq", "ws", "wzp"], ["Wd"], name="dq", **axis))
    conv_inputs = ["x", "Wd"]
    if bias == "float":
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, C).astype(np.float32), "B"))
        conv_inputs.append("B")
    elif bias == "int32":
        bias_scale = (np.float32(0.02) * np.broadcast_to(ws, (C,))).astype(np.float32)
        inits += [numpy_helper.from_array(rng.integers(-2000, 2000, C).astype(np.int32), "Bq"),
                  numpy_helper.from_array(bias_scale if per_channel else bias_scale[:1].reshape(()), "bs")]
        nodes.append(helper.make_node("DequantizeLinear", ["Bq", "bs"], ["Bd"], name="dq_b", **axis))
        conv_inputs.append("Bd")
    names = ["bn_scale", "bn_B", "bn_mean", "bn_var"]
    inits += [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(names, bn_params(rng, C, negative))]
    nodes += [helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1]),
              helper.make_node("BatchNormalization", ["c", *names], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "qconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def fold_and_verify(tmp_path, model, name="m"):
    src = tmp_path / f"{name}.onnx"
    onnx.save(model, src)
    result = bnfold.fold_file(src)
    return src, result


def initializers(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def dq_inputs(model, dq_name="dq"):
    """(integers, scale, zero point, axis) a DequantizeLinear reads, QuantizeLinear's integers computed."""
    values = initializers(model)
    nodes = {n.name: n for n in model.graph.node}
    dq = nodes[dq_name]
    axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
    scale, zp = values[dq.input[1]], values[dq.input[2]]
    if dq.input[0] in values:
        ints = values[dq.input[0]].astype(np.int64)
    else:  # fake-quantized: what QuantizeLinear computes from W (round half to even, float32)
        q = next(n for n in model.graph.node if n.output[0] == dq.input[0])
        w = values[q.input[0]]
        shaped = scale.reshape(-1, 1, 1, 1) if scale.size > 1 else scale
        info = np.iinfo(zp.dtype)
        ints = np.clip(np.rint(w / shaped) + zp.astype(np.int64).reshape(shaped.shape), info.min, info.max)
    return ints, scale, zp, axis


CASES = [
    pytest.param(dict(source=source, negative=negative, per_channel=pc), id=f"{source}-{'neg' if negative else 'pos'}-{'pc' if pc else 'pt'}")
    for source in ("stored", "fake") for negative in (False, True) for pc in (True, False)
]


@pytest.mark.parametrize("case", CASES)
def test_quantized_weight_folded_exactly(tmp_path, rng, case):
    model = quantized_conv_bn(rng, **case)
    src, result = fold_and_verify(tmp_path, model)
    assert result.report.bn_after == 0 and result.report.folded[0].quantized
    assert result.verification.status == "passed"
    folded = onnx.load(result.path)
    assert [n.op_type for n in folded.graph.node if n.op_type in ("DequantizeLinear", "Conv")] == ["DequantizeLinear", "Conv"]
    old_ints, old_scale, old_zp, _ = dq_inputs(model)
    new_ints, new_scale, new_zp, axis = dq_inputs(folded)
    values = initializers(model)
    gamma, var = values["bn_scale"].astype(np.float64), values["bn_var"].astype(np.float64)
    s = gamma / np.sqrt(var + np.float64(np.float32(1e-5)))
    # the scale took |s| per output channel (a per-tensor one became per-channel, axis 0)
    assert axis == 0 and new_scale.shape == (C,)
    np.testing.assert_array_equal(new_scale, (np.broadcast_to(old_scale.astype(np.float64), (C,)) * np.abs(s)).astype(np.float32))
    # the integers: unchanged, negated (about the zero point 0) where s < 0
    expected = np.where((s < 0).reshape(-1, 1, 1, 1), -old_ints, old_ints)
    np.testing.assert_array_equal(new_ints, expected)
    np.testing.assert_array_equal(new_zp, np.broadcast_to(old_zp, (C,)))
    assert bnfold.verify(src, result.path).status == "passed"


def test_quantized_weight_wrong_scale_fails_verification(tmp_path, rng):
    """The comparison can fail: the folded scale of one channel 1% off is caught."""
    model = quantized_conv_bn(rng, negative=True)
    src, result = fold_and_verify(tmp_path, model)
    folded = onnx.load(result.path)
    dq = next(n for n in folded.graph.node if n.name == "dq")
    scale = next(t for t in folded.graph.initializer if t.name == dq.input[1])
    value = numpy_helper.to_array(scale).copy()
    value[2] *= 1.01
    scale.CopyFrom(numpy_helper.from_array(value, scale.name))
    wrong = tmp_path / "wrong.onnx"
    onnx.save(folded, wrong)
    assert bnfold.verify(src, wrong).status == "failed"


def test_negative_scale_on_int8_low_end_kept(tmp_path, rng):
    model = quantized_conv_bn(rng, negative=True, low_end=True)
    _, result = fold_and_verify(tmp_path, model)
    (kept,) = result.report.kept
    assert "negative on channel 0" in kept.reason and "cannot be negated within int8" in kept.reason


def test_asymmetric_uint8_negation_in_range_folded_out_of_range_kept(tmp_path, rng):
    """uint8 with zero point 128: 2*128 - q stays in [0, 255] unless q is 0 (the range's low end)."""
    inside = quantized_conv_bn(rng, negative=True, dtype=np.uint8, zero_point=128)
    _, result = fold_and_verify(tmp_path, inside, "inside")
    ints, _, _, _ = dq_inputs(inside)
    if (ints[0] == 0).any():  # the premise of the first half
        pytest.skip("random weights reached the low end")
    assert result.report.bn_after == 0 and result.verification.status == "passed"
    outside = quantized_conv_bn(rng, negative=True, dtype=np.uint8, zero_point=128, low_end=True)
    _, result = fold_and_verify(tmp_path, outside, "outside")
    assert "cannot be negated within uint8" in result.report.kept[0].reason


@pytest.mark.parametrize("per_channel", [True, False])
def test_int32_bias_quantized_again_rounding_stated(tmp_path, rng, per_channel):
    model = quantized_conv_bn(rng, negative=True, per_channel=per_channel, bias="int32")
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    data = json.loads(invoke([src, "--json"], 0).stdout)
    (fold,) = data["folded"]
    assert fold["quantized"] and 0 <= fold["bias_rounding_steps"] <= 0.5
    assert data["verification"]["status"] == "passed"
    folded = onnx.load(tmp_path / "m.folded.onnx")
    values = initializers(folded)
    dq_b = next(n for n in folded.graph.node if n.name == "dq_b")
    assert values[dq_b.input[0]].dtype == np.int32
    # the bias scale took |s| as the weight's did, so scale(bias) = scale(x) * scale(weight) still holds
    ws = values[next(n for n in folded.graph.node if n.name == "dq").input[1]].astype(np.float64)
    np.testing.assert_allclose(values[dq_b.input[1]], 0.02 * ws, rtol=1e-6)


def test_shared_dequantize_copied_not_mutated(tmp_path, rng):
    """One DequantizeLinear feeds two Convs: one folds BN, the other has none; the other keeps
    reading the original integers and scale."""
    model = quantized_conv_bn(rng, negative=True)
    graph = model.graph
    graph.node.append(helper.make_node("Conv", ["x", "Wd"], ["c2"], name="conv2", pads=[1, 1, 1, 1]))
    graph.output.append(helper.make_tensor_value_info("c2", TensorProto.FLOAT, [1, C, 6, 6]))
    src, result = fold_and_verify(tmp_path, model)
    assert result.report.bn_after == 0 and result.verification.status == "passed"
    folded = onnx.load(result.path)
    nodes = {n.name: n for n in folded.graph.node}
    assert nodes["conv2"].input[1] == "Wd" and nodes["dq"].output[0] == "Wd"
    assert nodes["conv"].input[1] != "Wd"
    old, new = initializers(model), initializers(folded)
    for position, name in enumerate(nodes["dq"].input):
        np.testing.assert_array_equal(new[name], old[model.graph.node[0].input[position]])


def test_backward_fold_into_quantized_weight_kept(tmp_path, rng):
    """BN -> Conv(quantized W): the BN would scale W's input channels; kept, saying what to do."""
    model = quantized_conv_bn(rng)
    graph = model.graph
    bn = graph.node[-1]
    conv = graph.node[-2]
    graph.node.remove(bn)
    graph.node.remove(conv)
    names = ["p_scale", "p_B", "p_mean", "p_var"]
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(names, bn_params(rng, K, False)))
    graph.node.extend([helper.make_node("BatchNormalization", ["x", *names], ["n"], name="pre_bn"),
                       helper.make_node("Conv", ["n", "Wd"], ["y"], name="conv", pads=[1, 1, 1, 1])])
    _, result = fold_and_verify(tmp_path, model)
    (kept,) = result.report.kept
    assert "is quantized (DequantizeLinear 'dq')" in kept.reason and "run bnfold on the float model, then quantize" in kept.reason


def test_opset_10_per_tensor_kept_without_per_channel_scales(tmp_path, rng):
    model = quantized_conv_bn(rng, per_channel=False, opset=10)
    _, result = fold_and_verify(tmp_path, model)
    assert "of opset 10, which has no per-channel scales" in result.report.kept[0].reason


def test_blocked_quantization_kept(tmp_path, rng):
    model = quantized_conv_bn(rng, opset=21)
    dq = next(n for n in model.graph.node if n.name == "dq")
    dq.attribute.append(helper.make_attribute("block_size", 4))
    _, result = fold_and_verify(tmp_path, model)
    assert "blocked (block_size 4)" in result.report.kept[0].reason


def test_quantized_matmul_weight_per_column(tmp_path, rng):
    """Linear -> BN head: MatMul weight [K, N] quantized per column (axis 1)."""
    w = rng.normal(0, 0.3, [16, C]).astype(np.float32)
    ws = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    q = np.clip(np.rint(w / ws), -127, 127).astype(np.int8)
    names = ["bn_scale", "bn_B", "bn_mean", "bn_var"]
    inits = [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(ws, "ws"), numpy_helper.from_array(np.zeros(C, np.int8), "wzp")]
    inits += [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(names, bn_params(rng, C, True))]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "ws", "wzp"], ["Wd"], name="dq", axis=1),
             helper.make_node("MatMul", ["x", "Wd"], ["m"], name="fc"),
             helper.make_node("BatchNormalization", ["m", *names], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, C])], inits)
    _, result = fold_and_verify(tmp_path, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert result.report.bn_after == 0 and result.report.folded[0].quantized
    assert result.verification.status == "passed"


# --------------------------------------------------------------------------- onnxruntime's quantizer


def float_conv_bn_relu(rng, blocks: int = 2, channels: int = C, size: int = 8, he_init: bool = False) -> onnx.ModelProto:
    """`blocks` x Conv 3x3 (bias) -> BN (scale of both signs) -> Relu on `channels` channels;
    weights N(0, 0.3), or N(0, 2 / fan-in) with `he_init` (values keep their scale with depth)."""
    inits, nodes, x, cin = [], [], "x", 3
    for i in range(blocks):
        std = (2 / (cin * 9)) ** 0.5 if he_init else 0.3
        inits += [numpy_helper.from_array(rng.normal(0, std, [channels, cin, 3, 3]).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), f"B{i}")]
        names = [f"bn{i}_{n}" for n in ("scale", "B", "mean", "var")]
        inits += [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(names, bn_params(rng, channels, True))]
        nodes += [helper.make_node("Conv", [x, f"W{i}", f"B{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{i}", *names], [f"n{i}"], name=f"bn{i}"),
                  helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}")]
        x, cin = f"r{i}", channels
    graph = helper.make_graph(nodes, "float", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def ort_quantized(tmp_path, rng, per_channel: bool, weights_only: bool, activations: str = "QUInt8", **model):
    """onnxruntime's quantize_static (QDQ) of float_conv_bn_relu(rng, **model): every Conv's
    input activation quantized (`activations` type), its weight int8, its bias int32; with
    `weights_only` the Conv outputs are left float."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    src, dst = tmp_path / "float.onnx", tmp_path / "quantized.onnx"
    float_model = float_conv_bn_relu(rng, **model)
    onnx.save(float_model, src)
    size = float_model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    batches = iter([{"x": rng.normal(size=[1, 3, size, size]).astype(np.float32)} for _ in range(4)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    extra = {"OpTypesToExcludeOutputQuantization": ["Conv"]} if weights_only else {}
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    weight_type=QuantType.QInt8, activation_type=getattr(QuantType, activations),
                    op_types_to_quantize=["Conv"], extra_options=extra)
    return dst


@pytest.mark.parametrize("per_channel", [True, False])
def test_onnxruntime_quantize_static_weights_folded(tmp_path, rng, per_channel):
    """QDQ weights (int8, per channel or per tensor) and int32 biases; Conv outputs left float."""
    src = ort_quantized(tmp_path, rng, per_channel, weights_only=True)
    check = invoke(["check", src], 1)  # foldable BN left: CI fails
    assert check.stderr.count("(bn_into_conv, into its quantized weight)") == 2
    summary = invoke([src, "-o", tmp_path / "summary.onnx"], 0).stderr
    assert "into quantized weights: 2 BN" in summary and "2 int32 biases quantized again" in summary
    data = json.loads(invoke([src, "--json"], 0).stdout)
    assert data["bn_after"] == 0 and all(f["quantized"] for f in data["folded"])
    assert data["verification"]["status"] == "passed" and data["verification"]["sites_compared"] == 2
    folded = onnx.load(tmp_path / "quantized.folded.onnx")
    ops = [n.op_type for n in folded.graph.node]
    assert "BatchNormalization" not in ops and ops.count("DequantizeLinear") >= 4  # still quantized
    # independently of bnfold's verification: the same outputs in onnxruntime
    from conftest import run_ort

    feeds = generate_inputs(src)
    np.testing.assert_allclose(run_ort(folded, feeds)[0], run_ort(onnx.load(src), feeds)[0], rtol=1e-4, atol=1e-4)


def test_onnxruntime_quantize_static_activations_kept_with_advice(tmp_path, rng):
    """Conv -> Q -> DQ -> BN: no exact fold exists; each BN is kept, telling what to do instead."""
    src = ort_quantized(tmp_path, rng, per_channel=True, weights_only=False)
    result = invoke(["check", src], 0)  # nothing foldable: check passes
    assert result.stderr.count("an activation QuantizeLinear/DequantizeLinear pair lies between Conv") >= 2
    assert "fold before quantizing: run bnfold on the float model, then quantize" in result.stderr


@pytest.mark.parametrize("opset", [13, 19, 21])
@pytest.mark.parametrize("source", ["stored", "fake"])
def test_quantized_weight_folded_across_opsets(tmp_path, rng, opset, source):
    model = quantized_conv_bn(rng, source=source, negative=True, per_channel=False, opset=opset)
    _, result = fold_and_verify(tmp_path, model)
    assert result.report.bn_after == 0 and result.verification.status == "passed"


def test_fake_quantized_weights_on_half_steps_kept_when_one_would_move(tmp_path, rng):
    """W exactly between two integers: W' / scale' can land on the other side of the half step
    in float32, so QuantizeLinear would give another integer. Such a fold is not exact: kept."""
    model = quantized_conv_bn(rng, source="fake", negative=True)
    values = initializers(model)
    ws = values["ws"].reshape(-1, 1, 1, 1)
    w = ((np.rint(values["W"] / ws) + 0.5) * ws).astype(np.float32)  # every weight on a half step
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "W"))
    model.graph.initializer.append(numpy_helper.from_array(w, "W"))
    _, result = fold_and_verify(tmp_path, model)
    # count the moves independently: QuantizeLinear of the folded W against the negated originals
    gamma, var = values["bn_scale"].astype(np.float64), values["bn_var"].astype(np.float64)
    s = gamma / np.sqrt(var + np.float64(np.float32(1e-5)))
    new_w = (w.astype(np.float64) * s.reshape(-1, 1, 1, 1)).astype(np.float32)
    new_scale = (ws.astype(np.float64) * np.abs(s).reshape(-1, 1, 1, 1)).astype(np.float32)
    old_q = np.clip(np.rint(w / ws), -128, 127)
    new_q = np.clip(np.rint(new_w / new_scale), -128, 127)
    moved = int(np.count_nonzero(new_q != np.where((s < 0).reshape(-1, 1, 1, 1), -old_q, old_q)))
    assert moved, "the premise: some half-step weights round the other way after the fold"
    assert f"{moved} quantized weights would move by a step" in result.report.kept[0].reason


@pytest.mark.parametrize("dtype,zero_point", [(np.int16, 0), (np.uint16, 2**15), (np.uint8, 128)])
def test_quantized_weight_other_integer_types(tmp_path, rng, dtype, zero_point):
    model = quantized_conv_bn(rng, negative=True, dtype=dtype, zero_point=zero_point, opset=21)
    _, result = fold_and_verify(tmp_path, model)
    assert result.report.bn_after == 0 and result.verification.status == "passed"
    new_ints, _, new_zp, _ = dq_inputs(onnx.load(result.path))
    assert new_zp.dtype == dtype and new_ints.min() >= np.iinfo(dtype).min and new_ints.max() <= np.iinfo(dtype).max


def test_quantized_weight_int4(tmp_path, rng):
    """int4 weights (DequantizeLinear-21): negated channels stay int4."""
    model = quantized_conv_bn(rng, negative=True, opset=21)
    values = initializers(model)
    q = np.clip(values["Wq"] // 16, -7, 7).astype(np.int8)
    for name in ("Wq", "wzp"):
        model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == name))
    model.graph.initializer.extend([helper.make_tensor("Wq", TensorProto.INT4, q.shape, q.flatten().tolist()),
                                    helper.make_tensor("wzp", TensorProto.INT4, [C], [0] * C)])
    _, result = fold_and_verify(tmp_path, model)
    assert result.report.bn_after == 0 and result.verification.status == "passed"
    folded = onnx.load(result.path)
    dq = next(n for n in folded.graph.node if n.name == "dq")
    stored = next(t for t in folded.graph.initializer if t.name == dq.input[0])
    assert stored.data_type == TensorProto.INT4


@pytest.mark.parametrize("trans_b", [0, 1])
def test_quantized_gemm_weight_per_tensor_becomes_per_column(tmp_path, rng, trans_b):
    w = rng.normal(0, 0.3, [C, 16] if trans_b else [16, C]).astype(np.float32)
    ws = np.float32(np.abs(w).max() / 127)
    q = np.clip(np.rint(w / ws), -127, 127).astype(np.int8)
    names = ["bn_scale", "bn_B", "bn_mean", "bn_var"]
    inits = [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(np.asarray(ws), "ws"),
             numpy_helper.from_array(np.array(0, np.int8), "wzp"), numpy_helper.from_array(rng.normal(size=C).astype(np.float32), "C")]
    inits += [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(names, bn_params(rng, C, True))]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "ws", "wzp"], ["Wd"], name="dq"),
             helper.make_node("Gemm", ["x", "Wd", "C"], ["g"], name="fc", transB=trans_b, beta=0.5),
             helper.make_node("BatchNormalization", ["g", *names], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, C])], inits)
    _, result = fold_and_verify(tmp_path, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert result.report.bn_after == 0 and result.report.folded[0].quantized
    assert result.verification.status == "passed"
    dq = next(n for n in onnx.load(result.path).graph.node if n.name == "dq")
    assert [a.i for a in dq.attribute if a.name == "axis"] == [0 if trans_b else 1]


# --------------------------------------------------------------------------- quantized activations pinned


def qdq_chain(tmp_path, rng):
    """Four Conv -> BN -> Relu blocks of 16 channels at 16x16 through quantize_static: int8
    activations before every Conv, int8 weights per channel, int32 biases, Conv outputs float."""
    return ort_quantized(tmp_path, rng, True, True, activations="QInt8", blocks=4, channels=16, size=16, he_init=True)


def test_quantized_activations_pinned_so_rounding_flips_do_not_undo_folds(tmp_path, rng):
    """Rescaled weight scales and re-quantized biases change a Conv's float output within
    rounding, which flips some of the next activation QuantizeLinear's integers; unpinned,
    every fold failed verification and was undone. Pinned, all fold and verify."""
    src = qdq_chain(tmp_path, rng)
    result = bnfold.fold_file(src)
    assert result.report.bn_after == 0 and result.report.rolled_back == ()
    verification = result.verification
    assert verification.status == "passed" and verification.count("site") == 4
    assert "4 quantized activations pinned" in verification.note
    # the premise: without pinning the folded model's output differs past the plain bound
    from conftest import run_ort

    feeds = generate_inputs(src)
    (ours,), (theirs,) = run_ort(onnx.load(result.path), feeds), run_ort(onnx.load(src), feeds)
    assert np.abs(ours - theirs).max() > 1e-4 * np.abs(theirs).max(), "no flip: the test proves nothing"


def test_quantized_activations_pinned_wrong_fold_still_fails(tmp_path, rng):
    src = qdq_chain(tmp_path, rng)
    result = bnfold.fold_file(src)
    folded = onnx.load(result.path)
    conv = next(n for n in folded.graph.node if n.name == "conv2")
    dq = next(n for n in folded.graph.node if n.output[0] == conv.input[1])
    scale = next(t for t in folded.graph.initializer if t.name == dq.input[1])
    value = numpy_helper.to_array(scale).copy()
    value[0] *= 1.01
    scale.CopyFrom(numpy_helper.from_array(value, scale.name))
    wrong = tmp_path / "wrong.onnx"
    onnx.save(folded, wrong)
    verification = bnfold.verify(src, wrong)
    assert verification.status == "failed"
    assert any(c.output == "n2" and not c.passed for c in verification.checks)  # bn2's fold site
    assert not any(c.output in ("n0", "n1") and not c.passed for c in verification.checks)


def test_tensorrt_style_qat_chain_folds(tmp_path, rng):
    """What quantization-aware training exports for TensorRT: every Conv input through an
    activation Q/DQ pair, every weight a fake-quantized float (Q/DQ over W, per channel), Conv ->
    BN -> Relu in float. Each BN folds into its fake-quantized weight; activations are pinned,
    the weights' QuantizeLinear are not (the folds change them)."""
    inits, nodes, x, cin = [], [], "x", K
    for i in range(3):
        w = rng.normal(0, 0.3, [C, cin, 3, 3]).astype(np.float32)
        ws = (np.abs(w).reshape(C, -1).max(axis=1) / 127).astype(np.float32)
        names = [f"bn{i}_{n}" for n in ("scale", "B", "mean", "var")]
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(ws, f"ws{i}"),
                  numpy_helper.from_array(np.zeros(C, np.int8), f"wz{i}"),
                  numpy_helper.from_array(np.float32(0.05 if i else 0.02), f"as{i}"), numpy_helper.from_array(np.int8(0), f"az{i}")]
        inits += [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(names, bn_params(rng, C, True))]
        nodes += [helper.make_node("QuantizeLinear", [x, f"as{i}", f"az{i}"], [f"xq{i}"]),
                  helper.make_node("DequantizeLinear", [f"xq{i}", f"as{i}", f"az{i}"], [f"xd{i}"]),
                  helper.make_node("QuantizeLinear", [f"W{i}", f"ws{i}", f"wz{i}"], [f"wq{i}"], axis=0),
                  helper.make_node("DequantizeLinear", [f"wq{i}", f"ws{i}", f"wz{i}"], [f"wd{i}"], axis=0),
                  helper.make_node("Conv", [f"xd{i}", f"wd{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{i}", *names], [f"n{i}"], name=f"bn{i}"),
                  helper.make_node("Relu", [f"n{i}"], [f"r{i}"])]
        x, cin = f"r{i}", C
    graph = helper.make_graph(nodes, "qat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K, 12, 12])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, C, 12, 12])], inits)
    _, result = fold_and_verify(tmp_path, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert result.report.bn_after == 0 and all(f.quantized for f in result.report.folded)
    assert result.verification.status == "passed" and "3 quantized activations pinned" in result.verification.note


def test_quantized_conv_transpose_weight_per_output_channel(tmp_path, rng):
    """ConvTranspose weight [C_in, C_out, k, k] quantized per output channel (axis 1)."""
    w = rng.normal(0, 0.3, [K, C, 3, 3]).astype(np.float32)
    ws = (np.abs(w).max(axis=(0, 2, 3)) / 127).astype(np.float32)
    q = np.clip(np.rint(w / ws.reshape(1, -1, 1, 1)), -127, 127).astype(np.int8)
    names = ["bn_scale", "bn_B", "bn_mean", "bn_var"]
    inits = [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(ws, "ws"), numpy_helper.from_array(np.zeros(C, np.int8), "wzp")]
    inits += [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(names, bn_params(rng, C, True))]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "ws", "wzp"], ["Wd"], name="dq", axis=1),
             helper.make_node("ConvTranspose", ["x", "Wd"], ["d"], name="deconv", strides=[2, 2]),
             helper.make_node("BatchNormalization", ["d", *names], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "up", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 11, 11])], inits)
    _, result = fold_and_verify(tmp_path, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert result.report.bn_after == 0 and result.report.folded[0].quantized
    assert result.verification.status == "passed"
