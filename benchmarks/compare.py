"""Side by side: bnfold against `cp`, onnx load+save and the peer tools, on the generated models.

Every run is one fresh process (so peak RSS is that tool's own), timed from start to exit, its
peak RSS its ru_maxrss as GNU time reports it (the process and the children it waited for).
After the first run of each tool the output is checked, untimed, in another process:
BatchNormalization left (subgraphs included), graph input/output names kept, and the largest
error against the unfused original, both run in onnxruntime with graph optimisations DISABLED
on the same seeded inputs (max |Δ| and max |Δ| / max |reference|).

    python benchmarks/compare.py [--models resnet50,...] [--tools bnfold,cp,...] [--repeats 3]
                                 [--timeout 300] [--results benchmarks/results.json]
    python benchmarks/compare.py --render benchmarks/results.json      # tables only

Prints markdown tables and writes the runs to a JSON file (one per invocation; merge is by model,
so several invocations can fill one file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
BIN = pathlib.Path(sys.executable).parent
DEFAULT_MODELS = pathlib.Path("/tmp/bnfold-bench/models")
DEFAULT_WORK = pathlib.Path("/tmp/bnfold-bench/out")
TOOLS = ("onnx", "cp", "cp+fsync", "bnfold", "ort-basic", "onnxoptimizer", "onnxscript-bn", "onnxscript-opt", "onnxslim")
MB = 1e6


# --------------------------------------------------------------------------- running one tool


def snapshot_bnfold(work: pathlib.Path) -> tuple[pathlib.Path, str]:
    """Copy the bnfold package as it is now into `work`, named by a hash of its sources.

    bnfold is edited while benchmarks run; every bnfold run of one invocation uses this one
    snapshot (through PYTHONPATH), and the results name it.
    """
    import hashlib

    import bnfold

    package = pathlib.Path(bnfold.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    tag = digest.hexdigest()[:12]
    root = work / "bnfold-src" / tag
    if not root.exists():
        shutil.copytree(package, root / "bnfold", ignore=shutil.ignore_patterns("__pycache__"))
    return root, tag


def git_head() -> str:
    try:
        return subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


# What the `bnfold` script runs; started with -P so that the current folder cannot shadow the snapshot.
BNFOLD_MAIN = "import sys; from bnfold.cli import main; sys.exit(main())"


def tool_command(tool: str, src: pathlib.Path, files: list[pathlib.Path], dst_dir: pathlib.Path) -> list[str]:
    dst = dst_dir / src.name
    if tool == "cp":
        return ["cp", *map(str, files), str(dst_dir)]
    if tool == "cp+fsync":  # bnfold fsyncs what it writes; this is cp held to the same durability
        return ["sh", "-c", 'cp -- "$@" "$0" && sync "$0"/*', str(dst_dir), *map(str, files)]
    if tool == "bnfold":
        return [sys.executable, "-P", "-c", BNFOLD_MAIN, str(src), "-o", str(dst), "--no-verify"]
    if tool == "onnxslim":
        return [str(BIN / "onnxslim"), str(src), str(dst)]
    return [sys.executable, str(HERE / "peers.py"), tool, str(src), str(dst)]


TIME = "/usr/bin/time"


def measure(cmd: list[str], timeout: float, log_path: pathlib.Path, env=None) -> dict:
    """Wall time and peak RSS of one process (and its waited-for children), killed at `timeout`.

    Peak RSS comes from GNU time (`%M`, its child's ru_maxrss), not from this process's own
    wait4: Linux carries the RSS high-water mark of a forked child across exec, so a child forked
    from this (larger) Python process would report at least this process's size.
    """
    timed_out = threading.Event()
    rss_file = log_path.with_suffix(".rss")
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen([TIME, "-f", "%M", "-o", str(rss_file), *cmd], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)

        def kill():
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        returncode = proc.wait()
        wall = time.perf_counter() - started
        timer.cancel()
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    status_text = "timeout" if timed_out.is_set() else "ok" if returncode == 0 else f"error (exit {returncode})"
    rss_lines = rss_file.read_text().split() if rss_file.exists() else []
    peak_kib = int(rss_lines[-1]) if rss_lines and rss_lines[-1].isdigit() else 0
    return {
        "wall_s": wall,
        "peak_rss_mb": peak_kib * 1024 / MB,  # GNU time reports KiB
        "rc": returncode,
        "status": status_text,
        "log_tail": tail if status_text != "ok" else [],
    }


def dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


# --------------------------------------------------------------------------- checking an output
# Runs in its own process (`compare.py --evaluate`), so the timed runs never share its memory.


def graph_io(model) -> tuple[list[str], list[str]]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits], [o.name for o in model.graph.output]


def count_bn(graph) -> int:
    import onnx

    total = 0
    for node in graph.node:
        total += node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += count_bn(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                total += sum(count_bn(g) for g in attr.graphs)
    return total


def seeded_inputs(session, batch: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(1234)
    types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in inp.shape]
        feeds[inp.name] = rng.standard_normal(shape).astype(types[inp.type])
    return feeds


def run_unoptimised(path: pathlib.Path, batch: int, feeds=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if feeds is None:
        feeds = seeded_inputs(session, batch)
    else:  # the candidate may have renamed its inputs: feed by position
        feeds = dict(zip([i.name for i in session.get_inputs()], feeds.values()))
    return feeds, session.run(None, feeds)


def evaluate(src: pathlib.Path, dst: pathlib.Path, batch: int, ref_path: pathlib.Path) -> dict:
    import numpy as np
    import onnx

    original = onnx.load(src, load_external_data=False)
    candidate = onnx.load(dst, load_external_data=False)
    result = {"bn_left": count_bn(candidate.graph), "io_kept": graph_io(original) == graph_io(candidate)}
    if ref_path.exists():
        stored = np.load(ref_path)
        feeds = {k[3:]: stored[k] for k in stored.files if k.startswith("in:")}
        reference = [stored[f"out:{i}"] for i in range(len(original.graph.output))]
    else:
        feeds, reference = run_unoptimised(src, batch)
        np.savez(ref_path, **{f"in:{k}": v for k, v in feeds.items()}, **{f"out:{i}": v for i, v in enumerate(reference)})
    _, outputs = run_unoptimised(dst, batch, feeds)
    abs_err = max(float(np.max(np.abs(o.astype(np.float64) - r))) for o, r in zip(outputs, reference))
    scale = max(float(np.max(np.abs(r))) for r in reference)
    result.update(max_abs_err=abs_err, max_rel_err=abs_err / scale if scale else abs_err)
    return result


def evaluate_in_subprocess(src, dst, batch, ref_path, timeout) -> dict:
    cmd = [sys.executable, __file__, "--evaluate", str(src), str(dst), str(batch), str(ref_path)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"eval_error": f"evaluation timed out after {timeout} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"eval_error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads(done.stdout)


# --------------------------------------------------------------------------- the driver


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 2**30, 1), "python": platform.python_version(),
            "kernel": platform.release(), "versions": tool_versions()}


def tool_versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("bnfold", "onnx", "onnxruntime", "onnxoptimizer", "onnxscript", "onnx-ir", "onnxslim", "torch", "numpy", "protobuf"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def warm_cache(files) -> None:
    for f in files:
        with open(f, "rb") as handle:
            while handle.read(1 << 24):
                pass


def bench_model(name: str, info: dict, tools, repeats: int, timeout: float, work: pathlib.Path, env) -> dict:
    src = pathlib.Path(info["path"])
    files = [src.parent / f for f in info["files"]]
    warm_cache(files)
    ref_path = work / "ref" / f"{name}.npz"
    ref_path.parent.mkdir(parents=True, exist_ok=True)
    runs = {tool: [] for tool in tools}
    evals = {}
    given_up: set[str] = set()  # a tool that timed out once is not run again for this model
    # Rounds of all tools in turn, so a change in machine load hits every tool alike.
    for round_no in range(repeats):
        for tool in tools:
            if tool in given_up:
                continue
            dst_dir = work / tool.replace("+", "_") / name
            shutil.rmtree(dst_dir, ignore_errors=True)
            dst_dir.mkdir(parents=True)
            load1 = os.getloadavg()[0]
            run = measure(tool_command(tool, src, files, dst_dir), timeout, work / "last.log", env)
            run["load1"] = load1
            run["out_mb"] = dir_bytes(dst_dir) / MB
            runs[tool].append(run)
            _progress(name, tool, round_no, run)
            if round_no == 0 and run["status"] == "ok" and tool not in ("cp", "cp+fsync"):
                evals[tool] = evaluate_in_subprocess(src, dst_dir / src.name, info["input_shape"][0], ref_path, 900)
            shutil.rmtree(dst_dir, ignore_errors=True)
            if run["status"] == "timeout":
                given_up.add(tool)
    return {"runs": runs, "evals": evals}


def _progress(name, tool, round_no, run) -> None:
    print(f"  {name} {tool} #{round_no}: {run['status']} {run['wall_s']:.2f} s {run['peak_rss_mb']:.0f} MB "
          f"(load {run['load1']:.2f})", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=pathlib.Path, default=DEFAULT_MODELS)
    parser.add_argument("--work", type=pathlib.Path, default=DEFAULT_WORK, help="scratch folder for outputs")
    parser.add_argument("--models", help="comma-separated (default: all in models.json)")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--results", type=pathlib.Path, default=HERE / "results.json")
    parser.add_argument("--render", type=pathlib.Path, help="only print the tables of this results file")
    parser.add_argument("--evaluate", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.evaluate:
        src, dst, batch, ref = args.evaluate
        print(json.dumps(evaluate(pathlib.Path(src), pathlib.Path(dst), int(batch), pathlib.Path(ref))))
        return 0
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    index = json.loads((args.models_dir / "models.json").read_text())
    names = args.models.split(",") if args.models else list(index)
    tools = args.tools.split(",")
    results = json.loads(args.results.read_text()) if args.results.exists() else {"models": {}}
    results["machine"] = machine()
    snapshot, tag = snapshot_bnfold(args.work)
    env = {**os.environ, "PYTHONPATH": str(snapshot)}
    print(f"bnfold sources {tag} (git HEAD {git_head()} plus the working tree), copied to {snapshot}", file=sys.stderr)
    for name in names:
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        bench = bench_model(name, index[name], tools, args.repeats, args.timeout, args.work, env)
        results["models"][name] = {"info": index[name], "started": started, "repeats": args.repeats,
                                   "timeout_s": args.timeout, "bnfold_sources": tag, "git_head": git_head(), **bench}
        args.results.write_text(json.dumps(results, indent=1))
    print(render(results))
    return 0


# --------------------------------------------------------------------------- tables


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return {"status": runs[0]["status"] if runs else "not run", "log_tail": runs[0].get("log_tail", []) if runs else []}
    return {
        "status": "ok",
        "wall_s": statistics.median(r["wall_s"] for r in ok),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
        "out_mb": ok[0]["out_mb"],
        "n": len(ok),
        "load1": statistics.mean(r["load1"] for r in runs),
    }


def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def _err(ev: dict, key: str) -> str:
    if "eval_error" in ev:
        return "n/a"
    return _fmt(ev.get(key), ".2e")


def render(results: dict) -> str:
    out = [render_time_matrix(results), "", render_rss_matrix(results), "", render_detail(results)]
    return "\n".join(out)


def _model_order(results):
    return list(results["models"])


def _tools_in(results):
    seen = []
    for m in results["models"].values():
        seen += [t for t in m["runs"] if t not in seen]
    return seen


def _render_matrix(results, title: str, columns: list[str], row_start, cell) -> str:
    """One row per model, one column per tool: `row_start(model)` gives the cells under
    `columns`, `cell(summary, model)` a tool's cell where it ran ("timeout"/"error" elsewhere)."""
    tools = _tools_in(results)
    lines = [title, "", f"| model | {' | '.join(columns)} | " + " | ".join(tools) + " |",
             "|---|" + "---:|" * (len(columns) + len(tools))]
    for name in _model_order(results):
        m = results["models"][name]
        cells = []
        for tool in tools:
            s = summarise(m["runs"].get(tool, []))
            cells.append(cell(s, m) if s["status"] == "ok" else s["status"].split(" ")[0])
        lines.append(f"| {name} | " + " | ".join(row_start(m)) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_time_matrix(results) -> str:
    return _render_matrix(
        results, "Wall time, whole process, seconds (median of the runs; `timeout`/`error` as reported)",
        ["MB", "BN"], lambda m: [f"{m['info']['bytes'] / MB:.1f}", str(m["info"]["bn"])],
        lambda s, m: f"{s['wall_s']:.2f}",
    )


def render_rss_matrix(results) -> str:
    return _render_matrix(
        results, "Peak RSS, MB (max over the runs), and as a multiple of the model's size on disk",
        ["MB"], lambda m: [f"{m['info']['bytes'] / MB:.1f}"],
        lambda s, m: f"{s['peak_rss_mb']:.0f} ({s['peak_rss_mb'] / (m['info']['bytes'] / MB):.2f}×)",
    )


def render_detail(results) -> str:
    lines = ["Per model and tool: output size, BN left, error against the unfused original "
             "(onnxruntime, optimisations disabled, seeded inputs), graph I/O names kept", "",
             "| model | tool | wall s | peak RSS MB | out MB | BN left | max abs err | max rel err | I/O kept | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|:---:|---|"]
    for name in _model_order(results):
        m = results["models"][name]
        for tool, runs in m["runs"].items():
            s = summarise(runs)
            ev = m["evals"].get(tool, {})
            if s["status"] != "ok":
                note = s["status"] + (": " + " ".join(s["log_tail"])[-160:] if s.get("log_tail") else "")
                lines.append(f"| {name} | {tool} | – | – | – | – | – | – | – | {note.replace('|', '/')} |")
                continue
            io_kept = "" if tool.startswith("cp") else ("yes" if ev.get("io_kept") else "no" if "io_kept" in ev else "?")
            bn_left = "" if tool.startswith("cp") else _fmt(ev.get("bn_left"), "d", "?")
            note = ev.get("eval_error", "")[:160].replace("|", "/")
            lines.append(
                f"| {name} | {tool} | {s['wall_s']:.2f} | {s['peak_rss_mb']:.0f} | {s['out_mb']:.1f} | {bn_left} | "
                f"{'' if tool.startswith('cp') else _err(ev, 'max_abs_err')} | {'' if tool.startswith('cp') else _err(ev, 'max_rel_err')} | "
                f"{io_kept} | {note} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
