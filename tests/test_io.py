"""bnfold.io: loading with checks, external data layout on save, atomic commit, crash safety.

Builders are local on purpose: these tests are about files on disk, not fold rules.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import io, staging
from bnfold.errors import InvalidModel, WriteFailed

REPO = pathlib.Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(7)
X = RNG.normal(size=(1, 16)).astype(np.float32)


# --------------------------------------------------------------------------- builders


def mlp_weights() -> dict[str, np.ndarray]:
    """W1 (2 KiB) and W2 (2 KiB) go external; B1 (128 B) stays embedded."""
    return {
        "W1": RNG.normal(size=(16, 32)).astype(np.float32),
        "B1": RNG.normal(size=(32,)).astype(np.float32),
        "W2": RNG.normal(size=(32, 16)).astype(np.float32),
    }


def mlp_model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H"]),
        helper.make_node("Add", ["H", "B1"], ["A"]),
        helper.make_node("MatMul", ["A", "W2"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return _finish(graph)


def mlp_expected(w: dict[str, np.ndarray]) -> np.ndarray:
    return (X @ w["W1"] + w["B1"]) @ w["W2"]


def if_model(then_w: np.ndarray, else_w: np.ndarray) -> onnx.ModelProto:
    """Y = X @ T if cond else X @ E, with T and E initializers of the branch subgraphs."""
    def branch(name, w):
        return helper.make_graph(
            [helper.make_node("MatMul", ["X", name], [f"{name}_out"])], f"{name}_branch", [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 16])],
            [numpy_helper.from_array(w, name)],
        )
    node = helper.make_node("If", ["cond"], ["Y"], then_branch=branch("T", then_w), else_branch=branch("E", else_w))
    graph = helper.make_graph(
        [node], "if",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 16])],
    )
    return _finish(graph)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save_external(model: onnx.ModelProto, path: pathlib.Path, location: str | None = "weights.bin") -> pathlib.Path:
    """Save with tensors >= 256 B in external data (`location=None`: one file per tensor)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(
        copy, path, save_as_external_data=True, all_tensors_to_one_file=location is not None,
        location=location, size_threshold=256,
    )
    return path


def replace_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """What a fold does: the tensor becomes an in-memory array, its external reference gone."""
    for graph in [model.graph, *(a.g for n in model.graph.node for a in n.attribute if a.HasField("g"))]:
        for init in graph.initializer:
            if init.name == name:
                init.CopyFrom(numpy_helper.from_array(value, name))
                return
    raise KeyError(name)


def run(path: pathlib.Path, **feeds) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": X, **feeds})[0]


def digest(*paths: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def ext_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def raw_range(path: pathlib.Path, tensor: onnx.TensorProto) -> bytes:
    entries = ext_entries(tensor)
    with open(path, "rb") as f:
        f.seek(int(entries.get("offset", 0)))
        return f.read(int(entries["length"]))


def temp_leftovers(folder: pathlib.Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".bnfold")]


# --------------------------------------------------------------------------- round trips


def test_io_embedded_round_trip(tmp_path):
    w = mlp_weights()
    model = mlp_model(w)
    path = io.save_model(model, tmp_path / "m.onnx")
    loaded = io.load_model(path)
    assert loaded.model.SerializeToString() == model.SerializeToString()
    assert loaded.external_files == () and loaded.base_dir == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    np.testing.assert_allclose(run(path), mlp_expected(w), rtol=1e-5)


def test_io_external_replaced_initializer_appended_unchanged_copied(tmp_path):
    w = mlp_weights()
    (tmp_path / "in").mkdir()
    src = save_external(mlp_model(w), tmp_path / "in" / "m.onnx")
    before = digest(src, src.parent / "weights.bin")
    loaded = io.load_model(src)
    assert loaded.external_files == ("weights.bin",)
    w["W2"] = RNG.normal(size=(32, 16)).astype(np.float32)
    replace_initializer(loaded.model, "W2", w["W2"])

    (tmp_path / "out").mkdir()
    dst = io.save_model(loaded.model, tmp_path / "out" / "m.onnx", source=loaded)

    data = dst.parent / "m.onnx.data"
    assert sorted(p.name for p in dst.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert not os.path.samefile(data, src.parent / "weights.bin")
    assert digest(src, src.parent / "weights.bin") == before
    out = onnx.load(dst, load_external_data=False)
    w1_in, w1_out, w2_out = initializers(loaded.model)["W1"], initializers(out)["W1"], initializers(out)["W2"]
    assert ext_entries(w1_out)["offset"] == ext_entries(w1_in)["offset"]
    assert raw_range(data, w1_out) == raw_range(src.parent / "weights.bin", w1_in)
    assert ext_entries(w2_out)["location"] == "m.onnx.data" and int(ext_entries(w2_out)["offset"]) % io.ALIGN == 0
    full = onnx.load(dst, load_external_data=True)
    for name, value in w.items():
        np.testing.assert_array_equal(numpy_helper.to_array(initializers(full)[name]), value)
    np.testing.assert_allclose(run(dst), mlp_expected(w), rtol=1e-5)


def test_io_save_leaves_callers_model_unchanged(tmp_path):
    src = save_external(mlp_model(mlp_weights()), tmp_path / "m.onnx")
    loaded = io.load_model(src)
    replace_initializer(loaded.model, "W2", np.zeros((32, 16), np.float32))
    snapshot = loaded.model.SerializeToString()
    io.save_model(loaded.model, tmp_path / "out.onnx", source=loaded)
    assert loaded.model.SerializeToString() == snapshot


def test_io_external_several_files_numbered(tmp_path):
    w = mlp_weights()
    src = save_external(mlp_model(w), tmp_path / "m.onnx", location=None)
    loaded = io.load_model(src)
    assert set(loaded.external_files) == {"W1", "W2"}
    dst = io.save_model(loaded.model, tmp_path / "o.onnx", source=loaded)
    assert {"o.onnx.0.data", "o.onnx.1.data"} <= {p.name for p in tmp_path.iterdir()}
    np.testing.assert_allclose(run(dst), mlp_expected(w), rtol=1e-5)


def test_io_subgraph_tensors_external(tmp_path):
    then_w, else_w = (RNG.normal(size=(16, 16)).astype(np.float32) for _ in range(2))
    src = save_external(if_model(then_w, else_w), tmp_path / "if.onnx")
    loaded = io.load_model(src)
    assert loaded.external_files == ("weights.bin",)
    then_w = RNG.normal(size=(16, 16)).astype(np.float32)
    replace_initializer(loaded.model, "T", then_w)
    dst = io.save_model(loaded.model, tmp_path / "out.onnx", source=loaded)

    out = onnx.load(dst, load_external_data=False)
    for tensor in io.iter_tensors(out):
        assert ext_entries(tensor)["location"] == "out.onnx.data"
    np.testing.assert_allclose(run(dst, cond=np.array(True)), X @ then_w, rtol=1e-5)
    np.testing.assert_allclose(run(dst, cond=np.array(False)), X @ else_w, rtol=1e-5)


def test_io_in_place_same_data_name(tmp_path):
    w = mlp_weights()
    src = save_external(mlp_model(w), tmp_path / "m.onnx", location="m.onnx.data")
    loaded = io.load_model(src)
    w["W1"] = np.full((16, 32), 0.5, np.float32)
    replace_initializer(loaded.model, "W1", w["W1"])
    assert io.save_model(loaded.model, src, source=loaded) == src
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    np.testing.assert_allclose(run(src), mlp_expected(w), rtol=1e-5)
    assert io.load_model(src).external_files == ("m.onnx.data",)


def test_io_in_place_other_data_name_keeps_input_data(tmp_path):
    w = mlp_weights()
    src = save_external(mlp_model(w), tmp_path / "m.onnx")
    before = digest(tmp_path / "weights.bin")
    loaded = io.load_model(src)
    io.save_model(loaded.model, src, source=loaded)
    assert digest(tmp_path / "weights.bin") == before
    assert io.load_model(src).external_files == ("m.onnx.data",)
    np.testing.assert_allclose(run(src), mlp_expected(w), rtol=1e-5)


def test_io_too_big_to_embed_saved_external(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "MAX_EMBEDDED", 1000)
    w = mlp_weights()
    dst = io.save_model(mlp_model(w), tmp_path / "m.onnx")
    assert io.load_model(dst).external_files == ("m.onnx.data",)
    np.testing.assert_allclose(run(dst), mlp_expected(w), rtol=1e-5)


# --------------------------------------------------------------------------- staging


def test_io_staged_opens_by_path_before_commit(tmp_path):
    w = mlp_weights()
    src = save_external(mlp_model(w), tmp_path / "m.onnx")
    loaded = io.load_model(src)
    staged = io.stage_model(loaded.model, tmp_path / "out.onnx", source=loaded)
    assert staged.path.parent.parent == tmp_path and not (tmp_path / "out.onnx").exists()
    np.testing.assert_allclose(run(staged.path), mlp_expected(w), rtol=1e-5)
    staged.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "weights.bin"]


def test_io_in_place_keeps_file_mode(tmp_path):
    src = io.save_model(mlp_model(mlp_weights()), tmp_path / "m.onnx")
    src.chmod(0o640)
    io.save_model(io.load_model(src).model, src)
    assert src.stat().st_mode & 0o777 == 0o640


def test_io_staged_context_manager_discards_unless_committed(tmp_path):
    model = mlp_model(mlp_weights())
    with io.stage_model(model, tmp_path / "a.onnx"):
        pass
    with io.stage_model(model, tmp_path / "b.onnx") as staged:
        staged.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.onnx"]


# --------------------------------------------------------------------------- invalid models


def _ext_model(folder: pathlib.Path, location: str, offset: int = 0, length: int | None = None) -> pathlib.Path:
    """An MLP whose W1 points at `location` (written directly: onnx helpers would refuse)."""
    w = mlp_weights()
    model = mlp_model(w)
    w1 = initializers(model)["W1"]
    w1.ClearField("raw_data")
    w1.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length or w["W1"].nbytes)):
        entry = w1.external_data.add()
        entry.key, entry.value = key, str(value)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    return folder / "m.onnx"


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    return path


def _mlp_bytes() -> bytes:
    return mlp_model(mlp_weights()).SerializeToString()


def _without_opset(tmp_path):
    model = mlp_model(mlp_weights())
    del model.opset_import[:]
    return _write(tmp_path / "m.onnx", model.SerializeToString())


def _unknown_op(tmp_path):
    model = mlp_model(mlp_weights())
    model.graph.node[0].op_type = "NoSuchOp"
    return _write(tmp_path / "m.onnx", model.SerializeToString())


def _escape_to(tmp_path, location):
    (tmp_path / "outside.bin").write_bytes(bytes(4096))
    return _ext_model(tmp_path / "model", location)


def _symlink_escape(tmp_path):
    path = _escape_to(tmp_path, "link.bin")
    (tmp_path / "model" / "link.bin").symlink_to(tmp_path / "outside.bin")
    return path


def _short_data(tmp_path):
    path = _ext_model(tmp_path, "w.bin", offset=1024)
    (tmp_path / "w.bin").write_bytes(bytes(2048))
    return path


def _sparse_over_2gb(tmp_path):
    with open(tmp_path / "m.onnx", "wb") as f:
        f.truncate(2**31)
    return tmp_path / "m.onnx"


INVALID = {
    "missing": (lambda p: p / "nope.onnx", "not found"),
    "directory": (lambda p: p, "directory"),
    "empty": (lambda p: _write(p / "m.onnx", b""), "empty"),
    "over_2gb": (_sparse_over_2gb, "2 GiB"),
    "text": (lambda p: _write(p / "m.onnx", b"hello, not a model\n"), "decode"),
    "truncated": (lambda p: _write(p / "m.onnx", _mlp_bytes()[:-40]), "decode"),
    "bit_flipped": (lambda p: _write(p / "m.onnx", b"\xff" + _mlp_bytes()[1:]), "decode"),
    "graph_proto": (lambda p: _write(p / "m.onnx", mlp_model(mlp_weights()).graph.SerializeToString()), "no graph"),
    "no_opset": (_without_opset, "opset"),
    "checker": (_unknown_op, "checker: No Op registered for NoSuchOp"),
    "dotdot": (lambda p: _escape_to(p, "../outside.bin"), "escapes"),
    "absolute": (lambda p: _escape_to(p, str(p / "outside.bin")), "escapes"),
    "symlink": (_symlink_escape, "escapes"),
    "data_missing": (lambda p: _ext_model(p, "gone.bin"), "'gone.bin' not found"),
    "data_short": (_short_data, "past the end"),
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_io_load_invalid_raises_one_line(tmp_path, case):
    make, words = INVALID[case]
    path = make(tmp_path)
    with pytest.raises(InvalidModel) as err:
        io.load_model(path)
    message = str(err.value)
    assert words in message and str(path) in message
    assert "\n" not in message and len(message) < 400


def test_io_load_unreadable_raises(tmp_path, monkeypatch):
    path = _write(tmp_path / "m.onnx", _mlp_bytes())
    if os.geteuid() == 0:  # root reads anything: simulate the refusal instead
        def refuse(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        monkeypatch.setattr(pathlib.Path, "read_bytes", refuse)
    else:
        path.chmod(0)
    with pytest.raises(InvalidModel, match="permission denied"):
        io.load_model(path)


def test_io_read_tensor_refuses_escape_without_reading(tmp_path):
    path = _escape_to(tmp_path, "../outside.bin")
    model = onnx.load(path, load_external_data=False)
    with pytest.raises(InvalidModel, match="escapes"):
        io.read_tensor(initializers(model)["W1"], path.parent)


def test_io_read_tensor_external_and_embedded(tmp_path):
    w = mlp_weights()
    loaded = io.load_model(save_external(mlp_model(w), tmp_path / "m.onnx"))
    for name, value in w.items():
        np.testing.assert_array_equal(io.read_tensor(initializers(loaded.model)[name], loaded.base_dir), value)
    assert io.is_external(initializers(loaded.model)["W1"])  # reading did not pull the data in


# --------------------------------------------------------------------------- write failures


@pytest.mark.parametrize("where", ["missing_folder", "folder_is_file", "unwritable"])
def test_io_write_failed_leaves_nothing(tmp_path, where, monkeypatch):
    if where == "unwritable" and os.geteuid() == 0:  # root writes anywhere: simulate the refusal
        def refuse(**kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(staging.tempfile, "mkdtemp", refuse)
    parent = {"missing_folder": tmp_path / "no" / "such", "folder_is_file": tmp_path / "f", "unwritable": tmp_path / "ro"}[where]
    if where == "folder_is_file":
        parent.write_bytes(b"")
    if where == "unwritable":
        parent.mkdir(mode=0o555)
    with pytest.raises(WriteFailed, match="cannot write"):
        io.save_model(mlp_model(mlp_weights()), parent / "m.onnx")
    assert temp_leftovers(tmp_path) == [] and not (parent / "m.onnx").exists()


def test_io_disk_full_cleans_temp_folder(tmp_path, monkeypatch):
    src = save_external(mlp_model(mlp_weights()), tmp_path / "m.onnx")
    loaded = io.load_model(src)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteFailed, match="No space left"):
        io.save_model(loaded.model, tmp_path / "out.onnx", source=loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "weights.bin"]


# --------------------------------------------------------------------------- crash safety

KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from bnfold import io, staging
    from onnx import numpy_helper
    src, dst, pause = sys.argv[1:4]
    loaded = io.load_model(src)
    loaded.model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((16, 32), 3.0, np.float32), "W1"))
    replace = os.replace
    def replace_then_pause(a, b):
        replace(a, b)
        if pause == "between" and str(b).endswith(".data"):
            print("ready", flush=True)
            time.sleep(60)
    os.replace = replace_then_pause
    staged = io.stage_model(loaded.model, dst, source=loaded)
    if pause == "staged":
        print("ready", flush=True)
        time.sleep(60)
    staged.commit()
""")


@pytest.mark.parametrize("pause", ["staged", "between"])
@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "new_file"])
def test_io_killed_mid_write_leaves_old_or_new(tmp_path, pause, in_place):
    w = mlp_weights()
    src = save_external(mlp_model(w), tmp_path / "m.onnx", location="m.onnx.data")
    dst = src if in_place else tmp_path / "out.onnx"
    data_size = (tmp_path / "m.onnx.data").stat().st_size
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(src), str(dst), pause], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline() == b"ready\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if not in_place:
        assert not dst.exists()
        return
    grown = (tmp_path / "m.onnx.data").stat().st_size > data_size
    assert grown == (pause == "between")
    io.load_model(dst)  # the old model; after "between" it reads the new data file
    np.testing.assert_allclose(run(dst), mlp_expected(w), rtol=1e-5)


# --------------------------------------------------------------------------- large models


@pytest.mark.slow
def test_io_over_2gb_external_copies_data_appends_small(tmp_path, request):
    if "slow" not in request.config.getoption("markexpr", ""):
        pytest.skip("large model: run with -m slow")
    import resource

    count = (2**31 + 2**20) // 4  # 2 GiB + 1 MiB of float32, written sparsely
    big = np.memmap(tmp_path / "m.onnx.data", dtype=np.float32, mode="w+", shape=(count,))
    big[:4], big[-4:] = [1, 2, 3, 4], [5, 6, 7, 8]
    big.flush()
    del big
    small = np.ones((64, 64), np.float32)
    model = mlp_model(mlp_weights())  # carries a tiny graph; the big tensor rides along
    big_t = helper.make_tensor_value_info("Big", TensorProto.FLOAT, [count])
    model.graph.output.append(big_t)
    model.graph.node.append(helper.make_node("Identity", ["BigInit"], ["Big"]))
    init = model.graph.initializer.add()
    init.name, init.data_type, init.data_location = "BigInit", TensorProto.FLOAT, TensorProto.EXTERNAL
    init.dims.append(count)
    for key, value in (("location", "m.onnx.data"), ("offset", "0"), ("length", str(count * 4))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    src = _write(tmp_path / "m.onnx", model.SerializeToString())

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loaded = io.load_model(src)
    replace_initializer(loaded.model, "W2", RNG.normal(size=(32, 16)).astype(np.float32))
    replace_initializer(loaded.model, "W1", np.resize(small, (16, 32)))
    dst = io.save_model(loaded.model, tmp_path / "out.onnx", source=loaded)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before

    out = onnx.load(dst, load_external_data=False)
    data = tmp_path / "out.onnx.data"
    assert data.stat().st_size < count * 4 + 4 * io.ALIGN + 2 * 2048
    big_out = initializers(out)["BigInit"]
    assert ext_entries(big_out) == ext_entries(init) | {"location": "out.onnx.data"}
    view = np.memmap(data, dtype=np.float32, mode="r", shape=(count,))
    assert view[:4].tolist() == [1, 2, 3, 4] and view[-4:].tolist() == [5, 6, 7, 8]
    np.testing.assert_array_equal(io.read_tensor(initializers(out)["W1"], tmp_path), np.resize(small, (16, 32)))
    assert grown_kib < 200 * 1024, f"peak memory grew by {grown_kib} KiB"
