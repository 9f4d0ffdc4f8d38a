"""Inputs for verification: seeded random data for every input a caller must feed, or the
user's own (`--inputs FILE.npz`), checked against the model's declared inputs."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
import onnx

from bnfold.compare import is_float
from bnfold.errors import InvalidModel, UsageError, one_line

# Sizes of dynamic dimensions (a name, no value, or a value <= 0, as exporters write them),
# unless --dim names them: chosen to exercise the model, not to be cheap. A batch of 2 (a batch
# of one hides batch-mixing bugs), spatial dims of 64 (at least the total stride of usual
# backbones: a 2x2 map vanishes after the first strided layers and saturates what follows),
# and 16 for other axes (sequence lengths, features). A named dimension gets one size everywhere.
DEFAULT_BATCH = 2
DEFAULT_SPATIAL = 64
DEFAULT_LENGTH = 16
# When the original does not run at the default spatial size (a fixed pooling window after a
# stride-32 backbone, a neck resizing to a skip connection's shape), the next sizes are tried:
# multiples of the usual total stride, and the classifiers' 224.
SPATIAL_SIZES = (DEFAULT_SPATIAL, 224, 32, 128, 320, 640)
# Seeded inputs are generated in float64 first: 2**28 elements is 2 GiB, far above real inputs
# (an image batch is ~10**6) and far below what a hostile shape asks for.
MAX_GENERATED_ELEMENTS = 2**28


def graph_model(model) -> onnx.ModelProto:
    """The model's graph without loading weights: only the graph inputs and outputs are needed."""
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load(os.fspath(model), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf/IO errors vary by version
        raise InvalidModel(f"cannot read model {os.fspath(model)}: {one_line(str(err))}") from None


def free_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs the caller must feed: IR<4 models also list every initializer as an input."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _input_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    if value.type.WhichOneof("value") != "tensor_type":
        raise UsageError(f"input '{value.name}' is not a tensor; pass its value with --inputs FILE.npz")
    elem_type = value.type.tensor_type.elem_type
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):  # UNDEFINED (0) or a number no dtype has
        raise InvalidModel(f"input '{value.name}' has no valid element type ({elem_type})") from None


def _symbolic_dims(model: onnx.ModelProto) -> set[str]:
    return {
        d.dim_param
        for i in free_inputs(model) if i.type.HasField("tensor_type")
        for d in i.type.tensor_type.shape.dim if d.dim_param
    }


def _check_dims(model: onnx.ModelProto, dims) -> dict[str, int]:
    """A --dim that names no symbolic dimension is a typo; say so rather than ignore it."""
    dims = dict(dims or {})
    known = _symbolic_dims(model)
    for name, size in dims.items():
        if name not in known:
            have = ", ".join(sorted(known)) or "none"
            raise UsageError(f"--dim {name}: the model has no symbolic dimension '{name}' (it has: {have})")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise UsageError(f"--dim {name}={size}: the size must be a positive integer")
    return {name: int(size) for name, size in dims.items()}


def _input_shape(value: onnx.ValueInfoProto, dims: dict[str, int], spatial: int = DEFAULT_SPATIAL) -> tuple[int, ...]:
    """The input's shape: its fixed dims, and for each dynamic one --dim's size or the default
    (DEFAULT_*); a named dim's size is remembered in `dims`, so every input agrees on it."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        raise UsageError(
            f"input '{value.name}' has no shape information; pass its value with --inputs FILE.npz"
        )
    rank, shape = len(tensor.shape.dim), []
    for axis, d in enumerate(tensor.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(d.dim_value)
        elif d.dim_param:
            shape.append(dims.setdefault(d.dim_param, default_size(axis, rank, spatial)))
        else:
            shape.append(default_size(axis, rank, spatial))
    if math.prod(shape) > MAX_GENERATED_ELEMENTS:
        raise UsageError(
            f"input '{value.name}' of shape {tuple(shape)} is too large to generate "
            f"(over {MAX_GENERATED_ELEMENTS} elements); pass --dim NAME=SIZE or --inputs FILE.npz"
        )
    return tuple(shape)


def has_nonpositive_dims(model: onnx.ModelProto) -> bool:
    """Whether a graph input declares a dim <= 0 (dynamic, as exporters write it)."""
    return any(
        d.HasField("dim_value") and d.dim_value <= 0
        for value in model.graph.input if value.type.HasField("tensor_type")
        for d in value.type.tensor_type.shape.dim
    )


def default_size(axis: int, rank: int, spatial: int = DEFAULT_SPATIAL) -> int:
    """The size of a dynamic dimension no --dim names (see DEFAULT_*)."""
    if axis == 0:
        return DEFAULT_BATCH
    return spatial if rank >= 4 and axis >= 2 else DEFAULT_LENGTH


def has_default_spatial(model, dims=None) -> bool:
    """Whether generated inputs would give some spatial dimension its default size (so another
    size may be tried: SPATIAL_SIZES)."""
    given = set(dims or {})
    for value in free_inputs(graph_model(model)):
        shape = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else ()
        for axis, d in enumerate(shape):
            dynamic = not (d.HasField("dim_value") and d.dim_value > 0)
            if len(shape) >= 4 and axis >= 2 and dynamic and d.dim_param not in given:
                return True
    return False


def _random_array(rng: np.random.Generator, shape, dtype: np.dtype, name: str) -> np.ndarray:
    """Standard normal floats; small non-negative ints (they are often indices or sizes)."""
    if is_float(dtype):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if dtype.kind in "iu":
        return rng.integers(0, 4, shape).astype(dtype)
    raise UsageError(f"cannot generate input '{name}' of type {dtype}; pass it with --inputs FILE.npz")


def generate_inputs(model, dims=None, seed=0, spatial: int = DEFAULT_SPATIAL) -> dict[str, np.ndarray]:
    """Seeded inputs for every free graph input; dynamic dims from `dims`, else the defaults
    (`spatial`: the size of spatial ones)."""
    model = graph_model(model)
    dims = _check_dims(model, dims)
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in free_inputs(model):
        dtype = _input_dtype(value)
        feeds[value.name] = _random_array(rng, _input_shape(value, dims, spatial), dtype, value.name)
    return feeds


def _read_npz(path) -> dict[str, np.ndarray]:
    try:
        with np.load(os.fspath(path), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except AttributeError:  # np.load gave a plain array: a .npy file, not an archive
        raise UsageError(f"--inputs {os.fspath(path)}: not an .npz archive") from None
    except Exception as err:  # noqa: BLE001 - zip, pickle and IO errors all mean "unreadable"
        raise UsageError(f"--inputs {os.fspath(path)}: cannot read it ({one_line(str(err))})") from None


def _coerce_input(name: str, array, dtype: np.dtype) -> np.ndarray:
    """Cast within a kind (float64 data for a float32 input); never float <-> int silently."""
    array = np.asarray(array)
    if array.dtype == dtype:
        return array
    if array.dtype.kind == "V" and array.dtype.itemsize == dtype.itemsize:
        return array.view(dtype)  # .npz stores bfloat16 as raw 2-byte records
    same_kind = (is_float(array.dtype) and is_float(dtype)) or (
        array.dtype.kind in "iu" and dtype.kind in "iu"
    )
    if not same_kind:
        raise UsageError(f"input '{name}' is {array.dtype} but the model expects {dtype}")
    return array.astype(dtype)


def given_inputs(model: onnx.ModelProto, inputs) -> dict[str, np.ndarray]:
    """Validate user inputs against the reference model's free inputs."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = _read_npz(inputs)
    elif not isinstance(inputs, Mapping):
        raise UsageError("inputs must be a dict of arrays or the path of an .npz file")
    expected = {v.name: v for v in free_inputs(model)}
    unknown = sorted(set(inputs) - set(expected))
    if unknown:
        raise UsageError(f"unknown input '{unknown[0]}' (the model's inputs: {', '.join(expected)})")
    missing = [name for name in expected if name not in inputs]
    if missing:
        raise UsageError(f"no value for input '{missing[0]}' (give every input: {', '.join(expected)})")
    return {name: _coerce_input(name, inputs[name], _input_dtype(v)) for name, v in expected.items()}
