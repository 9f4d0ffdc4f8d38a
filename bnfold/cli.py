"""Command line: parse, call the API, render; the report decides the exit code.

Human text goes to stderr, `--json` data to stdout. No graph logic here.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import click

from bnfold import __version__, batch
from bnfold.errors import BnfoldError, UsageError, VerificationFailed, describe, exit_code_of, printable
from bnfold.progress import Progress

EXIT_CODES = """\b
Exit codes:
  0    success (folded and verified; check: nothing left to fold; verify: outputs and sites match)
  1    a check or verification failed (verify, --strict: also when inconclusive)
  2    bad input or usage (missing file, not ONNX, broken external data, bad option)
  130  interrupted"""


class DefaultCommandGroup(click.Group):
    """`bnfold MODEL.onnx` means `bnfold fold MODEL.onnx`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["fold", *args]
        return super().parse_args(ctx, args)


def parse_dims(values) -> dict[str, int]:
    dims = {}
    for value in values:
        name, sep, size = value.partition("=")
        if not sep or not name or not size.isdigit() or int(size) < 1:
            raise UsageError(f"--dim expects NAME=SIZE with a positive size, got {value!r}")
        dims[name] = int(size)
    return dims


def parse_rules(value: str | None):
    return None if value is None else [r.strip() for r in value.split(",") if r.strip()]


def verify_options(f):
    """Options shared by `fold` and `verify`."""
    options = [
        click.option("--dim", "dims", multiple=True, metavar="NAME=SIZE", help="Size of a dynamic input dimension (default: 2 for the batch axis, 64 for spatial axes, 16 otherwise)."),
        click.option("--inputs", type=click.Path(dir_okay=False), help="Inputs from an .npz file instead of seeded random data."),
        click.option("--rtol", type=float, help="Relative tolerance (default per dtype)."),
        click.option("--atol", type=float, help="Absolute tolerance (default per dtype)."),
        click.option("--provider", "providers", multiple=True, help="onnxruntime execution provider(s) (default: CPU, plus CUDA when available)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


CHECK_MODEL = click.option(
    "--check-model", is_flag=True,
    help="Refuse (exit 2) a model onnx.checker finds any fault in; by default a fault that onnxruntime tolerates is a warning.",
)
FREEZE_INPUTS = click.option(
    "--freeze-initializer-inputs", "freeze_inputs", is_flag=True,
    help="Read initializers also listed as graph inputs (IR >= 4: defaults a caller may override) as constants; "
    "those the fold changes leave the input list. IR < 4 models always read them as constants.",
)

KEEP_NOOPS = click.option(
    "--keep-noops", is_flag=True,
    help="Keep nodes that compute nothing (Identity, inference Dropout, Cast to the same type, ...); "
    "by default they are removed first, so that BN behind them fold.",
)


def run_guarded(action):
    """Run a command body; BnfoldError -> one line on stderr and its exit code, never a traceback.

    Python warnings (numpy overflow in a cast that is then refused, onnx's notes on odd external
    data keys) are silenced: the outcome is already reported in one line. BNFOLD_DEBUG=1 shows
    them, and the traceback of an internal error.
    """
    with warnings.catch_warnings():
        if not os.environ.get("BNFOLD_DEBUG"):
            warnings.simplefilter("ignore")
        return _run_reporting_errors(action)


def _run_reporting_errors(action):
    try:
        return action()
    except VerificationFailed as err:
        if err.verification is not None:
            click.echo(render_verification(err.verification), err=True)
        click.echo(f"bnfold: verification failed: {printable(err)}", err=True)
        sys.exit(exit_code_of(err))
    except (BnfoldError, MemoryError) as err:  # out of memory: a size in the model asks too much
        click.echo(f"bnfold: error: {describe(err)}", err=True)
        sys.exit(exit_code_of(err))
    except KeyboardInterrupt as err:
        click.echo("bnfold: interrupted", err=True)
        sys.exit(exit_code_of(err))
    except Exception as err:  # a bug of ours: still one line, unless the user asks for the trace
        if os.environ.get("BNFOLD_DEBUG"):
            raise
        click.echo(f"bnfold: {describe(err)} (set BNFOLD_DEBUG=1 for the traceback)", err=True)
        sys.exit(exit_code_of(err))


@click.group(cls=DefaultCommandGroup, epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="bnfold")
def main():
    """Fold BatchNormalization out of ONNX models and verify the result with onnxruntime.

    `bnfold MODEL.onnx` folds MODEL.onnx, verifies it and writes MODEL.folded.onnx.
    """


@main.command("fold", epilog=EXIT_CODES)
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), help="Output path (default: MODEL.folded.onnx), or - for stdout; one MODEL only.")
@click.option("--in-place", is_flag=True, help="Overwrite MODEL (atomically) instead of writing a new file.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime comparison.")
@click.option("--strict", is_flag=True, help="Fail (exit 1) when verification fails, instead of rolling back the folds responsible.")
@click.option("--rules", help="Comma-separated rule names to apply (default: all).")
@click.option(
    "--standalone", type=click.Choice(["keep", "affine"]), default="keep", show_default=True,
    help="A BN no rule can fold: keep it, or replace it by Mul + Add (for runtimes without BatchNormalization).",
)
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Models folded in parallel processes (several MODELs).")
@click.option("--json", "as_json", is_flag=True, help="Print the machine-readable report on stdout.")
@FREEZE_INPUTS
@KEEP_NOOPS
@CHECK_MODEL
@verify_options
def fold_command(
    models, output, in_place, no_verify, strict, rules, standalone, jobs, as_json, freeze_inputs, keep_noops,
    check_model, dims, inputs, rtol, atol, providers,
):
    """Fold, verify and write MODEL.folded.onnx (or -o OUTPUT).

    Several MODELs, or a directory (its .onnx files), are folded one by one (or -j N at a
    time); a bad model does not stop the others, and the exit code is the worst of them.
    """

    def action():
        options = dict(
            verify=not no_verify, in_place=in_place, strict=strict, rules=parse_rules(rules), standalone=standalone,
            inputs=inputs, dims=parse_dims(dims), providers=list(providers) or None, rtol=rtol, atol=atol,
            freeze_initializer_inputs=freeze_inputs, check_model=check_model, remove_noops=not keep_noops,
        )
        if output == "-" and as_json:
            raise UsageError("--json prints the report on stdout, where -o - writes the model; drop one of them")
        if len(models) == 1 and not os.path.isdir(models[0]):
            fold_single(models[0], output, options, as_json)
        elif output is not None:
            what = f"{models[0]} is a directory" if len(models) == 1 else "several are written next to their inputs"
            raise UsageError(f"-o/--output takes a single model file; {what}")
        else:
            fold_batch(models, options, jobs, as_json)

    run_guarded(action)


def fold_single(model, output, options: dict, as_json: bool) -> None:
    with Progress(enabled=not as_json) as progress:
        from bnfold import api

        result = api.fold_file(model, output, on_phase=lambda text: progress.update(f"{model}: {text}"), **options)
    click.echo(render_fold(model, result, verified=options["verify"], standalone=options["standalone"]), err=True)
    if as_json:
        click.echo(json.dumps({"input": str(model), **result.to_dict()}, indent=2))


def fold_batch(models, options: dict, jobs: int, as_json: bool) -> None:
    paths = batch.expand_models(models)
    with Progress(enabled=not as_json) as progress:
        outcomes = batch.fold_files(
            paths, options, jobs,
            on_done=lambda outcome, count: progress.update(f"{count}/{len(paths)} models done, last {outcome.path}"),
        )
    for outcome in outcomes:
        click.echo(render_outcome(outcome, options["verify"], options["standalone"]), err=True)
    failed = [o for o in outcomes if o.exit_code]
    already = [o for o in outcomes if o.result is not None and o.result.not_written]
    written = len(outcomes) - len(failed) - len(already)
    counts = f"{written} written" + (f", {len(already)} already folded" if already else "")
    click.echo(f"bnfold: {len(outcomes)} models, {counts}, {len(failed)} failed", err=True)
    if as_json:
        click.echo(json.dumps([o.to_dict() for o in outcomes], indent=2))
    sys.exit(batch.batch_exit_code(outcomes))


def render_outcome(outcome, verified: bool, standalone: str = "keep") -> str:
    if outcome.result is not None:
        return render_fold(outcome.path, outcome.result, verified, standalone)
    lines = [render_verification(outcome.verification)] if outcome.verification is not None else []
    what = "verification failed" if outcome.exit_code == 1 else "error"
    lines.append(f"bnfold: {printable(outcome.path)}: {what}: {outcome.error}")
    return "\n".join(lines)


@main.command("check", epilog=EXIT_CODES)
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option("--rules", help="Comma-separated rule names to consider (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the machine-readable report on stdout (a list for several models).")
@FREEZE_INPUTS
@KEEP_NOOPS
@CHECK_MODEL
def check_command(models, rules, as_json, freeze_inputs, keep_noops, check_model):
    """Exit 1 if a MODEL still carries BatchNormalization that bnfold could fold (a dry run:
    nothing is written). Several MODELs, or a directory (its .onnx files), are checked one by
    one; a bad model does not stop the others, and the exit code is the worst of them."""

    def action():
        options = dict(rules=parse_rules(rules), freeze_initializer_inputs=freeze_inputs, check_model=check_model,
                       remove_noops=not keep_noops)
        if len(models) == 1 and not os.path.isdir(models[0]):
            code, data = check_one(models[0], options)  # a bad model: one line, exit 2, as for fold
        else:
            outcomes = [check_one_guarded(path, options) for path in batch.expand_models(models)]
            code, data = max(c for c, _ in outcomes), [d for _, d in outcomes]
        if as_json:
            click.echo(json.dumps(data, indent=2))
        sys.exit(code)

    run_guarded(action)


def check_one(model, options: dict) -> tuple[int, dict]:
    """Check one model, report on stderr: (exit code, its JSON report)."""
    from bnfold import api

    report = api.check(model, **options)
    for line in render_load_notes(model, report):
        click.echo(line, err=True)
    for folded in report.folded:
        weight = ", into its quantized weight" if folded.quantized else ""
        click.echo(f"foldable: {printable(folded.graph + folded.bn)} into {printable(folded.into)} ({folded.rule}{weight})", err=True)
    for kept in report.kept:
        click.echo(f"not foldable: {printable(kept.graph + kept.bn)}: {printable(kept.reason)}", err=True)
    click.echo(f"{printable(model)}: {report.bn_before} BatchNormalization, {len(report.folded)} foldable", err=True)
    return (1 if report.folded else 0), {"input": str(model), **report.to_check_dict()}


def check_one_guarded(model, options: dict) -> tuple[int, dict]:
    """check_one for one of several models: its bad input is one line and its exit code."""
    try:
        return check_one(model, options)
    except (BnfoldError, MemoryError) as err:
        click.echo(f"bnfold: {printable(model)}: error: {describe(err)}", err=True)
        return exit_code_of(err), {"input": str(model), "exit_code": exit_code_of(err), "error": describe(err)}


@main.command("verify", epilog=EXIT_CODES)
@click.argument("reference", type=click.Path(dir_okay=True))
@click.argument("candidate", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print the comparison on stdout.")
@click.option(
    "--outputs-only", is_flag=True,
    help="Compare the graph outputs only, not the fold sites CANDIDATE records (or the values both models name alike).",
)
@CHECK_MODEL
@verify_options
def verify_command(reference, candidate, as_json, outputs_only, check_model, dims, inputs, rtol, atol, providers):
    """Exit 1 if CANDIDATE differs from REFERENCE beyond tolerance, at a graph output or at a
    fold site, or if nothing informative could be compared (inconclusive)."""

    def action():
        from bnfold import io
        from bnfold.verify import verify

        for path in (reference, candidate):
            loaded = io.load_model(path, check_model=check_model)  # bad input -> one clear line, exit 2
            for warning in loaded.warnings:
                click.echo(f"bnfold: warning: {printable(path)}: {printable(warning)}", err=True)
        result = verify(
            reference, candidate, inputs=inputs, dims=parse_dims(dims), outputs_only=outputs_only,
            providers=list(providers) or None, rtol=rtol, atol=atol,
        )
        click.echo(render_verification(result), err=True)
        if as_json:
            click.echo(json.dumps(result.to_dict(), indent=2))
        sys.exit(0 if result.status == "passed" else 1)

    run_guarded(action)


def shown_path(path) -> str:
    """A path under the current folder as a relative one (what the user typed, usually), any
    other as it is; the JSON report keeps it absolute."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith(os.pardir) else relative


def render_load_notes(model, report) -> list[str]:
    """One line per tolerated checker finding, and one for initializer inputs read as constants."""
    lines = [f"bnfold: warning: {printable(model)}: {printable(warning)}" for warning in report.warnings]
    if report.constant_inputs:
        count = len(report.constant_inputs)
        line = f"bnfold: {printable(model)}: {report.constant_inputs_reason}: {count} initializers listed as graph inputs read as constants"
        if report.unlisted_inputs:
            line += f"; no longer inputs (the fold changed them): {printable(', '.join(report.unlisted_inputs))}"
        lines.append(line)
    return lines


def render_fold(model, result, verified: bool, standalone: str = "keep") -> str:
    report = result.report
    if result.not_written:
        return "\n".join([*render_load_notes(model, report), f"bnfold: {printable(model)}: {result.not_written}; nothing written"])
    written = "<stdout>" if str(result.path) == "-" else printable(shown_path(result.path))
    lines = [*render_load_notes(model, report), f"bnfold: {printable(model)} -> {written}"]
    rules = ", ".join(f"{name} {count}" for name, count in report.rule_counts().items())
    lines.append(f"  BatchNormalization: {report.bn_before} -> {report.bn_after}" + (f" ({rules})" if rules else ""))
    for kept in report.kept:
        lines.append(f"  kept {printable(kept.graph + kept.bn)}: {printable(kept.reason)}")
    if report.kept and standalone == "keep":
        lines.append("  --standalone affine replaces a kept BN by Mul + Add where its rank and dtype are known")
    lines += render_affine(report)
    lines += render_quantized(report)
    if report.noops_removed:
        counts = ", ".join(f"{op} {n}" for op, n in report.noops_removed.items())
        lines.append(f"  no-op nodes removed: {sum(report.noops_removed.values())} ({counts})")
    lines += render_rolled_back(report)
    lines += render_readiness(report)
    if result.verification is not None:
        lines.append(render_verification(result.verification, indent="  "))
    elif verified:
        lines.append("  verification: skipped (nothing was folded)")
    else:
        lines.append("  verification: skipped (--no-verify)")
    timing = f"  time: fold {report.seconds:.3f} s"
    if result.verification is not None:
        timing += f", verify {result.verification.seconds:.3f} s"
    lines.append(timing + render_memory(report, result.verification))
    return "\n".join(lines)


def render_memory(report, verification) -> str:
    """'; peak memory ... MB folding, ... MB verifying' (bnfold.memory), or "" where unknown."""
    if report.peak_rss_mb is None:
        return ""
    text = f"; peak memory {report.peak_rss_mb:.0f} MB folding"
    if verification is not None and verification.peak_rss_mb is not None:
        text += f", {verification.peak_rss_mb:.0f} MB verifying"
    return text


def render_rolled_back(report) -> list[str]:
    """One plain line when verification undid folds, above all when it undid every one."""
    undone = len(report.rolled_back)
    if not undone:
        return []
    if not report.folded and not report.affine_folded:
        return [f"  rolled back: every fold ({undone}) failed verification; the model is written with no fold applied"]
    return [f"  rolled back: {undone} fold{'s' * (undone != 1)} failed verification (kept above); the others verified"]


def render_quantized(report) -> list[str]:
    """One line when folds went into quantized weights (bnfold.weights): what changed there."""
    folds = [f for f in report.folded if f.quantized]
    if not folds:
        return []
    line = f"  into quantized weights: {len(folds)} BN (each weight's scale took |BN scale|, its integers kept or negated exactly)"
    roundings = [f.bias_rounding for f in folds if f.bias_rounding is not None]
    if roundings:
        line += f"; {len(roundings)} int32 biases quantized again, the shift rounded by at most {max(roundings):.2f} of a step"
    return [line]


SHOWN_SPREADS = 3  # layers named on the channel spread line, worst first


def render_readiness(report) -> list[str]:
    """One line on folded layers whose per-channel weight ranges spread past the threshold, one
    on subnormals flushed to zero; none when there is nothing to say (bnfold.readiness)."""
    lines = []
    spreads = report.channel_spread
    if spreads:
        named = ", ".join(f"{printable(s.graph + s.layer)} {s.ratio:.3g}x" for s in spreads[:SHOWN_SPREADS])
        more = f", {len(spreads) - SHOWN_SPREADS} more" if len(spreads) > SHOWN_SPREADS else ""
        layers = f"{len(spreads)} layer{'s' * (len(spreads) != 1)}"
        lines.append(
            f"  per-channel weight ranges differ by over {report.channel_spread_threshold:g}x in {layers} ({named}{more}): "
            f"quantize {'them' if len(spreads) != 1 else 'it'} per-channel"
        )
    if report.subnormals_flushed:
        lines.append(f"  subnormal values flushed to zero in folded tensors: {report.subnormals_flushed} (they slow CPU inference)")
    return lines


def render_affine(report) -> list[str]:
    """Lines on BN written out as arithmetic (constant Mul/Add/Sub/Div chains), if there was any."""
    if not report.affine_folded and not report.affine_kept:
        return []
    rules = ", ".join(f"{name} {count}" for name, count in report.affine_rule_counts().items())
    lines = [f"  affine chains (BN as arithmetic): {len(report.affine_folded)} folded" + (f" ({rules})" if rules else "")]
    for kept in report.affine_kept:
        lines.append(f"  kept {printable(kept.ops)} chain at {printable(kept.graph + kept.bn)}: {printable(kept.reason)}")
    return lines


SHOWN_FAILURES = 5  # failing tensors listed per verification, in the order compared: outputs, then sites in graph order


def render_verification(verification, indent: str = "") -> str:
    status = {"passed": "passed", "failed": "FAILED", "inconclusive": "INCONCLUSIVE"}[verification.status]
    outputs, sites = verification.count("output"), verification.count("site")
    compared = f"{outputs} output{'s' * (outputs != 1)}" + (f" and {sites} fold site{'s' * (sites != 1)}" if sites else "")
    lines = [f"{indent}verification {status} ({verification.engine}): {compared} compared"]
    for provider in verification.providers:
        lines.append(
            f"{indent}  {printable(provider)}: max abs error {verification.max_abs_err(provider):.3g}, "
            f"max rel error {verification.max_rel_err(provider):.3g}"
        )
    shadowed = [c for c in verification.checks if c.passed and c.bound != "dtype"]
    if shadowed:
        lines.append(
            f"{indent}  {len(shadowed)} compared within the float64 shadow's bound: rounding, the original is as far "
            f"from the exact answer (worst: candidate {max(c.shadow_cand_err for c in shadowed):.3g}, "
            f"original {max(c.shadow_err for c in shadowed):.3g})"
        )
    failed = [c for c in verification.checks if not c.passed]
    for check in failed[:SHOWN_FAILURES]:
        lines.append(f"{indent}  {_describe_failure(check)}")
    if len(failed) > SHOWN_FAILURES:
        lines.append(f"{indent}  ... and {len(failed) - SHOWN_FAILURES} more differ")
    if verification.inconclusive:
        from bnfold.api import INCONCLUSIVE_HINT

        lines.append(f"{indent}  inconclusive: {INCONCLUSIVE_HINT}")
    if verification.note:
        lines.append(f"{indent}  note: {printable(verification.note)}")
    return "\n".join(lines)


def _describe_failure(check) -> str:
    what = f"site '{printable(check.output)}'" + (f" ({printable(check.fold)})" if check.fold else "") if check.kind == "site" else f"output '{printable(check.output)}'"
    note = f" ({printable(check.note)})" if check.note else ""
    bound = (
        f"; float64 shadow: candidate {check.shadow_cand_err:.3g} from the exact answer, original {check.shadow_err:.3g}"
        if check.shadow_err is not None else ""
    )
    return f"{printable(check.provider)} {what} differs: max abs error {check.max_abs_err:.3g}{note}{bound}"
