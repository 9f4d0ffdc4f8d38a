"""CLI: exit codes, messages on stderr, data on stdout, files written only where promised."""

import hashlib
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from bnfold.cli import main
from conftest import assert_same_outputs, bn_node, count_bn, make_model, tensor, value_info


def invoke(args, expected_exit: int):
    """Run the CLI; on an unexpected exit code show stdout, stderr and the exception."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    assert result.exit_code == expected_exit, (
        f"exit {result.exit_code} != {expected_exit}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n"
        f"exception: {result.exception!r}"
    )
    assert "Traceback" not in result.stderr
    return result


def conv_bn_relu_bn(rng):
    """Conv -> BN (foldable) -> Relu -> BN (kept: its scale is negative on some channels, so it
    cannot move through the Relu)."""
    inits = [tensor("W", rng.normal(0, 0.5, [4, 3, 3, 3]).astype(np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node(inits, "c", "b1", rng, 4, name="bn1"),
        helper.make_node("Relu", ["b1"], ["r"], name="relu"),
        bn_node(inits, "r", "y", rng, 4, name="bn2"),
    ]
    x = value_info("x", np.float32, ["batch", 3, 6, 6])
    return make_model(nodes, [x], [value_info("y", np.float32, ["batch", 4, 6, 6])], inits)


@pytest.fixture
def model_path(tmp_path, rng):
    path = tmp_path / "net.onnx"
    onnx.save(conv_bn_relu_bn(rng), path)
    return path


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_fold_writes_default_output_and_verifies(model_path, rng):
    before = digest(model_path)
    result = invoke([model_path], 0)
    out = model_path.with_name("net.folded.onnx")
    assert out.exists() and digest(model_path) == before
    assert "BatchNormalization: 2 -> 1" in result.stderr
    assert "kept bn2: scale is not positive on 3 of 4 channels" in result.stderr
    assert "verification passed (onnxruntime)" in result.stderr
    folded = onnx.load(out)
    assert count_bn(folded) == 1
    assert_same_outputs(onnx.load(model_path), folded, rng)


def test_cli_fold_json_on_stdout(model_path, tmp_path):
    result = invoke(["fold", model_path, "-o", tmp_path / "o.onnx", "--json", "--dim", "batch=3"], 0)
    data = json.loads(result.stdout)
    assert data["schema_version"] == 1
    assert data["bn_before"] == 2 and data["bn_after"] == 1
    assert data["folded"][0] == {"bn": "bn1", "status": "folded", "into": "conv", "rule": "bn_into_conv", "graph": "", "site": "b1"}
    assert data["kept"][0]["bn"] == "bn2"
    assert data["verification"]["passed"] is True
    assert data["output"].endswith("o.onnx")


def test_cli_fold_no_verify(model_path, tmp_path):
    result = invoke([model_path, "-o", tmp_path / "o.onnx", "--no-verify"], 0)
    assert "skipped (--no-verify)" in result.stderr


def test_cli_fold_in_place(model_path, rng):
    original = onnx.load(model_path)
    invoke([model_path, "--in-place"], 0)
    assert count_bn(onnx.load(model_path)) == 1
    assert_same_outputs(original, onnx.load(model_path), rng)
    assert not model_path.with_name("net.folded.onnx").exists()


def test_cli_fold_output_equal_input_refused(model_path):
    result = invoke([model_path, "-o", model_path], 2)
    assert "--in-place" in result.stderr


def test_cli_check_foldable_exit_1(model_path):
    result = invoke(["check", model_path], 1)
    assert "foldable: bn1 into conv (bn_into_conv)" in result.stderr


def test_cli_check_clean_exit_0(model_path, tmp_path):
    out = tmp_path / "clean.onnx"
    invoke([model_path, "-o", out], 0)
    result = invoke(["check", out, "--json"], 0)
    assert json.loads(result.stdout)["foldable"] == []


def test_cli_verify_pass_and_fail(model_path, tmp_path, rng):
    out = tmp_path / "o.onnx"
    invoke([model_path, "-o", out, "--no-verify"], 0)
    invoke(["verify", model_path, out], 0)
    broken = onnx.load(out)
    w = next(t for t in broken.graph.initializer if t.name.startswith("W"))
    arr = onnx.numpy_helper.to_array(w) * 1.01
    w.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), w.name))
    onnx.save(broken, out)
    result = invoke(["verify", model_path, out], 1)
    assert "FAILED" in result.stderr


def write_file(folder, name: str, data: bytes):
    path = folder / name
    path.write_bytes(data)
    return path


BAD_INPUTS = {
    "missing": (lambda d: d / "missing.onnx", "not found"),
    "directory": (lambda d: d, "directory"),
    "empty": (lambda d: write_file(d, "empty.onnx", b""), "empty"),
    "garbage": (lambda d: write_file(d, "junk.onnx", b"\x08\xff\xff\xff garbage"), ""),
}


@pytest.mark.parametrize("make,message", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_cli_bad_input_exit_2(tmp_path, make, message):
    path = make(tmp_path)
    result = invoke([path], 2)
    assert result.stderr.startswith("bnfold: error:")
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr
    assert not list(tmp_path.glob("*.folded.onnx"))


def test_cli_truncated_model_exit_2(model_path):
    data = model_path.read_bytes()
    model_path.write_bytes(data[: len(data) // 2])
    result = invoke([model_path], 2)
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["--dim", "batch"], ["--dim", "batch=0"], ["--rules", "nope"]])
def test_cli_bad_options_exit_2(model_path, args):
    result = invoke([model_path, *args], 2)
    assert "bnfold: error:" in result.stderr


def test_cli_interrupted_exit_130_one_line(model_path, monkeypatch):
    from bnfold import api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "fold_model", interrupted)
    assert invoke([model_path], 130).stderr == "bnfold: interrupted\n"


def test_cli_internal_error_exit_2_traceback_only_with_debug(model_path, monkeypatch):
    from bnfold import api

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(api, "fold_model", bug)
    monkeypatch.delenv("BNFOLD_DEBUG", raising=False)
    line = invoke([model_path], 2).stderr
    assert line == "bnfold: internal error: ZeroDivisionError: a bug (set BNFOLD_DEBUG=1 for the traceback)\n"
    monkeypatch.setenv("BNFOLD_DEBUG", "1")
    result = CliRunner().invoke(main, [str(model_path)])
    assert isinstance(result.exception, ZeroDivisionError), "re-raised for the traceback"


def test_cli_help_lists_exit_codes():
    result = invoke(["--help"], 0)
    assert "Exit codes" in result.stdout
    assert "Exit codes" in invoke(["check", "--help"], 0).stdout
