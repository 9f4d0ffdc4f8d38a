"""The proof that a folded model computes what the original computes.

Both models run on the same seeded inputs, with every graph optimisation turned off: left on,
onnxruntime fuses Conv+BatchNormalization itself and the comparison would prove nothing. Each
output is compared normwise,

    max_abs_err = max|cand - ref|        max_rel_err = max_abs_err / max(max|ref|, tiny)

and passes when ``max_abs_err <= atol + rtol * max|ref|`` (per-element relative errors explode
near zero, which a fold legitimately moves around). NaN/Inf must sit at the same positions with
the same values; integer and bool outputs must be equal.

When onnxruntime has no kernel for a model (BatchNormalization opset 6 from old exports, float64
Conv, bfloat16 Conv on CPU, ...) both models run on ``onnx.reference`` instead, with a corrected
BatchNormalization (see ``_reference_batchnorm``).

onnxruntime is imported inside the functions that need it, so ``import bnfold`` stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping

import ml_dtypes
import numpy as np
import onnx

from bnfold.errors import InvalidModel, UsageError, VerificationFailed

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
REFERENCE = "onnx.reference"
DEFAULT_DIM = 2
# Seeded inputs are generated in float64 first: 2**28 elements is 2 GiB, far above real inputs
# (an image batch is ~10**6) and far below what a hostile shape asks for.
MAX_GENERATED_ELEMENTS = 2**28
# Protobuf cannot serialise a message of 2 GiB or more; such models go to onnxruntime as files.
_MAX_PROTO_BYTES = 2**31 - 1
_RUN_HINT = "the inputs may not fit the model; pass --dim NAME=SIZE or --inputs FILE.npz"

_TOLERANCES = {
    np.dtype(np.float64): (1e-9, 1e-12),
    np.dtype(np.float32): (1e-4, 1e-6),
    np.dtype(np.float16): (1e-2, 1e-3),
    np.dtype(ml_dtypes.bfloat16): (5e-2, 1e-2),
}


def _json_float(value: float) -> float | None:
    """JSON has no NaN/Infinity; a non-finite error is reported as null (the check has failed)."""
    return float(value) if math.isfinite(value) else None


@dataclasses.dataclass(frozen=True)
class OutputCheck:
    """One output of the two models compared on one provider."""

    provider: str
    output: str
    dtype: str
    max_abs_err: float
    max_rel_err: float
    rtol: float
    atol: float
    passed: bool
    note: str = ""

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["max_abs_err"] = _json_float(self.max_abs_err)
        out["max_rel_err"] = _json_float(self.max_rel_err)
        return out


@dataclasses.dataclass(frozen=True)
class Verification:
    """Outcome of one comparison; ``seconds`` counts session building and runs only."""

    passed: bool
    engine: str  # "onnxruntime" | "onnx.reference"
    providers: tuple[str, ...]
    checks: tuple[OutputCheck, ...]
    seconds: float
    note: str = ""

    def _checks(self, provider):
        return [c for c in self.checks if provider is None or c.provider == provider]

    def max_abs_err(self, provider: str | None = None) -> float:
        return max((c.max_abs_err for c in self._checks(provider)), default=0.0)

    def max_rel_err(self, provider: str | None = None) -> float:
        return max((c.max_rel_err for c in self._checks(provider)), default=0.0)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "engine": self.engine,
            "providers": list(self.providers),
            "max_abs_err": _json_float(self.max_abs_err()),
            "max_rel_err": _json_float(self.max_rel_err()),
            "seconds": float(self.seconds),
            "note": self.note,
            "checks": [c.to_dict() for c in self.checks],
        }


# ---------------------------------------------------------------- dtypes and tolerances


def _is_float(dtype: np.dtype) -> bool:
    """numpy does not count ml_dtypes' bfloat16/float8 as np.floating; finfo knows them all."""
    if dtype.kind == "f":
        return True
    try:
        ml_dtypes.finfo(dtype)
    except (ValueError, TypeError):
        return False
    return dtype.kind == "V"


def default_tolerance(dtype) -> tuple[float, float]:
    """(rtol, atol) for an output dtype: loose enough for the rounding a fold moves, no looser."""
    dtype = np.dtype(dtype)
    if dtype in _TOLERANCES:
        return _TOLERANCES[dtype]
    if _is_float(dtype):  # float8 and friends: scale with the format's precision
        eps = float(ml_dtypes.finfo(dtype).eps)
        return (8 * eps, 8 * eps)
    return (0.0, 0.0)


# ---------------------------------------------------------------- providers


def _session_options(severity: int = 4):
    """ORT_DISABLE_ALL so onnxruntime cannot fuse BN itself. Only fatal messages are logged:
    warnings (old opsets) are noise, and errors come back as exceptions that bnfold reports in
    one line, so onnxruntime's own copy on stderr would only repeat them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = severity
    return options


# TF32 rounds float32 Conv/MatMul inputs to 10 mantissa bits on Ampere and later GPUs, and
# onnxruntime's CUDA provider enables it by default: errors of ~1e-3 on both models would swamp
# the fold's own rounding (~1e-7) and fail good folds. The proof runs in full float32.
_FULL_FLOAT32 = {"use_tf32": "0"}


@functools.lru_cache(maxsize=1)
def _cuda_options() -> dict | None:
    """The CUDA provider options verification runs with, or None when CUDA is not usable.
    onnxruntime-gpu lists CUDA even without a GPU or CUDA libraries, then silently uses CPU;
    only a real session shows whether CUDA is there. An onnxruntime too old to know use_tf32
    gets plain CUDA."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return None
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    for options in (_FULL_FLOAT32, {}):
        try:
            with _CUDA_LOCK:
                session = ort.InferenceSession(model.SerializeToString(), _session_options(4), providers=[(CUDA, options)])
        except Exception:  # noqa: BLE001 - any failure means "not with these options"
            continue
        if CUDA in session.get_providers():
            return options
    return None


def _cuda_works() -> bool:
    return _cuda_options() is not None


def _with_options(provider: str):
    """The provider as onnxruntime takes it, with the options that make the comparison exact."""
    return (CUDA, _cuda_options() or {}) if provider == CUDA else provider


def available_providers() -> list[str]:
    """The providers `verify` uses by default: CPU always, CUDA when a session can really use it."""
    return [CPU, CUDA] if _cuda_works() else [CPU]


def _check_providers(providers) -> list[str]:
    import onnxruntime as ort

    if providers is None:
        return available_providers()
    providers = list(providers)
    if not providers:
        raise UsageError("no execution provider given")
    unknown = [p for p in providers if p not in ort.get_available_providers()]
    if unknown:
        have = ", ".join(ort.get_available_providers())
        raise UsageError(f"execution provider {unknown[0]} is not available (available: {have})")
    return providers


# ---------------------------------------------------------------- models and inputs


def _graph_model(model) -> onnx.ModelProto:
    """The model's graph without loading weights: only the graph inputs and outputs are needed."""
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load(os.fspath(model), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf/IO errors vary by version
        raise InvalidModel(f"cannot read model {os.fspath(model)}: {_one_line(err)}") from None


def _free_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
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
        for i in _free_inputs(model) if i.type.HasField("tensor_type")
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


def _input_shape(value: onnx.ValueInfoProto, dims: dict[str, int]) -> tuple[int, ...]:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        raise UsageError(
            f"input '{value.name}' has no shape information; pass its value with --inputs FILE.npz"
        )
    shape = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value"):
            shape.append(d.dim_value)
        else:
            shape.append(dims.get(d.dim_param, DEFAULT_DIM))
    if any(size < 0 for size in shape):
        raise InvalidModel(f"input '{value.name}' has a negative dimension {tuple(shape)}")
    if math.prod(shape) > MAX_GENERATED_ELEMENTS:
        raise UsageError(
            f"input '{value.name}' of shape {tuple(shape)} is too large to generate "
            f"(over {MAX_GENERATED_ELEMENTS} elements); pass --dim NAME=SIZE or --inputs FILE.npz"
        )
    return tuple(shape)


def _random_array(rng: np.random.Generator, shape, dtype: np.dtype, name: str) -> np.ndarray:
    """Standard normal floats; small non-negative ints (they are often indices or sizes)."""
    if _is_float(dtype):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if dtype.kind in "iu":
        return rng.integers(0, 4, shape).astype(dtype)
    raise UsageError(f"cannot generate input '{name}' of type {dtype}; pass it with --inputs FILE.npz")


def generate_inputs(model, dims=None, seed=0) -> dict[str, np.ndarray]:
    """Seeded inputs for every free graph input; symbolic dims from `dims`, else 2."""
    model = _graph_model(model)
    dims = _check_dims(model, dims)
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in _free_inputs(model):
        dtype = _input_dtype(value)
        feeds[value.name] = _random_array(rng, _input_shape(value, dims), dtype, value.name)
    return feeds


def _read_npz(path) -> dict[str, np.ndarray]:
    try:
        with np.load(os.fspath(path), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except AttributeError:  # np.load gave a plain array: a .npy file, not an archive
        raise UsageError(f"--inputs {os.fspath(path)}: not an .npz archive") from None
    except Exception as err:  # noqa: BLE001 - zip, pickle and IO errors all mean "unreadable"
        raise UsageError(f"--inputs {os.fspath(path)}: cannot read it ({_one_line(err)})") from None


def _coerce_input(name: str, array, dtype: np.dtype) -> np.ndarray:
    """Cast within a kind (float64 data for a float32 input); never float <-> int silently."""
    array = np.asarray(array)
    if array.dtype == dtype:
        return array
    if array.dtype.kind == "V" and array.dtype.itemsize == dtype.itemsize:
        return array.view(dtype)  # .npz stores bfloat16 as raw 2-byte records
    same_kind = (_is_float(array.dtype) and _is_float(dtype)) or (
        array.dtype.kind in "iu" and dtype.kind in "iu"
    )
    if not same_kind:
        raise UsageError(f"input '{name}' is {array.dtype} but the model expects {dtype}")
    return array.astype(dtype)


def _given_inputs(model: onnx.ModelProto, inputs) -> dict[str, np.ndarray]:
    """Validate user inputs against the reference model's free inputs."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = _read_npz(inputs)
    elif not isinstance(inputs, Mapping):
        raise UsageError("inputs must be a dict of arrays or the path of an .npz file")
    expected = {v.name: v for v in _free_inputs(model)}
    unknown = sorted(set(inputs) - set(expected))
    if unknown:
        raise UsageError(f"unknown input '{unknown[0]}' (the model's inputs: {', '.join(expected)})")
    missing = [name for name in expected if name not in inputs]
    if missing:
        raise UsageError(f"no value for input '{missing[0]}' (give every input: {', '.join(expected)})")
    return {name: _coerce_input(name, inputs[name], _input_dtype(v)) for name, v in expected.items()}


# ---------------------------------------------------------------- onnxruntime


def _one_line(err: BaseException) -> str:
    """First meaningful line of an engine error, without onnxruntime's status-code prefix."""
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : ", "", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else type(err).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _ort_source(model, stack: contextlib.ExitStack):
    """A path stays a path (external data, >2 GB); a proto is serialised, or written to a
    temporary folder when protobuf cannot serialise it in one piece."""
    if not isinstance(model, onnx.ModelProto):
        return os.fspath(model)
    if model.ByteSize() <= _MAX_PROTO_BYTES:
        return model.SerializeToString()
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bnfold-verify-"))
    path = os.path.join(folder, "model.onnx")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save moves tensors out of the proto it is given
    onnx.save(copy, path, save_as_external_data=True, location="model.onnx.data")
    return path


class _Refused(Exception):
    """onnxruntime cannot build a session for one of the models."""


# onnxruntime's CUDA provider is not safe to use from several threads at once: on an H100,
# sessions built while another thread's were building or running failed with "CUDA failure
# 900: operation not permitted when stream is capturing" (microsoft/onnxruntime#18806), and
# bnfold then saw a provider that "could not be initialised". Its CUDA work is serialised.
_CUDA_LOCK = threading.RLock()  # re-entrant: the first CUDA session may probe CUDA inside it


def _provider_lock(provider: str):
    return _CUDA_LOCK if provider == CUDA else contextlib.nullcontext()


def _ort_session(source, provider: str, which: str):
    import onnxruntime as ort

    providers = [_with_options(provider)]  # may probe CUDA once (under the lock itself)
    try:
        with _provider_lock(provider):
            session = ort.InferenceSession(source, _session_options(), providers=providers)
    except Exception as err:  # noqa: BLE001 - NOT_IMPLEMENTED, INVALID_GRAPH, FAIL, ...
        raise _Refused(f"onnxruntime refused the {which} model: {_one_line(err)}") from None
    if provider not in session.get_providers():
        raise UsageError(f"execution provider {provider} could not be initialised")
    return session


def _to_ortvalue(array: np.ndarray):
    """bfloat16 cannot cross onnxruntime's numpy bridge; hand it over as raw 16-bit words."""
    import onnxruntime as ort

    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            array.view(np.uint16), onnx_element_type=onnx.TensorProto.BFLOAT16
        )
    return ort.OrtValue.ortvalue_from_numpy(array)


def _from_ortvalue(value) -> np.ndarray:
    """Outputs come back on the CPU; bfloat16 ones are copied out byte for byte."""
    if value.data_type() != "tensor(bfloat16)":
        return np.asarray(value.numpy())
    import ctypes

    raw = (ctypes.c_char * value.tensor_size_in_bytes()).from_address(value.data_ptr())
    return np.frombuffer(bytes(raw), dtype=ml_dtypes.bfloat16).reshape(value.shape())


def _run_ort(session, feeds: dict, which: str, provider: str) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    values = {k: _to_ortvalue(v) for k, v in feeds.items() if k in wanted}
    try:
        with _provider_lock(provider):
            outputs = session.run_with_ort_values(names, values)
    except Exception as err:  # noqa: BLE001 - shape errors and the like, raised at run time
        message = f"onnxruntime could not run the {which} model on {provider}: {_one_line(err)}"
        if which == "reference":  # the input does not run on these inputs: not a failed fold
            raise UsageError(f"{message}; {_RUN_HINT}") from None
        raise VerificationFailed(message) from None  # the inputs ran on the reference: no hint
    return {name: _from_ortvalue(v) for name, v in zip(names, outputs)}


def load_problem(path) -> str | None:
    """Why no engine can load the model file at `path`, or None when one can: onnxruntime (CPU,
    optimisations off), or onnx.reference where onnxruntime has no kernel for an op."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    try:
        ort.InferenceSession(os.fspath(path), _session_options(), providers=[CPU])
        return None
    except Exception as err:  # noqa: BLE001 - INVALID_GRAPH, NOT_IMPLEMENTED, FAIL, ...
        refusal, no_kernel = _one_line(err), "NOT_IMPLEMENTED" in str(err)
    status = refusal.split(" : ")[0] if " : " in refusal else refusal[:80]  # INVALID_GRAPH, FAIL, ...
    if not no_kernel:
        return f"onnxruntime refuses it too: {status}"
    try:
        ReferenceEvaluator(os.fspath(path), new_ops=[_reference_batchnorm()])
        return None
    except Exception:  # noqa: BLE001 - the evaluator raises anything from anywhere
        return f"onnxruntime refuses it too: {status}; so does onnx.reference"


def run_model(model, feeds: dict, providers=None, which: str = "model") -> tuple[str, dict, str]:
    """(engine, {provider: {output: array}}, note) for one model: onnxruntime with optimisations
    off on each provider, or onnx.reference when onnxruntime refuses the model (no kernel)."""
    providers = _check_providers(providers)
    with contextlib.ExitStack() as stack:
        source = _ort_source(model, stack)
        try:
            sessions = {p: _ort_session(source, p, which) for p in providers}
            return "onnxruntime", {p: _run_ort(s, feeds, which, p) for p, s in sessions.items()}, ""
        except _Refused as refusal:
            note = f"{refusal}; verified with onnx.reference"
    return REFERENCE, {REFERENCE: _run_reference(model, feeds, which)}, note


def compare_outputs(provider: str, expected: dict, actual: dict, rtol=None, atol=None) -> list[OutputCheck]:
    """Per-output checks of `actual` against `expected` ({name: array}), with verify's tolerances."""
    return _compare(provider, expected, actual, rtol, atol)


# ---------------------------------------------------------------- onnx.reference


@functools.lru_cache(maxsize=1)
def _reference_batchnorm():
    """onnx.reference's BatchNormalization is wrong for inference before opset 14: opset 7-8
    lands in BatchNormalization_6 with is_test unset and returns a nested tuple (crash); opset
    9-13 mixes batch statistics into the running ones through the momentum default. The mode is
    the attribute is_test (opset < 7), the output count (7-13) or training_mode (14+)."""
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):
        op_domain = ""
        op_schema = None  # only the node's own attributes; opset-specific defaults are below

        def _run(self, x, scale, bias, mean, var, **attrs):
            opset = self.run_params["opsets"][""]
            if opset < 7:
                training = not attrs.get("is_test", 0)
            elif opset < 14:
                training = len(self.onnx_node.output) > 1
            else:
                training = bool(attrs.get("training_mode", 0))
            eps = attrs.get("epsilon", 1e-5)
            if training:
                outputs = _batchnorm_training(x, scale, bias, mean, var, eps, attrs.get("momentum", 0.9), opset)
                return outputs[: len(self.onnx_node.output)]
            return (_batchnorm_apply(x, scale, bias, mean, var, eps),)

    return BatchNormalization


def _per_channel(param: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Broadcast a BN parameter over x: per channel, or per activation (spatial=0, opset < 9)."""
    param = np.asarray(param, dtype=np.float64)
    if param.size == x.shape[1]:
        return param.reshape((-1,) + (1,) * (x.ndim - 2))
    return param.reshape(x.shape[1:])


def _batchnorm_apply(x, scale, bias, mean, var, eps) -> np.ndarray:
    x64 = x.astype(np.float64)
    scale, bias, mean, var = (_per_channel(p, x) for p in (scale, bias, mean, var))
    return ((x64 - mean) / np.sqrt(var + eps) * scale + bias).astype(x.dtype)


def _batchnorm_training(x, scale, bias, mean, var, eps, momentum, opset):
    """Training mode, so models that keep a training BN still verify; never folded by bnfold."""
    axes = (0,) + tuple(range(2, x.ndim))
    batch_mean = x.astype(np.float64).mean(axis=axes)
    batch_var = x.astype(np.float64).var(axis=axes)
    y = _batchnorm_apply(x, scale, bias, batch_mean, batch_var, eps)
    running_mean = (mean * momentum + batch_mean * (1 - momentum)).astype(mean.dtype)
    running_var = (var * momentum + batch_var * (1 - momentum)).astype(var.dtype)
    if opset >= 14:
        return y, running_mean, running_var
    saved = (batch_mean.astype(x.dtype), batch_var.astype(x.dtype))
    return (y, running_mean, running_var) + saved


def _run_reference(model, feeds: dict, which: str) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    try:
        source = model if isinstance(model, onnx.ModelProto) else os.fspath(model)
        evaluator = ReferenceEvaluator(source, new_ops=[_reference_batchnorm()])
        wanted = set(evaluator.input_names)
        outputs = evaluator.run(None, {k: v for k, v in feeds.items() if k in wanted})
    except Exception as err:  # noqa: BLE001 - the evaluator raises anything from anywhere
        message = f"neither onnxruntime nor onnx.reference can run the {which} model: {_one_line(err)}"
        if which == "reference":  # the input itself does not run: bad input, not a failed fold
            raise InvalidModel(f"{message} (bnfold fold --no-verify skips verification)") from None
        raise VerificationFailed(message) from None
    return {name: np.asarray(v) for name, v in zip(evaluator.output_names, outputs)}


# ---------------------------------------------------------------- comparison


def _mismatch(provider, name, dtype, note) -> OutputCheck:
    return OutputCheck(provider, name, str(dtype), math.inf, math.inf, 0.0, 0.0, False, note)


def _float_errors(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float, str]:
    """(max_abs_err, max|ref|, note) over the finite elements; non-finite ones must match."""
    ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
    finite = np.isfinite(ref64)
    if not np.array_equal(finite, np.isfinite(cand64)) or not np.array_equal(
        ref64[~finite], cand64[~finite], equal_nan=True
    ):
        return math.inf, float(np.abs(ref64[finite]).max(initial=0.0)), "NaN/Inf differ"
    diff = np.abs(cand64[finite] - ref64[finite]).max(initial=0.0)
    return float(diff), float(np.abs(ref64[finite]).max(initial=0.0)), ""


def _tolerance(dtype: np.dtype, rtol, atol) -> tuple[float, float]:
    """Explicit tolerances override the per-dtype defaults; integer/bool outputs stay exact."""
    default_rtol, default_atol = default_tolerance(dtype)
    if not _is_float(dtype):
        return default_rtol, default_atol
    return (default_rtol if rtol is None else float(rtol), default_atol if atol is None else float(atol))


def _compare_output(provider, name, ref, cand, rtol, atol) -> OutputCheck:
    if ref.dtype != cand.dtype:
        return _mismatch(provider, name, ref.dtype, f"dtype {cand.dtype}, expected {ref.dtype}")
    if ref.shape != cand.shape:
        return _mismatch(provider, name, ref.dtype, f"shape {cand.shape}, expected {ref.shape}")
    rtol, atol = _tolerance(ref.dtype, rtol, atol)
    if _is_float(ref.dtype):
        abs_err, scale, note = _float_errors(ref, cand)
        tiny = float(ml_dtypes.finfo(ref.dtype).tiny)
        passed = not note and abs_err <= atol + rtol * scale
    else:
        equal = np.array_equal(ref, cand)
        delta = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
        abs_err, scale, tiny, note = float(delta.max(initial=0.0)), float(np.abs(ref).max(initial=0)), 1.0, ""
        passed = equal
    rel_err = abs_err / max(scale, tiny)
    return OutputCheck(provider, name, str(ref.dtype), abs_err, rel_err, rtol, atol, passed, note)


def _compare(provider, ref_out: dict, cand_out: dict, rtol, atol) -> list[OutputCheck]:
    checks = []
    for name, ref in ref_out.items():
        if name not in cand_out:
            checks.append(_mismatch(provider, name, ref.dtype, "missing from the candidate"))
        else:
            checks.append(_compare_output(provider, name, ref, cand_out[name], rtol, atol))
    for name, cand in cand_out.items():
        if name not in ref_out:
            checks.append(_mismatch(provider, name, cand.dtype, "not an output of the reference"))
    return checks


# ---------------------------------------------------------------- entry point


class Reference:
    """The reference side of verification, prepared once for any number of candidates (the
    rollback trials of one fold): its inputs are generated once, and it is run once per
    provider, its session built once; `check` then builds and runs only the candidate.

    Its graph is read at once, the rest done on the first `check`, in the order `verify` has
    always used, so ``verify(ref, cand, **settings)`` is ``Reference(ref, **settings).check(cand)``.
    `close()` (or ``with``) removes the temporary copy a model of 2 GiB or more needs.
    """

    def __init__(self, model, *, inputs=None, dims=None, providers=None, rtol=None, atol=None, seed=0):
        self.model = model
        self.graph = _graph_model(model)
        self._settings = {"inputs": inputs, "dims": dims, "seed": seed, "providers": providers}
        self.rtol, self.atol = rtol, atol
        self._stack = contextlib.ExitStack()
        self._source = None  # what onnxruntime builds the reference's sessions from
        self._sessions: dict = {}  # provider -> session whose outputs are not known yet
        self._outputs: dict = {}  # provider (or REFERENCE) -> the reference's outputs
        self._refusal: _Refused | None = None  # onnxruntime cannot build the reference's session

    def __enter__(self) -> "Reference":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._sessions.clear()
        self._source = None
        self._stack.close()

    @functools.cached_property
    def feeds(self) -> dict[str, np.ndarray]:
        inputs, dims, seed = self._settings["inputs"], self._settings["dims"], self._settings["seed"]
        return generate_inputs(self.graph, dims, seed) if inputs is None else _given_inputs(self.graph, inputs)

    @functools.cached_property
    def providers(self) -> list[str]:
        return _check_providers(self._settings["providers"])

    def check(self, candidate) -> Verification:
        """Run `candidate` on the reference's inputs and compare every output on every provider.

        A mismatch is a failed Verification, not an exception; VerificationFailed means no
        engine could run the candidate. Bad inputs, dims or providers raise UsageError."""
        cand_graph = _graph_model(candidate)
        feeds, providers = self.feeds, self.providers
        extra = [v.name for v in _free_inputs(cand_graph) if v.name not in feeds]
        if extra:  # a candidate that needs an input the reference lacks cannot run
            note = f"the candidate has inputs the reference lacks: {', '.join(extra)}"
            return Verification(False, "onnxruntime", tuple(providers), (), 0.0, note)
        start = time.perf_counter()  # counts the reference's share too when it runs now
        engine, outputs, note = self._run(candidate)
        seconds = time.perf_counter() - start
        checks = tuple(c for p, (ref, cand) in outputs.items() for c in _compare(p, ref, cand, self.rtol, self.atol))
        return Verification(all(c.passed for c in checks), engine, tuple(outputs), checks, seconds, note)

    def _run(self, candidate) -> tuple[str, dict, str]:
        """(engine, {provider: (ref_out, cand_out)}, note): onnxruntime, else onnx.reference."""
        with contextlib.ExitStack() as stack:
            try:
                return "onnxruntime", self._run_ort(_ort_source(candidate, stack)), ""
            except _Refused as refusal:
                note = f"{refusal}; verified with onnx.reference"
        if REFERENCE not in self._outputs:
            self._outputs[REFERENCE] = _run_reference(self.model, self.feeds, "reference")
        outputs = (self._outputs[REFERENCE], _run_reference(candidate, self.feeds, "candidate"))
        return REFERENCE, {REFERENCE: outputs}, note

    def _run_ort(self, source) -> dict[str, tuple[dict, dict]]:
        """Build every session first (a refusal sends both models to onnx.reference), then run."""
        candidates = {p: (self._prepare(p), _ort_session(source, p, "candidate")) for p in self.providers}
        return {
            p: (self._ort_outputs(p), _run_ort(session, self.feeds, "candidate", p))
            for p, (_, session) in candidates.items()
        }

    def _prepare(self, provider: str) -> None:
        """Make sure the reference's outputs on `provider` can be had: its session, built once."""
        if self._refusal is not None:
            raise self._refusal
        if provider in self._outputs or provider in self._sessions:
            return
        if self._source is None:
            self._source = _ort_source(self.model, self._stack)
        try:
            self._sessions[provider] = _ort_session(self._source, provider, "reference")
        except _Refused as refusal:
            self._refusal = refusal
            raise

    def _ort_outputs(self, provider: str) -> dict[str, np.ndarray]:
        """The reference's outputs on `provider`, run once; its session is not needed after."""
        if provider not in self._outputs:
            self._outputs[provider] = _run_ort(self._sessions[provider], self.feeds, "reference", provider)
            del self._sessions[provider]
            if not self._sessions:  # run on every provider: a serialised model is not needed again
                self._source = None
        return self._outputs[provider]


def verify(reference, candidate, *, inputs=None, dims=None, providers=None,
           rtol=None, atol=None, seed=0) -> Verification:
    """Run both models on the same inputs and compare every output on every provider.

    A mismatch is a failed Verification, not an exception; VerificationFailed means neither
    engine could run a model. Bad inputs, dims or providers raise UsageError. Checking several
    candidates against one reference: `Reference`."""
    settings = dict(inputs=inputs, dims=dims, providers=providers, rtol=rtol, atol=atol, seed=seed)
    with Reference(reference, **settings) as prepared:
        return prepared.check(candidate)
