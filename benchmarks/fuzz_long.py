"""Long profile of the property tests: thousands of random graphs through every invariant.

    nice python benchmarks/fuzz_long.py --examples 5000 [--unsafe-examples 1000] [--seed 1]
                                        [--quantized-examples 5000] [--only quantized]
                                        [--save-failures DIR]

The same graphs (tests/strategies.py) and the same checks (tests/test_property.py:
check_invariants, check_unsafe_kept) as the quick profile in the test suite, but with hypothesis's
generation phase only: no shrinking and no stop at the first failure, so every example is tried
and every failure counted. Prints the counts (examples, failures by first error line, what the
graphs held, what was folded and kept); failing models go to DIR as .onnx, their inputs as
.npz (for `bnfold verify ... --inputs`), and a .txt with the description and the error. Exit code 1 if any example failed.
The quantized plans run graph_cases(quantized=True) (layer weights through DequantizeLinear);
--only NAME runs the plans whose name contains NAME. --fold-file also runs each graph whose
inputs are all fed and fixed in shape through bnfold.fold_file (verification on inputs it makes
itself, rollback): a rollback, a failed verification or an exception counts as a failure.

For a shrunk, minimal failing example instead, run the quick profile with more examples:
`BNFOLD_PROPERTY_EXAMPLES=5000 python -m pytest tests/test_property.py -x`.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

import bnfold  # noqa: E402
import strategies  # noqa: E402
import test_property  # noqa: E402


class Tally:
    """Counts across one run: examples, failures (by first error line), graph and fold stats."""

    def __init__(self, save: pathlib.Path | None):
        self.counts: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.save = save

    def example(self, case: strategies.GraphCase, check) -> None:
        self.counts["examples"] += 1
        self.counts[f"dtype {case.dtype.name}"] += 1
        self.counts[f"opset {case.model.opset_import[0].version}"] += 1
        for node in case.model.graph.node:
            self.counts[f"op {node.op_type}"] += 1
        try:
            result = check(case)
        except Exception as err:  # noqa: BLE001 - every failure is counted, none stops the run
            self.failure(case, err)
            return
        report = result.report
        self.counts["BN"] += report.bn_before
        self.counts["BN folded"] += len(report.folded)
        self.counts["BN kept"] += len(report.kept)
        for fold in report.folded:
            self.counts[f"rule {fold.rule}"] += 1
            self.counts["BN folded into quantized weights"] += fold.quantized
            self.counts["int32 biases quantized again"] += fold.bias_rounding is not None
        for facts in case.quantized.values():
            where = "per tensor" if facts.axis is None else "per channel"
            self.counts[f"quantized {'fake' if facts.fake else 'stored'} {facts.integer} {where}{' low end' if facts.low_end else ''}"] += 1
        for kept in report.kept:
            if "quantiz" in kept.reason or "negated" in kept.reason:
                self.counts[f"kept {_reason_kind(kept.reason)}"] += 1

    def failure(self, case: strategies.GraphCase, err: Exception) -> None:
        self.counts["failures"] += 1
        line = (str(err).strip().splitlines() or [""])[0][:160]
        self.errors[f"{type(err).__name__}: {line}"] += 1
        if self.save is None:
            return
        self.save.mkdir(parents=True, exist_ok=True)
        stem = self.save / f"failure{self.counts['failures']:04d}"
        onnx.save(case.model, stem.with_suffix(".onnx"))
        np.savez(stem.with_suffix(".npz"), **case.feeds)
        text = f"{case.describe()}\n\n{''.join(traceback.format_exception(err))}"
        stem.with_suffix(".txt").write_text(text)


def _reason_kind(reason: str) -> str:
    """A quantization reason without its names and numbers, for counting."""
    for kind in ("cannot be negated", "would move by a step", "no per-channel scales", "quantized along axis",
                 "grouped along axis", "a BN before the layer", "activation QuantizeLinear", "read elsewhere too",
                 "other than as an int32 vector", "overflows int32", "leaves the float range"):
        if kind in reason:
            return kind
    return reason.split(":")[-1].strip()[:60]


def run(name: str, strategy, check, examples: int, seed_value: int, tally: Tally) -> float:
    @seed(seed_value)
    @settings(
        max_examples=examples,
        phases=[Phase.generate],
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def each(case):
        tally.example(case, check)

    started = time.perf_counter()
    each()
    return time.perf_counter() - started


def unsafe_check(case):
    result = test_property.check_invariants(case)
    test_property.check_unsafe_kept(case, result)
    return result


def through_file(check):
    """`check`, then the graph through fold_file: nothing rolled back, verification not failed.
    Graphs with inputs the case does not feed (overridable BN parameters) or a symbolic batch
    (the generator's Reshape targets fix it) are not: verification feeds inputs of its own."""

    def both(case):
        result = check(case)
        inputs = case.model.graph.input
        if any(i.name not in case.feeds or any(d.dim_param for d in i.type.tensor_type.shape.dim) for i in inputs):
            return result
        with tempfile.TemporaryDirectory() as folder:
            src = pathlib.Path(folder) / "model.onnx"
            onnx.save(case.model, src)
            folded = bnfold.fold_file(src)
        assert not folded.report.rolled_back, f"fold_file rolled back: {[k.reason for k in folded.report.rolled_back]}"
        assert folded.verification is None or folded.verification.passed, folded.verification.to_dict()  # "inconclusive" passes
        return result

    return both


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000, help="random graphs for the main property")
    parser.add_argument("--unsafe-examples", type=int, default=None, help="graphs ending in an unsafe BN (default examples/5)")
    parser.add_argument("--quantized-examples", type=int, default=None, help="graphs with quantized weights (default examples)")
    parser.add_argument("--only", default="", help="run only the plans whose name contains this")
    parser.add_argument("--fold-file", action="store_true", help="also fold each graph through fold_file (verify, roll back)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--save-failures", type=pathlib.Path, default=None, metavar="DIR")
    args = parser.parse_args(argv)
    unsafe = args.examples // 5 if args.unsafe_examples is None else args.unsafe_examples
    quantized = args.examples if args.quantized_examples is None else args.quantized_examples
    plans = [
        ("all invariants", strategies.graph_cases(), test_property.check_invariants, args.examples),
        ("unsafe BN kept", strategies.graph_cases(unsafe=True), unsafe_check, unsafe),
        ("quantized all invariants", strategies.graph_cases(quantized=True), test_property.check_invariants, quantized),
        ("quantized unsafe BN kept", strategies.graph_cases(unsafe=True, quantized=True), unsafe_check, quantized // 5),
    ]
    worst = 0
    for name, strategy, check, examples in plans:
        if args.only not in name:
            continue
        check = through_file(check) if args.fold_file else check
        test_property.KNOWN_BUGS_SEEN.clear()
        tally = Tally(args.save_failures / name.replace(" ", "_") if args.save_failures else None)
        seconds = run(name, strategy, check, examples, args.seed, tally)
        report(name, tally, seconds)
        worst = max(worst, tally.counts["failures"])
    return 1 if worst else 0


def report(name: str, tally: Tally, seconds: float) -> None:
    counts = tally.counts
    print(f"\n== {name}: {counts['examples']} examples, {counts['failures']} failures, {seconds:.0f} s")
    for error, count in tally.errors.most_common():
        print(f"   {count:6d}  {error}")
    for bug, count in sorted(test_property.KNOWN_BUGS_SEEN.items()):
        print(f"   known bnfold bug tolerated (an xfail test pins it) {count} times: {bug}")
    groups = ("dtype", "opset", "rule", "op", "quantized", "kept")
    print("   BN: {} total, {} folded ({} into quantized weights, {} int32 biases quantized again), {} kept".format(
        counts["BN"], counts["BN folded"], counts["BN folded into quantized weights"], counts["int32 biases quantized again"], counts["BN kept"]))
    for group in groups:
        items = sorted((k.split(" ", 1)[1], v) for k, v in counts.items() if k.startswith(group + " "))
        print(f"   {group}: " + ", ".join(f"{k} {v}" for k, v in items))


if __name__ == "__main__":
    sys.exit(main())
