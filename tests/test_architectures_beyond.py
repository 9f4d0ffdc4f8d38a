"""Architectures whose BN the core forward rules alone cannot all fold (issue 4): exported from
PyTorch with BN kept, folded as far as is legal (the count asserted, reasons checked), and
proven in onnxruntime against the unfused original.

Builders, export settings and randomised statistics come from test_architectures.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

from conftest import assert_folds, run_ort  # noqa: E402
from test_architectures import DIMS, assert_accounted, conv_bn, export_keeping_bn, randomise_batchnorm  # noqa: E402
from torch import nn  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")


class DenseLayer(nn.Module):
    """DenseNet-BC layer: BN -> ReLU -> Conv1x1 -> BN -> ReLU -> Conv3x3, concatenated to its input."""

    def __init__(self, cin, growth):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(torch.relu(self.norm1(x)))
        return torch.cat([x, self.conv2(torch.relu(self.norm2(y)))], 1)


def densenet_like():
    """Stem Conv-BN-ReLU-MaxPool, two dense blocks of three layers, a transition, final BN-ReLU.

    Folded (7): the stem BN and each layer's norm2 (after conv1), forward. Kept (8): each norm1,
    the transition's BN and the final BN read a Concat or a pooling and feed a ReLU: no linear
    neighbour on either side.
    """
    growth, layers, cin = 4, [], 8
    for block in range(2):
        for _ in range(3):
            layers.append(DenseLayer(cin, growth))
            cin += growth
        if block == 0:
            layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cin // 2, 1, bias=False), nn.AvgPool2d(2)]
            cin //= 2
    net = nn.Sequential(
        conv_bn(3, 8, 3), nn.MaxPool2d(2), *layers, nn.BatchNorm2d(cin), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10),
    )
    return net, (2, 3, 32, 32), 8


class PreActBottleneck(nn.Module):
    """ResNet v2 bottleneck: BN-ReLU-Conv1x1, BN-ReLU-Conv3x3, BN-ReLU-Conv1x1, identity shortcut."""

    def __init__(self, channels):
        super().__init__()
        mid = channels // 2
        self.norm1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, mid, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(mid), nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.norm3, self.conv3 = nn.BatchNorm2d(mid), nn.Conv2d(mid, channels, 1, bias=False)

    def forward(self, x):
        y = self.conv1(torch.relu(self.norm1(x)))
        y = self.conv2(torch.relu(self.norm2(y)))
        return x + self.conv3(torch.relu(self.norm3(y)))


def preact_resnet_like():
    """Stem Conv, three v2 bottlenecks, final BN-ReLU, pool, Linear.

    Folded (6): norm2 and norm3 of each block, forward into conv1 / conv2. Kept (4): each norm1
    reads the stem Conv or a residual Add that the shortcut also reads, and feeds a ReLU; so does
    the final BN.
    """
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), *(PreActBottleneck(16) for _ in range(3)), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    return net, (2, 3, 16, 16), 4


def face_embedding_head():
    """The face-recognition head (ArcFace/InsightFace layout): body -> BN2d -> Dropout -> Flatten
    -> Linear -> BN1d. BN2d reads a PReLU, so it folds backward through Flatten into the Linear
    (its scale and shift expanded over the 4x4 positions of each channel); BN1d folds forward
    into the same Linear. Nothing is left."""
    net = nn.Sequential(
        conv_bn(3, 8, 3, 2, act=nn.PReLU), conv_bn(8, 16, 3, 2, act=nn.PReLU),
        nn.BatchNorm2d(16), nn.Dropout(0.4), nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.BatchNorm1d(32),
    )
    return net, (2, 3, 16, 16), 0


ARCHITECTURES = {
    "densenet_like": densenet_like,
    "preact_resnet_like": preact_resnet_like,
    "face_embedding_head": face_embedding_head,
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_beyond_forward_folds_as_far_as_legal(name, tmp_path, rng):
    torch.manual_seed(0)
    module, shape, expect_left = ARCHITECTURES[name]()
    module = randomise_batchnorm(module, seed=3)
    model = export_keeping_bn(module, shape, "dynamo", tmp_path / f"{name}.onnx")
    result = assert_folds(model, rng, expect_left=expect_left, engine=run_ort, dims=DIMS, rel=1e-5)
    assert_accounted(model, result)
    for kept in result.report.kept:  # each kept BN feeds a ReLU, or reads a Conv the shortcut reads too
        assert "Relu" in kept.reason or "fan-out: Conv" in kept.reason, kept
