"""Before/after of bnfold's write path on one model: whole-process wall time of bnfold from two
source trees, `cp` and `cp`+`sync`, taking turns round by round (so machine load hits all alike).

    python benchmarks/ab_external.py --before /tmp/bnfold-before --after . [--rounds 7] [--prefault]

`--before`/`--after` are folders holding a `bnfold` package (e.g. `git archive REV bnfold | tar
-x -C DIR`). `--prefault` touches and frees 3 GB before every run: on this VM memory that was
freed a while ago seems to be handed back to the host (virtio-balloon free page reporting), and
re-faulting the 2.3 GB of page cache a copy needs then costs up to seconds, which makes single
runs bimodal. Prints each round and the medians; outputs go to `--out` and are removed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

MAIN = "import sys; from bnfold.cli import main; sys.exit(main())"


def commands(src: pathlib.Path, out: pathlib.Path, before: str, after: str) -> dict[str, list[str]]:
    files = [str(src), f"{src}.data"]
    bnfold = [sys.executable, "-P", "-c", MAIN, str(src), "-o", str(out / src.name), "--no-verify"]
    return {
        "cp": ["cp", *files, str(out)],
        "cp+fsync": ["sh", "-c", 'cp -- "$@" "$0" && sync "$0"/*', str(out), *files],
        "bnfold before": ["env", f"PYTHONPATH={before}", *bnfold],
        "bnfold after": ["env", f"PYTHONPATH={after}", *bnfold],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=pathlib.Path, default=pathlib.Path("/tmp/bnfold-bench/models/resnet50_2gb_external.onnx"))
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prefault", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/bnfold-bench/out/ab"))
    args = parser.parse_args()
    tools = commands(args.model, args.out, os.path.abspath(args.before), os.path.abspath(args.after))
    times: dict[str, list[float]] = {name: [] for name in tools}
    for round_no in range(args.rounds):
        for name, cmd in tools.items():
            args.out.mkdir(parents=True, exist_ok=True)
            if args.prefault:
                subprocess.run([sys.executable, "-c", "b = b'1' * (3 << 30)"], check=True)
            started = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - started)
            shutil.rmtree(args.out)
        row = "  ".join(f"{name} {t[-1]:.2f}" for name, t in times.items())
        print(f"round {round_no}: {row}  (load {os.getloadavg()[0]:.2f})", flush=True)
    for name, t in times.items():
        print(f"{name:14s} median {statistics.median(t):.2f} s  min {min(t):.2f}  max {max(t):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
