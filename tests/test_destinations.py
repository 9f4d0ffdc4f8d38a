"""`-o` destinations that are not a new regular file (devices, FIFOs, stdout, sockets, symlinks,
existing files, the input under another name): written through, or refused in one line; nothing left behind."""

import contextlib
import errno
import os
import pty
import select
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

import bnfold
from bnfold import destination
from bnfold.cli import main
from conftest import assert_same_outputs, conv_bn_relu_chain, count_bn
from test_cli import digest, invoke

NULL_MINOR, FULL_MINOR = 3, 7  # major 1: the memory devices (/dev/null, /dev/full)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def listing(folder) -> set[str]:
    return set(os.listdir(folder))


def scratch_device(tmp_path, name: str, minor: int) -> Path:
    """A character device node (major 1) inside tmp_path; skip where none can be made or opened."""
    path = tmp_path / name
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
        os.close(os.open(path, os.O_WRONLY))
    except OSError as e:  # PermissionError included: no CAP_MKNOD, or a nodev mount
        pytest.skip(f"cannot make a scratch device node: {e}")
    return path


def assert_device(path, minor: int) -> None:
    info = os.lstat(path)
    assert stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(1, minor), f"{path} was replaced"


def bnfold_script() -> str:
    """The console script users run (`python -m bnfold.cli` did nothing: cli.py had no `__main__` block)."""
    script = Path(sys.executable).parent / "bnfold"
    found = str(script) if script.exists() else shutil.which("bnfold")
    if found is None:
        pytest.skip("the bnfold console script is not installed")
    return found


def assert_folded(data: bytes, original, rng) -> None:
    """`data` is a complete model with every BN of `original` folded, computing the same outputs."""
    assert data, "no model bytes were written"
    folded = onnx.load_from_string(data)
    assert count_bn(folded) == 0
    assert_same_outputs(original, folded, rng)


class FifoReader:
    """Reads everything written to the FIFO at `path` in a daemon thread."""

    def __init__(self, path):
        self.path, self.chunks, self.opened = path, [], threading.Event()
        # Linux: an O_PATH descriptor reaches the FIFO even if bnfold replaces the path
        self.pin = os.open(path, os.O_PATH) if hasattr(os, "O_PATH") else None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        with open(self.path, "rb") as f:
            self.opened.set()
            while chunk := f.read(65536):
                self.chunks.append(chunk)

    def finish(self) -> bytes:
        """The bytes read; fails (after releasing the reader) if nobody opened the FIFO to write."""
        try:
            if not self.opened.wait(5):
                where = self.path if self.pin is None else f"/proc/self/fd/{self.pin}"
                with contextlib.suppress(OSError):  # a writer opening and closing releases the reader
                    os.close(os.open(where, os.O_WRONLY | os.O_NONBLOCK))
                self.thread.join(60)
                pytest.fail("bnfold never opened the FIFO for writing")
            self.thread.join(60)
            assert not self.thread.is_alive(), "the FIFO was never closed by its writer"
            return b"".join(self.chunks)
        finally:
            if self.pin is not None:
                os.close(self.pin)


@pytest.fixture
def model(tmp_path, rng):
    """A Conv-BN-Relu chain whose BN all fold, saved as tmp_path/net.onnx."""
    original = conv_bn_relu_chain(rng)
    onnx.save(original, tmp_path / "net.onnx")
    return original


@pytest.mark.parametrize("flags", [[], ["--no-verify"]], ids=["verify", "no_verify"])
def test_destination_null_device_succeeds(tmp_path, model, flags):
    null = scratch_device(tmp_path, "null", NULL_MINOR)
    result = invoke([tmp_path / "net.onnx", "-o", null, *flags], 0)
    assert "BatchNormalization: 3 -> 0" in result.stderr
    assert_device(null, NULL_MINOR)
    assert listing(tmp_path) == {"net.onnx", "null"}


def test_destination_full_device_fails_cleanly(tmp_path, model):
    full = scratch_device(tmp_path, "full", FULL_MINOR)
    result = invoke([tmp_path / "net.onnx", "-o", full], 2)
    line = one_line(result.stderr)
    assert line.startswith("bnfold: error:") and "No space left on device" in line
    assert_device(full, FULL_MINOR)
    assert listing(tmp_path) == {"net.onnx", "full"}


def test_destination_fifo_receives_model(tmp_path, model, rng):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    result = CliRunner().invoke(main, [str(tmp_path / "net.onnx"), "-o", str(fifo)])
    data = reader.finish()
    assert result.exit_code == 0 and "Traceback" not in result.stderr, result.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert listing(tmp_path) == {"net.onnx", "pipe"}
    assert_folded(data, model, rng)


def test_destination_stdout_receives_model(tmp_path, model, rng, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(["net.onnx", "-o", "-"], 0)
    assert "BatchNormalization:" in result.stderr
    assert listing(tmp_path) == {"net.onnx"}
    assert_folded(result.stdout_bytes, model, rng)


def test_destination_stdout_pipe_receives_model(tmp_path, model, rng):
    done = subprocess.run(
        [bnfold_script(), "net.onnx", "-o", "-"], cwd=tmp_path, stdin=subprocess.DEVNULL,
        capture_output=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"BatchNormalization:" in done.stderr
    assert listing(tmp_path) == {"net.onnx"}
    assert_folded(done.stdout, model, rng)


def test_destination_stdout_terminal_refused(tmp_path, model):
    master, slave = pty.openpty()
    try:
        try:
            done = subprocess.run(
                [bnfold_script(), "net.onnx", "-o", "-"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                stdout=slave, stderr=subprocess.PIPE, timeout=300, check=False,
            )
        finally:
            os.close(slave)
        written = b""
        while select.select([master], [], [], 0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError as e:  # EIO: the terminal's other end is closed and drained
                assert e.errno == errno.EIO
                break
            if not chunk:
                break
            written += chunk
    finally:
        os.close(master)
    assert done.returncode == 2
    assert "terminal" in one_line(done.stderr.decode(errors="replace"))
    assert written == b""
    assert listing(tmp_path) == {"net.onnx"}


def test_destination_stdout_json_refused(tmp_path, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(["net.onnx", "-o", "-", "--json"], 2)
    assert "--json" in result.stderr
    assert listing(tmp_path) == {"net.onnx"}


def test_destination_stdout_external_data_refused(tmp_path, rng, monkeypatch):
    onnx.save(conv_bn_relu_chain(rng), tmp_path / "net.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, size_threshold=0, location="net.onnx.data")
    before = listing(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = invoke(["net.onnx", "-o", "-"], 2)
    assert "external data" in one_line(result.stderr)
    assert result.stdout_bytes == b""
    assert listing(tmp_path) == before == {"net.onnx", "net.onnx.data"}


def test_destination_symlink_writes_through(tmp_path, model, rng):
    (tmp_path / "out").mkdir()
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "target.onnx"
    target.write_bytes(b"old bytes")
    link = tmp_path / "out" / "link.onnx"
    link.symlink_to(Path("..") / "real" / "target.onnx")
    invoke([tmp_path / "net.onnx", "-o", link], 0)
    assert os.path.islink(link) and os.readlink(link) == os.path.join("..", "real", "target.onnx")
    assert listing(tmp_path / "out") == {"link.onnx"}
    assert listing(tmp_path / "real") == {"target.onnx"}
    assert listing(tmp_path) == {"net.onnx", "out", "real"}
    assert_folded(target.read_bytes(), model, rng)


def test_destination_dangling_symlink_refused(tmp_path, model):
    link = tmp_path / "link.onnx"
    link.symlink_to("missing.onnx")
    result = invoke([tmp_path / "net.onnx", "-o", link], 2)
    assert "dangling" in result.stderr
    assert os.path.islink(link) and os.readlink(link) == "missing.onnx"
    assert not (tmp_path / "missing.onnx").exists()
    assert listing(tmp_path) == {"net.onnx", "link.onnx"}


@pytest.fixture
def existing(tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old bytes")
    return out


def test_destination_existing_file_keeps_mode(tmp_path, model, rng, existing):
    os.chmod(existing, 0o640)
    invoke([tmp_path / "net.onnx", "-o", existing], 0)
    assert stat.S_IMODE(os.stat(existing).st_mode) == 0o640
    assert_folded(existing.read_bytes(), model, rng)
    assert listing(tmp_path) == {"net.onnx", "out.onnx"}


def test_destination_existing_file_keeps_owner(tmp_path, model, rng, existing):
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    os.chown(existing, 1234, 1234)
    invoke([tmp_path / "net.onnx", "-o", existing], 0)
    info = os.stat(existing)
    assert (info.st_uid, info.st_gid) == (1234, 1234)
    assert_folded(existing.read_bytes(), model, rng)


def hard_link(tmp_path):
    os.link(tmp_path / "net.onnx", tmp_path / "alias.onnx")
    return tmp_path / "alias.onnx"


def soft_link(tmp_path):
    (tmp_path / "link.onnx").symlink_to("net.onnx")
    return tmp_path / "link.onnx"


def dot_dot(tmp_path):
    (tmp_path / "x").mkdir()
    return f"{tmp_path}/x/../net.onnx"


@pytest.mark.parametrize("alias", [hard_link, soft_link, dot_dot], ids=["hardlink", "symlink", "dotdot"])
def test_destination_input_alias_refused(tmp_path, model, alias):
    output = alias(tmp_path)
    before, names = digest(tmp_path / "net.onnx"), listing(tmp_path)
    result = invoke([tmp_path / "net.onnx", "-o", output], 2)
    assert "same file" in result.stderr
    assert digest(tmp_path / "net.onnx") == before
    assert listing(tmp_path) == names


def batch_of_files(tmp_path):
    shutil.copy(tmp_path / "net.onnx", tmp_path / "net2.onnx")
    return [tmp_path / "net.onnx", tmp_path / "net2.onnx"]


def batch_folder(tmp_path):
    (tmp_path / "models").mkdir()
    shutil.copy(tmp_path / "net.onnx", tmp_path / "models" / "net.onnx")
    return [tmp_path / "models"]


@pytest.mark.parametrize("destination", ["-", "null", "fifo"])
@pytest.mark.parametrize("batch", [batch_of_files, batch_folder], ids=["files", "folder"])
def test_destination_batch_node_refused(tmp_path, model, monkeypatch, batch, destination):
    monkeypatch.chdir(tmp_path)
    models = batch(tmp_path)
    drain = None
    if destination == "null":
        output = scratch_device(tmp_path, "null", NULL_MINOR)
    elif destination == "fifo":  # a FIFO makes "no bytes written" observable
        output = tmp_path / "pipe"
        os.mkfifo(output)
        drain = os.open(output, os.O_RDONLY | os.O_NONBLOCK)  # a writer's open() won't block
    else:
        output = "-"
    names = {folder: listing(folder) for folder in (tmp_path, tmp_path / "models") if folder.is_dir()}
    try:
        result = invoke([*models, "-o", output], 2)
        if drain is not None:
            try:
                assert os.read(drain, 65536) == b""
            except BlockingIOError:  # a writer is connected but wrote nothing
                pass
            assert stat.S_ISFIFO(os.lstat(output).st_mode)
    finally:
        if drain is not None:
            os.close(drain)
    assert result.stdout_bytes == b""
    if destination == "null":
        assert_device(output, NULL_MINOR)
    assert {folder: listing(folder) for folder in names} == names


def test_destination_socket_refused(tmp_path, model):
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        try:
            server.bind(str(path))
        except OSError as e:
            pytest.skip(f"cannot bind a Unix socket: {e}")
        result = invoke([tmp_path / "net.onnx", "-o", path], 2)
        one_line(result.stderr)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert listing(tmp_path) == {"net.onnx", "sock"}


def test_destination_stdout_reader_gone_fails_cleanly(tmp_path, rng):
    """`bnfold m.onnx -o - | head -c 10`: the reader goes away part-way; one line, exit 2."""
    onnx.save(conv_bn_relu_chain(rng, channels=64), tmp_path / "big.onnx")  # more than a pipe holds
    with subprocess.Popen([bnfold_script(), "big.onnx", "-o", "-", "--no-verify"], cwd=tmp_path,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert len(process.stdout.read(10)) == 10
        process.stdout.close()
        stderr = process.stderr.read().decode(errors="replace")
        assert process.wait(timeout=300) == 2, stderr
    report = [line for line in stderr.splitlines() if line.startswith("bnfold: error")]
    assert report and "Broken pipe" in report[0] and "Traceback" not in stderr and "Exception ignored" not in stderr


def test_destination_symlink_elsewhere_external_data_refused(tmp_path, rng):
    """Data files go beside the target, but a loader looks beside the link: refused, not written."""
    onnx.save(conv_bn_relu_chain(rng), tmp_path / "net.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, size_threshold=0, location="net.onnx.data")
    (tmp_path / "real").mkdir()
    (tmp_path / "link.onnx").symlink_to(Path("real") / "target.onnx")
    (tmp_path / "real" / "target.onnx").write_bytes(b"old bytes")
    result = invoke([tmp_path / "net.onnx", "-o", tmp_path / "link.onnx"], 2)
    assert "another folder" in one_line(result.stderr)
    assert (tmp_path / "real" / "target.onnx").read_bytes() == b"old bytes"
    assert listing(tmp_path / "real") == {"target.onnx"}


def test_destination_api_stdout_and_device(tmp_path, model, rng, capsysbinary):
    """The Python API takes the same destinations: "-" is stdout, a device is written into."""
    result = bnfold.fold_file(tmp_path / "net.onnx", "-")
    assert str(result.path) == "-"
    assert_folded(capsysbinary.readouterr().out, model, rng)
    null = scratch_device(tmp_path, "null", NULL_MINOR)
    assert bnfold.fold_file(tmp_path / "net.onnx", null).path == null
    assert_device(null, NULL_MINOR)


@pytest.mark.parametrize("make, kind", [
    (lambda p: p, destination.REGULAR),
    (lambda p: (p.write_bytes(b"x"), p)[1], destination.REGULAR),
    (lambda p: (os.mkfifo(p), p)[1], destination.FIFO),
    (lambda p: scratch_device(p.parent, p.name, NULL_MINOR), destination.DEVICE),
])
def test_destination_classify_kinds(tmp_path, make, kind):
    path = make(tmp_path / "out.onnx")
    found = destination.classify(path)
    assert (found.kind, found.path, found.streamed) == (kind, path, kind != destination.REGULAR)
    assert destination.classify("-").kind == destination.STDOUT  # stdout under pytest is no terminal


def test_destination_classify_link_chain_resolves_to_final_target(tmp_path):
    (tmp_path / "final.onnx").write_bytes(b"x")
    (tmp_path / "middle.onnx").symlink_to("final.onnx")
    (tmp_path / "first.onnx").symlink_to("middle.onnx")
    found = destination.classify(tmp_path / "first.onnx")
    assert (found.kind, found.path, found.given) == (destination.REGULAR, tmp_path / "final.onnx", tmp_path / "first.onnx")


def test_destination_classify_missing_folder_refused(tmp_path):
    with pytest.raises(bnfold.WriteFailed, match="does not exist"):
        destination.classify(tmp_path / "nowhere" / "out.onnx")
