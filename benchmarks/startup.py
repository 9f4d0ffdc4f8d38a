"""Start-up as users meet it: whole processes, rounds interleaved, median wall time.

    python benchmarks/startup.py [--rounds 7]

Compares `bnfold --help`, `bnfold --version` with `python -c "import click"`, and folding *and
verifying* the tiny sample models/mlp_bn.onnx with `python -c "import onnxruntime, numpy,
google.protobuf"`; prints a markdown table with the ratios.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def commands(folder: pathlib.Path) -> dict[str, list[str]]:
    bnfold = [sys.executable, "-c", "import sys; sys.argv[0] = 'bnfold'; from bnfold.cli import main; main()"]
    model = folder / "tiny.onnx"
    shutil.copy(ROOT / "models" / "mlp_bn.onnx", model)
    return {
        "python -c 'import click'": [sys.executable, "-c", "import click"],
        "bnfold --help": [*bnfold, "--help"],
        "bnfold --version": [*bnfold, "--version"],
        "python -c 'import onnxruntime, numpy, google.protobuf'": [sys.executable, "-c", "import onnxruntime, numpy, google.protobuf"],
        "bnfold tiny.onnx -o OUT (fold and verify)": [*bnfold, str(model), "-o", str(folder / "out.onnx")],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bnfold-startup-") as folder:
        runs = commands(pathlib.Path(folder))
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, command in runs.items():
                started = time.perf_counter()
                subprocess.run(command, capture_output=True, check=True, cwd=ROOT)
                times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in times.items()}
    click, runtime = median["python -c 'import click'"], median["python -c 'import onnxruntime, numpy, google.protobuf'"]
    print("| process | median s | ratio |")
    print("|---|---:|---|")
    for name, seconds in median.items():
        base = click if "--help" in name or "--version" in name else runtime if "fold" in name else None
        ratio = f"{seconds / base:.1f}x the import line above" if base else ""
        print(f"| `{name}` | {seconds:.3f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
