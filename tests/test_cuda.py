"""The CUDA verification path, on a real GPU: folded models match their originals on
CUDAExecutionProvider, a wrong fold is caught there, and the CLI verifies on CUDA by default.

Every test skips cleanly where onnxruntime-gpu or a GPU is missing (`available_providers()`
runs a real CUDA session before it lists CUDA)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import bnfold
from bnfold.cli import main
from bnfold.verify import CPU, CUDA, available_providers, verify
from tests.conftest import bn_node, conv_bn_relu_chain, count_bn, make_model, tensor, value_info

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(CUDA not in available_providers(), reason="no usable CUDA"),
]

SAMPLES = sorted(p for p in pathlib.Path(__file__).resolve().parent.parent.joinpath("models").glob("*.onnx")
                 if not p.name.endswith(".folded.onnx"))  # not README's main-job output


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.stem)
def test_cuda_sample_model_folded_matches_original(path):
    original = onnx.load(path)
    folded = bnfold.fold(original).model
    assert count_bn(folded) < count_bn(original)
    result = verify(original, folded, providers=[CUDA])
    assert result.engine == "onnxruntime" and result.providers == (CUDA,)
    assert result.passed, result.to_dict()


def test_cuda_chain_folded_matches_original(rng):
    original = conv_bn_relu_chain(rng, blocks=12, channels=32, size=16)
    folded = bnfold.fold(original).model
    assert count_bn(folded) == 0
    result = verify(original, folded, providers=[CPU, CUDA], dims={"batch": 4})
    assert result.passed, result.to_dict()
    assert {c.provider for c in result.checks} == {CPU, CUDA}


def test_cuda_wrong_fold_is_caught(rng):
    """One channel's folded weight off by 0.1%: CUDA's comparison must see it."""
    original = conv_bn_relu_chain(rng, blocks=2, channels=16, size=16)
    folded = bnfold.fold(original).model
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    init = next(i for i in folded.graph.initializer if i.name == conv.input[1])
    weight = numpy_helper.to_array(init).copy()
    weight[3] *= 1.001
    init.CopyFrom(numpy_helper.from_array(weight, init.name))
    result = verify(original, folded, providers=[CUDA], dims={"batch": 4})
    assert not result.passed
    assert all(c.provider == CUDA for c in result.checks)


def _conv_bn_fp16(rng, channels=8):
    inits = [tensor("w", rng.standard_normal((channels, 3, 3, 3)).astype(np.float16))]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        bn_node(inits, "c", "y", rng, channels, dtype=np.float16),
    ]
    return make_model(nodes, [value_info("x", np.float16, [2, 3, 16, 16])],
                      [value_info("y", np.float16, None)], inits)


def test_cuda_float16_conv_bn_folded_matches_original(rng):
    """CPU onnxruntime has no float16 Conv; CUDA runs it natively, within float16's tolerance."""
    original = _conv_bn_fp16(rng)
    folded = bnfold.fold(original).model
    assert count_bn(folded) == 0
    result = verify(original, folded, providers=[CUDA])
    assert result.engine == "onnxruntime"
    assert result.passed, result.to_dict()


def test_cuda_cli_verifies_on_cpu_and_cuda_by_default(tmp_path):
    src = tmp_path / "resnet_mini.onnx"
    src.write_bytes(SAMPLES[[p.stem for p in SAMPLES].index("resnet_mini")].read_bytes())
    out = tmp_path / "out.onnx"
    run = CliRunner().invoke(main, [str(src), "-o", str(out), "--json"])
    assert run.exit_code == 0, run.output
    report = json.loads(run.stdout)
    checks = report["verification"]["checks"]
    assert {c["provider"] for c in checks} == {CPU, CUDA}
    assert all(c["passed"] for c in checks)


def test_cuda_verification_disables_tf32():
    """TF32 (onnxruntime's CUDA default) would put ~1e-3 errors on both models; the proof
    compares in full float32."""
    import importlib

    assert importlib.import_module("bnfold.engines")._with_options(CUDA) == (CUDA, {"use_tf32": "0"})
