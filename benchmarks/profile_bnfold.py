"""Where bnfold's time goes on one model: phase times, then cProfile's top functions.

Phases (each timed once, in this order, in one process): importing bnfold, `io.load_model`
(read + parse + checks; lazy, as `fold_file` loads), `api.fold_model`, and staging + committing
the output (`io.stage_model`).
Then the same work, `api.fold_file(src, dst, verify=False)` (what `bnfold MODEL --no-verify`
runs), under cProfile: the top N by tottime, then bnfold's own functions by cumulative time.

    python benchmarks/profile_bnfold.py MODEL.onnx [--top 15] [--out /tmp/bnfold-bench/profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io as text_io
import pathlib
import pstats
import shutil
import sys
import time


def phase_times(src: pathlib.Path, dst: pathlib.Path) -> dict[str, float]:
    times = {}
    start = time.perf_counter()
    from bnfold import api, io

    times["import bnfold"] = time.perf_counter() - start
    start = time.perf_counter()
    loaded = io.load_model(src, lazy=True)  # as fold_file loads
    times["load (io.load_model, lazy)"] = time.perf_counter() - start
    start = time.perf_counter()
    result = api.fold_model(loaded.model, base_dir=loaded.base_dir, spill=loaded.spill)
    times["fold (api.fold_model)"] = time.perf_counter() - start
    start = time.perf_counter()
    with io.stage_model(result.model, dst, source=loaded) as staged:
        staged.commit()
    times["save (io.stage_model + commit)"] = time.perf_counter() - start
    times["BN before -> after"] = f"{result.report.bn_before} -> {result.report.bn_after}"
    return times


def profile(src: pathlib.Path, dst: pathlib.Path, top: int) -> str:
    from bnfold import api

    profiler = cProfile.Profile()
    profiler.enable()
    api.fold_file(src, dst, verify=False)
    profiler.disable()
    out = text_io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    print(f"--- bnfold's own functions by cumulative time (top {top}) ---", file=out)
    stats.sort_stats("cumulative").print_stats(r"bnfold[/\\](?!.*site-packages)", top)
    return out.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=pathlib.Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/bnfold-bench/profile"))
    args = parser.parse_args(argv)
    work = args.out / args.model.stem
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for phase, value in phase_times(args.model, work / f"a_{args.model.name}").items():
        print(f"{phase}: {value:.3f} s" if isinstance(value, float) else f"{phase}: {value}")
    shutil.rmtree(work)
    work.mkdir(parents=True)
    print(profile(args.model, work / f"b_{args.model.name}", args.top))
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
