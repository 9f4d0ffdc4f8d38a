"""Generate the benchmark models (BatchNormalization kept) into a folder outside the repository.

Real architectures are compact PyTorch definitions (torchvision does not install beside the
local torch build) with random weights and randomised BN statistics, so that a fold that gets
the algebra wrong shows up as an error:

    running_mean ~ N(0, 0.5)   running_var ~ U(0.5, 2)   weight ~ ±U(0.5, 2)   bias ~ N(0, 0.5)

They are exported with torch's dynamo exporter and `optimize=False`, which keeps every BN node
(`optimize=True` folds Conv+BN itself), with a symbolic batch dimension named `batch`.
The synthetic Conv->BN->Relu chains are built directly with onnx.helper. The external-data model
(over 2 GB) is the ResNet-50 export with its weights moved into a data file plus a huge MatMul
head whose weight is streamed to disk in chunks, so it never sits in memory whole.

    python benchmarks/make_models.py [--out /tmp/bnfold-bench/models] [--only resnet50,chain2k]

Writes MODEL.onnx (and MODEL.onnx.data for the external one) and `models.json` (name, files,
bytes, BN count, input shape) for compare.py.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

DEFAULT_OUT = pathlib.Path("/tmp/bnfold-bench/models")
SEED = 0


# --------------------------------------------------------------------------- architectures
# Imported lazily: the chains and the big model need no torch.


def _torch_models():
    """{name: (constructor, example input shape)}; built inside a function so torch loads lazily."""
    import torch
    from torch import nn

    def conv_bn(cin, cout, k, stride=1, groups=1, act=nn.ReLU, dims=2):
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        # Conv3d keeps its bias: without one, torch 2.13's exporter (optimize=False) writes a
        # zero bias of shape [C, 2], which onnxruntime rejects ("bias must be a 1D tensor").
        layers = [conv(cin, cout, k, stride, k // 2, groups=groups, bias=dims == 3), bn(cout)]
        if act is not None:
            layers.append(act())
        return nn.Sequential(*layers)

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                conv_bn(cin, width, 1), conv_bn(width, width, 3, stride), conv_bn(width, cout, 1, act=None)
            )
            self.down = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

        def forward(self, x):
            return torch.relu(self.body(x) + self.down(x))

    def resnet(blocks):
        layers, cin = [conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64
        for stage, count in enumerate(blocks):
            width = 64 * 2**stage
            for i in range(count):
                layers.append(Bottleneck(cin, width, 2 if i == 0 and stage > 0 else 1))
                cin = width * 4
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
        return nn.Sequential(*layers)

    class InvertedResidual(nn.Module):
        """MobileNetV2 block (act=ReLU6) or EfficientNet MBConv with squeeze-excite (act=SiLU)."""

        def __init__(self, cin, cout, stride, expand, k=3, act=nn.ReLU6, se=False):
            super().__init__()
            hidden = cin * expand
            layers = [conv_bn(cin, hidden, 1, act=act)] if expand != 1 else []
            layers.append(conv_bn(hidden, hidden, k, stride, groups=hidden, act=act))
            if se:
                layers.append(SqueezeExcite(hidden, max(1, cin // 4)))
            layers.append(conv_bn(hidden, cout, 1, act=None))
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = self.body(x)
            return x + y if self.residual else y

    class SqueezeExcite(nn.Module):
        def __init__(self, channels, squeezed):
            super().__init__()
            self.fc = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, squeezed, 1), nn.SiLU(),
                nn.Conv2d(squeezed, channels, 1), nn.Sigmoid(),
            )

        def forward(self, x):
            return x * self.fc(x)

    def mobilenet_v2():
        config = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
        layers, cin = [conv_bn(3, 32, 3, 2, act=nn.ReLU6)], 32
        for expand, cout, repeats, stride in config:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers += [conv_bn(cin, 1280, 1, act=nn.ReLU6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000)]
        return nn.Sequential(*layers)

    def efficientnet_b0():
        config = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3),
                  (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]
        layers, cin = [conv_bn(3, 32, 3, 2, act=nn.SiLU)], 32
        for expand, cout, repeats, stride, k in config:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand, k, nn.SiLU, se=True))
                cin = cout
        layers += [conv_bn(cin, 1280, 1, act=nn.SiLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000)]
        return nn.Sequential(*layers)

    class DenseLayer(nn.Module):
        """Pre-activation: BN -> ReLU -> Conv1x1 -> BN -> ReLU -> Conv3x3; the first BN follows a
        Concat (nothing to fold it into), the second follows the 1x1 Conv."""

        def __init__(self, cin, growth=32, bn_size=4):
            super().__init__()
            self.body = nn.Sequential(
                nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, bn_size * growth, 1, bias=False),
                nn.BatchNorm2d(bn_size * growth), nn.ReLU(), nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False),
            )

        def forward(self, x):
            return torch.cat([x, self.body(x)], 1)

    def densenet121():
        layers, cin = [conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64
        for stage, count in enumerate((6, 12, 24, 16)):
            for _ in range(count):
                layers.append(DenseLayer(cin))
                cin += 32
            if stage < 3:
                layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cin // 2, 1, bias=False), nn.AvgPool2d(2)]
                cin //= 2
        layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
        return nn.Sequential(*layers)

    def conv1d_net():
        """M5-like raw-audio classifier."""
        return nn.Sequential(
            conv_bn(1, 128, 79, 4, dims=1), nn.MaxPool1d(4), conv_bn(128, 128, 3, dims=1), nn.MaxPool1d(4),
            conv_bn(128, 256, 3, dims=1), nn.MaxPool1d(4), conv_bn(256, 512, 3, dims=1),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(512, 35),
        )

    def conv3d_net():
        """Small C3D-like video net."""
        return nn.Sequential(
            conv_bn(3, 64, 3, dims=3), nn.MaxPool3d((1, 2, 2)), conv_bn(64, 128, 3, dims=3), nn.MaxPool3d(2),
            conv_bn(128, 256, 3, dims=3), conv_bn(256, 256, 3, dims=3), nn.MaxPool3d(2),
            conv_bn(256, 512, 3, dims=3), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(512, 101),
        )

    def mlp_bn():
        layers, cin = [], 784
        for width in (2048, 2048, 1024, 512):
            layers += [nn.Linear(cin, width), nn.BatchNorm1d(width), nn.ReLU()]
            cin = width
        layers += [nn.Linear(cin, 10), nn.BatchNorm1d(10)]
        return nn.Sequential(*layers)

    return {
        "resnet50": (lambda: resnet((3, 4, 6, 3)), (1, 3, 224, 224)),
        "resnet152": (lambda: resnet((3, 8, 36, 3)), (1, 3, 224, 224)),
        "mobilenet_v2": (mobilenet_v2, (1, 3, 224, 224)),
        "efficientnet_b0": (efficientnet_b0, (1, 3, 224, 224)),
        "densenet121": (densenet121, (1, 3, 224, 224)),
        "conv1d_m5": (conv1d_net, (1, 1, 16000)),
        "conv3d_c3d": (conv3d_net, (1, 3, 8, 64, 64)),
        "mlp_bn1d": (mlp_bn, (2, 784)),  # batch 2: BatchNorm1d export wants more than one row
    }


TORCH_MODELS = (
    "resnet50", "resnet152", "mobilenet_v2", "efficientnet_b0", "densenet121", "conv1d_m5", "conv3d_c3d", "mlp_bn1d",
)
CHAINS = {"chain2k": 2_000, "chain20k": 20_000}
BIG = "resnet50_2gb_external"


def randomise_batchnorm(module, gen) -> int:
    """Give every BN module statistics far from identity (so a wrong fold is visible)."""
    import torch

    count = 0
    for bn in module.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            c = bn.num_features
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                bn.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                sign = torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0)
                bn.weight.copy_(sign * (torch.rand(c, generator=gen) * 1.5 + 0.5))
                bn.bias.copy_(torch.randn(c, generator=gen) * 0.5)
            count += 1
    return count


def export_torch_model(name: str, out_dir: pathlib.Path) -> dict:
    import torch

    build, shape = _torch_models()[name]
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    module = build()
    randomise_batchnorm(module, gen)
    module.eval()
    path = out_dir / f"{name}.onnx"
    example = torch.randn(*shape, generator=gen)
    torch.onnx.export(
        module, (example,), str(path), dynamo=True, optimize=False, external_data=False,
        input_names=["input"], output_names=["output"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
    )
    return {"input_shape": list(shape)}


# --------------------------------------------------------------------------- synthetic chains


def make_chain(name: str, blocks: int, out_dir: pathlib.Path, channels: int = 4, size: int = 8) -> dict:
    """Conv(3x3, pads 1) -> BN -> Relu, `blocks` times, tiny channels: a graph-size stress test."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(SEED)
    nodes, inits = [], []
    x = "input"
    for i in range(blocks):
        # Conv gain about 0.2 keeps 20,000 blocks finite (BN's shift feeds each block fresh signal).
        w = (rng.standard_normal((channels, channels, 3, 3)) * (0.2 / (9 * channels) ** 0.5)).astype(np.float32)
        params = _bn_params(rng, channels)
        names = [f"conv{i}.W", f"conv{i}.B"] + [f"bn{i}.{p}" for p in ("scale", "B", "mean", "var")]
        values = [w, (rng.standard_normal(channels) * 0.1).astype(np.float32), *params]
        inits += [numpy_helper.from_array(v, n) for v, n in zip(values, names)]
        nodes += [
            helper.make_node("Conv", [x, names[0], names[1]], [f"c{i}"], name=f"Conv_{i}", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", [f"c{i}", *names[2:]], [f"b{i}"], name=f"BN_{i}", epsilon=1e-5),
        ]
        x = f"r{i}" if i < blocks - 1 else "output"
        nodes.append(helper.make_node("Relu", [f"b{i}"], [x], name=f"Relu_{i}"))
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", channels, size, size])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bnfold-bench")
    onnx.save(model, out_dir / f"{name}.onnx")
    return {"input_shape": [1, channels, size, size]}


def _bn_params(rng, c: int):
    """scale, B, mean, var as the module docstring says (float32)."""
    sign = np.where(rng.random(c) < 0.5, -1.0, 1.0)
    return [
        (sign * rng.uniform(0.5, 2.0, c)).astype(np.float32),
        (rng.standard_normal(c) * 0.5).astype(np.float32),
        (rng.standard_normal(c) * 0.5).astype(np.float32),
        rng.uniform(0.5, 2.0, c).astype(np.float32),
    ]


# --------------------------------------------------------------------------- the >2 GB model

ALIGN = 4096
CHUNK_ROWS = 16  # rows of the big weight generated and written at a time (16 x 560k x 4 B = 36 MB)


def make_big_external(base: pathlib.Path, out_dir: pathlib.Path, head_columns: int = 560_000) -> dict:
    """ResNet-50 (from `base`) with every weight in external data, plus a MatMul head
    [1000, head_columns] float32 (2.24 GB at the default) written in chunks: the whole model
    is over protobuf's 2 GB limit, and its one huge tensor is not touched by a fold."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(base)
    name = f"{BIG}.onnx"
    data_name = f"{name}.data"
    with open(out_dir / data_name, "wb") as data:
        for tensor in model.graph.initializer:
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                _move_to_external(tensor, data, data_name)
        offset = _pad(data)
        length = _stream_random_matrix(data, 1000, head_columns)
    big = TensorProto(name="head.big_weight", data_type=TensorProto.FLOAT, dims=[1000, head_columns])
    _set_external(big, data_name, offset, length)
    model.graph.initializer.append(big)
    old_output = model.graph.output[0].name
    model.graph.node.append(helper.make_node("MatMul", [old_output, big.name], ["output_big"], name="head_big"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("output_big", TensorProto.FLOAT, ["batch", head_columns]))
    onnx.save(model, out_dir / name)
    return {"input_shape": [1, 3, 224, 224], "external": True}


def _pad(f) -> int:
    f.write(b"\0" * (-f.tell() % ALIGN))
    return f.tell()


def _move_to_external(tensor, f, location: str) -> None:
    offset = _pad(f)
    f.write(tensor.raw_data)
    _set_external(tensor, location, offset, len(tensor.raw_data))
    tensor.ClearField("raw_data")


def _set_external(tensor, location: str, offset: int, length: int) -> None:
    import onnx

    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _stream_random_matrix(f, rows: int, cols: int) -> int:
    """Write a float32 [rows, cols] matrix of small random values, CHUNK_ROWS rows at a time."""
    rng = np.random.default_rng(SEED + 1)
    written = 0
    for start in range(0, rows, CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows - start)
        block = rng.standard_normal((n, cols), dtype=np.float32)
        block *= 0.03
        f.write(block.tobytes())
        written += block.nbytes
    return written


# --------------------------------------------------------------------------- driver


def describe(path: pathlib.Path) -> dict:
    """Files, sizes and BN count of a written model (external data not loaded)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    files = [path.name] + sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    sizes = {f: (path.parent / f).stat().st_size for f in files}
    return {
        "path": str(path),
        "files": files,
        "bytes": sum(sizes.values()),
        "model_file_bytes": sizes[path.name],
        "bn": sum(n.op_type == "BatchNormalization" for n in model.graph.node),
        "nodes": len(model.graph.node),
        "initializers": len(model.graph.initializer),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})")
    parser.add_argument("--only", help="comma-separated model names (default: all)")
    parser.add_argument("--big-columns", type=int, default=560_000, help="columns of the big head (default 560000: 2.24 GB)")
    args = parser.parse_args(argv)
    everything = [*TORCH_MODELS, *CHAINS, BIG]
    names = everything if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = sorted(set(names) - set(everything))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {everything}")
    args.out.mkdir(parents=True, exist_ok=True)
    index_path = args.out / "models.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    for name in names:
        started = time.perf_counter()
        if name in TORCH_MODELS:
            extra = export_torch_model(name, args.out)
        elif name in CHAINS:
            extra = make_chain(name, CHAINS[name], args.out)
        else:
            base = args.out / "resnet50.onnx"
            if not base.exists():
                export_torch_model("resnet50", args.out)
            extra = make_big_external(base, args.out, args.big_columns)
        index[name] = {**describe(args.out / f"{name}.onnx"), **extra}
        info = index[name]
        print(f"{name}: {info['bytes'] / 1e6:.1f} MB, {info['bn']} BN, {info['nodes']} nodes "
              f"({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
        index_path.write_text(json.dumps(index, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
