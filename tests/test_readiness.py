"""Quantization readiness (bnfold/readiness.py): per-channel weight spread of folded layers and
subnormals flushed from what a fold writes, in the report, the JSON and the CLI summary."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnfold
from bnfold import readiness
from bnfold.readiness import THRESHOLD, channel_maxima, channel_spread, flush_subnormals
from conftest import assert_same_outputs, make_model, tensor, value_info
from test_cli import invoke

EPS = 1e-5
SUBNORMAL_F32 = 2.0**-126  # float32's smallest normal magnitude


def unit_channels(rng, shape, axis: int = 0) -> np.ndarray:
    """Random float32 weights whose every output channel (on `axis`) has max|W| exactly 1."""
    w = rng.uniform(-1, 1, shape)
    maxima = np.abs(w).max(axis=tuple(a for a in range(len(shape)) if a != axis), keepdims=True)
    return (w / maxima).astype(np.float32)


def bn_inits(prefix: str, gamma, var, beta=None, mean=None) -> list[onnx.TensorProto]:
    c = len(gamma)
    values = (gamma, np.zeros(c) if beta is None else beta, np.zeros(c) if mean is None else mean, var)
    return [tensor(f"{prefix}_{p}", np.asarray(v, np.float32)) for p, v in zip(("scale", "B", "mean", "var"), values)]


def bn(prefix: str, x: str, y: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, *(f"{prefix}_{p}" for p in ("scale", "B", "mean", "var"))], [y],
                            name=prefix, epsilon=EPS)


def conv_bn(rng, var, gamma=None, weight=None) -> onnx.ModelProto:
    """x [1, 3, 6, 6] -> Conv 'conv' (W [4, 3, 3, 3], each channel's max|W| 1) -> BN 'bn'."""
    weight = unit_channels(rng, [4, 3, 3, 3]) if weight is None else weight
    gamma = np.ones(4) if gamma is None else gamma
    inits = [tensor("W", weight), tensor("B", rng.normal(0, 1, 4).astype(np.float32)), *bn_inits("bn", gamma, var)]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn("bn", "c", "y")]
    return make_model(nodes, [value_info("x", np.float32, [1, 3, 6, 6])], [value_info("y", np.float32, [1, 4, 6, 6])], inits)


def layer_weight(model: onnx.ModelProto, layer: str) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == layer)
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[1]))


def numpy_spread(weight: np.ndarray, axis: int) -> float:
    """max|W| per output channel on `axis`, largest / smallest nonzero: the report's ratio by hand."""
    maxima = np.abs(np.moveaxis(weight.astype(np.float64), axis, 0)).reshape(weight.shape[axis], -1).max(axis=1)
    maxima = maxima[maxima > 0]
    return float(maxima.max() / maxima.min())


# A running variance of 1e-8 makes scale 1 / sqrt(1e-8 + 1e-5) ~ 316 on that channel, the others
# ~1: over the threshold of 100 after the fold, where the weight itself spreads by exactly 1.
TINY_VAR = [1.0, 1.0, 1.0, 1e-8]


def test_conv_tiny_running_variance_spread_reported_as_folded_weight_computes(rng):
    model = conv_bn(rng, TINY_VAR)
    assert numpy_spread(layer_weight(model, "conv"), 0) == pytest.approx(1.0)
    result = bnfold.fold(model)
    assert result.report.bn_after == 0
    (spread,) = result.report.channel_spread
    expected = numpy_spread(layer_weight(result.model, "conv"), 0)
    assert expected > THRESHOLD
    assert (spread.layer, spread.graph, spread.channels, spread.zero_channels) == ("conv", "", 4, 0)
    assert spread.ratio == pytest.approx(expected, rel=1e-12)
    assert spread.ratio == pytest.approx(1 / np.sqrt(1e-8 + EPS) * np.sqrt(1 + EPS), rel=1e-6)
    data = result.report.to_dict()
    assert data["channel_spread"]["threshold"] == THRESHOLD
    assert data["channel_spread"]["layers"] == [
        {"layer": "conv", "graph": "", "ratio": pytest.approx(expected, rel=1e-5), "channels": 4, "zero_channels": 0}
    ]
    assert data["subnormals_flushed"] == 0


def test_conv_ordinary_statistics_below_threshold_nothing_reported(rng):
    result = bnfold.fold(conv_bn(rng, rng.uniform(0.5, 2.0, 4), gamma=rng.uniform(0.5, 2.0, 4)))
    assert result.report.bn_after == 0
    assert numpy_spread(layer_weight(result.model, "conv"), 0) < THRESHOLD
    assert result.report.channel_spread == ()
    assert result.report.to_dict()["channel_spread"]["layers"] == []


def test_layer_folded_twice_spread_is_of_its_final_weight(rng):
    """BN0 -> Conv -> BN1: the Conv's weight is written by the backward fold and again by the
    forward one; the spread is the final weight's, not either fold's alone."""
    weight = unit_channels(rng, [4, 3, 1, 1])
    inits = [tensor("W", weight), *bn_inits("bn0", [1.0, 1.0, 1.0], [1.0, 1e-8, 1.0]),
             *bn_inits("bn1", np.ones(4), TINY_VAR)]
    nodes = [bn("bn0", "x", "n"), helper.make_node("Conv", ["n", "W"], ["c"], name="conv"), bn("bn1", "c", "y")]
    model = make_model(nodes, [value_info("x", np.float32, [1, 3, 5, 5])], [value_info("y", np.float32, [1, 4, 5, 5])], inits)
    result = bnfold.fold(model)
    assert {f.rule for f in result.report.folded} == {"bn_into_conv", "bn_into_next_conv"}
    final = numpy_spread(layer_weight(result.model, "conv"), 0)
    alone = [numpy_spread(layer_weight(bnfold.fold(model, rules=[r]).model, "conv"), 0) for r in ("bn_into_conv", "bn_into_next_conv")]
    assert all(abs(final - a) > 0.01 * final for a in alone)  # a test that would catch the first write kept
    (spread,) = result.report.channel_spread
    assert spread.ratio == pytest.approx(final, rel=1e-12)
    assert_same_outputs(model, result.model, rng)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_spread_on_output_axis_of_b_by_trans_b(rng, trans_b):
    """B is [K, N] (output channels on axis 1) or, with transB=1, [N, K] (axis 0)."""
    k, n = 6, 4
    out_axis = 0 if trans_b else 1
    weight = unit_channels(rng, [n, k] if trans_b else [k, n], axis=out_axis)
    inits = [tensor("Wg", weight), *bn_inits("bn", np.ones(n), TINY_VAR)]
    nodes = [helper.make_node("Gemm", ["x", "Wg"], ["g"], name="fc", transB=trans_b), bn("bn", "g", "y")]
    model = make_model(nodes, [value_info("x", np.float32, [2, k])], [value_info("y", np.float32, [2, n])], inits)
    result = bnfold.fold(model)
    folded = layer_weight(result.model, "fc")
    (spread,) = result.report.channel_spread
    assert (spread.layer, spread.channels) == ("fc", n)
    assert spread.ratio == pytest.approx(numpy_spread(folded, out_axis), rel=1e-12)
    assert spread.ratio != pytest.approx(numpy_spread(folded, 1 - out_axis), rel=1e-3)


def subnormal_conv_bn(rng) -> onnx.ModelProto:
    """Channel 0's weights are ~1e-30 and its BN scale 1e-10: folded, ~1e-40, subnormal in
    float32. Channel 3 has a tiny running variance (a spread of ~316 among channels 1-3)."""
    weight = unit_channels(rng, [4, 3, 3, 3])
    weight[0] *= np.float32(1e-30)
    return conv_bn(rng, TINY_VAR, gamma=[1e-10, 1.0, 1.0, 1.0], weight=weight)


def expected_subnormals(model: onnx.ModelProto) -> int:
    """Subnormals the Conv's weight would hold, folded without flushing (the bias is ~1)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    scale = inits["bn_scale"].astype(np.float64) / np.sqrt(inits["bn_var"].astype(np.float64) + np.float64(np.float32(EPS)))
    folded = (inits["W"].astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
    magnitude = np.abs(folded)
    return int(np.count_nonzero((magnitude > 0) & (magnitude < SUBNORMAL_F32)))


def test_fold_making_float32_subnormals_flushes_to_zero_counts_and_verifies(rng, tmp_path):
    model = subnormal_conv_bn(rng)
    count = expected_subnormals(model)
    assert count == 27  # every weight of channel 0, before the flush
    result = bnfold.fold(model)
    assert result.report.subnormals_flushed == count
    folded = layer_weight(result.model, "conv")
    assert np.all(folded[0] == 0)  # exactly zero, +0
    assert not np.signbit(folded[0]).any()
    for t in result.model.graph.initializer:
        magnitude = np.abs(numpy_helper.to_array(t).astype(np.float64))
        assert not np.any((magnitude > 0) & (magnitude < SUBNORMAL_F32)), t.name
    # channel 0 is all zero now: left out of the ratio, which is the other channels' ~316
    (spread,) = result.report.channel_spread
    assert spread.zero_channels == 1
    assert spread.ratio == pytest.approx(numpy_spread(folded, 0), rel=1e-12)
    original, candidate = tmp_path / "m.onnx", tmp_path / "m.folded.onnx"
    onnx.save(model, original)
    onnx.save(result.model, candidate)
    assert bnfold.verify(original, candidate).status == "passed"


def test_cli_summary_and_json_name_spread_layers_and_flushed_subnormals(rng, tmp_path):
    src = tmp_path / "m.onnx"
    model = subnormal_conv_bn(rng)
    onnx.save(model, src)
    result = invoke(["fold", src, "--json"], 0)
    ratio = numpy_spread(layer_weight(onnx.load(tmp_path / "m.folded.onnx"), "conv"), 0)
    assert f"  per-channel weight ranges differ by over 100x in 1 layer (conv {ratio:.3g}x): quantize it per-channel" in result.stderr
    assert f"  subnormal values flushed to zero in folded tensors: {expected_subnormals(model)}" in result.stderr
    data = json.loads(result.stdout)
    assert data["channel_spread"]["layers"][0]["layer"] == "conv"
    assert data["subnormals_flushed"] == expected_subnormals(model)
    assert data["verification"]["status"] == "passed"
    checked = json.loads(invoke(["check", src, "--json"], 1).stdout)  # the dry run reports them too
    assert checked["channel_spread"] == data["channel_spread"] and checked["subnormals_flushed"] == data["subnormals_flushed"]


def test_cli_ordinary_model_has_no_readiness_lines(rng, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn(rng, rng.uniform(0.5, 2.0, 4)), src)
    stderr = invoke(["fold", src], 0).stderr
    assert "per-channel" not in stderr and "subnormal" not in stderr


def test_cli_many_spread_layers_names_the_worst_three_first(rng, tmp_path):
    """Five Conv -> BN blocks, block i with gamma 60 * 2**i on one channel (1 on the others):
    spreads of ~60 (under the threshold), 120, 240, 480 and 960."""
    inits, nodes, x = [], [], "x"
    for i in range(5):
        inits += [tensor(f"W{i}", unit_channels(rng, [4, 4, 1, 1])), *bn_inits(f"bn{i}", [1, 1, 1, 60 * 2**i], np.ones(4))]
        nodes += [helper.make_node("Conv", [x, f"W{i}"], [f"c{i}"], name=f"conv{i}"), bn(f"bn{i}", f"c{i}", f"y{i}")]
        x = f"y{i}"
    model = make_model(nodes, [value_info("x", np.float32, [1, 4, 3, 3])], [value_info(x, np.float32, [1, 4, 3, 3])], inits)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    report = bnfold.fold(model).report
    assert [s.layer for s in report.channel_spread] == ["conv4", "conv3", "conv2", "conv1"]
    stderr = invoke(["fold", src], 0).stderr
    line = next(l for l in stderr.splitlines() if "per-channel" in l)
    assert line == "  per-channel weight ranges differ by over 100x in 4 layers (conv4 960x, conv3 480x, conv2 240x, 1 more): quantize them per-channel"


# --- the functions themselves -------------------------------------------------------------------


def test_channel_maxima_conv_transpose_groups_by_output_channel(rng):
    """ConvTranspose W [C_in, C_out/groups, k]: output channel g * C_out/groups + j is slice j of
    axis 1 within input block g, so per-group maxima, not axis 1 over every input channel."""
    groups, cin, per_group = 3, 6, 2
    weight = rng.normal(size=[cin, per_group, 3])
    expected = [np.abs(weight[g * cin // groups:(g + 1) * cin // groups, j]).max() for g in range(groups) for j in range(per_group)]
    np.testing.assert_array_equal(channel_maxima(weight, 1, groups), expected)
    assert not np.array_equal(channel_maxima(weight, 1, 1), expected[:per_group])


@pytest.mark.parametrize(("shape", "axis", "groups"), [([10, 8, 3, 3], 0, 1), ([7, 9], 1, 1), ([6, 4, 5], 1, 2)])
def test_channel_maxima_in_slices_is_the_whole_computation(rng, monkeypatch, shape, axis, groups):
    weight = rng.normal(size=shape).astype(np.float32)
    whole = channel_maxima(weight, axis, groups)
    monkeypatch.setattr(readiness, "CHUNK_ELEMENTS", 5)
    np.testing.assert_array_equal(channel_maxima(weight, axis, groups), whole)


def test_channel_spread_leaves_zero_channels_out():
    weight = np.array([[0.0, 0.0], [1.0, -2.0], [0.5, 0.1]])
    assert channel_spread(weight, 0) == pytest.approx(4.0)  # 2 / 0.5; the zero row is left out
    assert channel_spread(np.zeros([3, 2]), 0) is None
    assert channel_spread(np.array([[0.0], [3.0]]), 0) == 1.0


def test_flush_subnormals_in_each_dtypes_own_range():
    f32 = np.array([1e-40, -1e-39, 1e-37, 0.0, 1.0, np.inf, np.nan], np.float32)
    flushed, count = flush_subnormals(f32)
    assert count == 2
    np.testing.assert_array_equal(flushed[:5], [0, 0, np.float32(1e-37), 0, 1])
    assert np.isinf(flushed[5]) and np.isnan(flushed[6])
    assert f32[0] != 0  # the input is left as it was
    f16 = np.array([1e-5, 1e-4, -3e-6, 1.0], np.float16)  # float16 normals start at 6.1e-5
    flushed, count = flush_subnormals(f16)
    assert count == 2 and flushed.dtype == np.float16
    np.testing.assert_array_equal(flushed, np.array([0, 1e-4, 0, 1], np.float16))
    assert flush_subnormals(f16.astype(np.float32))[1] == 0  # the same values are normal in float32
    f64 = np.array([1e-310, 1.0])
    assert flush_subnormals(f64)[0] is f64 and flush_subnormals(f64)[1] == 0


def test_flush_subnormals_bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = np.array([1e-39, 1e-30, 1.0], np.float32).astype(ml_dtypes.bfloat16)
    flushed, count = flush_subnormals(values)
    assert count == 1 and flushed.dtype == values.dtype
    assert flushed.astype(np.float32)[0] == 0 and flushed.astype(np.float32)[1] > 0


def test_readiness_flush_passes_non_arrays_through_uncounted():
    log = readiness.Readiness()

    class Lazy:  # a plan entry that is not a plain array: left to its owner
        value = np.array([1e-40], np.float32)

    lazy = Lazy()
    assert log.flush(lazy) is lazy and log.flush(None) is None
    assert log.subnormals_flushed == 0
    log.flush(np.array([1e-40, 1e-41], np.float32))
    assert log.subnormals_flushed == 2
