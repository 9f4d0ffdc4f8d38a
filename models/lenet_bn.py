"""LeNet-BN seed example: train with bnfold's BatchNorm, fold it, export to ONNX, verify.

Classic LeNet with BatchNorm after every conv and hidden linear layer (d2l.ai's LeNet-BN), on
28x28 inputs. The data are made here, no download: ten classes of procedurally drawn shapes
(bars, diagonals, ring, square, plus, cross, triangle, two dots) with random position, size,
stroke, contrast and Gaussian noise, so the task is learnable in a few epochs but not trivial.

    python models/lenet_bn.py --epochs 3 --out models/out/

prints the accuracy of the unfolded eval model and of the folded one (they must agree), the
BatchNormalization count of the ONNX export without and with folding, and the max error.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import onnx
import torch
from torch import nn

from bnfold.torch import BatchNorm1d, BatchNorm2d
from bnfold.torch.batchnorm import BatchNormBase
from bnfold.torch.export import count_batchnorms, export
from bnfold.torch.fold import fold

SIZE = 28
CLASSES = ("hbar", "vbar", "diag", "antidiag", "ring", "square", "plus", "cross", "triangle", "dots")


def lenet_bn() -> nn.Sequential:
    """conv(1->6,5)-BN-sigmoid-avgpool-conv(6->16,5)-BN-sigmoid-avgpool-256-120-84-10."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), BatchNorm2d(6), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, kernel_size=5), BatchNorm2d(16), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120), BatchNorm1d(120), nn.Sigmoid(),
        nn.Linear(120, 84), BatchNorm1d(84), nn.Sigmoid(),
        nn.Linear(84, 10),
    )


# --------------------------------------------------------------------------- synthetic data


def _shape_masks(label: int, dx, dy, r, t):
    """Boolean (n, 28, 28) masks of class `label`; dx, dy are offsets from the shape's centre."""
    d = r * 0.7
    inside = (dx.abs() < d) & (dy.abs() < d)
    diag, anti = (dx + dy).abs() / math.sqrt(2) < t, (dx - dy).abs() / math.sqrt(2) < t
    hbar, vbar = (dy.abs() < t) & (dx.abs() < r), (dx.abs() < t) & (dy.abs() < r)
    masks = {
        0: hbar,
        1: vbar,
        2: diag & inside,
        3: anti & inside,
        4: ((dx**2 + dy**2).sqrt() - r).abs() < t,
        5: inside,
        6: hbar | vbar,
        7: (diag | anti) & inside,
        8: (dy.abs() < d) & (dx.abs() < (dy + d) / 2),
        9: ((dx - r / 2) ** 2 + dy**2 < (t + 1) ** 2) | ((dx + r / 2) ** 2 + dy**2 < (t + 1) ** 2),
    }
    return masks[label]


def make_images(label: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """n noisy 1x28x28 drawings of one class, each with its own position, size and stroke."""

    def uniform(low, high):
        return (torch.rand(n, 1, 1, generator=gen) * (high - low) + low)

    grid = torch.arange(SIZE, dtype=torch.float32)
    cx, cy = uniform(10, 18), uniform(10, 18)
    dx, dy = grid[None, None, :] - cx, grid[None, :, None] - cy
    mask = _shape_masks(label, dx, dy, r=uniform(5, 9), t=uniform(1.0, 2.2))
    images = mask.float() * uniform(0.5, 1.0) + torch.randn(n, SIZE, SIZE, generator=gen) * 0.35
    return images[:, None]


def make_dataset(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.cat([make_images(k, per_class, gen) for k in range(len(CLASSES))])
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    order = torch.randperm(len(labels), generator=gen)
    return images[order], labels[order]


# --------------------------------------------------------------------------- train, fold, export


def train(model: nn.Module, images, labels, epochs: int, batch: int = 128) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        total = 0.0
        for i in range(0, len(labels), batch):
            loss = loss_fn(model(images[i : i + batch]), labels[i : i + batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels[i : i + batch])
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(labels):.4f}")


@torch.no_grad()
def recalibrate(model: nn.Module, images, batch: int = 500) -> None:
    """Recompute the running statistics as a plain average over the training set.

    The running averages (momentum 0.1) trail weights that were still moving, so eval mode, and
    with it the folded model that bakes those statistics in, is worse than it needs to be.
    """
    norms = [m for m in model.modules() if isinstance(m, BatchNormBase)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    for i in range(0, len(images), batch):
        model(images[i : i + batch])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def predict(model: nn.Module, images) -> torch.Tensor:
    return model(images).argmax(dim=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "out")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(options.seed)
    train_x, train_y = make_dataset(per_class=1000, seed=options.seed)
    test_x, test_y = make_dataset(per_class=100, seed=options.seed + 1)
    model = lenet_bn()
    train(model, train_x, train_y, options.epochs)
    recalibrate(model, train_x)

    result = fold(model, example_inputs=test_x[:2])
    unfolded, folded = predict(model, test_x), predict(result.module, test_x)
    print(f"folded {len(result.folded)} BN, kept {len(result.kept)}")
    print(f"accuracy unfolded (eval): {(unfolded == test_y).float().mean():.4f}")
    print(f"accuracy folded:          {(folded == test_y).float().mean():.4f}")

    options.out.mkdir(parents=True, exist_ok=True)
    example = (test_x[:64],)
    plain = export(model, example, options.out / "lenet_bn_unfolded.onnx", fold=False)
    done = export(model, example, options.out / "lenet_bn.onnx")
    print(f"ONNX BatchNormalization: {plain.bn_left} without folding -> {count_batchnorms(onnx.load(done.path))} folded")
    print(f"ONNX vs PyTorch max abs error: {done.max_abs_err():.3g} (unfolded export {plain.max_abs_err():.3g})")
    print(f"wrote {done.path} in {time.perf_counter() - start:.1f} s")
    if not torch.equal(unfolded, folded):
        print(f"error: {(unfolded != folded).sum()} predictions changed by folding", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
