"""Real architectures, exported by torch.onnx with BN kept, folded by bnfold and proven in onnxruntime.

Each net is built here (no torchvision) with seeded random weights and randomised BN statistics
(running_mean ~ N(0, 0.5), running_var ~ U(0.5, 2), weight ~ ±U(0.5, 2), bias ~ N(0, 0.5)), so a
fold that forgets the shift or scales the wrong axis shows. The export keeps every BN as a
BatchNormalization node: the dynamo exporter with optimize=False (optimize=True folds BN itself),
and the TorchScript exporter with do_constant_folding=False (its constant folding fuses Conv+BN).
The committed samples in models/ are folded here too.
"""

from __future__ import annotations

import io
import logging
import pathlib
import warnings

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")  # the dynamo exporter needs it

from conftest import assert_folds, assert_same_outputs, count_bn, run_ort  # noqa: E402
from torch import nn  # noqa: E402

from bnfold.graph import node_label  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"
SAMPLES = ("resnet_mini", "mobilenet_mini", "mlp_bn", "deconv_bn")
DIMS = {"batch": 3}  # not the example's batch size: the symbolic dimension really is symbolic


# --------------------------------------------------------------------------- building blocks


def conv_bn(cin, cout, kernel, stride=1, groups=1, act=nn.ReLU, dims=2, bias=False):
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    layers = [conv(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias), norm(cout)]
    return nn.Sequential(*layers, *([act()] if act else []))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, act=None))
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        expansion = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        self.body = nn.Sequential(
            *expansion,
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            conv_bn(hidden, cout, 1, act=None),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class PreActBlock(nn.Module):
    """BN -> ReLU -> Conv (pre-activation ResNet): BN reads a fan-out value and feeds a ReLU."""

    def __init__(self, channels):
        super().__init__()
        self.norm, self.conv = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv(torch.relu(self.norm(x)))


# --------------------------------------------------------------------------- architectures
# Each returns (module, example input shape, expected BN left, reason fragments for those kept).


def resnet18_like():
    """ResNet-18 layout (2-2-2-2 basic blocks, three downsample shortcuts) at reduced width: 20 BN."""
    widths, layers, cin = (8, 16, 24, 32), [], 8
    for stage, width in enumerate(widths):
        layers += [BasicBlock(cin, width, 1 if stage == 0 else 2), BasicBlock(width, width, 1)]
        cin = width
    net = nn.Sequential(conv_bn(3, 8, 3), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))
    return net, (2, 3, 32, 32), ()


def mobilenet_v2_like():
    """MobileNetV2 layout: expand-1 first block, residual blocks, 1x1 head conv, dropout, Linear."""
    settings = [(1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2)]  # expand, channels, repeats, first stride
    blocks, cin = [], 8
    for expand, cout, repeats, stride in settings:
        for i in range(repeats):
            blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    net = nn.Sequential(
        conv_bn(3, 8, 3, 2, act=nn.ReLU6), *blocks, conv_bn(cin, 32, 1, act=nn.ReLU6),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(32, 10),
    )
    return net, (2, 3, 32, 32), ()


def vgg1d():
    """VGG-style 1-D conv stacks with max pooling, then a Linear -> BN1d -> ReLU -> Linear head."""
    net = nn.Sequential(
        conv_bn(4, 8, 3, dims=1), conv_bn(8, 8, 3, dims=1), nn.MaxPool1d(2),
        conv_bn(8, 16, 3, dims=1, bias=True), conv_bn(16, 16, 5, dims=1), nn.MaxPool1d(2),
        nn.Flatten(), nn.Linear(16 * 8, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 5),
    )
    return net, (2, 4, 32), ()


def conv3d_net():
    """3-D convs, strided and grouped (the Conv3d keep a bias: see conv3d_without_bias below)."""
    net = nn.Sequential(
        conv_bn(2, 8, 3, dims=3, bias=True), conv_bn(8, 8, 3, 2, groups=2, dims=3, bias=True),
        conv_bn(8, 12, 1, dims=3, bias=True, act=None), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(12, 3),
    )
    return net, (2, 2, 8, 8, 8), ()


def decoder(groups):
    """ConvTranspose upsampling decoder (2x twice, one with output_padding), then Conv -> BN."""

    def up(cin, cout, **kw):
        return [nn.ConvTranspose2d(cin, cout, 4 if not kw else 3, stride=2, padding=1, groups=groups, **kw), nn.BatchNorm2d(cout), nn.ReLU()]

    net = nn.Sequential(
        *up(16, 8), *up(8, 4, output_padding=1, bias=False),
        nn.Conv2d(4, 2, 3, padding=1), nn.BatchNorm2d(2),
    )
    return net, (2, 16, 4, 4), ()


def mlp():
    """Input BN (folds into the next Linear), Linear+BN1d with and without a Linear bias."""
    net = nn.Sequential(
        nn.BatchNorm1d(12), nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4),
    )
    return net, (4, 12), ()


def preact_net():
    """Pre-activation blocks: those BN can be folded neither forward nor backward."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), PreActBlock(8), PreActBlock(8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    # The first BN reads the stem Conv's output, which the residual Add reads too; the others
    # read a residual Add and feed a ReLU.
    reasons = ("fan-out: Conv", "input comes from Add", "input comes from Add")
    return net, (2, 3, 16, 16), reasons


ARCHITECTURES = {
    "resnet18_like": resnet18_like,
    "mobilenet_v2_like": mobilenet_v2_like,
    "vgg1d": vgg1d,
    "conv3d": conv3d_net,
    "decoder_groups1": lambda: decoder(1),
    "decoder_groups2": lambda: decoder(2),
    "mlp": mlp,
    "preact": preact_net,
}


# --------------------------------------------------------------------------- export


def randomise_batchnorm(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                c = layer.num_features
                sign = torch.randint(0, 2, (c,), generator=generator) * 2 - 1
                layer.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
                layer.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                layer.weight.copy_(sign * (torch.rand(c, generator=generator) * 1.5 + 0.5))
                layer.bias.copy_(torch.randn(c, generator=generator) * 0.5)
    return module.eval()


def export_keeping_bn(module, shape, exporter: str, path: pathlib.Path) -> onnx.ModelProto:
    """Export to `path` with the settings that keep BN, batch dimension symbolic ("batch")."""
    example = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(
                module, (example,), str(path), dynamo=True, optimize=False, external_data=False,
                input_names=["input"], output_names=["output"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=2)},), verbose=False,
            )
        else:
            buffer = io.BytesIO()
            torch.onnx.export(
                module, (example,), buffer, dynamo=False, do_constant_folding=False,
                input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch"}},
            )
            path.write_bytes(buffer.getvalue())
    return onnx.load(path)


def bn_labels(model: onnx.ModelProto) -> list[str]:
    return sorted(node_label(n) for n in model.graph.node if n.op_type == "BatchNormalization")


def assert_accounted(model: onnx.ModelProto, result) -> None:
    """Every BN of the original appears in the report exactly once, folded or kept."""
    report = result.report
    recorded = sorted([f.bn for f in report.folded] + [k.bn for k in report.kept])
    assert recorded == bn_labels(model)
    assert report.bn_before == count_bn(model) and report.bn_after == len(report.kept)
    assert bn_labels(result.model) == sorted(k.bn for k in report.kept)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_exported_with_bn_folds_and_matches(name, exporter, tmp_path, rng):
    torch.manual_seed(0)
    module, shape, reasons = ARCHITECTURES[name]()
    module = randomise_batchnorm(module, seed=1)
    model = export_keeping_bn(module, shape, exporter, tmp_path / f"{name}.onnx")
    assert count_bn(model) > 0, "the export lost its BatchNormalization nodes"

    result = assert_folds(model, rng, expect_left=len(reasons), engine=run_ort, dims=DIMS, rel=1e-5)
    assert_accounted(model, result)
    kept = [k.reason for k in result.report.kept]
    for fragment in set(reasons):
        assert sum(fragment in reason for reason in kept) == reasons.count(fragment), (fragment, kept)


def test_conv3d_without_bias_exports_a_bias_onnxruntime_rejects(tmp_path):
    """Why conv3d_net keeps its Conv3d biases: torch 2.13's dynamo exporter (optimize=False)
    gives a bias-less Conv3d a zero bias of the wrong shape. If this starts failing, the
    exporter is fixed and conv3d_net can drop its biases."""
    module = randomise_batchnorm(nn.Sequential(conv_bn(2, 4, 3, dims=3)), seed=2)
    model = export_keeping_bn(module, (2, 2, 4, 4, 4), "dynamo", tmp_path / "conv3d.onnx")
    feeds = {"input": np.zeros((2, 2, 4, 4, 4), np.float32)}
    try:
        run_ort(model, feeds)
    except Exception as e:  # onnxruntime's error types are not public
        assert "bias" in str(e).lower()
    else:
        pytest.fail("onnxruntime now runs a bias-less Conv3d export: give conv3d_net bias=False layers")


@pytest.mark.parametrize("name", SAMPLES)
def test_committed_sample_folds_to_zero_bn(name, rng):
    model = onnx.load(MODELS / f"{name}.onnx")
    assert count_bn(model) > 0
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    result = assert_folds(model, rng, expect_left=0, engine=run_ort, dims=DIMS, rel=1e-5)
    assert_accounted(model, result)


@pytest.mark.parametrize("name", SAMPLES)
def test_committed_sample_without_bn_differs(name, rng):
    """The samples' BN statistics are far from the identity: dropping a BN, as a wrong fold
    would, changes the outputs well beyond the tolerance."""
    model = onnx.load(MODELS / f"{name}.onnx")
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    for node in broken.graph.node:
        if node.op_type == "BatchNormalization":
            del node.input[1:]
            node.op_type = "Identity"
            del node.attribute[:]
    with pytest.raises(AssertionError, match="relative error"):
        assert_same_outputs(model, broken, rng, engine=run_ort, dims=DIMS, rel=1e-2)
