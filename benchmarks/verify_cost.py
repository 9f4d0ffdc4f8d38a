"""What verification costs: `bnfold MODEL -o OUT` as whole processes, with verification (graph
outputs, every fold site, the float64 shadow where a bound fails) and with `--no-verify`, on
the models verification has to see inside; optionally the same from an older source tree, rounds
interleaved, so a change in verification cost shows as a ratio measured in one run.

    python benchmarks/verify_cost.py [--baseline /path/to/older/checkout] [--repeats 2]

Models (written once to /tmp/bnfold-bench/verify): the 20,000-block near-identity chain (float32
rounding accumulates: tests/corpus.py), the onnx package's light ResNet-50 graph with random
weights (IR 3, weights listed as inputs), a 113 MB chain (48 blocks x 256 channels), and the
ResNet-152 and 2,000/20,000-block chains of make_models.py. Prints a markdown table: wall time, peak RSS (GNU time), verification seconds,
verdict and the number of outputs and sites compared, from each run's --json report.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = pathlib.Path("/tmp/bnfold-bench/verify")
MODELS = ("chain20k_identity", "zoo_resnet50", "resnet152", "chain113mb", "chain2k", "chain20k")


def make_models(names) -> dict[str, pathlib.Path]:
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]
    import numpy as np
    import onnx

    import corpus
    import make_models as bench

    OUT.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        path = paths[name] = OUT / f"{name}.onnx"
        if path.exists():
            continue
        started = time.perf_counter()
        if name == "chain20k_identity":
            onnx.save(corpus.near_identity_chain(np.random.default_rng(0), 20_000), path)
        elif name == "zoo_resnet50":
            onnx.save(corpus.zoo_model("resnet50", np.random.default_rng(0)), path)
        elif name == "chain113mb":  # 48 blocks x 256 channels: 113 MB of weights, embedded
            bench.make_chain(name, 48, OUT, channels=256)
        elif name in bench.CHAINS:
            bench.make_chain(name, bench.CHAINS[name], OUT)
        else:
            bench.export_torch_model(name, OUT)
        print(f"made {name} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return paths


def run(tree: pathlib.Path, model: pathlib.Path, verify: bool) -> dict:
    """One whole `bnfold` process from source tree `tree`: wall, peak RSS, and its report."""
    with tempfile.TemporaryDirectory(prefix="bnfold-verify-cost-") as folder:
        out = pathlib.Path(folder) / "out.onnx"
        args = [str(model), "-o", str(out), "--json", *([] if verify else ["--no-verify"])]
        code = "import sys; sys.argv[0] = 'bnfold'; from bnfold.cli import main; main()"
        command = ["/usr/bin/time", "-f", "%M", sys.executable, "-P", "-c", code, *args]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})
        wall = time.perf_counter() - started
    rss_kb = int(done.stderr.strip().splitlines()[-1])
    report = json.loads(done.stdout) if done.returncode in (0, 1) and done.stdout.strip() else {}
    verification = report.get("verification") or {}
    return {
        "exit": done.returncode, "wall": wall, "rss_mb": rss_kb / 1024,
        "verify_s": verification.get("seconds"), "status": verification.get("status", verification.get("passed")),
        "outputs": verification.get("outputs_compared"), "sites": verification.get("sites_compared"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=pathlib.Path, help="an older checkout to measure beside this one")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    paths = make_models([m.strip() for m in args.models.split(",") if m.strip()])
    trees = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    rows = []
    for name, path in paths.items():
        for _ in range(args.repeats):
            for label, tree in trees.items():
                for verify in (True, False):
                    result = run(tree, path, verify)
                    rows.append({"model": name, "tree": label, "verify": verify, **result})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| model | tree | verification | exit | wall s | peak RSS MB | verify s | verdict | outputs + sites |")
    print("|---|---|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        verify_s = f"{r['verify_s']:.2f}" if isinstance(r["verify_s"], (int, float)) else "–"
        compared = f"{r['outputs']} + {r['sites']}" if r["outputs"] is not None else "–"
        print(f"| {r['model']} | {r['tree']} | {'on' if r['verify'] else 'off'} | {r['exit']} | {r['wall']:.2f} | "
              f"{r['rss_mb']:.0f} | {verify_s} | {r['status'] if r['verify'] else '–'} | {compared if r['verify'] else '–'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
