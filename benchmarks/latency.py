"""Inference latency before and after folding: onnxruntime and PyTorch (eval mode), CPU or CUDA.

onnxruntime: the original and the bnfold-folded model, each with graph optimisations DISABLED
and at the default level (ORT_ENABLE_ALL, which fuses Conv+BN itself), batch 1 and batch 32.
PyTorch: the module in eval mode and `bnfold.torch.fold(module).module`, under inference_mode.
Variants take turns, one run each per round, so a change in machine load hits all alike; the
median of the rounds is reported, after warm-up runs.

    python benchmarks/latency.py [ort|torch|all] [--models resnet50,...] [--rounds 10] [--threads 2]
                                 [--device cpu|cuda]

With ``--device cuda`` onnxruntime runs on CUDAExecutionProvider (inputs fed from host memory,
so each run includes the copies in and out, as a plain ``session.run`` does for a user) and the
PyTorch module on the GPU, synchronised after each call.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_models import DEFAULT_OUT as MODELS_DIR  # noqa: E402

DEFAULT_MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121", "conv1d_m5", "conv3d_c3d", "mlp_bn1d")
BATCHES = (1, 32)


def interleaved_medians(fns: dict, rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each zero-argument function, the functions taking turns."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def rounds_for(batch: int, rounds: int) -> int:
    return rounds if batch == 1 else max(3, rounds // 3)


# --------------------------------------------------------------------------- onnxruntime


def ort_providers(device: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def ort_session(path: pathlib.Path, level, threads: int, device: str = "cpu"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=ort_providers(device))
    if session.get_providers()[0] != ort_providers(device)[0]:
        raise SystemExit(f"{device}: onnxruntime fell back to {session.get_providers()}")
    return session


def bench_ort(name: str, work: pathlib.Path, rounds: int, threads: int, device: str = "cpu") -> list[dict]:
    import onnxruntime as ort

    import bnfold

    src = MODELS_DIR / f"{name}.onnx"
    folded = work / f"{name}.folded.onnx"
    result = bnfold.fold_file(src, folded, verify=False)
    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    rows = []
    for level_name, level in levels.items():
        sessions = {k: ort_session(p, level, threads, device) for k, p in (("original", src), ("folded", folded))}
        for batch in BATCHES:
            feeds = _feeds(sessions["original"], batch)
            fns = {k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}
            medians = interleaved_medians(fns, rounds_for(batch, rounds))
            rows.append(_row(name, "onnxruntime", level_name, batch, medians, result.report.bn_after, device))
            print(_line(rows[-1]), file=sys.stderr, flush=True)
    folded.unlink()
    return rows


def _feeds(session, batch: int) -> dict:
    rng = np.random.default_rng(0)
    return {i.name: rng.standard_normal([d if isinstance(d, int) else batch for d in i.shape]).astype(np.float32)
            for i in session.get_inputs()}


# --------------------------------------------------------------------------- PyTorch


def bench_torch(name: str, rounds: int, threads: int, device: str = "cpu") -> list[dict]:
    import torch

    import bnfold.torch
    from make_models import SEED, _torch_models, randomise_batchnorm

    torch.set_num_threads(threads)
    build, shape = _torch_models()[name]
    torch.manual_seed(SEED)
    module = build()
    randomise_batchnorm(module, torch.Generator().manual_seed(SEED))
    module.eval()
    example = torch.randn(*shape)
    result = bnfold.torch.fold(module, example_inputs=(example,))
    module, folded = module.to(device), result.module.to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, *shape[1:]).to(device)
        with torch.inference_mode():
            err = float((module(x) - folded(x)).abs().max())
            fns = {"original": lambda: (module(x), sync()), "folded": lambda: (folded(x), sync())}
            medians = interleaved_medians(fns, rounds_for(batch, rounds))
        row = _row(name, "torch", "eval", batch, medians, len(result.kept), device)
        row["max_abs_err"] = err
        rows.append(row)
        print(_line(row), file=sys.stderr, flush=True)
    return rows


def _row(model, engine, level, batch, medians, bn_left, device="cpu") -> dict:
    return {"model": model, "engine": engine, "device": device, "level": level, "batch": batch, "bn_left_after_fold": bn_left,
            "original_ms": medians["original"] * 1e3, "folded_ms": medians["folded"] * 1e3,
            "speedup": medians["original"] / medians["folded"], "load1": os.getloadavg()[0]}


def _line(row) -> str:
    return (f"  {row['model']} {row['engine']} {row.get('device', 'cpu')} {row['level']} batch {row['batch']}: "
            f"{row['original_ms']:.2f} -> {row['folded_ms']:.2f} ms ({row['speedup']:.2f}x, load {row['load1']:.2f})")


def render(rows: list[dict]) -> str:
    lines = ["| model | engine | device | graph optimisation | batch | original ms | folded ms | speed-up | BN left | load |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['engine']} | {r.get('device', 'cpu')} | {r['level']} | {r['batch']} | {r['original_ms']:.2f} | "
                     f"{r['folded_ms']:.2f} | {r['speedup']:.2f}× | {r['bn_left_after_fold']} | {r['load1']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", nargs="?", default="all", choices=("ort", "torch", "all"))
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--rounds", type=int, default=15, help="rounds at batch 1 (a third of them at batch 32, at least 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/bnfold-bench/latency"))
    parser.add_argument("--results", type=pathlib.Path, default=HERE / "latency.json")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        if args.engine in ("ort", "all"):
            rows += bench_ort(name, args.work, args.rounds, args.threads, args.device)
        if args.engine in ("torch", "all"):
            rows += bench_torch(name, args.rounds, args.threads, args.device)
        args.results.write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "device": args.device, "rows": rows}, indent=1))
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
