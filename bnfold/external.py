"""External data: a tensor's reference to a data file, the checks that keep it inside the model's
folder and inside the file, reading one tensor's range, and the data files of an output.

Loading checks every reference up front (`check_external_data`: stays inside the model's folder,
the file exists, the range lies inside it), so a broken or hostile model fails at load with one
line, not later with a traceback; `read_tensor` reads a tensor's bytes only when a fold needs them.

An output keeps its source's data files byte for byte: they are copied (`DataCopies`, in the
background for big files) and only the tensors the fold changed are appended (`externalized`), so
every unchanged tensor keeps its offset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import pathlib
import stat
import threading

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold import wire
from bnfold.errors import InvalidModel, one_line
from bnfold.tensors import byte_size, dtype_name, is_external, iter_tensors, raw_dtype, subgraph_initializers

ALIGN = 4096  # offsets of appended tensors: page-aligned so runtimes can mmap them
BACKGROUND_COPY_MIN = 2**26  # data files from this size on are copied by DataCopies' thread
COPY_CHUNK = 2**28  # bytes per copy_file_range call: how soon a cancelled copy stops
SYNC_INTERVAL = 0.05  # seconds between DataCopies' fdatasyncs of the copies under way


@dataclasses.dataclass(frozen=True)
class ExternalRef:
    location: str
    offset: int
    length: int | None


def external_ref(tensor: onnx.TensorProto, where) -> ExternalRef:
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    if not location:
        raise InvalidModel(f"{where}: tensor '{tensor.name}' is external but has no data location")
    try:
        offset = int(entries.get("offset", 0))
        length = int(entries["length"]) if "length" in entries else None
    except ValueError:
        raise InvalidModel(f"{where}: tensor '{tensor.name}' has a non-integer external data offset/length") from None
    if offset < 0 or (length is not None and length < 0):
        raise InvalidModel(f"{where}: tensor '{tensor.name}' has a negative external data offset/length")
    return ExternalRef(location, offset, length)



def safe_data_path(base_dir: pathlib.Path, location: str, tensor_name: str, where) -> pathlib.Path:
    """The data file, refused (before any read) unless it lies inside the model's folder."""
    refused = f"{where}: tensor '{tensor_name}' external data location '{location}' escapes the model folder"
    if os.path.isabs(location) or pathlib.PureWindowsPath(location).is_absolute():
        raise InvalidModel(f"{refused} (absolute path); refused")
    if ".." in pathlib.PurePath(location).parts:
        raise InvalidModel(f"{refused} ('..'); refused")
    try:
        candidate = (base_dir / location).resolve()
    except (ValueError, OSError) as e:  # NUL byte, symlink loop
        raise InvalidModel(f"{where}: tensor '{tensor_name}' external data location '{location}': {e}") from None
    if not candidate.is_relative_to(base_dir.resolve()):
        raise InvalidModel(f"{refused} (symlink to {candidate}); refused")
    return candidate


def check_external_data(tensors, base_dir: pathlib.Path, where, stubs=None) -> tuple[str, ...]:
    """Validate the external references of `tensors` (the model's external ones); return the
    distinct locations in first-use order. Stubs (lazy loads) point into the model file, which
    is no data file: only their sizes are checked."""
    sizes: dict[pathlib.Path, int] = {}
    locations: dict[str, None] = {}
    for tensor in tensors:
        if stubs and tensor.name in stubs:
            check_stub(tensor, stubs[tensor.name], where)
            continue
        ref = external_ref(tensor, where)
        file = safe_data_path(base_dir, ref.location, tensor.name, where)
        if file not in sizes:
            sizes[file] = _data_file_size(file, ref.location, where)
        end = ref.offset + (ref.length or 0)
        if end > sizes[file]:
            raise InvalidModel(
                f"{where}: tensor '{tensor.name}' external data (offset {ref.offset}, length "
                f"{ref.length}) runs past the end of '{ref.location}' ({sizes[file]} bytes)"
            )
        _check_external_length(tensor, ref, sizes[file], where)
        locations.setdefault(ref.location)
    return tuple(locations)


def _check_external_length(tensor: onnx.TensorProto, ref: ExternalRef, file_size: int, where) -> None:
    """The range read (length, or offset to end of file without one) must hold the tensor."""
    expected = byte_size(tensor)
    length = ref.length if ref.length is not None else file_size - ref.offset
    if expected is not None and length != expected:
        raise InvalidModel(
            f"{where}: tensor '{tensor.name}' ({dtype_name(tensor.data_type)} {list(tensor.dims)}) needs "
            f"{expected} bytes but its external data range in '{ref.location}' holds {length}"
        )


def check_stub(tensor: onnx.TensorProto, stub: wire.Stub, where) -> None:
    """The raw_data size check of `_tensor_problem`, for a tensor whose bytes stayed on disk."""
    expected = byte_size(tensor)
    if expected is not None and expected != stub.data_length:
        shape = f"{dtype_name(tensor.data_type)} {list(tensor.dims)}"
        raise InvalidModel(f"cannot load {where}: tensor '{tensor.name}' ({shape}) holds {stub.data_length} bytes of data, expected {expected}")


def _data_file_size(file: pathlib.Path, location: str, where) -> int:
    try:
        info = file.stat()
    except FileNotFoundError:
        raise InvalidModel(f"{where}: external data file '{location}' not found") from None
    except OSError as e:
        raise InvalidModel(f"{where}: external data file '{location}': {e.strerror or e}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidModel(f"{where}: external data '{location}' is not a regular file")
    return info.st_size


def read_tensor(tensor: onnx.TensorProto, base_dir) -> np.ndarray:
    """Decode one tensor, reading its external bytes (only its range) if it has any: straight
    into the array for the common dtypes (numpy_helper holds the bytes and the array at once)."""
    base_dir = pathlib.Path(base_dir)
    try:
        if is_external(tensor):
            ref = external_ref(tensor, base_dir)
            path = safe_data_path(base_dir, ref.location, tensor.name, base_dir)
            dtype = raw_dtype(tensor.data_type)
            count = int(np.prod(tensor.dims, dtype=np.int64))
            if dtype is not None and ref.length in (None, count * dtype.itemsize):
                return _read_array(path, ref.offset, dtype, count).reshape(tuple(tensor.dims))
        return numpy_helper.to_array(tensor, str(base_dir))
    except (OSError, ValueError) as e:
        raise InvalidModel(f"{base_dir}: cannot read tensor '{tensor.name}': {one_line(str(e))}") from None


def _read_array(path: pathlib.Path, offset: int, dtype: np.dtype, count: int) -> np.ndarray:
    with open(path, "rb") as f:
        array = np.fromfile(f, dtype=dtype, count=count, offset=offset)
    if array.size != count:
        raise ValueError(f"{path.name} ends {count - array.size} values short of the tensor")
    return array


def plan_data_names(dst: pathlib.Path, locations: list[str], base_dir) -> dict[str, str]:
    """Output name per source location: `<dst>.data`, or `<dst>.<i>.data` for several.

    A source file that already sits at one of those names keeps it, so in-place saves replace
    each data file with a copy of itself plus appended tensors, never with another file.
    """
    if len(locations) == 1:
        names = [f"{dst.name}.data"]
    else:
        names = [f"{dst.name}.{i}.data" for i in range(len(locations))]
    plan = {}
    for location in locations:
        here = (base_dir / location).resolve()
        same = [n for n in names if (dst.parent / n).resolve() == here and n not in plan.values()]
        if same:
            plan[location] = same[0]
    free = iter(n for n in names if n not in plan.values())
    return {location: plan.get(location) or next(free) for location in locations}


@contextlib.contextmanager
def externalized(model: onnx.ModelProto, folder: pathlib.Path, data_files: list[str], data_name: str,
                 renames: dict[str, str], threshold: int, spill=None, compact: dict | None = None):
    """Point `model` at the staged data for the duration of serialization, then undo it all.

    The big main-graph initializers are appended to the data file but not edited: what is
    yielded maps their index to the record that replaces them (for `wire.plan_splice`), so at
    most one tensor's bytes are copied at a time. Subgraphs' (rare) are edited and restored.
    Tensors in `spill` (bnfold.loading.Spill: what a fold made) are copied from it in the kernel,
    never read into memory. `compact` (source location -> its file): data files written afresh
    with only the tensors still read, instead of copied whole (see staging._mostly_dead).
    """
    undo: list = []
    try:
        spilled = _spilled(model, spill)
        for location, path in (compact or {}).items():
            readers = [t for t in iter_tensors(model) if is_external(t) and id(t) not in spilled and external_ref(t, "model").location == location]
            _write_compacted(readers, path, folder / renames[location], undo)
        for tensor in iter_tensors(model):
            if is_external(tensor) and id(tensor) not in spilled:
                _relocate(tensor, renames, undo)
        main = [(i, t) for i, t in enumerate(model.graph.initializer) if _in_memory_size(t) >= threshold]
        nested = [(None, t) for t in subgraph_initializers(model.graph) if _in_memory_size(t) >= threshold]
        records = _append_tensors(main + nested, folder, data_files, data_name, undo) if main or nested else {}
        if spilled:
            records.update(_append_spilled(list(spilled.values()), folder, data_files, data_name, spill.fileno(), undo))
        yield records
    finally:
        for restore in reversed(undo):
            restore()


def _write_compacted(tensors: list, source: pathlib.Path, target: pathlib.Path, undo: list) -> None:
    """`target` holds the data of `tensors` (all in `source`), copied range by range in the
    kernel, each at an aligned offset; the tensors point at it (`undo` restores them). Tensors
    sharing one range keep sharing it."""
    refs = [external_ref(tensor, source) for tensor in tensors]
    ranges = [(ref.offset, ref.length if ref.length is not None else byte_size(tensor)) for ref, tensor in zip(refs, tensors)]
    unique = list(dict.fromkeys(ranges))
    src = os.open(source, os.O_RDONLY)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            placed = dict(zip(unique, _copy_aligned(src, dst, 0, unique)))
        finally:
            os.close(dst)
    finally:
        os.close(src)
    for tensor, ref, key in zip(tensors, refs, ranges):
        undo.append(_stub_restorer(tensor))
        _point_at(tensor, ref.location, placed[key], key[1])


def _copy_aligned(src: int, dst: int, end: int, ranges) -> list[int]:
    """Copy each (offset, length) range of `src` into `dst` from `end` on, each at the next
    ALIGN boundary, in the kernel (copy_exactly); their offsets in `dst`."""
    offsets = []
    for offset, length in ranges:
        at = end + (-end % ALIGN)
        copy_exactly(src, offset, dst, at, length)
        offsets.append(at)
        end = at + length
    return offsets


def _spilled(model: onnx.ModelProto, spill) -> dict[int, tuple]:
    """id(tensor) -> (main-graph index or None, tensor, its wire.Stub) for each spilled initializer."""
    if spill is None or not spill.stubs:
        return {}
    found = {}
    indexed = [*enumerate(model.graph.initializer), *((None, t) for t in subgraph_initializers(model.graph))]
    for index, tensor in indexed:
        stub = spill.find(tensor)
        if stub is not None:
            found[id(tensor)] = (index, tensor, stub)
    return found


def _append_spilled(spilled: list, folder: pathlib.Path, data_files: list[str], data_name: str, spill_fd: int, undo: list) -> dict[int, bytes]:
    """`_append_tensors` for spilled tensors: their data copied from the spill file."""
    records = {}
    fd = os.open(folder / data_name, os.O_WRONLY | os.O_CREAT, 0o666)  # not O_APPEND: copies write at an offset
    try:
        end = os.fstat(fd).st_size  # a data file being copied in is already at its full size
        offsets = _copy_aligned(spill_fd, fd, end, [(stub.data_offset, stub.data_length) for _, _, stub in spilled])
    finally:
        os.close(fd)
    for (index, tensor, stub), offset in zip(spilled, offsets):
        if index is None:
            undo.append(_stub_restorer(tensor))
            _point_at(tensor, data_name, offset, stub.data_length)
        else:
            records[index] = _external_record(tensor, data_name, offset, stub.data_length)
    if data_name not in data_files:
        data_files.append(data_name)
    return records


def _stub_restorer(tensor: onnx.TensorProto):
    saved = tensor.SerializeToString()
    return lambda: tensor.ParseFromString(saved)


def _in_memory_size(tensor: onnx.TensorProto) -> int:
    if is_external(tensor) or not tensor.HasField("raw_data"):
        return 0
    return len(tensor.raw_data)


def _relocate(tensor: onnx.TensorProto, renames: dict[str, str], undo: list) -> None:
    for entry in tensor.external_data:
        if entry.key == "location":
            old = entry.value
            entry.value = renames[old]
            undo.append(lambda entry=entry, old=old: setattr(entry, "value", old))


def _append_tensors(tensors, folder: pathlib.Path, data_files: list[str], data_name: str, undo: list) -> dict[int, bytes]:
    """Append the data of `tensors`, (main-graph index or None, tensor) pairs, to `data_name`:
    returns the records of the indexed ones; the others are pointed there (`undo` restores)."""
    path = folder / data_name
    records = {}
    with open(path, "ab") as f:
        f.seek(0, os.SEEK_END)
        for index, tensor in tensors:
            f.write(b"\0" * (-f.tell() % ALIGN))
            raw = tensor.raw_data
            offset = f.tell()
            f.write(raw)
            if index is None:
                undo.append(_embedding_restorer(tensor, raw))
                _point_at(tensor, data_name, offset, len(raw))
            else:
                records[index] = _external_record(tensor, data_name, offset, len(raw))
    if data_name not in data_files:
        data_files.append(data_name)
    return records


def _external_record(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> bytes:
    """The initializer record of `tensor` with its data at `location` (a copy is edited)."""
    stub = onnx.TensorProto()
    stub.CopyFrom(tensor)
    _point_at(stub, location, offset, length)
    body = stub.SerializeToString()
    return wire.record(wire.INITIALIZER, len(body)) + body


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _embedding_restorer(tensor: onnx.TensorProto, raw: bytes):
    """Undo for `_point_at`, down to field presence, so the caller's model serializes as before."""
    had_location = tensor.HasField("data_location")
    entries = [(e.key, e.value) for e in tensor.external_data]

    def restore() -> None:
        tensor.ClearField("data_location")
        if had_location:
            tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
        for key, value in entries:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.raw_data = raw

    return restore


# --------------------------------------------------------------------------- background copies

_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class DataCopies:
    """Big data files copied into the staging folder by a background thread: for a model with
    external data the copy is most of the time, and this way it runs while the model is folded
    and serialized. A second thread fdatasyncs the copies while they grow, so that their
    write-back to disk overlaps the copy too and the fsync before commit waits only for the
    tail (keeping the output durable costs little more than not).

    Each copy is created at its source's size, so tensors appended meanwhile (append mode)
    land after it, wherever the copy has got to. Neither thread lets an exception escape (it
    would be printed as a thread traceback): the first one is kept and `finish` raises it.
    `finish` and `cancel` both join the threads and close the files; either may be called again.
    """

    def __init__(self, jobs: dict[str, pathlib.Path], tmp_dir: pathlib.Path):
        self.jobs = dict(jobs)  # output name (in tmp_dir) -> source file
        self._files: list[tuple[pathlib.Path, int, int, int]] = []  # source, its fd, copy's fd, size
        self._stop, self._copied = threading.Event(), threading.Event()
        self._error: BaseException | None = None
        try:
            for name, source in self.jobs.items():
                self._open(source, tmp_dir / name)
        except BaseException:
            self._close()
            raise
        self._threads = [threading.Thread(target=self._run, args=(work,), name=f"bnfold-{work.__name__}", daemon=True)
                         for work in (self._copy_all, self._sync_while_copying)]
        for thread in self._threads:
            thread.start()

    def _open(self, source: pathlib.Path, target: pathlib.Path) -> None:
        src = os.open(source, os.O_RDONLY)
        try:
            dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except BaseException:
            os.close(src)
            raise
        self._files.append((source, src, dst, os.fstat(src).st_size))
        os.ftruncate(dst, self._files[-1][3])

    def _run(self, work) -> None:
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - kept for finish() to raise, never lost
            if self._error is None:
                self._error = e
            self._stop.set()

    def _copy_all(self) -> None:
        try:
            for source, src, dst, size in self._files:
                done = 0
                while done < size and not self._stop.is_set():
                    copied = copy_range(src, dst, done, min(COPY_CHUNK, size - done))
                    if copied == 0:
                        raise OSError(f"the input data file {source} shrank while it was being copied")
                    done += copied
        finally:
            self._copied.set()

    def _sync_while_copying(self) -> None:
        sync = getattr(os, "fdatasync", os.fsync)
        while not self._copied.wait(SYNC_INTERVAL):
            for _, _, dst, _ in self._files:
                sync(dst)

    def finish(self) -> None:
        """Wait for the copies; raise what went wrong (an OSError for a failed copy or sync)."""
        self._join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self._stop.set()
        self._join()

    def _join(self) -> None:
        for thread in self._threads:
            thread.join()
        self._close()

    def _close(self) -> None:
        files, self._files = self._files, []
        for _, src, dst, _ in files:
            os.close(src)
            os.close(dst)


def copy_exactly(src: int, src_offset: int, dst: int, dst_offset: int, length: int) -> None:
    """Copy `length` bytes from `src` at `src_offset` to `dst` at `dst_offset`: in the kernel
    where it can, else in chunks of COPY_BUFFER (never the whole range in memory)."""
    while length > 0:
        try:
            done = os.copy_file_range(src, dst, length, src_offset, dst_offset)
        except AttributeError:  # not Linux
            done = -1
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            done = -1
        if done < 0:
            data = os.pread(src, min(length, COPY_BUFFER), src_offset)
            pwrite_all(dst, memoryview(data), dst_offset)
            done = len(data)
        if done == 0:
            raise OSError(f"copying tensor data: {length} bytes short")
        src_offset, dst_offset, length = src_offset + done, dst_offset + done, length - done


COPY_BUFFER = 2**20


def copy_range(src: int, dst: int, offset: int, length: int) -> int:
    """Copy up to `length` bytes at `offset`: in the kernel where it can (copy_file_range, as cp
    does; shutil's sendfile took 1.5x as long for 2.3 GB here), by hand elsewhere. Returns
    the bytes copied, 0 at the end of `src`."""
    try:
        return os.copy_file_range(src, dst, length, offset, offset)
    except AttributeError:  # not Linux
        pass
    except OSError as e:
        if e.errno not in _NO_KERNEL_COPY:
            raise
    data = os.pread(src, min(length, 2**24), offset)
    pwrite_all(dst, memoryview(data), offset)
    return len(data)


def pwrite_all(fd: int, view: memoryview, at: int) -> None:
    while view:
        done = os.pwrite(fd, view, at)
        view, at = view[done:], at + done

