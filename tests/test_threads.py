"""Thread safety: the API called from several threads at once gives what sequential calls give.

Each thread folds and verifies a different small model (fold_file: load, fold, stage, run
onnxruntime on both models, commit); the reports, the written bytes and the verification
errors must equal those of the same calls made one after another. A shared ModelProto folded
from many threads must come out the same every time and stay unmodified.
"""

from __future__ import annotations

import concurrent.futures
import pathlib

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfold
from conftest import bn_node, make_model, tensor, value_info

THREADS = 8
ROUNDS = 3


def _conv(rng, channels: int) -> onnx.ModelProto:
    inits = [tensor("W", rng.normal(0, 0.5, [channels, 3, 3, 3]).astype(np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node(inits, "c", "b", rng, channels, name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        bn_node(inits, "r", "y", rng, channels, name="bn_kept"),
    ]
    return make_model(nodes, [value_info("x", np.float32, ["batch", 3, 6, 6])], [value_info("y", np.float32, ["batch", channels, 6, 6])], inits)


def _gemm(rng, channels: int) -> onnx.ModelProto:
    inits = [tensor("W", rng.normal(0, 0.5, [channels, 5]).astype(np.float32)), tensor("C", rng.normal(0, 1, [channels]).astype(np.float32))]
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["g"], name="gemm", transB=1), bn_node(inits, "g", "y", rng, channels, name="bn")]
    return make_model(nodes, [value_info("x", np.float32, [3, 5])], [value_info("y", np.float32, [3, channels])], inits)


def _matmul_fp16(rng, channels: int) -> onnx.ModelProto:
    inits = [tensor("W", rng.normal(0, 0.5, [6, channels]).astype(np.float16))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), bn_node(inits, "m", "y", rng, channels, np.float16, name="bn")]
    return make_model(nodes, [value_info("x", np.float16, [2, 6])], [value_info("y", np.float16, [2, channels])], inits)


def _conv_transpose(rng, channels: int) -> onnx.ModelProto:
    inits = [tensor("W", rng.normal(0, 0.5, [4, channels // 2, 2, 2]).astype(np.float32))]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "W"], ["t"], name="convt", group=2),
        bn_node(inits, "t", "y", rng, channels, name="bn"),
    ]
    return make_model(nodes, [value_info("x", np.float32, [1, 4, 3, 3])], [value_info("y", np.float32, [1, channels, 4, 4])], inits)


BUILDERS = [_conv, _gemm, _matmul_fp16, _conv_transpose]


def models() -> list[onnx.ModelProto]:
    """THREADS different models: four kinds, two sizes, each with its own statistics."""
    rng = np.random.default_rng(20261124)
    return [BUILDERS[i % len(BUILDERS)](rng, 4 + 2 * (i // len(BUILDERS))) for i in range(THREADS)]


@pytest.fixture
def model_paths(tmp_path) -> list[pathlib.Path]:
    paths = []
    for i, model in enumerate(models()):
        path = tmp_path / f"m{i}.onnx"
        onnx.save(model, path)
        paths.append(path)
    return paths


def fold_and_verify(path: pathlib.Path, out: pathlib.Path) -> dict:
    """Everything a caller can observe of one fold_file call, timings left out."""
    result = bnfold.fold_file(path, out)
    report = result.report.to_dict()
    del report["seconds"]
    return {
        "report": report,
        "written": out.read_bytes(),
        "passed": result.verification.passed,
        "max_abs_err": result.verification.max_abs_err(),
        "checks": [(c.output, c.max_abs_err, c.passed) for c in result.verification.checks],
    }


def test_threads_fold_file_concurrent_equals_sequential(model_paths, tmp_path):
    sequential = [fold_and_verify(p, tmp_path / f"seq{i}.onnx") for i, p in enumerate(model_paths)]
    assert all(r["passed"] and r["report"]["folded"] for r in sequential)
    for round_ in range(ROUNDS):
        outs = [tmp_path / f"par{round_}_{i}.onnx" for i in range(len(model_paths))]
        with concurrent.futures.ThreadPoolExecutor(max_workers=THREADS) as pool:
            concurrent_results = list(pool.map(fold_and_verify, model_paths, outs))
        for i, (seq, par) in enumerate(zip(sequential, concurrent_results)):
            assert par == seq, f"model {i} differs when folded concurrently (round {round_})"
    assert not list(tmp_path.glob(".*.bnfold")), "temporary folders left behind"


def test_threads_fold_shared_model_proto(tmp_path):
    """One ModelProto folded from THREADS threads: same result each time, input untouched."""
    model = models()[0]
    before = model.SerializeToString()
    expected = bnfold.fold(model).model.SerializeToString()
    with concurrent.futures.ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(lambda _: bnfold.fold(model).model.SerializeToString(), range(4 * THREADS)))
    assert all(r == expected for r in results)
    assert model.SerializeToString() == before


def test_threads_check_and_verify_concurrent_equal_sequential(model_paths, tmp_path):
    folded = [tmp_path / f"f{i}.onnx" for i in range(len(model_paths))]
    for path, out in zip(model_paths, folded):
        bnfold.fold_file(path, out)

    def observe(pair):
        path, out = pair
        report = bnfold.check(path).to_dict()
        del report["seconds"]
        verification = bnfold.verify(path, out)
        return report, verification.passed, verification.max_abs_err()

    pairs = list(zip(model_paths, folded))
    sequential = [observe(p) for p in pairs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=THREADS) as pool:
        assert list(pool.map(observe, pairs * 2)) == sequential * 2


def test_threads_errors_stay_with_their_call(model_paths, tmp_path):
    """Bad inputs mixed with good ones: each call gets its own outcome, nothing crosses over."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    jobs = [(p, tmp_path / f"o{i}.onnx") for i, p in enumerate(model_paths)] + [(bad, tmp_path / "bad_out.onnx")] * 4

    def run(job):
        try:
            return bnfold.fold_file(*job).verification.passed
        except bnfold.InvalidModel as err:
            return str(err)

    with concurrent.futures.ThreadPoolExecutor(max_workers=THREADS) as pool:
        outcomes = list(pool.map(run, jobs))
    assert outcomes[: len(model_paths)] == [True] * len(model_paths)
    assert all("not an ONNX model" in o for o in outcomes[len(model_paths):])
    assert not (tmp_path / "bad_out.onnx").exists()
