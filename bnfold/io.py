"""Reading and writing model files: external data, atomic writes, path safety.

Loading parses the model once, without external data: external tensors keep their references
and are only read (by `read_tensor`) when a fold needs their values. Every external reference is
checked up front (stays inside the model's folder, file exists, range inside the file), so a
broken or hostile model fails at load with one line, not later with a traceback.

Saving never decodes unchanged tensors. When the source kept its weights in external data, its
data file(s) are copied byte for byte and only the in-memory (changed) tensors are appended, so
every unchanged tensor keeps its offset. Big data files are copied by a background thread
(`DataCopies`), which `begin_staging` starts as soon as the model is loaded, so the copy runs
while the model is folded, and is synced to disk as it goes. Everything is written into a
temporary folder next to the destination and moved into place by `StagedModel.commit`: data
file(s) first, model last, each fsynced before the renames, so a crash (power loss included)
leaves the destination either old or new. Copy-then-append also means that after an
in-place save the old model file still reads correct bytes from the new data file (its tensors
are a prefix of it), so even a crash between the two renames leaves a loadable model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import math
import mmap
import os
import pathlib
import shutil
import stat
import tempfile
import threading

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from bnfold import wire
from bnfold.errors import InvalidModel, UsageError, WriteFailed

PROTOBUF_LIMIT = 2**31  # protobuf cannot serialize or parse a message this large
# Above this the model is saved with external data; the margin covers what ByteSize() does not
# foresee (it is exact, but a caller may add a little before saving).
MAX_EMBEDDED = PROTOBUF_LIMIT - 2**26
ALIGN = 4096  # offsets of appended tensors: page-aligned so runtimes can mmap them
# Lazy loads (load_model(lazy=True)): files from this size on are scanned rather than parsed
# whole, and their initializers from this size on stay in the file until needed.
LAZY_MIN_FILE = 32 * 2**20
LAZY_MIN_TENSOR = 2**16
BACKGROUND_COPY_MIN = 2**26  # data files from this size on are copied by DataCopies' thread
COPY_CHUNK = 2**28  # bytes per copy_file_range call: how soon a cancelled copy stops
SYNC_INTERVAL = 0.05  # seconds between DataCopies' fdatasyncs of the copies under way
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclasses.dataclass
class LoadedModel:
    """A parsed model file; external tensors still point at their data files."""

    model: onnx.ModelProto
    path: pathlib.Path
    base_dir: pathlib.Path
    external_files: tuple[str, ...]
    # lazy loads: large embedded initializers left in the model file (see bnfold.wire), and the
    # file's (size, mtime) when read, so saving can tell that their bytes are still there
    stubs: dict[str, wire.Stub] = dataclasses.field(default_factory=dict)
    file_stamp: tuple[int, int] | None = None
    spill: Spill | None = None  # lazy loads: where the tensors a fold makes go (see Spill)
    stub_location: str | None = None  # lazy loads: the stubs' external data location


class Spill:
    """The big tensors a fold of a lazy load makes, written to an anonymous temporary file as
    they are made instead of held in memory until the model is saved: the model keeps a stub
    (as for the source's tensors), `read` gives the value back, saving copies the record.
    Memory then stays at about the graph plus the largest tensor, whatever the model's size."""

    LOCATION = "<bnfold spill>"  # no file by that name: a stub that escaped is refused, not misread

    def __init__(self, min_bytes: int):
        self.min_bytes = min_bytes
        self.file = None
        self.size = 0
        self.stubs: dict[bytes, wire.Stub] = {}  # by the stub's bytes (see wire._unchanged)

    def put(self, header: onnx.TensorProto, data: np.ndarray) -> onnx.TensorProto:
        """Write a tensor (`header`: all but its data; `data`: its raw little-endian values)
        out; returns its stub."""
        prefix, stub, found = wire.spill_record(header, data.nbytes, self.LOCATION, self.size)
        if self.file is None:
            self.file = tempfile.TemporaryFile(prefix="bnfold-spill-")
        fd = self.file.fileno()
        os.pwrite(fd, prefix, self.size)
        _pwrite_all(fd, memoryview(data).cast("B"), self.size + len(prefix))  # from the array: no bytes copy
        self.size += len(prefix) + data.nbytes
        self.stubs[found.stub] = found
        return stub

    def find(self, tensor: onnx.TensorProto) -> wire.Stub | None:
        if not self.stubs or tensor.data_location != onnx.TensorProto.EXTERNAL:
            return None
        return self.stubs.get(tensor.SerializeToString())

    def read(self, tensor: onnx.TensorProto, found: wire.Stub) -> np.ndarray:
        from bnfold.graph import decode_tensor

        full = onnx.TensorProto()
        full.name, full.data_type = tensor.name, tensor.data_type
        full.dims.extend(tensor.dims)
        full.raw_data = os.pread(self.file.fileno(), found.data_length, found.data_offset)
        return decode_tensor(full)

    def fileno(self) -> int | None:
        return self.file.fileno() if self.file is not None else None


# --------------------------------------------------------------------------- loading


def load_model(path, *, lazy: bool = False) -> LoadedModel:
    """Parse and check a model file; every problem a user can cause is one `InvalidModel` line.

    `lazy` (for a caller that saves through `stage_model` with this as `source`): a large file's
    big embedded initializers are not read but become stubs, external data pointing into the
    model file itself, read when a fold needs them and copied byte for byte on saving.
    """
    path = pathlib.Path(path)
    # External data is relative to the folder of the path as given (as onnx and onnxruntime do),
    # not to where a symlinked model file points.
    base_dir = path.absolute().parent
    model, stubs, stamp = _read_model(path, base_dir, lazy)
    _check_is_model(model, path)
    external = _check_tensors(model, path)
    external_files = _check_external_data(external, base_dir, path, stubs)
    _run_checker(path, model if stubs else None, stubs)
    spill = Spill(LAZY_MIN_TENSOR) if stubs else None
    return LoadedModel(model, path.resolve(), base_dir, external_files, stubs, stamp, spill, path.name if stubs else None)


def _read_model(path: pathlib.Path, base_dir: pathlib.Path, lazy: bool):
    """(model, stubs, file stamp): parsed whole, or lazily when asked and worth it."""
    try:
        info = _model_file_info(path)
        if lazy and info.st_size >= LAZY_MIN_FILE and (base_dir / path.name).resolve().parent == base_dir.resolve():
            found = _read_lazily(path)
            if found is not None:
                return (*found, (info.st_size, info.st_mtime_ns))
        return _parse_model(path.read_bytes(), path), {}, None
    except FileNotFoundError:
        raise InvalidModel(f"cannot load {path}: file not found") from None
    except PermissionError:
        raise InvalidModel(f"cannot load {path}: permission denied") from None
    except OSError as e:
        raise InvalidModel(f"cannot load {path}: {e.strerror or e}") from None


def _model_file_info(path: pathlib.Path) -> os.stat_result:
    info = path.stat()
    if stat.S_ISDIR(info.st_mode):
        raise InvalidModel(f"cannot load {path}: is a directory, not a model file")
    if info.st_size == 0:
        raise InvalidModel(f"cannot load {path}: file is empty")
    if info.st_size >= PROTOBUF_LIMIT:
        raise InvalidModel(
            f"cannot load {path}: {info.st_size} bytes is over protobuf's 2 GiB limit "
            "(large models keep their weights in external data)"
        )
    return info


def _read_lazily(path: pathlib.Path) -> tuple[onnx.ModelProto, dict] | None:
    """The model with its big initializers as stubs; None when the file is not laid out as
    bnfold.wire expects, or also has external data (then it is parsed whole, as usual)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            skeleton, stubs = wire.scan(buf, path.name, LAZY_MIN_TENSOR)
        except wire.WireError:
            return None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(skeleton)
    except DecodeError:
        return None
    if any(is_external(t) and t.name not in stubs for t in iter_tensors(model)):
        return None
    return model, stubs


def _parse_model(data: bytes, path: pathlib.Path) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError:
        raise InvalidModel(
            f"cannot load {path}: not an ONNX model (protobuf decode failed: truncated or corrupt file?)"
        ) from None
    return model


def _check_is_model(model: onnx.ModelProto, path: pathlib.Path) -> None:
    """Another protobuf (a GraphProto, say) often parses as an empty ModelProto; refuse it."""
    if not model.HasField("graph") or model.ir_version <= 0:
        raise InvalidModel(f"cannot load {path}: not an ONNX model (no graph or no IR version)")
    _check_opsets(model, path)
    _check_text(model, path)


def _check_opsets(model: onnx.ModelProto, path: pathlib.Path) -> None:
    """One version per domain ("" and "ai.onnx" are the same one), and a default-domain version
    this onnx knows: the checker accepts opset 999 and BN semantics there are unknown."""
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        domain = "" if opset.domain in DEFAULT_DOMAINS else opset.domain
        if versions.setdefault(domain, opset.version) != opset.version:
            raise InvalidModel(
                f"cannot load {path}: opset_import gives domain '{domain or 'ai.onnx'}' two versions "
                f"({versions[domain]} and {opset.version})"
            )
    if "" not in versions:
        raise InvalidModel(f"cannot load {path}: no opset import for the default ONNX domain")
    newest = onnx.defs.onnx_opset_version()
    if not 1 <= versions[""] <= newest:
        raise InvalidModel(
            f"cannot load {path}: default-domain opset {versions['']} is not supported (this onnx knows 1 to {newest})"
        )


def _check_text(model: onnx.ModelProto, path: pathlib.Path) -> None:
    """Names must be valid UTF-8: protobuf hands invalid ones back as bytes, which would end up
    in graph lookups and reports (and crash `--json`).

    Every message is visited without recursion (nesting depth is attacker-chosen), through
    ListFields (one call for all its set fields), except tensors: that would copy raw_data.
    """
    stack = [model]
    while stack:
        message = stack.pop()
        if message.DESCRIPTOR is _TENSOR:
            name, doc = message.name, message.doc_string
            if name.__class__ is bytes or doc.__class__ is bytes:
                _check_strings(message, (("name", name), ("doc_string", doc)), path)
            if message.external_data:
                stack.extend(message.external_data)
            if message.metadata_props:
                stack.extend(message.metadata_props)
            continue
        kinds = _field_kinds(message.DESCRIPTOR)
        for field, value in message.ListFields():
            kind = kinds.get(field.number)
            if kind == _STRING:
                _check_strings(message, ((field.name, value),), path)
            elif kind == _STRINGS:
                _check_string_list(message, field.name, value, path)
            elif kind == _MESSAGES:
                stack.extend(value)
            elif kind == _MESSAGE:
                stack.append(value)


def _check_strings(message, values, path: pathlib.Path) -> None:
    for name, value in values:
        if value.__class__ is bytes:
            raise InvalidModel(f"cannot load {path}: {type(message).__name__}.{name} is not valid UTF-8 ({value[:40]!r})")


def _check_string_list(message, name: str, values, path: pathlib.Path) -> None:
    try:
        "".join(values)  # fails on a bytes element, at C speed
    except TypeError:
        _check_strings(message, [(name, v) for v in values], path)


_TENSOR = onnx.TensorProto.DESCRIPTOR
_STRING, _STRINGS, _MESSAGE, _MESSAGES = range(1, 5)


@functools.lru_cache(maxsize=None)
def _field_kinds(descriptor) -> dict[int, int]:
    """Field number -> _STRING, _STRINGS, _MESSAGE or _MESSAGES (other fields: absent)."""
    kinds = {}
    for field in descriptor.fields:
        if field.type in (field.TYPE_STRING, field.TYPE_MESSAGE):
            kind = _STRING if field.type == field.TYPE_STRING else _MESSAGE
            kinds[field.number] = kind + 1 if _is_repeated(field) else kind
    return kinds


def _is_repeated(field) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.28; `label` is deprecated there
        return field.is_repeated
    return field.label == field.LABEL_REPEATED


# Where each fixed-size dtype keeps its values when not in raw_data, and how many entries one
# element takes there (complex numbers: two). Sub-byte types (int4, float4, ...) pack several
# elements per byte with version-dependent rules; their sizes are left to the readers.
_TYPED_FIELD = {
    onnx.TensorProto.FLOAT: ("float_data", 1),
    onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1),
    onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1),
    onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1),
    **dict.fromkeys(
        (onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT16,
         onnx.TensorProto.UINT8, onnx.TensorProto.BOOL, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
         *(getattr(onnx.TensorProto, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2",
                                                  "FLOAT8E5M2FNUZ", "FLOAT8E8M0") if hasattr(onnx.TensorProto, n))),
        ("int32_data", 1)),
}
_ITEMSIZE = {t: onnx.helper.tensor_dtype_to_np_dtype(t).itemsize for t in _TYPED_FIELD}
_KNOWN_DTYPES = frozenset(v for v in onnx.TensorProto.DataType.values() if v != onnx.TensorProto.UNDEFINED)


def _dtype_name(data_type: int) -> str:
    return onnx.TensorProto.DataType.Name(data_type)


def _byte_size(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's values take in raw form; None for strings and sub-byte types."""
    if tensor.data_type not in _TYPED_FIELD:
        return None
    return _ITEMSIZE[tensor.data_type] * _element_count(tensor)


def _element_count(tensor: onnx.TensorProto) -> int:
    return math.prod(tensor.dims)


def _check_tensors(model: onnx.ModelProto, where) -> list[onnx.TensorProto]:
    """Every tensor's stored data fits its dtype and shape, checked from sizes alone (nothing is
    decoded): the checker lets a mismatch through, and decoding it later would crash. Returns
    the external tensors (their sizes are checked against their files next)."""
    external = []
    for tensor in iter_tensors(model):
        problem = _tensor_problem(tensor)
        if problem:
            raise InvalidModel(f"cannot load {where}: tensor '{tensor.name}' {problem}")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            external.append(tensor)
    return external


def _tensor_problem(tensor: onnx.TensorProto) -> str:
    data_type, dims = tensor.data_type, tuple(tensor.dims)  # one conversion, then C-speed reads
    if data_type not in _KNOWN_DTYPES:
        return f"has unknown data type {data_type}"
    if dims and min(dims) < 0:
        return f"has negative dimensions {list(dims)}"
    if tensor.HasField("segment"):
        return "is segmented (not supported)"
    if is_external(tensor):
        return ""  # sizes checked against the data file by _check_external_data
    count = math.prod(dims)
    if data_type == onnx.TensorProto.STRING:
        stored, expected, what = len(tensor.string_data), count, "strings"
    elif data_type not in _TYPED_FIELD:
        return ""
    elif tensor.HasField("raw_data"):
        stored, expected, what = len(tensor.raw_data), _ITEMSIZE[data_type] * count, "bytes of data"
    else:
        field, per_element = _TYPED_FIELD[data_type]
        stored, expected, what = len(getattr(tensor, field)), per_element * count, f"values in {field}"
    if stored == expected:
        return ""
    return f"({_dtype_name(data_type)} {list(dims)}) holds {stored} {what}, expected {expected}"


def _run_checker(path: pathlib.Path, skeleton: onnx.ModelProto | None = None, stubs=None) -> None:
    """Check by path: given a proto, the checker looks for external data in the current folder.

    A lazy load's skeleton (no other external data) is checked as a proto instead of reading the
    whole file again, its stubs emptied (zero elements): their sizes are checked by
    `_check_stub`, everything else as usual.
    """
    target: object = str(path)
    if skeleton is not None:
        target = onnx.ModelProto()
        target.CopyFrom(skeleton)
        for tensor in target.graph.initializer:
            if tensor.name in stubs:
                del tensor.external_data[:], tensor.dims[:]
                tensor.ClearField("data_location")
                tensor.dims.append(0)
    try:
        onnx.checker.check_model(target)
    except (onnx.checker.ValidationError, ValueError, OSError) as e:
        raise InvalidModel(f"cannot load {path}: onnx checker: {_one_line(str(e))}") from None


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --------------------------------------------------------------------------- external data


@dataclasses.dataclass(frozen=True)
class _ExternalRef:
    location: str
    offset: int
    length: int | None


def _external_ref(tensor: onnx.TensorProto, where) -> _ExternalRef:
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
    return _ExternalRef(location, offset, length)


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _safe_data_path(base_dir: pathlib.Path, location: str, tensor_name: str, where) -> pathlib.Path:
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


def _check_external_data(tensors, base_dir: pathlib.Path, where, stubs=None) -> tuple[str, ...]:
    """Validate the external references of `tensors` (the model's external ones); return the
    distinct locations in first-use order. Stubs (lazy loads) point into the model file, which
    is no data file: only their sizes are checked."""
    sizes: dict[pathlib.Path, int] = {}
    locations: dict[str, None] = {}
    for tensor in tensors:
        if stubs and tensor.name in stubs:
            _check_stub(tensor, stubs[tensor.name], where)
            continue
        ref = _external_ref(tensor, where)
        file = _safe_data_path(base_dir, ref.location, tensor.name, where)
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


def _check_external_length(tensor: onnx.TensorProto, ref: _ExternalRef, file_size: int, where) -> None:
    """The range read (length, or offset to end of file without one) must hold the tensor."""
    expected = _byte_size(tensor)
    length = ref.length if ref.length is not None else file_size - ref.offset
    if expected is not None and length != expected:
        raise InvalidModel(
            f"{where}: tensor '{tensor.name}' ({_dtype_name(tensor.data_type)} {list(tensor.dims)}) needs "
            f"{expected} bytes but its external data range in '{ref.location}' holds {length}"
        )


def _check_stub(tensor: onnx.TensorProto, stub: wire.Stub, where) -> None:
    """The raw_data size check of `_tensor_problem`, for a tensor whose bytes stayed on disk."""
    expected = _byte_size(tensor)
    if expected is not None and expected != stub.data_length:
        shape = f"{_dtype_name(tensor.data_type)} {list(tensor.dims)}"
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
    """Decode one tensor, reading its external bytes (only its range) if it has any."""
    base_dir = pathlib.Path(base_dir)
    if is_external(tensor):
        ref = _external_ref(tensor, base_dir)
        _safe_data_path(base_dir, ref.location, tensor.name, base_dir)
    try:
        return numpy_helper.to_array(tensor, str(base_dir))
    except (OSError, ValueError) as e:
        raise InvalidModel(f"{base_dir}: cannot read tensor '{tensor.name}': {_one_line(str(e))}") from None


def iter_tensors(model: onnx.ModelProto):
    """Every TensorProto of the model: initializers and attributes, all subgraphs, functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


# Attribute types that hold no tensor and no graph: their attributes are skipped unread.
_PLAIN_ATTRIBUTES = frozenset({
    onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT, onnx.AttributeProto.STRING,
    onnx.AttributeProto.FLOATS, onnx.AttributeProto.INTS, onnx.AttributeProto.STRINGS,
})


def _node_tensors(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type in _PLAIN_ATTRIBUTES and not attr.HasField("t"):
            continue  # the common case (a Conv's pads, a BN's epsilon), at one field read more
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
        for s in [*sparse, *attr.sparse_tensors]:
            yield from (s.values, s.indices)
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def _initializers(graph: onnx.GraphProto):
    """Initializers of a graph and of its subgraphs: the tensors saving may move out."""
    yield from graph.initializer
    yield from _subgraph_initializers(graph)


def _subgraph_initializers(graph: onnx.GraphProto):
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _initializers(attr.g)
            for g in attr.graphs:
                yield from _initializers(g)


# --------------------------------------------------------------------------- saving


class StagedModel:
    """A written output not yet in place: verify `path` (onnxruntime can open it), then commit.

    As a context manager it discards on exit unless committed.
    """

    def __init__(self, dst: pathlib.Path, tmp_dir: pathlib.Path, in_place: bool = False):
        self.dst = dst
        self.tmp_dir = tmp_dir
        self.path = tmp_dir / dst.name
        self.in_place = in_place  # dst is the source model
        self.data_files: list[str] = []  # names inside tmp_dir, moved next to dst on commit
        self.extended: set[str] = set()  # data files that are a source data file plus appended bytes
        self.copies: DataCopies | None = None  # big data files being copied in the background
        self.committed = False

    def commit(self) -> pathlib.Path:
        """Data first, model last: until the model rename the old model is what dst holds.

        An old model at dst that is not the source may read a data file about to be replaced
        with unrelated bytes; it is removed first, so a crash in between leaves no model rather
        than an old model reading new data. (The source, in place, only reads data files that
        are replaced by themselves plus appended bytes.)
        """
        if self.committed:
            return self.dst
        if self.copies is not None:  # done by stage_model already; a commit never races a copy
            with _discarding_on_error(self):
                self.copies.finish()
        created: list[pathlib.Path] = []  # data files that did not exist before: taken back on failure
        try:
            if self._clobbers_old_data():
                os.unlink(self.dst)
            for name in self.data_files:
                target = self.dst.parent / name
                if not target.exists():
                    created.append(target)
                os.replace(self.tmp_dir / name, target)
            if self.data_files:  # the data renames must be durable before the model's
                _sync_dir(self.dst.parent)
            os.replace(self.path, self.dst)
        except OSError as e:
            for target in created:
                with contextlib.suppress(OSError):
                    target.unlink()
            self.discard()
            raise WriteFailed(f"cannot write {self.dst}: {e.strerror or e}") from None
        self.committed = True
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        try:
            _sync_dir(self.dst.parent)
        except OSError as e:
            raise WriteFailed(f"{self.dst} was written but could not be synced to disk: {e.strerror or e}") from None
        return self.dst

    def _clobbers_old_data(self) -> bool:
        if self.in_place or not self.dst.exists():
            return False
        return any(n not in self.extended and (self.dst.parent / n).exists() for n in self.data_files)

    def discard(self) -> None:
        if self.committed:
            return
        try:
            if self.copies is not None:
                self.copies.cancel()
        finally:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def save_model(
    model: onnx.ModelProto, dst, *, source: LoadedModel | None = None, size_threshold: int = 1024
) -> pathlib.Path:
    """Write `model` to `dst` atomically (see `stage_model`)."""
    return stage_model(model, dst, source=source, size_threshold=size_threshold).commit()


def stage_model(
    model: onnx.ModelProto,
    dst,
    *,
    source: LoadedModel | None = None,
    size_threshold: int = 1024,
    into: StagedModel | None = None,
) -> StagedModel:
    """Write `model` for `dst` into a temporary folder beside it; `model` is left as it was.

    With external data in `source` (or a model too big to embed), tensors in memory of at
    least `size_threshold` bytes go to the data file; smaller ones stay embedded. `into`: the
    `begin_staging` of `dst` whose data file copies are under way.
    """
    staged = into if into is not None else _new_staged(dst, source)
    if staged.dst != pathlib.Path(dst).absolute():
        raise ValueError(f"staged for {staged.dst}, not {dst}")
    with _discarding_on_error(staged):
        _write_staged(model, staged, source, size_threshold)
    return staged


def begin_staging(dst, source: LoadedModel) -> StagedModel:
    """Stage `dst` now, before the model is folded: the copies of the source's big data files
    start at once in the background (`DataCopies`), so they run while the fold does. Pass it to
    `stage_model(into=)`; as a context manager it stops the copies and removes everything
    unless committed."""
    staged = _new_staged(dst, source)
    with _discarding_on_error(staged):
        renames = _plan_data_names(staged.dst, list(source.external_files), source.base_dir)
        _start_copies(staged, {name: source.base_dir / location for location, name in renames.items()})
    return staged


def _new_staged(dst, source: LoadedModel | None) -> StagedModel:
    dst = _check_destination(dst, source)
    try:
        tmp_dir = tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".bnfold", dir=dst.parent)
    except OSError as e:
        raise WriteFailed(f"cannot write {dst}: {e.strerror or e}") from None
    in_place = source is not None and dst.resolve() == source.path
    return StagedModel(dst, pathlib.Path(tmp_dir), in_place)


@contextlib.contextmanager
def _discarding_on_error(staged: StagedModel):
    """Any failure removes what was staged; an OSError becomes one WriteFailed line."""
    try:
        yield
    except OSError as e:
        staged.discard()
        raise WriteFailed(f"cannot write {staged.dst}: {e.strerror or e}") from None
    except BaseException:
        staged.discard()
        raise


def _check_destination(dst, source: LoadedModel | None) -> pathlib.Path:
    dst = pathlib.Path(dst).absolute()
    if dst.is_dir():
        raise WriteFailed(f"cannot write {dst}: is a directory")
    if not dst.parent.is_dir():
        problem = "is not a folder" if dst.parent.exists() else "does not exist"
        raise WriteFailed(f"cannot write {dst}: {dst.parent} {problem}")
    if source is not None and dst.resolve() in _source_data_files(source):
        raise UsageError(f"output {dst} is an external data file of the input model; choose another output")
    return dst


def _source_data_files(source: LoadedModel) -> set[pathlib.Path]:
    return {(source.base_dir / location).resolve() for location in source.external_files}


def _check_data_targets(staged: StagedModel, source: LoadedModel | None, renames: dict[str, str], names) -> None:
    """A data file written for dst may replace a source file only with that file's own copy
    plus appended bytes (see `_plan_data_names`); never the input model or another data file."""
    if source is None:
        return
    inputs = _source_data_files(source) | {source.path}
    copies_of = {name: (source.base_dir / location).resolve() for location, name in renames.items()}
    for name in names:
        target = (staged.dst.parent / name).resolve()
        if target in inputs and copies_of.get(name) != target:
            raise UsageError(
                f"output {staged.dst} would write its data file '{name}' over the input's {target}; "
                "choose another output name"
            )


def _write_staged(model, staged: StagedModel, source: LoadedModel | None, size_threshold: int) -> None:
    splice = None
    if source is not None and source.stubs:
        spilled = source.spill.stubs if source.spill is not None else {}
        splice = wire.plan_splice(model, {**source.stubs, **spilled})
    if splice is not None and splice[1] <= MAX_EMBEDDED:
        _check_no_stale_stub(splice[0], source)
        _write_spliced(splice[0], staged, source)
    else:  # stubs of a model grown too big to embed stay external refs: the model file is their data
        _unspill(model, source)
        _write_whole(model, staged, source, size_threshold)
    if staged.dst.exists():  # an overwrite keeps the file's permissions
        shutil.copymode(staged.dst, staged.path)
    _sync_dir(staged.tmp_dir)


def _check_no_stale_stub(pieces: list, source: LoadedModel) -> None:
    """A stub edited after loading matches no record: written as it is, it would point into the
    input (or the spill file) from the output. Refuse; nothing in bnfold edits a tensor in place."""
    stale = {source.stub_location, Spill.LOCATION}
    for piece in pieces:
        if isinstance(piece, onnx.TensorProto) and is_external(piece):
            if _external_ref(piece, "model").location in stale:
                raise ValueError(f"initializer '{piece.name}' was edited in place after a lazy load")


def _write_spliced(pieces: list, staged: StagedModel, source: LoadedModel) -> None:
    """Embedded output of a lazy load: unchanged big tensors copied from the source file."""
    with open(source.path, "rb") as src:
        info = os.fstat(src.fileno())
        if (info.st_size, info.st_mtime_ns) != source.file_stamp:
            raise WriteFailed(f"cannot write {staged.dst}: the input {source.path} changed since it was read")
        fd = os.open(staged.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            wire.write_splice(fd, pieces, src.fileno(), source.spill.fileno() if source.spill else None)
            os.fsync(fd)
        finally:
            os.close(fd)


def _unspill(model: onnx.ModelProto, source: LoadedModel | None) -> None:
    """Put spilled tensors' bytes back into `model` (a model too big to embed after all)."""
    spill = source.spill if source is not None else None
    if spill is None or not spill.stubs:
        return
    for tensor in _initializers(model.graph):
        found = spill.find(tensor)
        if found is not None:
            tensor.raw_data = os.pread(spill.fileno(), found.data_length, found.data_offset)
            del tensor.external_data[:]
            tensor.ClearField("data_location")


def _write_whole(model, staged: StagedModel, source: LoadedModel | None, size_threshold: int) -> None:
    referenced = list(dict.fromkeys(_external_ref(t, "model").location for t in iter_tensors(model) if is_external(t)))
    if referenced and source is None:
        raise ValueError("model references external data: pass the LoadedModel it came from as source=")
    keeps_external = bool(referenced) or bool(source and source.external_files)
    data = None if keeps_external else _serialized_embedded(model)
    if data is not None:
        _write_file(staged.path, data)
    else:
        renames = _plan_data_names(staged.dst, referenced, source.base_dir if source else None)
        append_to = next(iter(renames.values()), f"{staged.dst.name}.data")
        _check_data_targets(staged, source, renames, [*renames.values(), append_to])
        _copy_data_files(staged, source, renames)
        with _externalized(model, staged, append_to, renames, size_threshold) as records:
            pieces, size = wire.plan_splice(model, {}, records)
            if size >= PROTOBUF_LIMIT:
                raise WriteFailed(f"cannot write {staged.dst}: over 2 GiB even with weights in external data")
            _write_pieces(staged.path, pieces)
        if staged.copies is not None:  # everything else is written: now wait for the big copies
            staged.copies.finish()
        for name in staged.data_files:  # once, at the end: the copies' write-back ran meanwhile
            _sync_path(staged.tmp_dir / name)


def _serialized_embedded(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, None when too big to embed. Serialized once: in upb ByteSize() itself
    serializes, so asking first would build the whole model's bytes twice."""
    try:
        data = model.SerializeToString()
    except ValueError:  # over protobuf's limit
        return None
    return data if len(data) <= MAX_EMBEDDED else None


def _copy_data_files(staged: StagedModel, source: LoadedModel | None, renames: dict[str, str]) -> None:
    """Copy each referenced source data file under its output name; unchanged bytes stay put.
    Big files are copied in the background (and may be already, see `begin_staging`)."""
    jobs = {name: source.base_dir / location for location, name in renames.items()}
    _start_copies(staged, jobs)
    for name, path in jobs.items():
        if staged.copies is None or name not in staged.copies.jobs:
            shutil.copyfile(path, staged.tmp_dir / name)  # synced with the rest, last
        staged.data_files.append(name)
        if (staged.dst.parent / name).resolve() == path.resolve():
            staged.extended.add(name)


def _start_copies(staged: StagedModel, jobs: dict[str, pathlib.Path]) -> None:
    """Copy the big files of `jobs` (output name -> source file) in the background, keeping
    the copies under way if they are these (the fold may have dropped a file's last tensor)."""
    big = {name: path for name, path in jobs.items() if path.stat().st_size >= BACKGROUND_COPY_MIN}
    early = staged.copies
    if early is not None and early.jobs == big:
        return
    if early is not None:
        staged.copies = None
        early.cancel()
        for name in early.jobs:
            (staged.tmp_dir / name).unlink(missing_ok=True)
    if big:
        staged.copies = DataCopies(big, staged.tmp_dir)


def _plan_data_names(dst: pathlib.Path, locations: list[str], base_dir) -> dict[str, str]:
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
def _externalized(model: onnx.ModelProto, staged: StagedModel, data_name: str, renames: dict[str, str], threshold: int):
    """Point `model` at the staged data for the duration of serialization, then undo it all.

    The big main-graph initializers are appended to the data file but not edited: what is
    yielded maps their index to the record that replaces them (for `wire.plan_splice`), so at
    most one tensor's bytes are copied at a time. Subgraphs' (rare) are edited and restored.
    """
    undo: list = []
    try:
        for tensor in iter_tensors(model):
            if is_external(tensor):
                _relocate(tensor, renames, undo)
        main = [(i, t) for i, t in enumerate(model.graph.initializer) if _in_memory_size(t) >= threshold]
        nested = [(None, t) for t in _subgraph_initializers(model.graph) if _in_memory_size(t) >= threshold]
        yield _append_tensors(main + nested, staged, data_name, undo) if main or nested else {}
    finally:
        for restore in reversed(undo):
            restore()


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


def _append_tensors(tensors, staged: StagedModel, data_name: str, undo: list) -> dict[int, bytes]:
    """Append the data of `tensors`, (main-graph index or None, tensor) pairs, to `data_name`:
    returns the records of the indexed ones; the others are pointed there (`undo` restores)."""
    path = staged.tmp_dir / data_name
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
    if data_name not in staged.data_files:
        staged.data_files.append(data_name)
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
                    copied = _copy_range(src, dst, done, min(COPY_CHUNK, size - done))
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


def _copy_range(src: int, dst: int, offset: int, length: int) -> int:
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
    _pwrite_all(dst, memoryview(data), offset)
    return len(data)


def _pwrite_all(fd: int, view: memoryview, at: int) -> None:
    while view:
        done = os.pwrite(fd, view, at)
        view, at = view[done:], at + done


# --------------------------------------------------------------------------- durability


def _write_file(path: pathlib.Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        _sync_file(f)


def _write_pieces(path: pathlib.Path, pieces: list) -> None:
    """A `wire.plan_splice` plan without stubs: bytes, and tensors serialized one at a time."""
    with open(path, "wb") as f:
        for piece in pieces:
            if not isinstance(piece, bytes):
                body = piece.SerializeToString()
                piece = wire.record(wire.INITIALIZER, len(body)) + body
            f.write(piece)
        _sync_file(f)


def _sync_file(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _sync_path(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(path: pathlib.Path) -> None:
    """A rename is durable only once its folder is synced."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
