"""Reliability and security end to end: bad and hostile input through the CLI and the API,
and the promise never to lose data (input untouched, outputs atomic, nothing half written).

Every bad input gets one line on stderr starting "bnfold: error:", exit code 2 and nothing
written; the API raises a BnfoldError with a one-line message. tests/test_io.py covers the io
layer itself; these go through `bnfold MODEL`, `bnfold check`, `bnfold verify`, `bnfold.fold`,
`bnfold.fold_file` and `bnfold.check`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import bnfold
from bnfold import external, io, staging
from bnfold.cli import main
from conftest import bn_node, count_bn, make_model, tensor, value_info

REPO = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def invoke(args, expected_exit: int):
    """Run the CLI; on an unexpected exit code show stdout, stderr and the exception."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    assert result.exit_code == expected_exit, (
        f"exit {result.exit_code} != {expected_exit}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n"
        f"exception: {result.exception!r}"
    )
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    return result


def invoke_error(args, words: str = ""):
    """A bad input: exit 2, exactly one line on stderr, naming the problem."""
    result = invoke(args, 2)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error:"), result.stderr
    assert words in lines[0], lines[0]
    return lines[0]


def snapshot(folder: pathlib.Path) -> dict[str, str]:
    """Every file under `folder` (hidden temporary folders included) with its content hash."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
        if not p.is_symlink()
    }


def conv_bn_model(rng, channels: int = 4, tail: bool = False) -> onnx.ModelProto:
    """Conv -> BN (foldable) -> Relu, and with `tail` a 1x1 Conv whose weight no fold touches."""
    inits = [tensor("W", rng.normal(0, 0.5, [channels, 3, 3, 3]).astype(np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node(inits, "c", "b", rng, channels, name="bn"),
        helper.make_node("Relu", ["b"], ["r" if tail else "y"], name="relu"),
    ]
    if tail:
        inits.append(tensor("W2", rng.normal(0, 0.5, [channels, channels, 1, 1]).astype(np.float32)))
        nodes.append(helper.make_node("Conv", ["r", "W2"], ["y"], name="tail"))
    return make_model(
        nodes, [value_info("x", np.float32, ["batch", 3, 5, 5])], [value_info("y", np.float32, ["batch", channels, 5, 5])], inits
    )


def save_external(model: onnx.ModelProto, path: pathlib.Path, location: str = "weights.bin") -> pathlib.Path:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)
    return path


def point_external(model: onnx.ModelProto, name: str, location: str, offset: int = 0, length: int | None = None):
    """Make initializer `name` external at `location` (written by hand: onnx helpers refuse)."""
    init = next(t for t in model.graph.initializer if t.name == name)
    nbytes = len(init.raw_data)
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", nbytes if length is None else length)):
        entry = init.external_data.add()
        entry.key, entry.value = key, str(value)
    return nbytes


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    return folder


# --------------------------------------------------------------------------- bad and hostile input


def _write(folder, data: bytes, name="m.onnx"):
    path = folder / name
    path.write_bytes(data)
    return path


def _model_bytes(rng) -> bytes:
    return conv_bn_model(rng).SerializeToString()


def _edited(folder, rng, edit, name="m.onnx"):
    model = conv_bn_model(rng)
    edit(model)
    return _write(folder, model.SerializeToString(), name)


def _outside_file(folder: pathlib.Path) -> pathlib.Path:
    outside = folder.parent / "outside.bin"
    outside.write_bytes(bytes(4096))
    return outside


def _external_to(folder, rng, location: str, offset: int = 0, length: int | None = None, data: bytes | None = None):
    model = conv_bn_model(rng)
    nbytes = point_external(model, "W", location, offset, length)
    if data is not None:
        (folder / location).write_bytes(data if data else bytes(nbytes))
    return _write(folder, model.SerializeToString())


def _symlink_outside(folder, rng):
    outside = _outside_file(folder)
    path = _external_to(folder, rng, "link.bin")
    (folder / "link.bin").symlink_to(outside)
    return path


def _bad_utf8_name(folder, rng):
    model = conv_bn_model(rng)
    model.graph.node[0].name = "conv\u00e9"  # two bytes in UTF-8: c3 a9
    data = model.SerializeToString().replace("conv\u00e9".encode(), b"conv\xff\xfe")
    return _write(folder, data)


def _tensor_size_mismatch(model):
    w = next(t for t in model.graph.initializer if t.name == "W")
    w.raw_data = w.raw_data[:-4]


def _unknown_dtype(model):
    next(t for t in model.graph.initializer if t.name == "W").data_type = 99


def _duplicate_value_name(model):
    model.graph.node.append(helper.make_node("Relu", ["x"], ["c"], name="again"))


def _dangling_input(model):
    model.graph.node[0].input[0] = "nobody_makes_this"


def _cycle(model):
    model.graph.node[0].input[0] = "y"  # conv reads relu's output, which depends on conv


def _opsets(*pairs):
    def edit(model):
        del model.opset_import[:]
        model.opset_import.extend(helper.make_opsetid(d, v) for d, v in pairs)
    return edit


def _subgraph_dangling(folder, rng):
    branch = helper.make_graph(
        [helper.make_node("Relu", ["nobody"], ["o"])], "b", [], [value_info("o", np.float32, [2])]
    )
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [value_info("y", np.float32, [2])]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _write(folder, model.SerializeToString())


BAD_INPUTS = {
    "missing": (lambda f, r: f / "missing.onnx", "not found"),
    "directory": (lambda f, r: f, "directory"),
    "empty": (lambda f, r: _write(f, b""), "empty"),
    "random_bytes": (lambda f, r: _write(f, np.random.default_rng(1).bytes(2048)), "not an ONNX model"),
    "text": (lambda f, r: _write(f, b"ir_version: 8\ngraph { }\n"), "not an ONNX model"),
    "truncated": (lambda f, r: _write(f, _model_bytes(r)[:-100]), "not an ONNX model"),
    "bit_flipped": (lambda f, r: _write(f, bytes([_model_bytes(r)[0] ^ 0x80]) + _model_bytes(r)[1:]), "not an ONNX model"),
    "graph_proto": (lambda f, r: _write(f, conv_bn_model(r).graph.SerializeToString()), "not an ONNX model"),
    "tensor_proto": (lambda f, r: _write(f, tensor("t", np.ones(8, np.float32)).SerializeToString()), "not an ONNX model"),
    "checker": (lambda f, r: _edited(f, r, lambda m: setattr(m.graph.node[2], "op_type", "NoSuchOp")), "checker"),
    "no_opset": (lambda f, r: _edited(f, r, _opsets()), "no opset import"),
    "only_custom_opset": (lambda f, r: _edited(f, r, _opsets(("com.example", 1))), "no opset import"),
    "opset_too_new": (lambda f, r: _edited(f, r, _opsets(("", 999))), "opset 999 is not supported"),
    "opset_zero": (lambda f, r: _edited(f, r, _opsets(("", 0))), "opset 0 is not supported"),
    "opset_twice": (lambda f, r: _edited(f, r, _opsets(("", 17), ("ai.onnx", 13))), "two versions"),
    "data_missing": (lambda f, r: _external_to(f, r, "gone.bin"), "'gone.bin' not found"),
    "data_past_end": (lambda f, r: _external_to(f, r, "w.bin", offset=64, data=bytes(128)), "past the end"),
    "data_wrong_length": (lambda f, r: _external_to(f, r, "w.bin", length=100, data=bytes(4096)), "needs 432 bytes"),
    "data_dotdot": (lambda f, r: (_outside_file(f), _external_to(f, r, "../outside.bin"))[1], "escapes the model folder"),
    "data_absolute": (lambda f, r: _external_to(f, r, str(_outside_file(f))), "escapes the model folder"),
    "data_symlink_outside": (_symlink_outside, "escapes the model folder"),
    "data_is_directory": (lambda f, r: ((f / "d.bin").mkdir(), _external_to(f, r, "d.bin"))[1], "not a regular file"),
    "duplicate_value_name": (lambda f, r: _edited(f, r, _duplicate_value_name), "single static assignment"),
    "dangling_input": (lambda f, r: _edited(f, r, _dangling_input), "nobody_makes_this"),
    "cycle": (lambda f, r: _edited(f, r, _cycle), "topologically sorted"),
    "subgraph_dangling": (_subgraph_dangling, "nobody"),
    "name_not_utf8": (_bad_utf8_name, "not valid UTF-8"),
    "tensor_size_mismatch": (lambda f, r: _edited(f, r, _tensor_size_mismatch), "holds 428 bytes of data, expected 432"),
    "tensor_unknown_dtype": (lambda f, r: _edited(f, r, _unknown_dtype), "unknown data type 99"),
}


def _bad_path(case, model_dir, rng):
    make, words = BAD_INPUTS[case]
    return make(model_dir, rng), words


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_reliability_bad_input_cli_one_line_exit_2_nothing_written(case, model_dir, rng, tmp_path):
    path, words = _bad_path(case, model_dir, rng)
    good = tmp_path / "good.onnx"
    onnx.save(conv_bn_model(np.random.default_rng(0)), good)
    before = snapshot(tmp_path)
    for args in ([path], ["fold", path, "-o", tmp_path / "out.onnx", "--json"], ["check", path], ["verify", path, good], ["verify", good, path]):
        invoke_error(args, words)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_reliability_bad_input_api_raises_invalid_model(case, model_dir, rng, tmp_path):
    path, words = _bad_path(case, model_dir, rng)
    before = snapshot(tmp_path)
    for call in (bnfold.fold, bnfold.check, lambda p: bnfold.fold_file(p, tmp_path / "out.onnx")):
        with pytest.raises(bnfold.InvalidModel) as err:
            call(path)
        assert words in str(err.value) and "\n" not in str(err.value)
    assert snapshot(tmp_path) == before


def test_reliability_unreadable_file_exit_2(model_dir, rng, monkeypatch):
    path = _write(model_dir, _model_bytes(rng))
    if os.geteuid() == 0:  # root reads anything: simulate the refusal
        real = pathlib.Path.read_bytes

        def refuse(self):
            if self == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(pathlib.Path, "read_bytes", refuse)
    else:
        path.chmod(0)
    invoke_error([path], "permission denied")
    invoke_error(["check", path], "permission denied")
    with pytest.raises(bnfold.InvalidModel, match="permission denied"):
        bnfold.fold(path)


def _wait_or_unblock(thread: threading.Thread, fifo: pathlib.Path, seconds: float) -> bool:
    """True if `thread` ended by itself; else open the FIFO's write end so a blocked reader
    gets EOF (the test then fails instead of hanging)."""
    thread.join(seconds)
    if not thread.is_alive():
        return True
    with open(fifo, "wb"):
        pass
    thread.join()
    return False


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_reliability_escaping_external_data_is_never_opened(model_dir, rng, how):
    """The outside target is a FIFO: opening it for reading would block until a writer comes,
    so finishing at all proves bnfold never opened it."""
    fifo = model_dir.parent / "outside.fifo"
    os.mkfifo(fifo)
    location = {"dotdot": "../outside.fifo", "absolute": str(fifo), "symlink": "link.bin"}[how]
    if how == "symlink":
        (model_dir / "link.bin").symlink_to(fifo)
    path = _external_to(model_dir, rng, location)
    results = []
    thread = threading.Thread(target=lambda: results.append(CliRunner().invoke(main, [str(path)])))
    thread.start()
    assert _wait_or_unblock(thread, fifo, 30), "bnfold opened the escaping external data file"
    assert results[0].exit_code == 2 and "escapes the model folder" in results[0].stderr


def test_reliability_model_file_is_a_fifo_is_refused_without_blocking(model_dir):
    fifo = model_dir / "m.onnx"
    os.mkfifo(fifo)
    results = []
    thread = threading.Thread(target=lambda: results.append(CliRunner().invoke(main, [str(fifo)])))
    thread.start()
    assert _wait_or_unblock(thread, fifo, 30), "bnfold blocked reading a FIFO"
    assert results[0].exit_code == 2


def test_reliability_control_characters_in_names_stay_on_one_line(model_dir, rng):
    """A newline in a name (or a path) must not split a message or forge a report line."""
    model = conv_bn_model(rng)
    model.graph.node[2].op_type = "NoSuch\nbnfold: verification passed"
    path = _write(model_dir, model.SerializeToString(), "evil\nname.onnx")
    line = invoke_error([path], "evil\\nname.onnx")
    assert "NoSuch" in line and "\\n" in line


def test_reliability_control_characters_in_kept_reason_escaped(model_dir, rng):
    model = conv_bn_model(rng)
    model.graph.node[0].name = "conv\nverification passed"
    model.graph.output.append(value_info("c", np.float32, ["batch", 4, 5, 5]))  # BN kept: Conv output is a graph output
    path = _write(model_dir, model.SerializeToString())
    result = invoke([path, "--json"], 0)
    assert not any(line.startswith("verification passed") for line in result.stderr.splitlines())
    assert "conv\\nverification passed" in result.stderr
    assert "conv\nverification passed" in json.loads(result.stdout)["kept"][0]["reason"]


def test_reliability_undefined_input_type_exit_2(model_dir, rng):
    """The checker accepts a graph input of element type UNDEFINED; generating inputs cannot."""
    model = conv_bn_model(rng)
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.UNDEFINED
    path = _write(model_dir, model.SerializeToString())
    invoke_error([path], "input 'x' has no valid element type")
    assert sorted(p.name for p in model_dir.iterdir()) == ["m.onnx"]


def test_reliability_hostile_input_shape_exit_2(model_dir, rng):
    """Generated inputs follow the declared shape; a hostile one must not allocate terabytes.
    (A value <= 0 is how exporters write a dynamic dim: see tests/test_verify_inside.py.)"""
    model = conv_bn_model(rng)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 2**40
    path = _write(model_dir, model.SerializeToString())
    line = invoke_error([path], "input 'x'")
    assert "too large to generate" in line and "--dim" in line
    assert sorted(p.name for p in model_dir.iterdir()) == ["m.onnx"]


def test_reliability_out_of_memory_is_one_line(model_dir, rng, monkeypatch):
    path = _write(model_dir, _model_bytes(rng))

    def exhausted(*args, **kwargs):
        raise MemoryError("Unable to allocate 400. TiB")

    monkeypatch.setattr("bnfold.api.fold_model", exhausted)
    invoke_error([path], "out of memory")


# --------------------------------------------------------------------------- BN kept with a reason


def _bn_param(model, param: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == f"bn_{param}")


def _set_param(param: str, value):
    def edit(model):
        t = _bn_param(model, param)
        array = onnx.numpy_helper.to_array(t).copy()
        array[1] = value
        t.CopyFrom(onnx.numpy_helper.from_array(array, t.name))
    return edit


def _set_epsilon(model, value: float):
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.attribute.append(helper.make_attribute("epsilon", value))


def _param_array(param: str, array: np.ndarray):
    def edit(model):
        t = _bn_param(model, param)
        t.CopyFrom(onnx.numpy_helper.from_array(array, t.name))
    return edit


KEPT = {
    "nan_scale": (_set_param("scale", np.nan), "scale holds NaN or Inf"),
    "inf_mean": (_set_param("mean", np.inf), "input_mean holds NaN or Inf"),
    "negative_var": (_set_param("var", -1.0), "input_var + epsilon <= 0"),
    "var_plus_eps_zero": (lambda m: (_set_param("var", -0.5)(m), _set_epsilon(m, 0.5)), "input_var + epsilon <= 0"),
    "shape_mismatch": (_param_array("B", np.zeros(3, np.float32)), "parameter shapes"),
    "not_a_vector": (_param_array("mean", np.zeros((4, 1), np.float32)), "parameter shapes"),
    "int_dtype": (_param_array("mean", np.zeros(4, np.int64)), "non-float dtype int64"),
}


@pytest.mark.parametrize("case", KEPT, ids=list(KEPT))
def test_reliability_bad_bn_parameters_kept_with_reason(case, model_dir, rng):
    edit, reason = KEPT[case]
    path = _edited(model_dir, rng, edit)
    before = path.read_bytes()
    result = invoke([path, "--json"], 0)
    data = json.loads(result.stdout)
    assert data["bn_before"] == data["bn_after"] == 1 and data["folded"] == []
    assert data["kept"][0]["bn"] == "bn" and reason in data["kept"][0]["reason"], data["kept"]
    assert "kept bn: " in result.stderr and reason in result.stderr
    assert count_bn(onnx.load(data["output"])) == 1
    check = invoke(["check", path, "--json"], 0)
    assert reason in json.loads(check.stdout)["kept"][0]["reason"]
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- never lose data


@pytest.fixture(params=["embedded", "external"])
def src(request, model_dir, rng):
    """16 channels: the folded weight (1728 B) is appended to the output's data file and W2
    (1 KiB) stays in the copied one, so every kind of write happens."""
    path = model_dir / "m.onnx"
    model = conv_bn_model(rng, channels=16, tail=True)
    if request.param == "external":
        save_external(model, path)
    else:
        onnx.save(model, path)
    return path


COMMANDS = {
    "fold_default": lambda s, t: ([s], 0),
    "fold_output": lambda s, t: (["fold", s, "-o", t / "o.onnx"], 0),
    "fold_json_no_verify": lambda s, t: ([s, "-o", t / "o.onnx", "--json", "--no-verify"], 0),
    "fold_verification_fails": lambda s, t: ([s, "-o", t / "o.onnx", "--rtol", "0", "--atol", "0", "--strict"], 1),
    "fold_verification_fails_rolled_back": lambda s, t: ([s, "-o", t / "o.onnx", "--rtol", "0", "--atol", "0"], 0),
    "fold_bad_option": lambda s, t: ([s, "--dim", "batch=0"], 2),
    "fold_output_is_input": lambda s, t: ([s, "-o", s], 2),
    "check": lambda s, t: (["check", s], 1),
    "verify": lambda s, t: (["verify", s, s], 0),
}


@pytest.mark.parametrize("command", COMMANDS, ids=list(COMMANDS))
def test_reliability_input_byte_identical_after_every_command(command, src, tmp_path):
    args, code = COMMANDS[command](src, tmp_path)
    inputs = {p.name: p.read_bytes() for p in src.parent.iterdir()}
    invoke(args, code)
    for name, data in inputs.items():
        assert (src.parent / name).read_bytes() == data, f"{name} changed"
    assert not [p for p in tmp_path.rglob("*.bnfold")], "temporary folder left behind"
    if code != 0:
        assert not (tmp_path / "o.onnx").exists() and not src.with_name("m.folded.onnx").exists()


def test_reliability_in_place_replaces_through_a_temporary_file(src, monkeypatch, rng):
    """A hard link to the input keeps the old bytes: the new model was renamed over the name,
    never written into the input file itself."""
    link = src.parent.parent / "hardlink.onnx"
    os.link(src, link)
    old = src.read_bytes()
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((pathlib.Path(a), pathlib.Path(b))), real_replace(a, b))[1])
    invoke([src, "--in-place"], 0)
    assert link.read_bytes() == old
    assert src.read_bytes() != old and count_bn(onnx.load(src)) == 0
    model_rename = [(a, b) for a, b in renames if b == src]
    assert len(model_rename) == 1 and model_rename[0][0].parent.name.endswith(".bnfold")
    assert not [p for p in src.parent.iterdir() if p.name.endswith(".bnfold")]


class _FullDisk:
    """A file whose writes stop with ENOSPC once `budget` bytes went through (shared)."""

    def __init__(self, f, budget: list[int]):
        self._f, self._budget = f, budget

    def write(self, data):
        if len(data) > self._budget[0]:
            self._f.write(bytes(data[: self._budget[0]]))
            self._budget[0] = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._budget[0] -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _fill_disk_after(monkeypatch, budget: int):
    """Every write bnfold's io makes (model, appended tensors, copied data files, tensor ranges
    copied in the kernel) shares one byte budget; past it, writes fail with ENOSPC after writing
    what still fits."""
    left = [budget]
    real_open = open
    def filling_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return _FullDisk(f, left) if "w" in mode or "a" in mode else f

    for module in (staging, external):  # the modules that write model and data files
        monkeypatch.setattr(module, "open", filling_open, raising=False)

    def copyfile(a, b):
        with real_open(a, "rb") as fa, _FullDisk(real_open(b, "wb"), left) as fb:
            fb.write(fa.read())

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    real_copy = external.copy_exactly

    def copy_exactly(src, src_offset, dst, dst_offset, length):  # ranges copied in the kernel
        allowed = min(length, left[0])
        if allowed:
            real_copy(src, src_offset, dst, dst_offset, allowed)
        left[0] -= allowed
        if allowed < length:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(external, "copy_exactly", copy_exactly)


def _bytes_written(src: pathlib.Path, folder: pathlib.Path) -> int:
    """Bytes a successful fold of `src` writes (into `folder`, removed afterwards)."""
    folder.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        _fill_disk_after(mp, 2**40)
        bnfold.fold_file(src, folder / "o.onnx")
    written = sum(p.stat().st_size for p in folder.iterdir())
    shutil.rmtree(folder)
    return written


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6, 0.9, 0.999])
@pytest.mark.parametrize("mode", ["default", "output", "over_output", "in_place"])
def test_reliability_disk_full_exit_2_input_intact_nothing_left(src, tmp_path, monkeypatch, mode, fraction):
    """The disk fills after `fraction` of what the fold writes: while copying the source's
    data file, appending the folded weights, or writing the model. A previous output stays."""
    budget = int(fraction * _bytes_written(src, tmp_path / "probe"))
    if mode == "over_output":
        (tmp_path / "o.onnx").write_bytes(b"a previous output")
    before = snapshot(tmp_path)
    _fill_disk_after(monkeypatch, budget)
    output = [src, "-o", tmp_path / "o.onnx"]
    args = {"default": [src], "output": output, "over_output": output, "in_place": [src, "--in-place"]}[mode]
    invoke_error(args, "No space left on device")
    assert snapshot(tmp_path) == before


def test_reliability_disk_full_api_raises_write_failed(src, tmp_path, monkeypatch):
    before = snapshot(tmp_path)
    _fill_disk_after(monkeypatch, 50)
    with pytest.raises(bnfold.WriteFailed, match="No space left"):
        bnfold.fold_file(src, tmp_path / "o.onnx")
    assert snapshot(tmp_path) == before


def test_reliability_unwritable_destination_folder(src, tmp_path, monkeypatch):
    folder = tmp_path / "readonly"
    folder.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere: simulate the refusal
        def refuse(**kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(staging.tempfile, "mkdtemp", refuse)
    before = snapshot(tmp_path)
    invoke_error([src, "-o", folder / "o.onnx"], "Permission denied")
    invoke_error([src, "-o", tmp_path / "no" / "such" / "o.onnx"], "does not exist")
    assert snapshot(tmp_path) == before


def test_reliability_model_rename_fails_leaves_no_data_file(src, tmp_path, monkeypatch):
    """A failure at the last step (the model's rename) takes back the data files it moved."""
    real_replace = os.replace

    def replace(a, b):
        if pathlib.Path(b).name == "o.onnx":
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    before = snapshot(tmp_path)
    invoke_error([src, "-o", tmp_path / "o.onnx"], "Input/output error")
    assert snapshot(tmp_path) == before


def test_reliability_output_onto_input_data_file_refused(model_dir, rng):
    """`-o weights.bin` would replace the input's own external data with a model file."""
    src = save_external(conv_bn_model(rng), model_dir / "m.onnx")
    before = snapshot(model_dir)
    invoke_error([src, "-o", model_dir / "weights.bin"], "external data file of the input")
    assert snapshot(model_dir) == before


def test_reliability_output_data_file_onto_input_model_refused(model_dir, rng):
    """Output o.onnx keeps its weights in o.onnx.data; that must not be the input model."""
    src = save_external(conv_bn_model(rng), model_dir / "o.onnx.data", location="w.bin")
    before = snapshot(model_dir)
    invoke_error([src, "-o", model_dir / "o.onnx"], "over the input")
    assert snapshot(model_dir) == before


def test_reliability_overwrite_other_output_removes_old_model_before_its_data(model_dir, rng, monkeypatch):
    """Killed between the data rename and the model rename, an older output at -o must not be
    left reading the new data file (wrong weights): it is removed first."""
    src_a = save_external(conv_bn_model(rng, channels=16), model_dir / "a.onnx", location="a.bin")
    src_b = save_external(conv_bn_model(np.random.default_rng(5), channels=16), model_dir / "b.onnx", location="b.bin")
    out = model_dir / "out.onnx"
    invoke([src_a, "-o", out], 0)
    assert (model_dir / "out.onnx.data").exists()  # the folded weights are big enough to go external

    class Killed(BaseException):
        pass

    real_replace = os.replace

    def replace(a, b):
        if pathlib.Path(b) == out:
            raise Killed  # the process dies here
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        bnfold.fold_file(src_b, out)
    assert not out.exists(), "old model left reading the new data file"


# --------------------------------------------------------------------------- killed mid-write

# MatMul [C, C] float32: 16 MiB of weights per copy in the default run, 64 MiB with -m slow.
KILL_SIZES = [2048, pytest.param(4096, marks=pytest.mark.slow)]


def _skip_unless_slow_selected(channels: int, request) -> None:
    if channels > 2048 and "slow" not in request.config.getoption("markexpr", ""):
        pytest.skip("64 MiB model: run with -m slow")


def _big_model(channels: int) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [tensor("W", rng.standard_normal((channels, channels), dtype=np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), bn_node(inits, "m", "y", rng, channels, name="bn")]
    return make_model(nodes, [value_info("x", np.float32, [2, channels])], [value_info("y", np.float32, [2, channels])], inits)


def _cli_process(args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "import sys; from bnfold.cli import main; main(sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when_staging(proc: subprocess.Popen, folder: pathlib.Path, after: float) -> bool:
    """SIGKILL `after` seconds once the temporary folder appears; False if the run ended first."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if any(p.name.endswith(".bnfold") for p in folder.iterdir()):
            time.sleep(after)
            break
        time.sleep(0.002)
    ended = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return not ended


def _assert_loads_and_matches(path: pathlib.Path, reference: pathlib.Path):
    io.load_model(path)
    verification = bnfold.verify(reference, path)
    assert verification.passed, verification.to_dict()


@pytest.mark.parametrize("channels", KILL_SIZES)
@pytest.mark.parametrize("layout", ["embedded", "external"])
def test_reliability_sigkill_mid_write_leaves_no_output_or_a_complete_one(tmp_path, layout, channels, request):
    """The real CLI in a subprocess, SIGKILLed at several moments after its temporary folder
    appears: the input never changes, and out.onnx is either absent or loads and matches."""
    _skip_unless_slow_selected(channels, request)
    folder = tmp_path / layout
    folder.mkdir()
    src = folder / "big.onnx"
    model = _big_model(channels)
    if layout == "external":
        save_external(model, src, location="big.data")
    else:
        onnx.save(model, src)
    reference = tmp_path / "reference.onnx"
    shutil.copy(src, reference) if layout == "embedded" else save_external(model, reference, location="reference.data")
    inputs = snapshot(folder)
    out = folder / "out.onnx"
    killed = 0
    for after in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8):
        killed += _kill_when_staging(_cli_process([src, "-o", out]), folder, after)
        assert {k: v for k, v in snapshot(folder).items() if k in inputs} == inputs, "input changed"
        if out.exists():
            _assert_loads_and_matches(out, reference)
            out.unlink()
        for leftover in folder.iterdir():
            if leftover.name not in inputs and not leftover.name.startswith("big"):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    assert killed >= 3, "the runs ended before the kills: the model is too small to catch a write"


@pytest.mark.parametrize("channels", KILL_SIZES)
def test_reliability_sigkill_in_place_leaves_old_or_new(tmp_path, channels, request):
    _skip_unless_slow_selected(channels, request)
    src = tmp_path / "big.onnx"
    model = _big_model(channels)
    save_external(model, src, location="big.onnx.data")
    reference = tmp_path / "ref" / "reference.onnx"
    reference.parent.mkdir()
    save_external(model, reference, location="reference.data")
    for after in (0.0, 0.05, 0.2, 0.5):
        _kill_when_staging(_cli_process([src, "--in-place"]), tmp_path, after)
        _assert_loads_and_matches(src, reference)


# --------------------------------------------------------------------------- regressions
# Bugs found while writing these tests and by tests/test_fuzz_files.py, one test each, named
# after the bug.


def test_regression_var_equal_minus_default_epsilon_kept(model_dir, rng):
    """The default epsilon is a float32 attribute: var = float32(-1e-5) makes var + eps exactly 0
    at run time, so the BN is kept (it used to be folded with a huge scale, and only the
    verification, exit 1, stopped it)."""
    path = _edited(model_dir, rng, _set_param("var", np.float32(-1e-5)))
    result = invoke([path, "--json"], 0)
    assert "input_var + epsilon <= 0" in json.loads(result.stdout)["kept"][0]["reason"]


def test_regression_tensor_raw_data_shorter_than_shape_refused_at_load(model_dir, rng):
    """Fuzz: a dtype swap (float32 -> float16) left raw_data the wrong size; the checker let it
    through and the fold crashed in numpy's reshape ("internal error: ValueError")."""
    def swap(model):
        _bn_param(model, "mean").data_type = TensorProto.FLOAT16
    path = _edited(model_dir, rng, swap)
    invoke_error([path], "tensor 'bn_mean' (FLOAT16 [4]) holds 16 bytes of data, expected 8")


def test_regression_tensor_unknown_data_type_refused_at_load(model_dir, rng):
    """Fuzz: data_type 99 crashed onnx's numpy_helper with a KeyError."""
    path = _edited(model_dir, rng, lambda m: setattr(_bn_param(m, "B"), "data_type", 99))
    invoke_error([path], "unknown data type 99")


def test_regression_external_length_not_matching_shape_refused_at_load(model_dir, rng):
    """The range fit in the file but not the tensor: onnx would fail to reshape on first read."""
    path = _external_to(model_dir, rng, "w.bin", length=400, data=bytes(432))
    invoke_error([path], "needs 432 bytes but its external data range in 'w.bin' holds 400")


def test_regression_graph_input_elem_type_undefined_is_exit_2(model_dir, rng):
    """Fuzz: elem_type 0 on the graph input crashed input generation with KeyError: 0."""
    model = conv_bn_model(rng)
    model.graph.input[0].type.tensor_type.elem_type = 0
    invoke_error([_write(model_dir, model.SerializeToString())], "no valid element type (0)")


def test_regression_huge_input_dim_is_usage_error_not_memory_error(model_dir, rng):
    """Fuzz: dim_value 2**31 made input generation ask numpy for 96 GiB (MemoryError)."""
    model = conv_bn_model(rng)
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 2**31
    line = invoke_error([_write(model_dir, model.SerializeToString())], "too large to generate")
    assert "--dim NAME=SIZE or --inputs FILE.npz" in line


def test_regression_invalid_utf8_node_name_crashed_json_after_writing(model_dir, rng):
    """Fuzz: a node name with invalid UTF-8 came back from protobuf as bytes; `--json` then
    crashed (exit 2, "internal error") after the output had been written."""
    path = _bad_utf8_name(model_dir, rng)
    invoke_error([path, "--json"], "NodeProto.name is not valid UTF-8")
    assert sorted(p.name for p in model_dir.iterdir()) == ["m.onnx"]


def test_regression_opset_newer_than_onnx_refused(model_dir, rng):
    """The checker accepts opset 999; bnfold folded it under unknown semantics and "verified" it
    with onnx.reference after onnxruntime refused the model."""
    invoke_error([_edited(model_dir, rng, _opsets(("", 999)))], "opset 999 is not supported")


def test_regression_python_warnings_do_not_reach_cli_stderr(model_dir, rng):
    """Fuzz: numpy overflow warnings and onnx's notes on unknown external data keys printed extra
    lines on stderr; the CLI reports in its own lines only."""
    path = _write(model_dir, _model_bytes(rng))
    script = (
        "import sys, warnings\n"
        "from bnfold import api\n"
        "def noisy(*args, **kwargs):\n"
        "    warnings.warn('overflow encountered in cast', RuntimeWarning)\n"
        "    raise api.UsageError('broken')\n"
        "api.fold_model = noisy\n"
        "from bnfold.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "always"}
    env.pop("BNFOLD_DEBUG", None)
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and result.stderr == "bnfold: error: broken\n", result.stderr


def _ai_onnx_domain(model):
    model.opset_import[0].domain = "ai.onnx"


def test_regression_opset_imported_as_ai_onnx_folds(model_dir, rng):
    """An opset_import spelled 'ai.onnx' (the default domain's full name) is what onnxruntime and
    the checker accept; bnfold keeps the BN as "BatchNormalization-0 in training mode"."""
    model = conv_bn_model(rng)
    _ai_onnx_domain(model)
    result = bnfold.fold(model)
    assert len(result.report.folded) == 1, result.report.to_dict()["kept"]


def _constant_chain(depth: int, op: str, fan_in: int) -> onnx.ModelProto:
    """BN scale = a chain of `depth` nodes, each reading the previous value `fan_in` times."""
    rng = np.random.default_rng(0)
    inits = [tensor("W", rng.normal(size=(4, 3, 1, 1)).astype(np.float32))]
    bn = bn_node(inits, "c", "y", rng, 4, name="bn")
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Constant", [], ["s0"], name="s0", value=tensor("v", np.full(4, 0.5, np.float32))),
    ]
    attrs = {"axis": 0} if op == "Concat" else {}
    nodes += [helper.make_node(op, [f"s{i}"] * fan_in, [f"s{i + 1}"], name=f"s{i + 1}", **attrs) for i in range(depth)]
    bn.input[1] = f"s{depth}"
    inits = [t for t in inits if t.name != "bn_scale"]
    return make_model([*nodes, bn], [value_info("x", np.float32, [1, 3, 2, 2])], [value_info("y", np.float32, [1, 4, 2, 2])], inits)


def test_regression_constant_chain_evaluated_once_per_node(monkeypatch):
    """Each level reads the one below twice: 10 nodes cost 2**10 evaluations (16 levels of
    Concat x4, within MAX_CONSTANT_DEPTH, would cost 4**16: a 20-node model that never ends)."""
    from bnfold import graph

    calls = []
    real = graph._evaluate
    monkeypatch.setattr(graph, "_evaluate", lambda *a: (calls.append(1), real(*a))[1])
    result = bnfold.fold(_constant_chain(10, "Add", 2))
    assert len(result.report.folded) == 1
    assert len(calls) <= 10, f"{len(calls)} evaluations for 10 nodes"


def test_regression_constant_of_shape_bomb_not_materialized():
    """A 3-node model whose BN scale is ConstantOfShape([2**26]) makes the fold allocate 256 MiB
    (2**32 would ask for 16 GiB). A BN parameter has C elements: big constants are not params."""
    import tracemalloc

    model = _constant_chain(0, "Add", 2)
    bn = model.graph.node[-1]
    model.graph.node.insert(0, helper.make_node("Constant", [], ["shape"], value=tensor("n", np.array([2**26], np.int64))))
    model.graph.node.insert(1, helper.make_node("ConstantOfShape", ["shape"], ["big"], value=tensor("one", np.ones(1, np.float32))))
    bn.input[1] = "big"
    tracemalloc.start()
    try:
        result = bnfold.fold(model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.report.kept
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_regression_newline_in_tensor_name_keeps_api_message_one_line(model_dir, rng):
    """Fuzz (case 3949 of the long profile): an overwritten chunk put protobuf bytes, newline
    included, into a tensor name; the API's InvalidModel message spanned two lines."""
    model = conv_bn_model(rng)
    point_external(model, "W", "w.bin")
    w = next(t for t in model.graph.initializer if t.name == "W")
    w.name = "W\nlocation"
    del w.external_data[0]  # no location left: refused, quoting the name
    path = _write(model_dir, model.SerializeToString())
    with pytest.raises(bnfold.InvalidModel) as err:
        bnfold.fold(path)
    assert "\n" not in str(err.value) and "W\\nlocation" in str(err.value)
    invoke_error([path], "W\\nlocation")
