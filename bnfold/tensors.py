"""Tensors: their values (decode and encode raw bytes), their storage facts (byte sizes, the
stored-size check), and where they are in a model (every TensorProto, the initializers).

Pure functions of a TensorProto: no file is read here (external bytes: `bnfold.external`), so
both the graph index and the loaders build on this module and neither on the other.
"""

from __future__ import annotations

import itertools
import math
import operator
import sys

import numpy as np
import onnx
from onnx import numpy_helper


# Dtypes whose raw_data numpy reads as is (little-endian, one element per itemsize bytes); the
# others (strings, bfloat16, float8, sub-byte ints, typed fields) go through numpy_helper.
_RAW_DTYPES = {
    onnx.TensorProto.FLOAT: np.dtype("<f4"),
    onnx.TensorProto.DOUBLE: np.dtype("<f8"),
    onnx.TensorProto.FLOAT16: np.dtype("<f2"),
    onnx.TensorProto.INT64: np.dtype("<i8"),
    onnx.TensorProto.INT32: np.dtype("<i4"),
    onnx.TensorProto.INT16: np.dtype("<i2"),
    onnx.TensorProto.INT8: np.dtype("i1"),
    onnx.TensorProto.UINT8: np.dtype("u1"),
    onnx.TensorProto.BOOL: np.dtype("?"),
}
ONNX_DTYPES = {np.dtype(dtype.str[1:]): onnx_type for onnx_type, dtype in _RAW_DTYPES.items()}


def raw_dtype(data_type: int) -> np.dtype | None:
    """The numpy dtype whose little-endian bytes are `data_type`'s raw_data, for the common ones."""
    return _RAW_DTYPES.get(data_type)


def decode_tensor(tensor: onnx.TensorProto) -> np.ndarray:
    """An embedded tensor's value; raw bytes of common dtypes are viewed, not converted
    (numpy_helper's round trip costs more than the fold itself on small tensors). Read-only."""
    dtype = _RAW_DTYPES.get(tensor.data_type)
    raw = tensor.raw_data if dtype is not None else b""
    if not raw:  # typed fields, other dtypes, or an empty tensor
        return numpy_helper.to_array(tensor)
    value = np.frombuffer(raw, dtype=dtype)
    dims = tensor.dims  # a vector (BN's parameters, biases) is already in shape: no reshape
    if len(dims) == 1 and dims[0] == value.size:
        return value
    return value.reshape(dims[:])  # a slice gives a list at once; tuple() iterates the field


def encode_tensor(value: np.ndarray, name: str, tensor: onnx.TensorProto) -> onnx.TensorProto:
    """Fill the empty `tensor` with `value` as raw little-endian bytes."""
    data_type = ONNX_DTYPES.get(value.dtype)
    if data_type is None:
        tensor.CopyFrom(numpy_helper.from_array(value, name))
        return tensor
    tensor.name = name
    tensor.data_type = data_type
    tensor.dims.extend(value.shape)
    tensor.raw_data = little_endian(value).tobytes()
    return tensor


def little_endian(value: np.ndarray) -> np.ndarray:
    if _NATIVE_LITTLE and value.dtype.isnative:
        return np.ascontiguousarray(value)
    return np.ascontiguousarray(value, value.dtype.newbyteorder("<"))


_NATIVE_LITTLE = sys.byteorder == "little"


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


def dtype_name(data_type: int) -> str:
    return onnx.TensorProto.DataType.Name(data_type)


def byte_size(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's values take in raw form; None for strings and sub-byte types."""
    if tensor.data_type not in _TYPED_FIELD:
        return None
    return _ITEMSIZE[tensor.data_type] * _element_count(tensor)


def _element_count(tensor: onnx.TensorProto) -> int:
    return math.prod(tensor.dims)


def tensor_problem(tensor: onnx.TensorProto) -> str:
    data_type, dims = tensor.data_type, tensor.dims[:]  # one conversion (a slice: faster than tuple()), then C-speed reads
    if data_type not in _KNOWN_DTYPES:
        return f"has unknown data type {data_type}"
    if dims and min(dims) < 0:
        return f"has negative dimensions {dims}"
    if tensor.HasField("segment"):
        return "is segmented (not supported)"
    if tensor.data_location == _EXTERNAL:
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
    return f"({dtype_name(data_type)} {list(dims)}) holds {stored} {what}, expected {expected}"


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == _EXTERNAL


_EXTERNAL = onnx.TensorProto.EXTERNAL


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
    # every node's attributes in one stream: no generator per node (most have no tensor)
    yield from _attribute_tensors(itertools.chain.from_iterable(map(_ATTRIBUTES, graph.node)))


# Attribute types that hold no tensor and no graph: their attributes are skipped unread.
_PLAIN_ATTRIBUTES = frozenset({
    onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT, onnx.AttributeProto.STRING,
    onnx.AttributeProto.FLOATS, onnx.AttributeProto.INTS, onnx.AttributeProto.STRINGS,
})


_ATTRIBUTES = operator.attrgetter("attribute")


def _node_tensors(node: onnx.NodeProto):
    yield from _attribute_tensors(node.attribute)


def _attribute_tensors(attributes):
    for attr in attributes:
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


def all_graphs(graph: onnx.GraphProto):
    """`graph` and every graph nested in it (If / Loop / Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from all_graphs(attr.g)
            for sub in attr.graphs:
                yield from all_graphs(sub)


def initializers(graph: onnx.GraphProto):
    """Initializers of a graph and of its subgraphs: the tensors saving may move out."""
    for each in all_graphs(graph):
        yield from each.initializer


def subgraph_initializers(graph: onnx.GraphProto):
    for each in itertools.islice(all_graphs(graph), 1, None):
        yield from each.initializer

