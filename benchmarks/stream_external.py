"""Folding a model whose weights are all in external data and all change: whole `bnfold`
processes (with and without verification) beside `cp` and `cp` + `sync` of the model's files,
rounds interleaved; wall time and peak RSS (GNU time), RSS also as a share of the data.

    python benchmarks/stream_external.py [--blocks 24] [--channels 512] [--rounds 3]

The model: `blocks` x (Conv 3x3 -> BN -> Relu) on `channels` channels, every weight in one data
file (24 x 512 channels: 226 MB), so every Conv weight is rewritten by its fold. Built once under
--dir. Before/after: `--tree DIR` (repeatable) runs bnfold from other source trees too.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MAIN = "import sys; from bnfold.cli import main; sys.exit(main())"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def build(path: pathlib.Path, blocks: int, channels: int) -> None:
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i in range(blocks):
        weight = rng.normal(0, (2.0 / (channels * 9)) ** 0.5, [channels, channels, 3, 3]).astype(np.float32)
        stats = (rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.1, channels), rng.normal(0, 0.1, channels), rng.uniform(0.5, 2, channels))
        names = [f"W{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"]
        for name, value in zip(names, (weight, *stats)):
            inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        nodes += [
            helper.make_node("Conv", [x, names[0]], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", [f"c{i}", *names[1:]], [f"n{i}"], name=f"bn{i}"),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        x = f"r{i}"
    graph = helper.make_graph(
        nodes, "stream", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, 8, 8])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall s, peak RSS MB) of a whole process, by GNU time."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    return wall, int(re.findall(r"^(\d+)$", done.stderr, re.M)[-1]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/tmp/bnfold-bench/stream"))
    parser.add_argument("--tree", action="append", default=[], help="another source tree to run bnfold from")
    args = parser.parse_args()
    src = args.dir / f"stream_{args.blocks}x{args.channels}.onnx"
    if not src.exists():
        build(src, args.blocks, args.channels)
    data = pathlib.Path(f"{src}.data")
    data_mb = data.stat().st_size / 2**20
    out = args.dir / "out"
    files = [str(src), str(data)]
    tools = {
        "cp": ["cp", *files, str(out)],
        "cp+sync": ["sh", "-c", 'cp -- "$@" "$0" && sync "$0"/*', str(out), *files],
    }
    for tree in [str(ROOT), *args.tree]:
        run = ["env", f"PYTHONPATH={os.path.abspath(tree)}", sys.executable, "-P", "-c", MAIN, str(src), "-o", str(out / src.name)]
        label = "this" if tree == str(ROOT) else tree
        tools[f"bnfold --no-verify ({label})"] = [*run, "--no-verify"]
        tools[f"bnfold ({label})"] = run
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in tools}
    for round_no in range(args.rounds):
        for name, cmd in tools.items():
            out.mkdir(parents=True, exist_ok=True)
            results[name].append(timed(cmd))
            shutil.rmtree(out)
        print(f"round {round_no}: " + "  ".join(f"{n} {r[-1][0]:.2f}s/{r[-1][1]:.0f}MB" for n, r in results.items()), flush=True)
    base = statistics.median(w for w, _ in results["cp+sync"])
    print(f"\ndata {data_mb:.0f} MB ({args.blocks} blocks x {args.channels} channels, every weight changes)\n")
    print("| process | median wall s | min–max | × cp+sync | peak RSS MB | RSS / data |")
    print("|---|---:|---|---:|---:|---:|")
    for name, rows in results.items():
        walls, rss = [w for w, _ in rows], max(r for _, r in rows)
        print(f"| {name} | {statistics.median(walls):.2f} | {min(walls):.2f}–{max(walls):.2f} | "
              f"{statistics.median(walls) / base:.2f} | {rss:.0f} | {rss / data_mb:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
