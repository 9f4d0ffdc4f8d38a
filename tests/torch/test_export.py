"""bnfold.torch.export: fold, export, and verify the file against the ORIGINAL module."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")  # the dynamo exporter needs it

from torch import nn  # noqa: E402

from bnfold.errors import UsageError, VerificationFailed  # noqa: E402
from bnfold.torch.export import count_batchnorms, export  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::DeprecationWarning"  # torch.onnx internals, both exporters
)


def bn_module():
    """bnfold's BatchNorm when it is there (exported as BatchNormalization too), else torch's."""
    try:
        from bnfold.torch import batchnorm
    except ImportError:
        return nn
    return batchnorm


def trained(model, *shape):
    """A few training steps of forward passes: running statistics far from (0, 1)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape) * 3 + 1)
    return model


def conv_net():
    bn = bn_module()
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), bn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2), bn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    return trained(model, 8, 3, 10, 10), torch.randn(2, 3, 10, 10)


def linear_head():
    bn = bn_module()
    model = nn.Sequential(nn.Linear(16, 12), bn.BatchNorm1d(12), nn.Sigmoid(), nn.Linear(12, 3), bn.BatchNorm1d(3))
    return trained(model, 8, 16), torch.randn(5, 16)


@pytest.mark.parametrize("make", [conv_net, linear_head])
def test_export_folds_and_verifies(make, tmp_path):
    model, x = make()
    result = export(model, (x,), tmp_path / "model.onnx")
    assert result.passed and result.exporter == "dynamo"
    assert result.max_abs_err() < 1e-4
    written = onnx.load(result.path)
    onnx.checker.check_model(written)
    assert count_batchnorms(written) == result.bn_left == 0
    assert len(result.fold_result.folded) == 2 and not result.fold_result.kept
    assert model.training  # the caller's module keeps its mode


@pytest.mark.parametrize("make", [conv_net, linear_head])
def test_export_without_fold_keeps_batchnormalization(make, tmp_path):
    model, x = make()
    result = export(model, x, tmp_path / "model.onnx", fold=False)
    assert result.passed and result.fold_result is None
    assert count_batchnorms(onnx.load(result.path)) == result.bn_left == 2


def test_export_torchscript_exporter(tmp_path):
    model, x = linear_head()
    result = export(model, (x,), tmp_path / "model.onnx", dynamo=False, output_names=["logits"])
    assert result.passed and result.exporter == "torchscript" and result.bn_left == 0
    # One check per provider verify ran (CPU, and CUDA where it works), each of the one output.
    checks = [(c.provider, c.output) for c in result.verification.checks]
    assert checks == [(p, "logits") for p in result.verification.providers]
    assert result.verification.providers[0] == "CPUExecutionProvider"
    assert onnx.load(result.path).graph.output[0].name == "logits"


def test_export_mismatch_raises_and_leaves_old_file(tmp_path):
    model, x = conv_net()
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    # Folding changes float32 rounding, so zero tolerance cannot pass.
    with pytest.raises(VerificationFailed, match="differs from the module"):
        export(model, (x,), path, rtol=0.0, atol=0.0)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary left behind


def test_export_dynamic_shapes_needs_dynamo(tmp_path):
    model, x = linear_head()
    with pytest.raises(UsageError, match="dynamic_shapes needs the dynamo exporter"):
        export(model, (x,), tmp_path / "m.onnx", dynamo=False, dynamic_shapes={"input": {0: "batch"}})


def test_export_report_to_dict(tmp_path):
    model, x = linear_head()
    report = export(model, (x,), tmp_path / "m.onnx").to_dict()
    assert report["verification"]["passed"] and report["fold"]["bn_after"] == 0
    assert report["verification"]["checks"][0]["output"] == result_output_name(tmp_path / "m.onnx")


def result_output_name(path) -> str:
    return onnx.load(path).graph.output[0].name


def test_export_float64_verifies(tmp_path):
    """onnxruntime's CPU Conv has no float64 kernel: the check falls back to onnx.reference."""
    model, x = conv_net()
    result = export(model.double(), (x.double(),), tmp_path / "m.onnx")
    assert result.passed and result.bn_left == 0
    assert result.max_abs_err() < 1e-9
