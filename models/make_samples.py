"""Regenerate the sample ONNX models in models/: small real architectures with BN left in them.

Each model is built in PyTorch with seeded random weights and randomised BN statistics

    running_mean ~ N(0, 0.5)   running_var ~ U(0.5, 2)   weight ~ ±U(0.5, 2)   bias ~ N(0, 0.5)

so that a fold that gets the algebra wrong shows in the outputs (fresh BN statistics, mean 0 and
var 1, would hide a forgotten shift or a scale applied on the wrong axis).

Exporter settings that keep BatchNormalization (torch 2.13, eval mode):
- torch.onnx.export(dynamo=True, optimize=False): every BN stays one BatchNormalization node,
  and the batch dimension can be symbolic (`dynamic_shapes`). Used here; the weights are saved
  embedded (one self-contained file, as `external_data=False` does) and the per-node stack
  traces are dropped (they hold this machine's paths).
- dynamo=True with the default optimize=True: onnxscript's optimizer folds BN itself (none left).
- dynamo=False (TorchScript, deprecated): the default do_constant_folding=True fuses Conv+BN
  (Gemm+BN stays); do_constant_folding=False or training=TrainingMode.PRESERVE keeps all BN.

    python models/make_samples.py [--out models/]

prints each file's size and BN count. The same command always writes the same files.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import warnings

import onnx
import torch
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
SEED = 20261124


# --------------------------------------------------------------------------- architectures


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act=None) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-bn, a 1x1 conv-bn shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride, act=nn.ReLU), conv_bn(cout, cout, 3))
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet_mini(classes: int = 10) -> nn.Module:
    """Stem conv-bn-relu, four basic blocks (two with a downsample shortcut), pool, Linear: 11 BN."""
    return nn.Sequential(
        conv_bn(3, 8, 3, act=nn.ReLU),
        BasicBlock(8, 8),
        BasicBlock(8, 16, stride=2),
        BasicBlock(16, 16),
        BasicBlock(16, 24, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, classes),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: pointwise expand, depthwise 3x3, pointwise linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            conv_bn(cin, hidden, 1, act=nn.ReLU6),
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            conv_bn(hidden, cout, 1),
        )

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


def mobilenet_mini(classes: int = 10) -> nn.Module:
    """Stem conv-bn-relu6, three inverted-residual blocks (one residual), pool, Linear: 10 BN."""
    return nn.Sequential(
        conv_bn(3, 8, 3, stride=2, act=nn.ReLU6),
        InvertedResidual(8, 12, stride=2, expand=4),
        InvertedResidual(12, 12, stride=1, expand=4),
        InvertedResidual(12, 16, stride=2, expand=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


def mlp_bn(features: int = 16, hidden: int = 32, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def deconv_bn() -> nn.Module:
    """Grouped ConvTranspose (2x upsampling) -> BN -> ReLU -> Conv -> BN."""
    return nn.Sequential(
        nn.ConvTranspose2d(4, 8, 4, stride=2, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4),
    )


# name: (constructor, example input shape, output name)
SAMPLES = {
    "resnet_mini": (resnet_mini, (2, 3, 32, 32), "logits"),
    "mobilenet_mini": (mobilenet_mini, (2, 3, 32, 32), "logits"),
    "mlp_bn": (mlp_bn, (2, 16), "logits"),
    "deconv_bn": (deconv_bn, (2, 4, 8, 8), "output"),
}


# --------------------------------------------------------------------------- statistics and export


def randomise_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    """Give every BN layer statistics and affine parameters far from the identity."""
    with torch.no_grad():
        for layer in module.modules():
            if not isinstance(layer, nn.modules.batchnorm._BatchNorm):
                continue
            c = layer.num_features
            layer.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
            layer.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
            sign = torch.randint(0, 2, (c,), generator=generator) * 2 - 1
            layer.weight.copy_(sign * (torch.rand(c, generator=generator) * 1.5 + 0.5))
            layer.bias.copy_(torch.randn(c, generator=generator) * 0.5)


def build(name: str, seed: int = SEED) -> tuple[nn.Module, torch.Tensor]:
    """The eval-mode sample module with its example input, the same for the same seed."""
    constructor, shape, _ = SAMPLES[name]
    torch.manual_seed(seed)
    module = constructor()
    randomise_batchnorm(module, torch.Generator().manual_seed(seed))
    return module.eval(), torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))


def export_keeping_bn(module: nn.Module, example: torch.Tensor, output_name: str = "output") -> onnx.ModelProto:
    """Export with the dynamo exporter, optimize=False (keeps BN), symbolic batch dimension."""
    batch = torch.export.Dim("batch", min=2)  # torch.export specialises a size-1 dimension
    # One "torchvision is not installed" line per export otherwise: irrelevant here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            optimize=False,
            input_names=["input"],
            output_names=[output_name],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    return program.model_proto


def strip_node_metadata(model: onnx.ModelProto) -> None:
    """Drop the per-node stack traces and fx names: they hold this machine's paths (the same
    command would write different bytes elsewhere) and make up most of a small file."""
    for node in model.graph.node:
        del node.metadata_props[:]


def count_bn(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def make_sample(name: str, out: pathlib.Path) -> pathlib.Path:
    module, example = build(name)
    model = export_keeping_bn(module, example, SAMPLES[name][2])
    strip_node_metadata(model)
    onnx.checker.check_model(model, full_check=True)
    if count_bn(model) == 0:
        raise SystemExit(f"{name}: the exporter removed every BatchNormalization node")
    path = out / f"{name}.onnx"
    onnx.save_model(model, path, save_as_external_data=False)  # weights embedded: one file
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=HERE, help="folder to write to (default: models/)")
    parser.add_argument("--only", default="", help="comma-separated sample names (default: all)")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(SAMPLES)
    unknown = sorted(set(names) - set(SAMPLES))
    if unknown:
        parser.error(f"unknown sample(s) {', '.join(unknown)}; known: {', '.join(SAMPLES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = make_sample(name, args.out)
        print(f"{path.name:22} {path.stat().st_size / 1024:7.1f} KB  {count_bn(onnx.load(path)):3d} BN")


if __name__ == "__main__":
    main()
