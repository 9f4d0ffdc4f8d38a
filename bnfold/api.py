"""Orchestration: load -> apply rules until nothing changes -> clean up -> verify -> save."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import os
import pathlib
import time
from collections import Counter, deque
from typing import Iterable

import onnx

from bnfold import initializer_inputs, memory, noops, readiness, sites
from bnfold.weights import QuantizedWrite
from bnfold.errors import UsageError, VerificationFailed
from bnfold.graph import DEFAULT_DOMAINS, GraphIndex, ModelIndex, node_label
from bnfold.report import BATCHNORM, FoldReport, Folded, Kept
from bnfold.rules import ALL_RULES, RULE_NAMES, RULES
from bnfold.rules.base import apply_plan, match_batchnorm, match_consumer, match_producer, no_consumer_reason, plan_changes, plan_site
from bnfold.rules.decomposed import ChainFolder, prime_types
from bnfold.standalone import MODES as STANDALONE_MODES, convert_kept

ModelLike = onnx.ModelProto | str | os.PathLike


@dataclasses.dataclass(frozen=True)
class FoldResult:
    """A pass result: the folded model, what happened to each BN, and (if run) the verification."""

    model: onnx.ModelProto
    report: FoldReport
    verification: object | None = None  # bnfold.verify.Verification
    path: pathlib.Path | None = None  # where fold_file wrote the model
    not_written: str = ""  # why fold_file wrote nothing (a model bnfold already folded)

    @property
    def modified(self) -> bool:
        return self.report.modified

    def to_dict(self) -> dict:
        data = self.report.to_dict()
        data["output"] = str(self.path) if self.path else None
        if self.not_written:
            data["not_written"] = self.not_written
        data["verification"] = self.verification.to_dict() if self.verification is not None else None
        return data


def is_batchnorm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in DEFAULT_DOMAINS


def fold(
    model: ModelLike,
    *,
    rules: Iterable[str] | None = None,
    base_dir=None,
    standalone: str = "keep",
    freeze_initializer_inputs: bool = False,
    check_model: bool = False,
    remove_noops: bool = True,
) -> FoldResult:
    """Fold every BN that can be folded safely; the input model object is not modified.

    `model` is a ModelProto or a path. A ModelProto whose tensors live in external data needs
    `base_dir` (the folder the data locations are relative to) for the tensors a fold touches.
    `standalone="affine"` turns each BN no rule can fold into Mul + Add (bnfold.standalone).
    `freeze_initializer_inputs`: initializers also listed as graph inputs (IR >= 4: defaults a
    caller may override) are read as constants (bnfold.initializer_inputs). `check_model`: a
    path is refused on any onnx.checker complaint, not only on those no engine tolerates.
    `remove_noops`: nodes that compute nothing (Identity, inference Dropout, ...) go first.
    """
    options = dict(rules=rules, standalone=standalone, freeze_initializer_inputs=freeze_initializer_inputs, remove_noops=remove_noops)
    if isinstance(model, onnx.ModelProto):

        def fresh(**extra) -> FoldResult:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            return fold_model(copy, base_dir=base_dir, **{**options, **extra})
    else:
        from bnfold import io

        def fresh(**extra) -> FoldResult:
            loaded = io.load_model(model, check_model=check_model)
            return fold_model(loaded.model, base_dir=loaded.base_dir, warnings=loaded.warnings, **{**options, **extra})

    return _unless_only_noops(fresh(), fresh)


def _unless_only_noops(result: FoldResult, refold) -> FoldResult:
    """A fold that folded nothing leaves the model as it was: no-ops removed for nothing are
    put back by folding a fresh copy without removing them (`refold(remove_noops=False)`). The
    report stays the first one's: its reasons for keeping each BN are the ones past the no-ops."""
    report = result.report
    if not report.noops_removed or report.folded or report.affine_folded:
        return result
    again = refold(remove_noops=False)
    return dataclasses.replace(again, report=dataclasses.replace(report, noops_removed={}))


def fold_model(
    model: onnx.ModelProto,
    *,
    rules=None,
    base_dir=None,
    skip=None,
    standalone: str = "keep",
    spill=None,
    freeze_initializer_inputs: bool = False,
    warnings: tuple[str, ...] = (),
    remove_noops: bool = True,
) -> FoldResult:
    """Fold `model` in place (callers that must keep their input pass a copy).

    `skip` maps (graph path, BN label) to the reason a BN is kept without trying any rule
    (folds that verification rolled back, see bnfold.rollback). `spill` (a lazy load's
    bnfold.loading.Spill) takes the big tensors the fold makes out of memory; the model then holds
    stubs for them, and is only whole once saved with `io.stage_model(source=...)`.
    `warnings`: what loading tolerated, carried into the report. `remove_noops`: nodes that
    compute nothing go first (bnfold.noops), so that every rule folds through them.
    """
    started = time.perf_counter()
    active = select_rules(rules)
    if standalone not in STANDALONE_MODES:
        raise UsageError(f"standalone must be one of {', '.join(STANDALONE_MODES)}, got {standalone!r}")
    listing = initializer_inputs.take_out(model, freeze_initializer_inputs)
    with _gc_paused():
        index = ModelIndex(model, base_dir, spill)
        before = count_batchnorms(index)
        prime_types(index)
        noops_removed = _remove_noops(index) if remove_noops else Counter()
        folded: list[Folded] = []
        kept: list[Kept] = []
        for graph in list(index.graphs):
            graph_folded, graph_kept = fold_graph(graph, active, skip or {}, standalone)
            folded += graph_folded
            kept += graph_kept
        index.finish()
        # The graph indexes are freed here, by reference counts, while the collector is paused:
        # left to it, the first collection after the pause traverses all they hold, to free it.
        index.release()
        del graph
    unlisted = initializer_inputs.put_back(model, listing)
    if folded:
        sites.record(model, sites.from_folds(folded))
    bn_folded = tuple(f for f in folded if f.ops == BATCHNORM)
    report = FoldReport(
        folded=bn_folded,
        kept=tuple(k for k in kept if k.ops == BATCHNORM),
        bn_before=before,
        bn_after=before - len(bn_folded),
        seconds=time.perf_counter() - started,
        affine_folded=tuple(f for f in folded if f.ops != BATCHNORM),
        affine_kept=tuple(k for k in kept if k.ops != BATCHNORM),
        warnings=tuple(warnings),
        noops_removed=dict(sorted(noops_removed.items())),
        constant_inputs=tuple(sorted(listing.backed)) if listing else (),
        constant_inputs_reason=listing.reason if listing else "",
        unlisted_inputs=unlisted,
        peak_rss_mb=memory.peak_rss_mb(),
        channel_spread=index.readiness.spreads(),
        channel_spread_threshold=readiness.THRESHOLD,
        subnormals_flushed=index.readiness.subnormals_flushed,
    )
    return FoldResult(model, report)


def _remove_noops(index: ModelIndex) -> Counter:
    for graph in index.graphs:  # every type the proofs need, before the first edit
        noops.prime(graph)
    return sum((noops.remove_noops(graph) for graph in list(index.graphs)), Counter())


@contextlib.contextmanager
def _gc_paused():
    """The fold allocates millions of short-lived, acyclic objects (tensor views, index lists);
    Python's cycle collector would rescan the whole heap over and over (12% of a 20,000-BN
    fold). Paused for the fold, restored after, whatever it was."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def fold_graph(graph: GraphIndex, rules, skip: dict, standalone: str = "keep") -> tuple[list[Folded], list[Kept]]:
    """The BN rules and the affine-chain rules (bnfold.rules.decomposed) until neither folds
    more, then `standalone` for the BN left; BN and chain records together (`ops` tells)."""
    folded, kept = apply_rules(graph, rules, skip)
    chains = ChainFolder(graph, rules, skip)
    while chains.sweep():
        more, kept = apply_rules(graph, rules, skip)  # every BN left gets a fresh record
        folded += more
        if not more:
            break
    if standalone == "affine":
        converted, kept = convert_kept(graph, kept, skip)
        folded += converted
    records = [dataclasses.replace(f, site=graph.current_site(f.site)) if f.site else f for f in folded + chains.folded]
    return records, kept + chains.kept


def select_rules(names: Iterable[str] | None):
    if names is None:
        return ALL_RULES
    names = list(names)
    unknown = [n for n in names if n not in RULE_NAMES]
    if unknown:
        raise UsageError(f"unknown rule(s) {', '.join(unknown)}; known: {', '.join(RULE_NAMES)}")
    return tuple(r for r in ALL_RULES if r.name in names)


def count_batchnorms(index: ModelIndex) -> int:
    return sum(is_batchnorm(n) for g in index.graphs for n in g.live_nodes())


def apply_rules(graph: GraphIndex, rules, skip=None) -> tuple[list[Folded], list[Kept]]:
    """Fold the BN nodes of one graph until nothing more folds; one record per BN.

    A worklist, not passes over the graph until nothing changes: each BN is tried once, in
    graph order; a fold re-queues the kept BN around it (their neighbours changed), and the
    kept ones are swept again only while a sweep still folds something. Same fixpoint, but
    linear in the graph's size on a deep network.
    """
    folded: list[Folded] = []
    kept: dict[int, tuple[onnx.NodeProto, Kept]] = {}
    work = _Worklist(n for n in graph.live_nodes() if is_batchnorm(n))
    while work:
        progress = False
        while work:
            node = work.pop()
            result = fold_one(node, graph, rules, skip)
            if isinstance(result, Kept):
                kept[id(node)] = (node, result)
                continue
            folded.append(result)
            kept.pop(id(node), None)
            progress = True
            if kept:  # a folded BN node keeps its input and output names
                around = (node.input[0] if node.input else "", node.output[0] if node.output else "")
                work.push(n for n in _nodes_near(graph, around) if id(n) in kept)
        if progress:
            work.push(node for node, _ in kept.values())
    return folded, [reason for _, reason in kept.values()]


class _Worklist:
    """A FIFO of nodes, each in it at most once (by identity: protobuf == compares contents)."""

    def __init__(self, nodes=()):
        self.queue: deque[onnx.NodeProto] = deque()
        self.queued: set[int] = set()
        self.push(nodes)

    def push(self, nodes) -> None:
        for node in nodes:
            if id(node) not in self.queued:
                self.queued.add(id(node))
                self.queue.append(node)

    def pop(self) -> onnx.NodeProto:
        node = self.queue.popleft()
        self.queued.discard(id(node))
        return node

    def __bool__(self) -> bool:
        return bool(self.queue)


def _nodes_near(graph: GraphIndex, names) -> list[onnx.NodeProto]:
    """Nodes within two edges of the values `names` (where a fold just changed the graph)."""
    near = {id(n): n for name in names if name for n in _ends(graph, name)}
    for node in list(near.values()):
        for name in (*node.input, *node.output):
            near.update((id(n), n) for n in _ends(graph, name) if name)
    return list(near.values())


def _ends(graph: GraphIndex, name: str) -> list[onnx.NodeProto]:
    producer = graph.producer.get(name)
    return [producer, *graph.users(name)] if producer is not None else graph.users(name)


def fold_one(node: onnx.NodeProto, graph: GraphIndex, rules, skip=None) -> Folded | Kept:
    """Fold one BN into the op producing its input (forward) if possible, else into the op
    reading its output (backward); the record names the rule, so the direction.

    When neither works, the reason gives both causes, "<forward>; next: <backward>", except that
    the backward one is left out when only the forward side had an op a rule folds into (Conv ->
    BN -> Relu with a Conv fan-out: the Relu says nothing useful).
    """
    reason = skip.get((graph.path, node_label(node))) if skip else None
    if reason:
        return Kept(node_label(node), reason, graph.path)
    bn = match_batchnorm(node, graph)
    if isinstance(bn, Kept):
        return bn
    attempts = []
    for direction in ("forward", "backward"):
        rule, result, candidate = _match_direction(bn, graph, rules, direction)
        if not isinstance(result, Kept):
            label, site = bn.label, plan_site(result)  # before the edit: a BN turned into an Add would be named as the Add
            quantized = [value for _, _, value in result.new_inputs if isinstance(value, QuantizedWrite)]
            rounding = max((w.rounding for w in quantized if w.rounding is not None), default=None)
            graph.moved_sites(plan_changes(result), site)
            apply_plan(result, graph)
            return Folded(label, node_label(result.into), rule.name, graph.path, site=site, quantized=bool(quantized),
                          bias_rounding=rounding)
        attempts.append((result, candidate))
    (forward, has_producer), (backward, has_consumer) = attempts
    if has_producer and not has_consumer:
        return forward
    return Kept(bn.label, f"{forward.reason}; next: {backward.reason}", graph.path)


def _match_direction(bn, graph: GraphIndex, rules, direction: str):
    """(rule, its Plan or Kept, whether any rule, enabled or not, targets that neighbour)."""
    targeting = []
    for rule in RULES:  # the first enabled rule that targets the neighbour decides
        if rule.direction == direction and rule.targets(bn, graph):
            if rule in rules:
                return rule, rule.match(bn, graph), True
            targeting.append(rule)
    if targeting:
        return None, Kept(bn.label, f"rule {', '.join(r.name for r in targeting)} is not enabled", graph.path), True
    if direction == "forward":
        return None, match_producer(bn, graph, ()), False
    ops = list(dict.fromkeys(op for r in RULES if r.direction == direction for op in r.consumer_ops))
    return None, no_consumer_reason(bn, graph, match_consumer(bn, graph), ops), False


def default_output_path(src: pathlib.Path) -> pathlib.Path:
    """model.onnx -> model.folded.onnx, next to the input."""
    return src.with_name(f"{src.stem}.folded{src.suffix or '.onnx'}")


def fold_file(
    src,
    dst=None,
    *,
    verify: bool = True,
    in_place: bool = False,
    strict: bool = False,
    rules=None,
    inputs=None,
    dims=None,
    providers=None,
    rtol=None,
    atol=None,
    on_phase=None,
    standalone: str = "keep",
    freeze_initializer_inputs: bool = False,
    check_model: bool = False,
    remove_noops: bool = True,
) -> FoldResult:
    """Fold the model file `src`, verify the written result against it, then move it into place.

    The output is staged in its destination folder and only committed when verification
    passes, so a failed verification leaves no output and the input is never touched
    (unless `in_place`, which still replaces it atomically). When verification fails, the
    folds responsible are found and undone (their BN kept with the reason, see bnfold.rollback)
    and the result verified again; `strict` makes a failure an error instead. `on_phase(text)`
    is told what is being done (for a progress display). `freeze_initializer_inputs`,
    `check_model` and `remove_noops` are as for `fold`.

    A model bnfold itself wrote with nothing left to fold is not written again (`result.path`
    None, `result.not_written` says so): re-running over a folder never makes *.folded.folded.onnx.

    The written file (`result.path`) is the product. For model files of 32 MiB or more the
    weights are not read into memory: `result.model` then refers to unchanged weights in the
    input file and to new ones in a temporary file that ends with the process, so it is not a
    self-contained model; use `bnfold.fold(path)` for one in memory.
    """
    from bnfold import io

    phase = on_phase or (lambda text: None)
    phase("loading")
    loaded = io.load_model(src, lazy=True, check_model=check_model)  # big weights stay on disk until a fold needs them
    target = _output_destination(loaded, dst, in_place)
    phase("folding")
    settings = dict(inputs=inputs, dims=dims, providers=providers, rtol=rtol, atol=atol)
    reference = _prepared_once(loaded.path, settings) if verify else None
    with io.begin_staging(target, loaded) as early:  # big data files are copied while the fold runs
        options = dict(rules=rules, standalone=standalone, freeze_initializer_inputs=freeze_initializer_inputs, remove_noops=remove_noops)
        result = fold_model(loaded.model, base_dir=loaded.base_dir, spill=loaded.spill, warnings=loaded.warnings, **options)
        result = _unless_only_noops(result, lambda **extra: _refold(loaded, {**options, **extra}))
        if not result.modified and sites.recorded(loaded.model) is not None:
            return dataclasses.replace(result, not_written=ALREADY_FOLDED)
        check = _checker(reference, result.report) if reference is not None else None
        verification = _stage_and_verify(result, loaded, target, check, phase, early, strict)
    if isinstance(verification, FoldResult):
        return verification
    if strict:
        raise _failure(verification, "--strict: nothing rolled back")
    for round_ in range(ROLLBACK_ROUNDS):  # each round undoes at least one fold; none left always verifies
        phase("verification failed: finding the folds responsible")
        last = round_ == ROLLBACK_ROUNDS - 1
        result = _roll_back(result, loaded, target, options, verification, check, everything=last)
        verification = _stage_and_verify(result, loaded, target, check, phase, strict=strict)
        if isinstance(verification, FoldResult):
            return verification
        if not result.modified:
            break
    raise _failure(verification, "even after rolling back the folds that failed")


def _output_destination(loaded, dst, in_place: bool):
    """Where the output goes, refused before any work when it cannot be written: the input
    under another name (without in-place), a terminal, a socket, external data to a stream."""
    from bnfold import io

    if in_place:
        if dst is not None and not io.same_file(io.classify_destination(dst), loaded.path):
            raise UsageError("--in-place and an output path are mutually exclusive")
        target = io.classify_destination(loaded.path)
    else:
        target = io.classify_destination(dst if dst is not None else default_output_path(loaded.path))
        if io.same_file(target, loaded.path):
            raise UsageError(f"output {target.given} and input {loaded.path} are the same file; pass --in-place to overwrite it")
    if target.streamed and in_place:
        raise UsageError(f"--in-place needs a regular file; {loaded.path} is not one")
    return target


def _stage_and_verify(result: FoldResult, loaded, target, check, phase, early=None, strict: bool = False):
    """The committed FoldResult when the staged output verifies (`check`, see _checker; None:
    verification off), else the failed Verification (nothing written). An inconclusive one is
    committed, and said so, unless `strict`. `early`: io.begin_staging's, to write into."""
    from bnfold import io

    phase("writing")
    with io.stage_model(result.model, target, source=loaded, into=early) as staged:
        verification = None
        if check is not None and result.modified:
            phase("verifying")
            verification = check(staged.path)
            if not verification.passed:
                return verification
            if strict and verification.inconclusive:
                raise VerificationFailed(f"--strict: verification was inconclusive ({INCONCLUSIVE_HINT}); nothing written", verification)
        path = staged.commit()
    return dataclasses.replace(result, verification=verification, path=path)


ROLLBACK_ROUNDS = 16  # then the last round undoes every fold left (see _roll_back)
ROUNDING_ONLY = (
    "each fold verifies on its own, so the difference is float rounding the folds accumulate, not a "
    "wrong fold; loosen --rtol/--atol (left unset, a float64 shadow of the original judges rounding where it runs)"
)


def _roll_back(result: FoldResult, loaded, target, options: dict, verification, check, everything: bool = False) -> FoldResult:
    """Refold `loaded`'s file keeping the BN (and affine chains) whose folds fail verification
    (the first failing fold site's, else found by bisection), and those an earlier round rolled back; `options` are fold_model's rules,
    standalone and freeze_initializer_inputs. The folds left may still fail together (rounding
    that each passes alone): the caller rolls back again; `everything` undoes every fold left."""
    from bnfold import io, rollback

    report = result.report
    folds, kept = report.folded + report.affine_folded, report.kept + report.affine_kept

    def refold(skip: dict) -> FoldResult:
        return _refold(loaded, options, skip)

    def trial(subset) -> tuple[bool, float]:
        chosen = set(subset)
        skip = rollback.skip_map([*kept, *(f for f in folds if f not in chosen)])
        with io.stage_model(refold(skip).model, target, source=loaded) as staged:
            outcome = check(staged.path)
        return outcome.passed, _error(outcome)

    earlier = {(k.graph, k.bn): k.reason for k in report.rolled_back}
    if everything:
        failing = dict.fromkeys(folds, _error(verification))
    else:  # a failing site names its fold, if that fold fails alone too; else bisection
        failing, proven = rollback.blame_by_site(folds, verification)
        if not failing or not proven and trial(list(failing))[0]:
            failing = rollback.find_failing_folds(folds, trial, _error(verification))
        if not failing:
            raise _failure(verification, ROUNDING_ONLY)
    return refold({**earlier, **rollback.skip_map(failing, failing)})


def _refold(loaded, options: dict, skip=None) -> FoldResult:
    """Fold `loaded`'s file again from disk (its lazy stubs and spill file are `loaded`'s)."""
    from bnfold import io

    source = io.load_model(loaded.path, lazy=True)
    return fold_model(source.model, base_dir=source.base_dir, skip=skip, spill=loaded.spill, warnings=loaded.warnings, **options)


def _error(verification) -> float:
    """Max abs error of a failed verification; inf when the candidate did not run at all."""
    return verification.max_abs_err() if verification.checks else float("inf")


def _checker(reference, report: FoldReport):
    """`check(path)`: the Verification of a candidate against the original, comparing the
    graph outputs and the sites of `report`'s folds (the same for every rollback trial, so the
    original's values are computed once). A candidate that no engine runs is a failed one."""
    from bnfold import sites
    from bnfold.verify import Verification

    folded_at = sites.from_folds(report.folded + report.affine_folded)

    def check(candidate) -> Verification:
        try:
            return reference().check(candidate, folded_at)
        except VerificationFailed as err:
            return Verification(False, "onnxruntime", (), (), 0.0, note=str(err))

    return check


def _prepared_once(path, settings: dict):
    """A callable giving the original's side of verification (inputs, outputs per provider),
    prepared on its first call and reused: the rollback trials and the check after them then
    run only their candidate."""
    from bnfold.verify import Reference

    return functools.cache(lambda: Reference(path, **settings))


ALREADY_FOLDED = "already folded: bnfold wrote this model and nothing is left to fold"
INCONCLUSIVE_HINT = (
    "nothing informative was compared: constant, non-finite or integer values only; "
    "pass --dim NAME=SIZE or --inputs FILE.npz with inputs that exercise the model"
)


def _failure(verification, why: str) -> VerificationFailed:
    if verification.checks:
        what = f"folded model differs from the original (max abs error {verification.max_abs_err():.3g})"
    else:  # no output was compared: the folded model did not run (see _verify_path)
        what = verification.note
    return VerificationFailed(f"{what}; {why}; nothing written", verification)


def check(model: ModelLike, *, rules=None, freeze_initializer_inputs: bool = False, check_model: bool = False,
          remove_noops: bool = True) -> FoldReport:
    """Which BN a fold would remove (for CI): the report of a dry run, nothing written."""
    options = dict(freeze_initializer_inputs=freeze_initializer_inputs, check_model=check_model, remove_noops=remove_noops)
    return fold(model, rules=rules, **options).report
