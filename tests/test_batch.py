"""Batch mode and the progress line: many models in one run, one bad model never stops the others."""

import dataclasses
import io
import json
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfold
from bnfold.batch import expand_models
from bnfold.progress import Progress
from conftest import assert_same_outputs, bn_node, count_bn, make_model, tensor, value_info
from test_cli import invoke


def conv_bn(rng, channels=4):
    inits = [tensor("W", rng.normal(0, 0.5, [channels, 3, 3, 3]).astype(np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node(inits, "c", "y", rng, channels, name="bn"),
    ]
    return make_model(nodes, [value_info("x", np.float32, [1, 3, 5, 5])], [value_info("y", np.float32, [1, channels, 5, 5])], inits)


@pytest.fixture
def folder(tmp_path, rng):
    for name, channels in (("a", 4), ("b", 6)):
        onnx.save(conv_bn(rng, channels), tmp_path / f"{name}.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    return tmp_path


def test_batch_expand_directory_skips_outputs_and_duplicates(folder):
    (folder / "a.folded.onnx").write_bytes(b"")
    (folder / "notes.txt").write_text("")
    paths = expand_models([folder, folder / "a.onnx"])
    assert [p.name for p in paths] == ["a.onnx", "b.onnx", "bad.onnx"]


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_batch_bad_model_does_not_stop_the_others(folder, rng, jobs):
    result = invoke([folder, "-j", jobs], 2)
    assert f"{folder / 'bad.onnx'}: error: cannot load" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "bnfold: 3 models, 2 written, 1 failed"
    for name in ("a", "b"):
        folded = onnx.load(folder / f"{name}.folded.onnx")
        assert count_bn(folded) == 0
        assert_same_outputs(onnx.load(folder / f"{name}.onnx"), folded, rng)
    assert not (folder / "bad.folded.onnx").exists()


def test_batch_parallel_writes_what_sequential_writes(folder):
    (folder / "bad.onnx").unlink()
    invoke([folder, "-j", "2"], 0)
    parallel = {n: (folder / f"{n}.folded.onnx").read_bytes() for n in ("a", "b")}
    invoke([folder / "a.onnx", folder / "b.onnx"], 0)
    assert {n: (folder / f"{n}.folded.onnx").read_bytes() for n in ("a", "b")} == parallel


def test_batch_json_lists_every_model(folder):
    result = invoke([folder, "--json"], 2)
    data = json.loads(result.stdout)
    assert [(d["input"].rsplit("/", 1)[-1], d["exit_code"]) for d in data] == [("a.onnx", 0), ("b.onnx", 0), ("bad.onnx", 2)]
    assert data[0]["bn_after"] == 0 and data[0]["verification"]["passed"]
    assert "cannot load" in data[2]["error"]


def test_batch_verification_failure_exit_1(folder, monkeypatch):
    (folder / "bad.onnx").unlink()
    reference = sys.modules["bnfold.verify"].Reference  # the package attribute is the function
    real = reference.check

    def failing(self, candidate, sites=None):
        outcome = real(self, candidate, sites)
        return outcome if "b.onnx" not in str(self.model) else dataclasses.replace(outcome, passed=False)

    monkeypatch.setattr(reference, "check", failing)
    result = invoke([folder, "--strict"], 1)
    assert f"{folder / 'b.onnx'}: verification failed" in result.stderr
    assert (folder / "a.folded.onnx").exists() and not (folder / "b.folded.onnx").exists()


def break_fold_file(kind, path, monkeypatch):
    """Make folding `path` fail with one kind of error; the extra CLI arguments it needs."""
    from bnfold import api

    if kind == "invalid model":
        path.write_bytes(b"not a model")
    elif kind == "verification failed":
        reference = sys.modules["bnfold.verify"].Reference
        real = reference.check
        monkeypatch.setattr(reference, "check", lambda self, c, sites=None: dataclasses.replace(real(self, c, sites), passed=False))
        return ["--strict"]
    elif kind in ("internal error", "out of memory"):
        error = RuntimeError("a bug") if kind == "internal error" else MemoryError()

        def fold_model(*args, **kwargs):
            raise error

        monkeypatch.setattr(api, "fold_model", fold_model)
    return ["--dim", "nope=3"] if kind == "usage error" else []


@pytest.mark.parametrize(
    "kind, code, message",
    [
        ("invalid model", 2, "error: cannot load"),
        ("usage error", 2, "error: --dim nope: the model has no symbolic dimension"),
        ("verification failed", 1, "verification failed: folded model differs"),
        ("internal error", 2, "internal error: RuntimeError: a bug"),
        ("out of memory", 2, "error: out of memory"),
    ],
)
def test_batch_error_kind_exit_code_same_as_single_file(tmp_path, rng, monkeypatch, kind, code, message):
    """A file's exit code in a batch is the one `bnfold FILE` alone exits with (errors.exit_code_of)."""
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save(conv_bn(rng), path)
    args = break_fold_file(kind, path, monkeypatch)
    single = invoke([path, *args], code)
    assert f"bnfold: {message}" in single.stderr
    batch = invoke([folder, "--json", *args], code)
    assert f"bnfold: {path}: " in batch.stderr and message in batch.stderr
    assert [(d["input"], d["exit_code"]) for d in json.loads(batch.stdout)] == [(str(path), code)]
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx"]


def test_batch_output_option_needs_one_model(folder):
    result = invoke([folder / "a.onnx", folder / "b.onnx", "-o", folder / "x.onnx"], 2)
    assert "single model file" in result.stderr


def test_fold_file_reports_its_phases(folder):
    phases = []
    bnfold.fold_file(folder / "a.onnx", on_phase=phases.append)
    assert phases == ["loading", "folding", "writing", "verifying"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_shown_on_terminal_and_erased():
    stream = Terminal()
    with Progress(delay=0, interval=0.01, stream=stream) as progress:
        progress.update("writing")
        time.sleep(0.1)
    text = stream.getvalue()
    assert "bnfold: writing" in text
    assert text.endswith("\r"), "the line is erased before the summary"


def test_progress_silent_when_not_a_terminal_or_quick():
    for stream, delay in ((io.StringIO(), 0), (Terminal(), 60)):
        with Progress(delay=delay, interval=0.01, stream=stream) as progress:
            progress.update("writing")
            time.sleep(0.05)
        assert stream.getvalue() == ""
