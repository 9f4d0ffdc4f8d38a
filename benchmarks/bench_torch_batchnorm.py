"""Training step (forward + backward) of bnfold's BatchNorm2d vs torch.nn.BatchNorm2d on CPU.

Both of bnfold's backward implementations are timed ("explicit": the autograd.Function with the
paper's backward formulas; "autograd": plain tensor ops differentiated by autograd). Prints a
markdown table of median wall times and the ratio to torch's native kernel.

    python benchmarks/bench_torch_batchnorm.py [--repeats 15] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bnfold.torch.batchnorm import BatchNorm2d

# (N, C, H, W): small to large, few channels with big maps and many channels with small maps.
SIZES = [
    (32, 16, 56, 56),
    (32, 64, 32, 32),
    (32, 64, 56, 56),
    (32, 256, 8, 8),
    (32, 256, 32, 32),
]


def time_train_steps(bn: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, steps: int) -> list[float]:
    """Seconds of each of `steps` forward + backward passes, after one warm-up step."""
    x = x.detach().requires_grad_()
    times = []
    for i in range(steps + 1):
        x.grad = None
        bn.zero_grad(set_to_none=True)
        start = time.perf_counter()
        bn(x).backward(grad)
        if i:
            times.append(time.perf_counter() - start)
    return times


def bench_size(size: tuple[int, int, int, int], repeats: int, rounds: int = 5) -> dict[str, float]:
    """Median step time per module. The modules take turns in short rounds, so that a change in
    machine load (other jobs on a shared box) hits all of them alike."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size, generator=gen) * 2 + 0.5
    grad = torch.randn(size, generator=gen)
    c = size[1]
    modules = {
        "torch": torch.nn.BatchNorm2d(c),
        "explicit": BatchNorm2d(c, impl="explicit"),
        "autograd": BatchNorm2d(c, impl="autograd"),
    }
    samples: dict[str, list[float]] = {k: [] for k in modules}
    for _ in range(rounds):
        for name, bn in modules.items():
            samples[name] += time_train_steps(bn.train(), x, grad, max(1, repeats // rounds))
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per size and module")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads of {os.cpu_count()} cores "
          f"(load average {load}), float32, median of {args.repeats} train steps "
          "(forward + backward)\n")
    print("| N | C | H×W | torch (ms) | bnfold explicit (ms) | ratio | bnfold autograd (ms) | ratio |")
    print("|---|---|-----|-----------:|---------------------:|------:|---------------------:|------:|")
    for size in SIZES:
        r = bench_size(size, args.repeats)
        t, e, a = (r[k] * 1e3 for k in ("torch", "explicit", "autograd"))
        n, c, h, w = size
        print(f"| {n} | {c} | {h}×{w} | {t:.2f} | {e:.2f} | {e / t:.2f}x | {a:.2f} | {a / t:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
