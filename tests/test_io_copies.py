"""The background copy of big external data files (bnfold.external.DataCopies, started by
io.begin_staging while the fold runs): the output is right and the unchanged bytes are the
input's, and a failure anywhere (in the fold, in the copy, in its sync) leaves no output, no
temporary files, no thread running and the input as it was.

The thresholds are lowered (every data file is 'big', copied 256 bytes at a time, synced every
millisecond) so that small models take this path, in many steps.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import threading
import time

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

import bnfold
from bnfold import api, external, io
from bnfold.cli import main
from bnfold.errors import UsageError, WriteFailed
from tests.conftest import assert_same_outputs, bn_node, make_model, tensor, value_info

CHUNK = 256


@pytest.fixture(autouse=True)
def background(monkeypatch):
    monkeypatch.setattr(external, "BACKGROUND_COPY_MIN", 0)
    monkeypatch.setattr(external, "COPY_CHUNK", CHUNK)
    monkeypatch.setattr(external, "SYNC_INTERVAL", 0.001)


@pytest.fixture
def slow_copy(monkeypatch):
    """Each copy step takes 10 ms (a 17 KB file: about 0.7 s in all); `started` is set at the
    first step, `steps` counts them."""
    state = {"started": threading.Event(), "steps": 0}
    real = external.copy_range

    def step(*args):
        state["started"].set()
        state["steps"] += 1
        time.sleep(0.01)
        return real(*args)

    monkeypatch.setattr(external, "copy_range", step)
    return state


def mixed_chain(rng) -> onnx.ModelProto:
    """Conv -> BN blocks (their weights change) between Conv blocks without BN and a MatMul head
    (their weights do not): three changed tensors among six unchanged ones, ~17 KB of data."""
    inits, nodes, x, channels = [], [], "x", 8
    for i, with_bn in enumerate([True, False, True, False, False, True, False, False]):
        cin = 3 if i == 0 else channels
        inits.append(tensor(f"W{i}", rng.normal(0, 0.3, [channels, cin, 3, 3]).astype(np.float32)))
        nodes.append(helper.make_node("Conv", [x, f"W{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        y = f"c{i}"
        if with_bn:
            nodes.append(bn_node(inits, y, f"b{i}", rng, channels, name=f"bn{i}"))
            y = f"b{i}"
        nodes.append(helper.make_node("Relu", [y], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    inits.append(tensor("H", rng.normal(0, 0.3, [6, 5]).astype(np.float32)))
    nodes.append(helper.make_node("MatMul", [x, "H"], ["y"], name="head"))
    inputs = [value_info("x", np.float32, [1, 3, 4, 6])]
    return make_model(nodes, inputs, [value_info("y", np.float32, [1, channels, 4, 5])], inits)


UNCHANGED = ["W1", "W3", "W4", "W6", "W7", "H"]


def save_external(model: onnx.ModelProto, path: pathlib.Path, one_file: bool = True) -> pathlib.Path:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_model moves the tensors of what it is given out
    location = f"{path.name}.data" if one_file else None
    onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=one_file, location=location, size_threshold=0)
    return path


def hashes(folder: pathlib.Path) -> dict[str, str]:
    """Every file under `folder` (hidden temporary folders included) with its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def entries(model: onnx.ModelProto, name: str) -> dict[str, str]:
    return {e.key: e.value for e in next(t for t in model.graph.initializer if t.name == name).external_data}


def copy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("bnfold-")]


def invoke_error(args, words: str) -> None:
    """exit 2 and one line on stderr naming the problem; no traceback."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    assert result.exit_code == 2, (result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error:") and words in lines[0], result.stderr


# --------------------------------------------------------------------------- right output


def test_copies_external_data_unchanged_bytes_kept_changed_appended_verifies(tmp_path, rng, reads):
    model = mixed_chain(rng)
    src = save_external(model, tmp_path / "m.onnx")
    data_in = (tmp_path / "m.onnx.data").read_bytes()
    assert len(data_in) > 40 * CHUNK  # the copy takes many steps
    result = bnfold.fold_file(src, tmp_path / "out.onnx")
    assert result.verification.passed and result.report.bn_after == 0
    data_out = (tmp_path / "out.onnx.data").read_bytes()
    assert data_out[: len(data_in)] == data_in  # the input's bytes, all of them, in place
    before = onnx.load(src, load_external_data=False)
    after = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    for name in UNCHANGED:  # same offset and length in a byte-identical prefix: same bytes, never decoded
        assert entries(after, name) == {**entries(before, name), "location": "out.onnx.data"}
        assert name not in reads
    appended = [t.name for t in after.graph.initializer if io.is_external(t) and t.name not in UNCHANGED]
    assert appended == ["W2_bnfold", "W5_bnfold"]  # W0 (864 bytes) is under save's 1 KB threshold
    for name in appended:  # the folded weights: after the copy, page-aligned
        offset = int(entries(after, name)["offset"])
        assert offset >= len(data_in) and offset % io.ALIGN == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "out.onnx", "out.onnx.data"]
    assert copy_threads() == []
    assert_same_outputs(model, onnx.load(tmp_path / "out.onnx"), rng)


def test_copies_fold_drops_a_data_file_copies_replanned_verifies(tmp_path, rng):
    """One data file per tensor: after the fold the changed weights' and BN parameters' files
    are no longer referenced, so the copies started before the fold are not the ones needed."""
    model = mixed_chain(rng)
    src = save_external(model, tmp_path / "m.onnx", one_file=False)
    inputs = hashes(tmp_path)
    bnfold.fold_file(src, tmp_path / "out.onnx")
    folded = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    locations = {e.value for t in folded.graph.initializer for e in t.external_data if e.key == "location"}
    written = {p.name for p in tmp_path.iterdir()} - set(inputs)
    assert written == {"out.onnx", *locations} and len(locations) == len(UNCHANGED)  # the folded ones appended to one
    assert {k: v for k, v in hashes(tmp_path).items() if k in inputs} == inputs
    assert_same_outputs(model, onnx.load(tmp_path / "out.onnx"), rng)


def test_copies_in_place_data_file_extended_verifies(tmp_path, rng):
    model = mixed_chain(rng)
    src = save_external(model, tmp_path / "m.onnx")
    data_in = (tmp_path / "m.onnx.data").read_bytes()
    bnfold.fold_file(src, in_place=True)
    assert (tmp_path / "m.onnx.data").read_bytes()[: len(data_in)] == data_in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert_same_outputs(model, onnx.load(src), rng)


def test_copies_rollback_after_failed_verification_verifies(tmp_path, rng, monkeypatch):
    """A wrong fold (bias off by 0.5) fails verification: the output staged during the fold is
    dropped, the folds are bisected with fresh stagings, and the final output is right."""
    from bnfold.rules.base import WeightAndBiasRule

    real = WeightAndBiasRule.plan

    def wrong_plan(self, bn, node, graph):
        plan = real(self, bn, node, graph)
        if bn.label == "bn2":
            n, position, bias = plan.new_inputs[1]
            plan.new_inputs[1] = (n, position, (bias + 0.5).astype(bias.dtype))
        return plan

    monkeypatch.setattr(WeightAndBiasRule, "plan", wrong_plan)
    model = mixed_chain(rng)
    src = save_external(model, tmp_path / "m.onnx")
    result = bnfold.fold_file(src, tmp_path / "out.onnx")
    assert [k.bn for k in result.report.kept] == ["bn2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "out.onnx", "out.onnx.data"]
    assert copy_threads() == []
    assert_same_outputs(model, onnx.load(tmp_path / "out.onnx"), rng)


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("error", [RuntimeError("a bug in a rule"), KeyboardInterrupt()], ids=["bug", "ctrl_c"])
def test_copies_fold_raises_mid_copy_leaves_nothing(tmp_path, rng, monkeypatch, slow_copy, error):
    src = save_external(mixed_chain(rng), tmp_path / "m.onnx")
    before = hashes(tmp_path)

    def failing_fold(*args, **kwargs):
        assert slow_copy["started"].wait(5)
        raise error

    monkeypatch.setattr(api, "fold_model", failing_fold)
    with pytest.raises(type(error)):
        bnfold.fold_file(src, tmp_path / "out.onnx")
    assert hashes(tmp_path) == before  # no output, no temporary folder, input untouched
    assert copy_threads() == []
    assert slow_copy["steps"] < len((tmp_path / "m.onnx.data").read_bytes()) // CHUNK  # stopped, not run to the end


def test_copies_fold_user_error_mid_copy_exit_2_leaves_nothing(tmp_path, rng, monkeypatch, slow_copy):
    src = save_external(mixed_chain(rng), tmp_path / "m.onnx")
    before = hashes(tmp_path)

    def failing_fold(*args, **kwargs):
        assert slow_copy["started"].wait(5)
        raise UsageError("refused for the test")

    monkeypatch.setattr(api, "fold_model", failing_fold)
    invoke_error([src, "-o", tmp_path / "out.onnx", "--no-verify"], "refused for the test")
    assert hashes(tmp_path) == before and copy_threads() == []


def test_copies_disk_full_mid_copy_write_failed_leaves_nothing(tmp_path, rng, monkeypatch):
    src = save_external(mixed_chain(rng), tmp_path / "m.onnx")
    before = hashes(tmp_path)
    real, steps = external.copy_range, []

    def filling(*args):
        steps.append(1)
        if len(steps) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(external, "copy_range", filling)
    with pytest.raises(WriteFailed, match=r"cannot write .*out\.onnx: No space left on device$"):
        bnfold.fold_file(src, tmp_path / "out.onnx", verify=False)
    assert hashes(tmp_path) == before and copy_threads() == []
    steps.clear()
    invoke_error([src, "-o", tmp_path / "out.onnx", "--no-verify"], "No space left on device")
    assert hashes(tmp_path) == before and copy_threads() == []


def test_copies_sync_fails_write_failed_leaves_nothing(tmp_path, rng, monkeypatch, slow_copy):
    src = save_external(mixed_chain(rng), tmp_path / "m.onnx")
    before = hashes(tmp_path)

    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    invoke_error([src, "-o", tmp_path / "out.onnx", "--no-verify"], "Input/output error")
    assert hashes(tmp_path) == before and copy_threads() == []


def test_copies_input_data_shrinks_mid_copy_write_failed(tmp_path, rng, monkeypatch, slow_copy):
    """The input changing under bnfold is refused: offsets past the new end would read the
    appended tensors."""
    src = save_external(mixed_chain(rng), tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    real_fold = api.fold_model

    def fold_then_truncate(*args, **kwargs):
        result = real_fold(*args, **kwargs)
        assert slow_copy["started"].wait(5)
        data.write_bytes(data.read_bytes()[: 10 * CHUNK])
        return result

    monkeypatch.setattr(api, "fold_model", fold_then_truncate)
    with pytest.raises(WriteFailed, match="shrank while it was being copied"):
        bnfold.fold_file(src, tmp_path / "out.onnx", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"] and copy_threads() == []


def test_copies_kernel_copy_refused_copied_by_hand_verifies(tmp_path, rng, monkeypatch):
    """copy_file_range refused (another file system, an old kernel): pread/pwrite instead."""
    def refused(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused)
    model = mixed_chain(rng)
    src = save_external(model, tmp_path / "m.onnx")
    data_in = (tmp_path / "m.onnx.data").read_bytes()
    bnfold.fold_file(src, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").read_bytes()[: len(data_in)] == data_in
    assert_same_outputs(model, onnx.load(tmp_path / "out.onnx"), rng)
