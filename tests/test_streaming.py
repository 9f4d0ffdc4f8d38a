"""A model whose external weights all change is folded one tensor at a time: each folded weight
goes to the spill file as it is made and is copied from there into the output's data file,
so memory holds about the largest weight, not all of them (bnfold.loading.Spill)."""

from __future__ import annotations

import importlib
import json
import re
import tracemalloc

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold import algebra
from bnfold.cli import main

verify_module = importlib.import_module("bnfold.verify")  # the module (bnfold.verify may be the function)


def external_chain(path, blocks: int, channels: int, rng) -> int:
    """`blocks` x Conv 3x3 -> BN -> Relu with every tensor in one data file; the weights' bytes."""
    inits, nodes, x = [], [], "x"
    for i in range(blocks):
        weight = rng.normal(0, 0.05, [channels, channels, 3, 3]).astype(np.float32)
        stats = (rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.1, channels),
                 rng.normal(0, 0.1, channels), rng.uniform(0.5, 2, channels))
        names = [f"W{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"]
        inits += [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(names, (weight, *stats))]
        nodes += [
            helper.make_node("Conv", [x, names[0]], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", [f"c{i}", *names[1:]], [f"n{i}"], name=f"bn{i}"),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    graph = helper.make_graph(
        nodes, "external_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 4])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, 4, 4])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    return blocks * channels * channels * 9 * 4


def test_every_weight_changes_peak_memory_is_a_fraction_of_the_weights(tmp_path, rng):
    src, out = tmp_path / "m.onnx", tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    weights = external_chain(src, blocks=16, channels=256, rng=rng)  # 16 x 2.4 MB
    largest = weights // 16
    tracemalloc.start()
    try:
        result = bnfold.fold_file(src, out, verify=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.report.bn_after == 0 and len(result.report.folded) == 16
    # the largest weight read and its folded copy, plus the float64 work of one slice and checks
    assert peak < 2 * largest + 4 * algebra.CHUNK_BYTES, f"peak {peak / 2**20:.1f} MB"
    assert peak < 0.25 * weights
    folded = onnx.load(out, load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in folded.graph.initializer if t.dims == [256, 256, 3, 3])
    verification = bnfold.verify(src, out)
    assert verification.status == "passed" and verification.count("site") == 16


@pytest.mark.parametrize("axis", [0, 1])
def test_scale_along_axis_cast_in_slices_is_the_whole_arithmetic(rng, monkeypatch, axis):
    monkeypatch.setattr(algebra, "CHUNK_BYTES", 64 * 8 * 3)  # three rows of 64 values a slice
    weight = rng.normal(size=[10, 8, 2, 4]).astype(np.float32)
    scale = rng.uniform(0.1, 3, weight.shape[axis])
    expected = algebra.cast_like(algebra.scale_along_axis(weight, scale, axis), np.float32)
    np.testing.assert_array_equal(algebra.scale_along_axis_cast(weight, scale, axis), expected)
    # overflow still becomes inf (the rules keep such a BN)
    big = np.full([10, 8], 6e4, np.float16)
    assert np.isinf(algebra.scale_along_axis_cast(big, np.full(10, 2.0), 0)).all()


def test_peak_memory_reported_for_folding_and_verifying_apart(tmp_path, rng):
    src = tmp_path / "m.onnx"
    external_chain(src, blocks=2, channels=16, rng=rng)
    result = CliRunner().invoke(main, [str(src), "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    fold_peak, verify_peak = data["peak_rss_mb"], data["verification"]["peak_rss_mb"]
    assert 0 < fold_peak <= verify_peak  # the process's peak: verifying comes after folding
    last = result.stderr.splitlines()[-1]
    shown = re.search(r"peak memory (\d+) MB folding, (\d+) MB verifying", last)
    assert shown, last
    assert abs(int(shown[1]) - fold_peak) <= 1 and abs(int(shown[2]) - verify_peak) <= 1  # JSON keeps a decimal


@pytest.mark.parametrize("limit_over_data", [False, True])
def test_sessions_built_one_after_the_other_when_external_weights_are_big(tmp_path, rng, monkeypatch, limit_over_data):
    """The model file is small; its external data decides whether both sessions live at once."""
    src = tmp_path / "m.onnx"
    weights = external_chain(src, blocks=2, channels=16, rng=rng)
    monkeypatch.setattr(verify_module, "TOGETHER_MAX_BYTES", 2 * weights if limit_over_data else weights // 2)
    pools = []
    real_pool = verify_module.concurrent.futures.ThreadPoolExecutor
    monkeypatch.setattr(verify_module.concurrent.futures, "ThreadPoolExecutor", lambda *a: pools.append(1) or real_pool(*a))
    result = bnfold.fold_file(src)
    assert result.verification.status == "passed"
    assert bool(pools) == limit_over_data


def test_data_file_mostly_replaced_is_written_afresh_without_dead_bytes(tmp_path, rng):
    """Every weight but one block's changes: the output's data file holds the tensors still read
    (that block's weight and BN statistics, moved to new offsets) and the new ones, not a copy of
    the input's with the old weights left as dead space."""
    src, out = tmp_path / "m.onnx", tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    weights = external_chain(src, blocks=6, channels=64, rng=rng)
    model = onnx.load(src, load_external_data=False)
    model.graph.output.append(helper.make_tensor_value_info("c3", TensorProto.FLOAT, [1, 64, 4, 4]))  # bn3 kept: fan-out
    onnx.save(model, src)
    result = bnfold.fold_file(src, out)
    assert [k.bn for k in result.report.kept] == ["bn3"] and result.verification.status == "passed"
    data = (tmp_path / "out" / "m.onnx.data").stat().st_size
    assert data < 1.1 * weights, f"{data} bytes for {weights} bytes of weights: dead bytes kept"
    folded = onnx.load(out)  # with its data: every tensor reads back
    kept = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer if t.name in ("W3", "s3", "v3")}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(src).graph.initializer if t.name in kept}
    assert kept.keys() == original.keys() == {"W3", "s3", "v3"}
    for name in kept:
        np.testing.assert_array_equal(kept[name], original[name])


def test_data_file_mostly_kept_is_copied_with_new_tensors_appended(tmp_path, rng):
    """One BN of many folds: the input's data file is copied as it is (unchanged tensors keep
    their offsets) and the new tensors appended."""
    src, out = tmp_path / "m.onnx", tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    external_chain(src, blocks=6, channels=64, rng=rng)
    model = onnx.load(src, load_external_data=False)
    for i in range(1, 6):  # only bn0 foldable
        model.graph.output.append(helper.make_tensor_value_info(f"c{i}", TensorProto.FLOAT, [1, 64, 4, 4]))
    onnx.save(model, src)
    result = bnfold.fold_file(src, out)
    assert len(result.report.folded) == 1 and result.verification.status == "passed"
    source = (tmp_path / "m.data").read_bytes()
    assert (tmp_path / "out" / "m.onnx.data").read_bytes()[:len(source)] == source


def test_rollback_refolds_external_model_through_the_spill(tmp_path, rng, monkeypatch):
    """A wrong fold in an external-data model: rolled back and folded again, the spilled
    tensors of both attempts in one spill file; what is written verifies on its own."""
    from test_verify_inside import break_rule_for

    src, out = tmp_path / "m.onnx", tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    external_chain(src, blocks=4, channels=64, rng=rng)
    break_rule_for(monkeypatch, "bn2")
    result = bnfold.fold_file(src, out)
    assert [k.bn for k in result.report.kept] == ["bn2"] and result.verification.status == "passed"
    monkeypatch.undo()
    assert bnfold.verify(src, out).status == "passed"
