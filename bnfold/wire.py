"""The protobuf wire format around large embedded tensors: read a model without its weights,
write one that copies the unchanged weights byte for byte.

A 250 MB model parsed whole costs its size again in memory, and saved whole a third time, even
though a fold changes only some tensors. Here the model file is scanned at the wire level
(tags and lengths; weight bytes are skipped, never read): every main-graph initializer of at
least `min_tensor` bytes whose data is one `raw_data` field becomes a *stub*, the same tensor
without its data, pointing at its bytes inside the model file as external data (location = the
model file's name), so whoever needs its value reads just that range. Everything else is parsed
as usual. The big tensors a fold makes are spilled the same way (`spill_record`: a record in a
temporary file, a stub in the model). Saving writes the graph's initializers record by record: a
stub still unchanged is its record copied from the source or spill file by the kernel
(`os.copy_file_range`), anything else is serialized. Only ModelProto.graph (field 7) and GraphProto.initializer (field 5) are treated
specially; TensorProto's raw_data is field 9, external_data 13, data_location 14.
"""

from __future__ import annotations

import dataclasses
import os

import onnx

GRAPH, INITIALIZER, GRAPH_OUTPUT, RAW_DATA, EXTERNAL_DATA, DATA_LOCATION = 7, 5, 12, 9, 13, 14
GRAPH_NODE = 1
LENGTH_DELIMITED = 2


class WireError(ValueError):
    """Bytes that are not the protobuf this module expects (the caller falls back to parsing)."""


@dataclasses.dataclass(frozen=True)
class Stub:
    """Where an embedded tensor's record and data lie in the source file (or, `spilled`, in
    the spill file of the tensors a fold made)."""

    record_offset: int  # the whole initializer record: tag, length, TensorProto
    record_length: int
    data_offset: int  # its raw_data bytes
    data_length: int
    stub: bytes  # the stub TensorProto as serialized: unchanged while equal
    spilled: bool = False


def read_varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def fields(buf, pos: int, end: int):
    """(number, wire type, record start, value start, record end) of each field in buf[pos:end]."""
    while pos < end:
        start = pos
        key, pos = read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        value = pos
        if wire_type == 0:
            _, pos = read_varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == LENGTH_DELIMITED:
            length, value = read_varint(buf, pos)
            pos = value + length
        elif wire_type == 5:
            pos += 4
        else:
            raise WireError(f"wire type {wire_type}")
        if pos > end or number == 0:
            raise WireError("field runs past its message")
        yield number, wire_type, start, value, pos


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def record(number: int, body_length: int) -> bytes:
    """Tag and length of a length-delimited field; its body follows."""
    return varint(number << 3 | LENGTH_DELIMITED) + varint(body_length)


def with_graph_fields(buf, extra: bytes) -> bytes:
    """The model's bytes with `extra` (serialized GraphProto fields, e.g. more outputs) added to
    its graph, without parsing it: repeated fields appended to a message extend it."""
    graphs = [f for f in fields(buf, 0, len(buf)) if f[0] == GRAPH]
    if len(graphs) != 1 or graphs[0][1] != LENGTH_DELIMITED:
        raise WireError("not exactly one graph")
    _, _, start, value, end = graphs[0]
    return b"".join((buf[:start], record(GRAPH, end - value + len(extra)), buf[value:end], extra, buf[end:]))


def count_graph_nodes(buf) -> int:
    """How many nodes the model's main graph has, read from the tags alone (weights skipped)."""
    graphs = [f for f in fields(buf, 0, len(buf)) if f[0] == GRAPH]
    if len(graphs) != 1 or graphs[0][1] != LENGTH_DELIMITED:
        raise WireError("not exactly one graph")
    _, _, _, value, end = graphs[0]
    return sum(1 for f in fields(buf, value, end) if f[0] == GRAPH_NODE)


def scan(buf, location: str, min_tensor: int) -> tuple[bytes, dict[str, Stub]]:
    """The model's bytes with each large main-graph initializer replaced by its stub, and the
    stubs by name. Raises WireError when the layout is not one this module handles."""
    size = len(buf)
    graphs = [f for f in fields(buf, 0, size) if f[0] == GRAPH]
    if len(graphs) != 1 or graphs[0][1] != LENGTH_DELIMITED:
        raise WireError("not exactly one graph")
    stubs: dict[str, Stub] = {}
    chunks = []
    for number, _, start, value, end in fields(buf, 0, size):
        if number != GRAPH:
            chunks.append(buf[start:end])
            continue
        graph = _scan_graph(buf, value, end, location, min_tensor, stubs)
        chunks += [record(GRAPH, len(graph)), graph]
    return b"".join(chunks), stubs


def _scan_graph(buf, pos: int, end: int, location: str, min_tensor: int, stubs: dict) -> bytes:
    chunks = []
    for number, wire_type, start, value, stop in fields(buf, pos, end):
        stub = None
        if number == INITIALIZER and wire_type == LENGTH_DELIMITED and stop - value >= min_tensor:
            stub = _stub(buf, start, value, stop, location)
        if stub is None:
            chunks.append(buf[start:stop])
            continue
        name, body, found = stub
        if name in stubs:
            raise WireError(f"two initializers named {name!r}")
        stubs[name] = found
        chunks += [record(INITIALIZER, len(body)), body]
    return b"".join(chunks)


def _stub(buf, start: int, pos: int, end: int, location: str):
    """(name, stub bytes, Stub) of the TensorProto in buf[pos:end], or None when its data is
    not one raw_data field (typed fields, external data: left as they are)."""
    header, raw = [], []
    for number, _, field_start, value, stop in fields(buf, pos, end):
        if number in (EXTERNAL_DATA, DATA_LOCATION):
            return None
        if number == RAW_DATA:
            raw.append((value, stop))
        else:
            header.append(buf[field_start:stop])
    if len(raw) != 1:
        return None
    tensor = onnx.TensorProto()
    tensor.ParseFromString(b"".join(header))
    data_offset, data_end = raw[0]
    for key, value in (("location", location), ("offset", str(data_offset)), ("length", str(data_end - data_offset))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL
    body = tensor.SerializeToString()
    return tensor.name, body, Stub(start, end - start, data_offset, data_end - data_offset, body)


def spill_record(header: onnx.TensorProto, data_length: int, location: str, offset: int) -> tuple[bytes, onnx.TensorProto, Stub]:
    """For a tensor (`header`: all but its data) whose raw data of `data_length` bytes is to be
    written at `offset` of a spill file: (the record's bytes before the data, the stub, Stub)."""
    head = header.SerializeToString()
    body_length = len(head) + len(record(RAW_DATA, data_length)) + data_length
    prefix = record(INITIALIZER, body_length) + head + record(RAW_DATA, data_length)
    stub = onnx.TensorProto()
    stub.CopyFrom(header)
    for key, value in (("location", location), ("offset", str(offset + len(prefix))), ("length", str(data_length))):
        entry = stub.external_data.add()
        entry.key, entry.value = key, value
    stub.data_location = onnx.TensorProto.EXTERNAL
    found = Stub(offset, len(prefix) + data_length, offset + len(prefix), data_length, stub.SerializeToString(), spilled=True)
    return prefix, stub, found


def plan_splice(model: onnx.ModelProto, stubs: dict[str, Stub], records: dict[int, bytes] | None = None) -> tuple[list, int]:
    """What `write_splice` writes for `model`, in order (bytes; a Stub to copy from the source
    file; a TensorProto to serialize), and the total size. Each initializer that is still an
    unchanged stub is its source record, one in `records` (by index) that record; nothing here
    serializes the whole model (in upb even ByteSize() does that, doubling memory)."""
    before, after = _shell(model, GRAPH)
    graph_before, graph_after = _shell(model.graph, INITIALIZER)
    records = records or {}
    tensors = [records.get(i) or _unchanged(tensor, stubs) or tensor for i, tensor in enumerate(model.graph.initializer)]
    graph_length = len(graph_before) + len(graph_after) + sum(_length(t) for t in tensors)
    pieces = [before + record(GRAPH, graph_length) + graph_before, *tensors, graph_after + after]
    return pieces, len(pieces[0]) - len(graph_before) + graph_length + len(after)


def write_splice(fd: int, pieces: list, source_fd: int, spill_fd: int | None = None) -> None:
    """Write a `plan_splice` plan to `fd`, one tensor in memory at a time."""
    for piece in pieces:
        if isinstance(piece, Stub):
            _copy(spill_fd if piece.spilled else source_fd, fd, piece)
        elif isinstance(piece, bytes):
            _write(fd, piece)
        else:
            body = piece.SerializeToString()
            _write(fd, record(INITIALIZER, len(body)))
            _write(fd, body)


def _unchanged(tensor: onnx.TensorProto, stubs: dict) -> Stub | None:
    """The Stub `tensor` still is: found by name among the source's, by its bytes among the
    spilled ones (a refold may spill a tensor of the same name again)."""
    if not stubs or tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    body = tensor.SerializeToString()
    found = stubs.get(tensor.name)
    if found is not None and body == found.stub:
        return found
    return stubs.get(body)


def _shell(message, skipped: int) -> tuple[bytes, bytes]:
    """`message` serialized without field `skipped`: the fields numbered below it, and above."""
    parts = (type(message)(), type(message)())
    for field, value in message.ListFields():
        if field.number == skipped:
            continue
        target = parts[field.number > skipped]
        if _is_repeated(field):
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)
    return parts[0].SerializeToString(), parts[1].SerializeToString()


def _is_repeated(field) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.28; `label` is deprecated there
        return field.is_repeated
    return field.label == field.LABEL_REPEATED


def _length(piece) -> int:
    """Bytes of an initializer record: a stub's source record, or a tensor's (ByteSize of one
    tensor serializes just that tensor)."""
    if isinstance(piece, Stub):
        return piece.record_length
    if isinstance(piece, bytes):
        return len(piece)
    size = piece.ByteSize()
    return len(record(INITIALIZER, size)) + size


def _write(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)


def _copy(source_fd: int, fd: int, stub: Stub) -> int:
    """Copy the stub's record from the source file, in the kernel where it can."""
    offset, left = stub.record_offset, stub.record_length
    while left:
        try:
            done = os.copy_file_range(source_fd, fd, left, offset)
        except (AttributeError, OSError):  # not Linux, or a file system that refuses: copy by hand
            done = _write(fd, os.pread(source_fd, min(left, 2**24), offset))
        if done <= 0:
            raise OSError("source model file shrank while it was being copied")
        offset += done
        left -= done
    return stub.record_length
