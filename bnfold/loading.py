"""Loading a model file: what makes a model acceptable, and what a lazy load keeps on disk.

Loading parses the model once, without external data: external tensors keep their references
and are only read (`bnfold.external.read_tensor`) when a fold needs their values. Every problem a
user can cause (not a file, not ONNX, unknown opsets, invalid UTF-8 names, tensors whose stored
data does not fit their shape, broken or escaping external data, a checker finding) is one
`InvalidModel` line at load, never a traceback later.

A lazy load of a big file leaves its big embedded initializers in the file as stubs (see
`bnfold.wire`), and the big tensors the fold makes go to a `Spill` file instead of memory.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import os
import pathlib
import stat
import tempfile

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from bnfold import findings, wire
from bnfold.errors import InvalidModel
from bnfold.external import check_external_data, pwrite_all
from bnfold.tensors import decode_tensor, is_external, iter_tensors, tensor_problem

PROTOBUF_LIMIT = 2**31  # protobuf cannot serialize or parse a message this large
# Lazy loads (load_model(lazy=True)): files from this size on are scanned rather than parsed
# whole, and their initializers from this size on stay in the file until needed.
LAZY_MIN_FILE = 32 * 2**20
LAZY_MIN_TENSOR = 2**16
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
    spill: Spill | None = None  # lazy loads of big or external models: where the tensors a fold makes go (see Spill)
    stub_location: str | None = None  # lazy loads: the stubs' external data location
    warnings: tuple[str, ...] = ()  # checker findings that do not stop a fold (bnfold.findings)


class Spill:
    """The big tensors a fold of a lazy load makes, written to an anonymous temporary file as
    they are made instead of held in memory until the model is saved: the model keeps a stub
    (as for the source's tensors), `read` gives the value back, saving copies the record (an
    embedded output) or the data (external data) from it. Memory then stays at about the graph
    plus the largest tensor, whatever the model's size, even when every weight changes."""

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
        pwrite_all(fd, memoryview(data).cast("B"), self.size + len(prefix))  # from the array: no bytes copy
        self.size += len(prefix) + data.nbytes
        self.stubs[found.stub] = found
        return stub

    def find(self, tensor: onnx.TensorProto) -> wire.Stub | None:
        if not self.stubs or tensor.data_location != onnx.TensorProto.EXTERNAL:
            return None
        return self.stubs.get(tensor.SerializeToString())

    def read(self, tensor: onnx.TensorProto, found: wire.Stub) -> np.ndarray:
        full = onnx.TensorProto()
        full.name, full.data_type = tensor.name, tensor.data_type
        full.dims.extend(tensor.dims)
        full.raw_data = os.pread(self.file.fileno(), found.data_length, found.data_offset)
        return decode_tensor(full)

    def fileno(self) -> int | None:
        return self.file.fileno() if self.file is not None else None


def load_model(path, *, lazy: bool = False, check_model: bool = False) -> LoadedModel:
    """Parse and check a model file; every problem a user can cause is one `InvalidModel` line,
    checker complaints that do not stop a fold are `warnings` (see bnfold.findings).

    `lazy` (for a caller that saves through `stage_model` with this as `source`): a large file's
    big embedded initializers are not read but become stubs, external data pointing into the
    model file itself, read when a fold needs them and copied byte for byte on saving.
    `check_model`: every checker complaint is fatal (the strict gate).
    """
    path = pathlib.Path(path)
    # External data is relative to the folder of the path as given (as onnx and onnxruntime do),
    # not to where a symlinked model file points.
    base_dir = path.absolute().parent
    model, stubs, stamp = _read_model(path, base_dir, lazy)
    _check_is_model(model, path)
    external = _check_tensors(model, path)
    external_files = check_external_data(external, base_dir, path, stubs)
    warnings = findings.check_model(path, model, whole_file=not stubs, strict=check_model)
    # lazy loads spill what a fold makes: big embedded tensors left on disk, or external data
    spill = Spill(LAZY_MIN_TENSOR) if stubs or (lazy and external_files) else None
    return LoadedModel(
        model, path.resolve(), base_dir, external_files, stubs, stamp, spill, path.name if stubs else None, warnings
    )


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
        for field, value in message.ListFields():  # a call only for a string that is not valid
            kind = kinds.get(field.number)
            if kind == _STRING:
                if value.__class__ is bytes:
                    _check_strings(message, ((field.name, value),), path)
            elif kind == _STRINGS:
                try:
                    "".join(value)  # fails on a bytes element, at C speed
                except TypeError:
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


def _check_tensors(model: onnx.ModelProto, where) -> list[onnx.TensorProto]:
    """Every tensor's stored data fits its dtype and shape, checked from sizes alone (nothing is
    decoded): the checker lets a mismatch through, and decoding it later would crash. Returns
    the external tensors (their sizes are checked against their files next)."""
    external = []
    for tensor in iter_tensors(model):
        problem = tensor_problem(tensor)
        if problem:
            raise InvalidModel(f"cannot load {where}: tensor '{tensor.name}' {problem}")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            external.append(tensor)
    return external
