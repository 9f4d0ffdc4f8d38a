"""The engines that run a model: onnxruntime with every graph optimisation turned off (left
on, it fuses Conv+BatchNormalization itself and a comparison would prove nothing), on each
execution provider, and onnx.reference where onnxruntime has no kernel (BatchNormalization
opset 6 from old exports, float64 Conv, bfloat16 Conv on CPU, ...), with a corrected
BatchNormalization (see `_reference_batchnorm`).

onnxruntime is imported inside the functions that need it, so `import bnfold` stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import mmap
import os
import re
import tempfile
import threading

import ml_dtypes
import numpy as np
import onnx

from bnfold import pieces, wire
from bnfold.errors import InvalidModel, UsageError, VerificationFailed

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
REFERENCE = "onnx.reference"
# Protobuf cannot serialise a message of 2 GiB or more; such models go to onnxruntime as files.
_MAX_PROTO_BYTES = 2**31 - 1
_RUN_HINT = "the inputs may not fit the model; pass --dim NAME=SIZE or --inputs FILE.npz"

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


def check_providers(providers) -> list[str]:
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


# ---------------------------------------------------------------- onnxruntime


def error_line(err: BaseException) -> str:
    """An engine error on one line, without onnxruntime's status-code prefix: its later lines
    joined on (they hold the detail: "index: 3 Got: 64 Expected: 0"), cut at 300 characters."""
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : ", "", str(err))
    line = "; ".join(part.strip() for part in text.splitlines() if part.strip()) or type(err).__name__
    return line if len(line) <= 300 else line[:297] + "..."


@dataclasses.dataclass(frozen=True)
class InPieces:
    """A deep main graph cut into pieces (bnfold.pieces): the parsed model (external data left
    on disk, in `data_folder`), its pieces and the values they give."""

    model: onnx.ModelProto
    pieces: list
    wanted: tuple[str, ...]
    data_folder: str | None


@dataclasses.dataclass(frozen=True)
class OrtSource:
    """What onnxruntime builds a session from: a path, or serialised bytes whose external data
    (if any) lies in `data_folder`; `pieces` when the graph is deep enough to build in pieces
    (the whole is still there for a graph the pieces cannot serve)."""

    model: str | bytes
    data_folder: str | None = None
    pieces: InPieces | None = None


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """`model` (edited in place) also outputs the values `names`, their types left to the engine."""
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in present)
    return model


def ort_source(model, stack: contextlib.ExitStack, outputs=(), dynamic_dims: bool = False) -> OrtSource:
    """A path stays a path (external data, >2 GB); a proto is serialised, or written to a
    temporary folder when protobuf cannot serialise it in one piece. With `outputs` (values to
    fetch besides the graph outputs) a path's bytes get them spliced into its graph, its
    external data found in the path's folder. `dynamic_dims`: the graph inputs have dims <= 0,
    which exporters mean as dynamic and onnxruntime reads as fixed; they are cleared first.
    A main graph of more than pieces.CUT_ABOVE nodes is also cut into pieces."""
    whole = _whole_source(model, stack, outputs, dynamic_dims)
    return dataclasses.replace(whole, pieces=_in_pieces(model, outputs))


def _in_pieces(model, outputs) -> InPieces | None:
    folder = None
    if isinstance(model, onnx.ModelProto):
        if len(model.graph.node) <= pieces.CUT_ABOVE or model.ByteSize() > _MAX_PROTO_BYTES:
            return None
    else:
        path = os.fspath(model)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                if wire.count_graph_nodes(memoryview(data)) <= pieces.CUT_ABOVE:
                    return None
            except wire.WireError:
                return None  # not laid out as usual: built whole
        model = onnx.load(path, load_external_data=False)
        folder = os.path.dirname(os.path.abspath(path))
    present = [o.name for o in model.graph.output]
    wanted = (*present, *(name for name in outputs if name not in present))
    try:
        cut = pieces.split(model, wanted)
    except pieces.Unsplittable:
        return None
    return InPieces(model, cut, wanted, folder)


def _whole_source(model, stack: contextlib.ExitStack, outputs, dynamic_dims: bool) -> OrtSource:
    if dynamic_dims:
        return _with_dynamic_dims(model, stack, outputs)
    if not isinstance(model, onnx.ModelProto):
        path = os.fspath(model)
        if not outputs:
            return OrtSource(path)
        folder = os.path.dirname(os.path.abspath(path))
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:  # no parse: the bytes copied once, from the page cache
                return OrtSource(wire.with_graph_fields(memoryview(data), _output_fields(outputs)), folder)
            except wire.WireError:  # not laid out as usual: parse it
                return _serialised(with_outputs(onnx.load_from_string(bytes(data)), outputs), stack, folder)
    if outputs:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = with_outputs(copy, outputs)
    return _serialised(model, stack, None)


def _with_dynamic_dims(model, stack: contextlib.ExitStack, outputs) -> OrtSource:
    folder = None
    if not isinstance(model, onnx.ModelProto):
        folder = os.path.dirname(os.path.abspath(os.fspath(model)))
        model = onnx.load(os.fspath(model), load_external_data=False)
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.ClearField("dim_value")
    return _serialised(with_outputs(model, outputs), stack, folder)


def _serialised(model: onnx.ModelProto, stack: contextlib.ExitStack, folder: str | None) -> OrtSource:
    if model.ByteSize() <= _MAX_PROTO_BYTES:
        return OrtSource(model.SerializeToString(), folder)
    temporary = stack.enter_context(tempfile.TemporaryDirectory(prefix="bnfold-verify-"))
    path = os.path.join(temporary, "model.onnx")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save moves tensors out of the proto it is given
    onnx.save(copy, path, save_as_external_data=True, location="model.onnx.data")
    return OrtSource(path)


def _output_fields(names) -> bytes:
    """GraphProto `output` fields for `names`, types left to the engine."""
    pieces = []
    for name in names:
        body = onnx.ValueInfoProto(name=name).SerializeToString()
        pieces.append(wire.record(wire.GRAPH_OUTPUT, len(body)) + body)
    return b"".join(pieces)


class ReferenceDidNotRun(UsageError):
    """onnxruntime built the original's session but could not run it on these inputs."""


class Refused(Exception):
    """onnxruntime cannot build a session for one of the models."""


# onnxruntime's CUDA provider is not safe to use from several threads at once: on an H100,
# sessions built while another thread's were building or running failed with "CUDA failure
# 900: operation not permitted when stream is capturing" (microsoft/onnxruntime#18806), and
# bnfold then saw a provider that "could not be initialised". Its CUDA work is serialised.
_CUDA_LOCK = threading.RLock()  # re-entrant: the first CUDA session may probe CUDA inside it


def _provider_lock(provider: str):
    return _CUDA_LOCK if provider == CUDA else contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class _PieceByPiece:
    """The session of a source in pieces: each piece is built as the run reaches it."""

    source: OrtSource
    provider: str
    which: str

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        cut, provider, which = self.source.pieces, self.provider, self.which

        def run_piece(serialised: bytes, fed: dict) -> dict:
            session = ort_session(OrtSource(serialised, cut.data_folder), provider, which)
            return run_ort(session, fed, which, provider)

        try:
            return pieces.run(cut.model, cut.pieces, cut.wanted, feeds, run_piece)
        except (pieces.Unsplittable, Refused):  # a refusal the whole may not share: try the whole
            whole = ort_session(dataclasses.replace(self.source, pieces=None), provider, which)
            return run_ort(whole, feeds, which, provider)


def ort_session(source: OrtSource, provider: str, which: str):
    """A session over `source` on `provider`; Refused when onnxruntime cannot build it. A
    source in pieces builds each piece when its run reaches it (see _PieceByPiece)."""
    if source.pieces is not None:
        return _PieceByPiece(source, provider, which)
    import onnxruntime as ort

    providers = [_with_options(provider)]  # may probe CUDA once (under the lock itself)
    options = _session_options()
    if source.data_folder is not None:  # bytes read from a file: its external data is beside that file
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", source.data_folder)
    try:
        with _provider_lock(provider):
            session = ort.InferenceSession(source.model, options, providers=providers)
    except Exception as err:  # noqa: BLE001 - NOT_IMPLEMENTED, INVALID_GRAPH, FAIL, ...
        raise Refused(f"onnxruntime refused the {which} model: {error_line(err)}") from None
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


def run_ort(session, feeds: dict, which: str, provider: str) -> dict[str, np.ndarray]:
    if isinstance(session, _PieceByPiece):
        return session.run(feeds)
    names = [o.name for o in session.get_outputs()]
    # an initializer that is also an input takes a value given for it (inputs.given_inputs)
    wanted = {i.name for i in [*session.get_inputs(), *session.get_overridable_initializers()]}
    values = {k: _to_ortvalue(v) for k, v in feeds.items() if k in wanted}
    try:
        with _provider_lock(provider):
            outputs = session.run_with_ort_values(names, values)
    except Exception as err:  # noqa: BLE001 - shape errors and the like, raised at run time
        message = f"onnxruntime could not run the {which} model on {provider}: {error_line(err)}"
        if which == "reference":  # the input does not run on these inputs: not a failed fold
            raise ReferenceDidNotRun(f"{message}; {_RUN_HINT}") from None
        raise VerificationFailed(message) from None  # the inputs ran on the reference: no hint
    # a sequence, map or optional output is left out: it is not compared (nor counted as compared)
    return {name: _from_ortvalue(v) for name, v in zip(names, outputs) if v.is_tensor()}


def load_problem(path) -> str | None:
    """Why no engine can load the model file at `path`, or None when one can: onnxruntime (CPU,
    optimisations off), or onnx.reference where onnxruntime has no kernel for an op."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    try:
        ort.InferenceSession(os.fspath(path), _session_options(), providers=[CPU])
        return None
    except Exception as err:  # noqa: BLE001 - INVALID_GRAPH, NOT_IMPLEMENTED, FAIL, ...
        refusal, no_kernel = error_line(err), "NOT_IMPLEMENTED" in str(err)
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
    providers = check_providers(providers)
    with contextlib.ExitStack() as stack:
        source = ort_source(model, stack)
        try:
            sessions = {p: ort_session(source, p, which) for p in providers}
            return "onnxruntime", {p: run_ort(s, feeds, which, p) for p, s in sessions.items()}, ""
        except Refused as refusal:
            note = f"{refusal}; verified with onnx.reference"
    return REFERENCE, {REFERENCE: run_reference(model, feeds, which)}, note


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


def run_reference(model, feeds: dict, which: str, outputs=()) -> dict[str, np.ndarray]:
    """The model's outputs (and the values `outputs`) computed by onnx.reference."""
    from onnx.reference import ReferenceEvaluator

    try:
        source = model if isinstance(model, onnx.ModelProto) else os.fspath(model)
        if outputs:
            copy = onnx.ModelProto()
            if isinstance(source, onnx.ModelProto):
                copy.CopyFrom(source)
            else:
                copy = onnx.load(source)
            source = with_outputs(copy, outputs)
        evaluator = ReferenceEvaluator(source, new_ops=[_reference_batchnorm()])
        wanted = set(evaluator.input_names)
        outputs = evaluator.run(None, {k: v for k, v in feeds.items() if k in wanted})
    except Exception as err:  # noqa: BLE001 - the evaluator raises anything from anywhere
        message = f"neither onnxruntime nor onnx.reference can run the {which} model: {error_line(err)}"
        if which == "reference":  # the input itself does not run: bad input, not a failed fold
            raise InvalidModel(f"{message} (bnfold fold --no-verify skips verification)") from None
        raise VerificationFailed(message) from None
    return {name: np.asarray(v) for name, v in zip(evaluator.output_names, outputs)}
