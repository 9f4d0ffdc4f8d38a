"""bnfold.verify: the onnxruntime comparison, input generation, tolerances, engine fallback."""

from __future__ import annotations

import importlib
import json

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import InvalidModel, UsageError, VerificationFailed
from bnfold.verify import available_providers, default_tolerance, generate_inputs, verify

# bnfold/__init__.py re-exports the function `verify`, which shadows the module's name.
verify_module = importlib.import_module("bnfold.verify")
from bnfold import engines, inputs as inputs_module  # noqa: E402

EPS = 1e-5
FLOAT = {np.float16: TensorProto.FLOAT16, np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE}


def model(nodes, inputs, outputs, inits=(), opset=17, ir_version=None):
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version or (3 if opset < 8 else 8)
    return m


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def mul_model(w: np.ndarray, dtype=np.float32, shape=(2, 4)):
    """y = x * w: elementwise, so numpy reproduces onnxruntime bit for bit."""
    elem = FLOAT[dtype]
    return model(
        [helper.make_node("Mul", ["x", "w"], ["y"])],
        [vi("x", elem, list(shape))], [vi("y", elem, list(shape))],
        [numpy_helper.from_array(w.astype(dtype), "w")],
    )


def unary_model(op, shape=(2, 3), elem=TensorProto.FLOAT, out="y"):
    return model([helper.make_node(op, ["x"], [out])], [vi("x", elem, list(shape))], [vi(out, elem, list(shape))])


def conv_bn(rng, dtype=np.float32, bn_opset=17, **bn_attrs):
    """Reference Conv+BN with non-trivial statistics, and the same Conv folded by hand in float64."""
    elem, c_in, c_out = FLOAT[dtype], 3, 4
    w, b = rng.normal(size=(c_out, c_in, 3, 3)), rng.normal(size=c_out)
    gamma, beta, mean = rng.normal(size=c_out), rng.normal(size=c_out), rng.normal(size=c_out)
    var = rng.uniform(0.5, 2.0, size=c_out)
    scale = gamma / np.sqrt(var + EPS)
    folded_w, folded_b = w * scale[:, None, None, None], (b - mean) * scale + beta
    tensors = lambda **kw: [numpy_helper.from_array(v.astype(dtype), k) for k, v in kw.items()]  # noqa: E731
    io = ([vi("x", elem, [1, c_in, 6, 6])], [vi("y", elem, [1, c_out, 4, 4])])
    reference = model(
        [helper.make_node("Conv", ["x", "w", "b"], ["t"]),
         helper.make_node("BatchNormalization", ["t", "gamma", "beta", "mean", "var"], ["y"], epsilon=EPS, **bn_attrs)],
        *io, tensors(w=w, b=b, gamma=gamma, beta=beta, mean=mean, var=var), opset=bn_opset,
    )
    candidate = model([helper.make_node("Conv", ["x", "w", "b"], ["y"])], *io, tensors(w=folded_w, b=folded_b), opset=bn_opset)
    return reference, candidate


def ort_refuses(m) -> bool:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001
        return True
    return False


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------- numeric comparison


def test_verify_identical_models_pass_with_zero_error(rng):
    m = mul_model(rng.normal(size=(2, 4)))
    result = verify(m, m)
    assert result.passed and result.engine == "onnxruntime"
    assert result.providers == tuple(available_providers())
    assert result.max_abs_err() == 0.0 and result.max_rel_err() == 0.0
    assert [c.output for c in result.checks] == ["y"] * len(result.providers)
    assert result.seconds > 0


def test_verify_perturbed_weight_fails_with_numpy_error(rng):
    w = rng.normal(size=(2, 4)).astype(np.float32)
    result = verify(mul_model(w), mul_model(w + np.float32(1e-3)), providers=["CPUExecutionProvider"])
    x = generate_inputs(mul_model(w))["x"]
    ref, cand = x * w, x * (w + np.float32(1e-3))
    expected = np.abs(cand.astype(np.float64) - ref).max()
    (check,) = result.checks
    assert not result.passed and not check.passed
    assert check.max_abs_err == pytest.approx(expected, rel=1e-12)
    assert check.max_rel_err == pytest.approx(expected / np.abs(ref).max(), rel=1e-12)
    assert (check.rtol, check.atol) == default_tolerance(np.float32)


def test_verify_conv_bn_vs_hand_folded_conv_passes(rng):
    reference, candidate = conv_bn(rng)
    result = verify(reference, candidate)
    assert result.passed, result.to_dict()
    assert result.engine == "onnxruntime"
    assert 0 < result.max_rel_err() < 1e-5


def test_verify_wrong_fold_fails(rng):
    reference, candidate = conv_bn(rng)
    bias = candidate.graph.initializer[1]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(0.01), bias.name))
    assert not verify(reference, candidate).passed


def test_default_tolerance_per_dtype():
    assert default_tolerance(np.float64) == (1e-9, 1e-12)
    assert default_tolerance(np.float32) == (1e-4, 1e-6)
    assert default_tolerance(np.float16) == (1e-2, 1e-3)
    assert default_tolerance(ml_dtypes.bfloat16) == (5e-2, 1e-2)
    assert default_tolerance(np.int64) == default_tolerance(np.bool_) == (0.0, 0.0)


def test_verify_float16_uses_float16_tolerance(rng):
    w = rng.normal(size=(2, 4))
    reference, candidate = mul_model(w, np.float16), mul_model(w * (1 + 2e-3), np.float16)
    result = verify(reference, candidate)
    assert result.passed, result.to_dict()
    assert all((c.dtype, c.rtol, c.atol) == ("float16", 1e-2, 1e-3) for c in result.checks)
    assert result.max_rel_err() > 1e-4  # so float32's tolerance would have failed it
    strict = verify(reference, candidate, rtol=1e-4, atol=0)
    assert not strict.passed and strict.checks[0].rtol == 1e-4


def test_verify_bfloat16_io_through_onnxruntime(rng):
    """onnxruntime's numpy bridge has no bfloat16; the inputs/outputs still get across."""
    bf16 = TensorProto.BFLOAT16
    m = model(
        [helper.make_node("Cast", ["x"], ["t"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["t", "w"], ["u"]),
         helper.make_node("Cast", ["u"], ["y"], to=bf16)],
        [vi("x", bf16, [2, 3])], [vi("y", bf16, [2, 3])],
        [numpy_helper.from_array(rng.normal(size=(2, 3)).astype(np.float32), "w")],
    )
    result = verify(m, m, providers=["CPUExecutionProvider"])
    assert result.passed and result.engine == "onnxruntime"
    assert (result.checks[0].dtype, result.checks[0].rtol) == ("bfloat16", 5e-2)


def test_verify_integer_output_is_exact():
    shape = [2, 3]
    reference = unary_model("Identity", shape, TensorProto.INT64)
    candidate = model(
        [helper.make_node("Add", ["x", "one"], ["y"])], [vi("x", TensorProto.INT64, shape)],
        [vi("y", TensorProto.INT64, shape)], [numpy_helper.from_array(np.array(1, np.int64), "one")],
    )
    (check,) = verify(reference, candidate, providers=["CPUExecutionProvider"], rtol=1, atol=1).checks
    assert not check.passed and (check.rtol, check.atol, check.max_abs_err) == (0.0, 0.0, 1.0)


def test_verify_nan_at_same_positions_passes():
    m = unary_model("Sqrt")  # standard normal inputs: about half are NaN
    result = verify(m, m, providers=["CPUExecutionProvider"])
    assert result.passed and result.max_abs_err() == 0.0


def test_verify_nan_mismatch_fails():
    reference = unary_model("Sqrt")
    candidate = model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sqrt", ["r"], ["y"])],
        [vi("x", TensorProto.FLOAT, [2, 3])], [vi("y", TensorProto.FLOAT, [2, 3])],
    )
    (check,) = verify(reference, candidate, providers=["CPUExecutionProvider"]).checks
    assert not check.passed and "NaN" in check.note
    assert check.to_dict()["max_abs_err"] is None  # JSON has no Infinity


def test_verify_shape_mismatch_fails_with_note():
    reference = unary_model("Identity", (2, 3))
    candidate = model(
        [helper.make_node("Flatten", ["x"], ["y"], axis=0)],
        [vi("x", TensorProto.FLOAT, [2, 3])], [vi("y", TensorProto.FLOAT, [1, 6])],
    )
    (check,) = verify(reference, candidate, providers=["CPUExecutionProvider"]).checks
    assert not check.passed and "shape" in check.note


def test_verify_output_names_differ_fails_with_notes():
    result = verify(unary_model("Relu"), unary_model("Relu", out="z"), providers=["CPUExecutionProvider"])
    assert not result.passed
    assert {(c.output, c.note) for c in result.checks} == {
        ("y", "missing from the candidate"), ("z", "not an output of the reference"),
    }


def test_verification_to_dict_is_json(rng):
    m = mul_model(rng.normal(size=(2, 4)))
    data = json.loads(json.dumps(verify(m, m).to_dict(), allow_nan=False))
    assert data["passed"] is True and data["checks"][0]["output"] == "y"


# ---------------------------------------------------------------- inputs


def test_generate_inputs_dtypes_seeded_and_skips_initializer_inputs():
    m = model(
        [helper.make_node("Identity", [n], [n + "_out"]) for n in ("f", "h", "i", "b")],
        [vi("f", TensorProto.FLOAT, [3, 4]), vi("h", TensorProto.FLOAT16, [3]),
         vi("i", TensorProto.INT64, [50]), vi("b", TensorProto.BOOL, [5]), vi("w", TensorProto.FLOAT, [2])],
        [vi(n + "_out", e, None) for n, e in (("f", 1), ("h", 10), ("i", 7), ("b", 9))],
        [numpy_helper.from_array(np.ones(2, np.float32), "w")], opset=7,  # IR 3: initializer listed as input
    )
    feeds = generate_inputs(m, seed=3)
    assert list(feeds) == ["f", "h", "i", "b"]
    assert [a.dtype for a in feeds.values()] == [np.float32, np.float16, np.int64, np.bool_]
    assert feeds["i"].min() >= 0 and feeds["i"].max() <= 3
    again = generate_inputs(m, seed=3)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)
    assert not np.array_equal(feeds["f"], generate_inputs(m, seed=4)["f"])


def symbolic_model():
    x = vi("x", TensorProto.FLOAT, ["N", 3, None])  # None: a dim with neither value nor name
    return model([helper.make_node("Relu", ["x"], ["y"])], [x], [vi("y", TensorProto.FLOAT, ["N", 3, None])])


def test_generate_inputs_symbolic_dims_default_and_override():
    assert generate_inputs(symbolic_model())["x"].shape == (2, 3, 16)  # batch 2; another axis of a rank-3 input 16
    assert generate_inputs(symbolic_model(), dims={"N": 5})["x"].shape == (5, 3, 16)
    result = verify(symbolic_model(), symbolic_model(), dims={"N": 5}, providers=["CPUExecutionProvider"])
    assert result.passed


@pytest.mark.parametrize("dims", [{"M": 5}, {"N": 0}, {"N": "5"}])
def test_generate_inputs_bad_dim_is_usage_error(dims):
    with pytest.raises(UsageError):
        generate_inputs(symbolic_model(), dims=dims)


def test_generate_inputs_no_shape_is_usage_error():
    m = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, None)], [vi("y", TensorProto.FLOAT, None)])
    with pytest.raises(UsageError, match="--inputs"):
        generate_inputs(m)


def relu_vs_identity():
    """Equal on non-negative inputs only: shows which inputs were really used."""
    return unary_model("Relu", (2, 3)), unary_model("Identity", (2, 3))


def test_verify_npz_inputs_are_used(tmp_path):
    reference, candidate = relu_vs_identity()
    assert not verify(reference, candidate, providers=["CPUExecutionProvider"]).passed
    path = tmp_path / "inputs.npz"
    np.savez(path, x=np.abs(np.random.default_rng(0).normal(size=(2, 3))))  # float64: cast to float32
    assert verify(reference, candidate, inputs=path, providers=["CPUExecutionProvider"]).passed
    assert verify(reference, candidate, inputs=str(path), providers=["CPUExecutionProvider"]).passed


def test_verify_dict_inputs_are_used():
    reference, candidate = relu_vs_identity()
    x = np.ones((2, 3), np.float32)
    assert verify(reference, candidate, inputs={"x": x}, providers=["CPUExecutionProvider"]).passed


@pytest.mark.parametrize(
    "content, match",
    [(b"not a zip archive", "cannot read"), ({"y": np.ones((2, 3))}, "unknown input 'y'"),
     ({}, "no value for input 'x'"), ({"x": np.ones((2, 3), np.int64)}, "expects float32")],
    ids=["garbage", "unknown-name", "missing-name", "wrong-kind"],
)
def test_verify_bad_npz_is_usage_error(tmp_path, content, match):
    path = tmp_path / "inputs.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.savez(path, **content)
    m = unary_model("Relu")
    with pytest.raises(UsageError, match=match) as err:
        verify(m, m, inputs=path)
    assert "\n" not in str(err.value)


def test_verify_unknown_dict_input_is_usage_error():
    m = unary_model("Relu")
    with pytest.raises(UsageError, match="unknown input 'nope'"):
        verify(m, m, inputs={"x": np.ones((2, 3), np.float32), "nope": np.ones(1)})


def test_verify_run_time_error_suggests_dim():
    """Reshape to (-1, 5) needs N*3 divisible by 5: the default N=2 cannot run, N=5 can."""
    m = model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [vi("x", TensorProto.FLOAT, ["N", 3])], [vi("y", TensorProto.FLOAT, [None, 5])],
        [numpy_helper.from_array(np.array([-1, 5], np.int64), "shape")],
    )
    with pytest.raises(UsageError, match="--dim") as err:  # the reference does not run: usage (exit 2)
        verify(m, m, providers=["CPUExecutionProvider"])
    assert "\n" not in str(err.value)
    assert verify(m, m, dims={"N": 5}, providers=["CPUExecutionProvider"]).passed


def test_verify_candidate_run_time_error_has_no_dim_hint():
    """The inputs ran on the reference, so a candidate that cannot run on them is a failed fold
    (exit 1), and --dim/--inputs would not help: no hint."""
    shape_of = lambda *dims: numpy_helper.from_array(np.array(dims, np.int64), "shape")  # noqa: E731
    io = [vi("x", TensorProto.FLOAT, ["N", 3])], [vi("y", TensorProto.FLOAT, [None, None])]
    reference = model([helper.make_node("Reshape", ["x", "shape"], ["y"])], *io, [shape_of(-1, 3)])
    candidate = model([helper.make_node("Reshape", ["x", "shape"], ["y"])], *io, [shape_of(-1, 5)])
    with pytest.raises(VerificationFailed, match="could not run the candidate model") as err:
        verify(reference, candidate, providers=["CPUExecutionProvider"])
    assert "--dim" not in str(err.value) and "--inputs" not in str(err.value)
    with pytest.raises(UsageError, match="could not run the reference model.*--dim NAME=SIZE or --inputs"):
        verify(candidate, reference, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- one reference, many candidates


def count_reference_work(monkeypatch):
    """Count the sessions built for the reference, their runs, and input generations."""
    counts = {"sessions": 0, "runs": 0, "inputs": 0}
    real_session, real_inputs = engines.ort_session, inputs_module.generate_inputs

    def counted(key, function):
        def call(*args, **kwargs):
            counts[key] += 1
            return function(*args, **kwargs)

        return call

    def session(source, provider, which):
        built = real_session(source, provider, which)
        if which == "reference":
            counts["sessions"] += 1
            built.run_with_ort_values = counted("runs", built.run_with_ort_values)
        return built

    monkeypatch.setattr(engines, "ort_session", session)
    monkeypatch.setattr(inputs_module, "generate_inputs", counted("inputs", real_inputs))
    return counts


def test_reference_several_candidates_reference_runs_once_same_results(rng, monkeypatch):
    reference, good = conv_bn(rng)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(good)
    bias = wrong.graph.initializer[1]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(0.01), bias.name))
    candidates = [good, wrong, good, wrong]
    expected = [verify(reference, c) for c in candidates]
    counts = count_reference_work(monkeypatch)
    with verify_module.Reference(reference) as prepared:
        results = [prepared.check(c) for c in candidates]
    assert [r.passed for r in results] == [True, False, True, False]
    for got, want in zip(results, expected):
        assert (got.engine, got.providers, got.note) == (want.engine, want.providers, want.note)
        assert got.checks == want.checks
    providers = len(available_providers())
    assert counts == {"sessions": providers, "runs": providers, "inputs": 1}


def test_reference_fallback_engine_reference_evaluated_once(rng, monkeypatch):
    """onnxruntime refuses the reference (BatchNormalization opset 6): both go to onnx.reference,
    and the reference is evaluated there once, not once per candidate."""
    reference, candidate = conv_bn(rng, bn_opset=6, is_test=1)
    runs = []
    real = engines.run_reference

    def run_reference(m, feeds, which, outputs=()):
        runs.append(which)
        return real(m, feeds, which, outputs)

    monkeypatch.setattr(engines, "run_reference", run_reference)
    with verify_module.Reference(reference) as prepared:
        results = [prepared.check(candidate) for _ in range(3)]
    assert all(r.passed and r.engine == "onnx.reference" for r in results), [r.to_dict() for r in results]
    assert runs == ["reference", "candidate", "candidate", "candidate"]
    assert results[1].checks == verify(reference, candidate).checks


# ---------------------------------------------------------------- engines and providers


def test_verify_bn_opset6_falls_back_to_onnx_reference(rng):
    reference, candidate = conv_bn(rng, bn_opset=6, is_test=1)
    assert ort_refuses(reference)  # onnxruntime 1.32 has no BatchNormalization(6) kernel
    result = verify(reference, candidate)
    assert result.passed, result.to_dict()
    assert result.engine == "onnx.reference" and result.providers == ("onnx.reference",)
    assert "BatchNormalization" in result.note and "\n" not in result.note
    assert result.max_rel_err() < 1e-5


@pytest.mark.parametrize("bn_opset", [7, 9, 14])
def test_verify_reference_fallback_bn_inference_stats_passes(rng, bn_opset):
    """float64 Conv has no onnxruntime CPU kernel; onnx.reference's own BatchNormalization
    crashes at opset 7-8 and mixes in batch statistics at 9-13, so bnfold brings its own."""
    reference, candidate = conv_bn(rng, np.float64, bn_opset=bn_opset)
    assert ort_refuses(reference)
    result = verify(reference, candidate)
    assert result.engine == "onnx.reference"
    assert result.passed, result.to_dict()
    assert result.checks[0].rtol == 1e-9


def test_verify_both_engines_refuse_reference_is_invalid_model():
    """The reference (a fold's input) runs nowhere: bad input (exit 2), not a failed fold."""
    m = unary_model("Relu")
    m.graph.node[0].domain = "com.example"
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(InvalidModel, match="can run the reference model.*--no-verify") as err:
        verify(m, m)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_verify_both_engines_refuse_candidate_is_verification_failed():
    good = unary_model("Relu")
    bad = unary_model("Relu")
    bad.graph.node[0].domain = "com.example"
    bad.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(VerificationFailed, match="can run the candidate model"):
        verify(good, bad)


def test_verify_unavailable_provider_is_usage_error():
    m = unary_model("Relu")
    with pytest.raises(UsageError, match="NoSuchExecutionProvider"):
        verify(m, m, providers=["NoSuchExecutionProvider"])


@pytest.mark.cuda
@pytest.mark.skipif("CUDAExecutionProvider" not in available_providers(), reason="no usable CUDA")
def test_verify_cuda_compares_on_cpu_and_cuda(rng):
    reference, candidate = conv_bn(rng)
    result = verify(reference, candidate)
    assert result.providers == ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert result.passed, result.to_dict()
    assert {c.provider for c in result.checks} == set(result.providers)


# ---------------------------------------------------------------- models on disk


def test_verify_paths_with_external_data(tmp_path, rng):
    reference, candidate = conv_bn(rng)
    paths = []
    for name, m in (("ref", reference), ("cand", candidate)):
        folder = tmp_path / name
        folder.mkdir()
        onnx.save(m, folder / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
        paths.append(folder / "model.onnx")
    assert (tmp_path / "ref" / "weights.bin").stat().st_size > 0
    result = verify(*paths)
    assert result.passed and result.engine == "onnxruntime"
    assert verify(str(paths[0]), str(paths[1])).passed


def test_verify_paths_with_external_data_on_onnx_reference(tmp_path, rng):
    reference, candidate = conv_bn(rng, bn_opset=6, is_test=1)
    paths = [tmp_path / "ref.onnx", tmp_path / "cand.onnx"]
    for path, m in zip(paths, (reference, candidate)):
        onnx.save(m, path, save_as_external_data=True, location=path.name + ".bin", size_threshold=0)
    result = verify(*paths)
    assert result.passed and result.engine == "onnx.reference"
    assert result.note.startswith("onnxruntime refused the reference model: NOT_IMPLEMENTED")


def test_verify_oversized_proto_goes_through_a_temporary_file(monkeypatch, rng):
    """Protos past protobuf's 2 GB limit are written out; the caller's proto stays untouched."""
    reference, candidate = conv_bn(rng)
    before = reference.SerializeToString()
    monkeypatch.setattr(engines, "_MAX_PROTO_BYTES", 0)
    assert verify(reference, candidate).passed
    assert reference.SerializeToString() == before


def test_import_bnfold_verify_does_not_import_onnxruntime():
    import subprocess
    import sys

    code = "import sys, bnfold.verify; print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_verify_cuda_work_serialised_across_threads(monkeypatch, rng):
    """onnxruntime's CUDA provider fails when used from several threads at once (seen on an
    H100: CUDA failure 900 at session creation): bnfold builds and runs CUDA sessions one at a
    time. A stand-in session records how many CUDA calls overlap; CPU calls may overlap."""
    import threading
    import time as time_module

    reference, candidate = conv_bn(rng)
    active = {"CUDAExecutionProvider": 0}
    peak = {"CUDAExecutionProvider": 0}
    guard = threading.Lock()
    real_session = ort.InferenceSession

    def busy(provider):
        with guard:
            active[provider] += 1
            peak[provider] = max(peak[provider], active[provider])
        time_module.sleep(0.005)
        with guard:
            active[provider] -= 1

    class FakeCudaSession:
        def __init__(self, source, options, providers):
            busy("CUDAExecutionProvider")
            self._inner = real_session(source, options, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return ["CUDAExecutionProvider"]

        def run_with_ort_values(self, names, values):
            busy("CUDAExecutionProvider")
            return self._inner.run_with_ort_values(names, values)

        def __getattr__(self, name):
            return getattr(self._inner, name)

    monkeypatch.setattr(ort, "InferenceSession", FakeCudaSession)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(engines, "_cuda_options", lambda: {})
    results = []

    def job():
        results.append(verify(reference, candidate, providers=["CUDAExecutionProvider"]).passed)

    threads = [threading.Thread(target=job) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 6
    assert peak["CUDAExecutionProvider"] == 1


def test_verify_explicit_cuda_before_any_probe_does_not_deadlock(monkeypatch, rng):
    """`--provider CUDAExecutionProvider` in a fresh process: the first CUDA session is built
    before CUDA was probed, and the probe takes the same lock."""
    import threading

    reference, candidate = conv_bn(rng)
    real_session = ort.InferenceSession

    class FakeCudaSession:
        def __init__(self, source, options, providers):
            self._inner = real_session(source, options, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return ["CUDAExecutionProvider"]

        def __getattr__(self, name):
            return getattr(self._inner, name)

    monkeypatch.setattr(ort, "InferenceSession", FakeCudaSession)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    engines._cuda_options.cache_clear()
    try:
        outcome = []
        worker = threading.Thread(
            target=lambda: outcome.append(verify(reference, candidate, providers=["CUDAExecutionProvider"]).passed),
            daemon=True,
        )
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), "verify hung: the CUDA lock was taken twice"
        assert outcome == [True]
    finally:
        engines._cuda_options.cache_clear()
