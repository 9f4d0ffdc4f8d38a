"""The proof that a folded model computes what the original computes.

Both models run on the same inputs (bnfold.inputs) on every engine and provider
(bnfold.engines), and their outputs are compared tensor by tensor (bnfold.compare).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import sys
import time
import types

import numpy as np

import onnx

from bnfold import engines, memory, pinning, shadow
from bnfold import inputs as model_inputs
from bnfold import sites as site_names
from bnfold.compare import OUTPUT, SITE, OutputCheck, compare_all, compare_outputs, default_tolerance, judge_by_shadow, json_float
from bnfold.engines import CPU, CUDA, REFERENCE, available_providers, load_problem, run_model
from bnfold.external import external_ref
from bnfold.tensors import is_external, iter_tensors

PASSED, FAILED, INCONCLUSIVE = "passed", "failed", "inconclusive"
# Fold sites are fetched in groups of about this many bytes (the reference's values, once more
# for the candidate's): never every intermediate of a large model at once. A group costs a
# session per model, so groups are as few as that allows.
SITE_GROUP_BYTES = 2**28
CACHED_REFERENCE_BYTES = 2**28  # the reference's values kept for the next candidate (rollback trials)
TOGETHER_MAX_BYTES = 2**27  # models up to this size get both sides run at once (see _run_ort)
_UNSET = object()


@dataclasses.dataclass(frozen=True)
class Verification:
    """Outcome of one comparison; ``seconds`` counts session building and runs only.

    `passed`: no compared tensor differs beyond its bound. `status` adds whether that proves
    anything: "inconclusive" when no informative tensor was compared (see OutputCheck)."""

    passed: bool
    engine: str  # "onnxruntime" | "onnx.reference"
    providers: tuple[str, ...]
    checks: tuple[OutputCheck, ...]
    seconds: float
    note: str = ""
    peak_rss_mb: float | None = None  # the process's peak memory when verification was done (bnfold.memory)

    @property
    def status(self) -> str:
        if not self.passed:
            return FAILED
        return PASSED if any(c.informative for c in self.checks) else INCONCLUSIVE

    @property
    def inconclusive(self) -> bool:
        return self.status == INCONCLUSIVE

    def count(self, kind: str) -> int:
        """Distinct tensors of `kind` (OUTPUT or SITE) compared."""
        return len({c.output for c in self.checks if c.kind == kind})

    def _checks(self, provider):
        return [c for c in self.checks if provider is None or c.provider == provider]

    def max_abs_err(self, provider: str | None = None) -> float:
        return max((c.max_abs_err for c in self._checks(provider)), default=0.0)

    def max_rel_err(self, provider: str | None = None) -> float:
        return max((c.max_rel_err for c in self._checks(provider)), default=0.0)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "status": self.status,
            "engine": self.engine,
            "providers": list(self.providers),
            "outputs_compared": self.count(OUTPUT),
            "sites_compared": self.count(SITE),
            "max_abs_err": json_float(self.max_abs_err()),
            "max_rel_err": json_float(self.max_rel_err()),
            "seconds": float(self.seconds),
            "peak_rss_mb": None if self.peak_rss_mb is None else round(self.peak_rss_mb, 1),
            "note": self.note,
            "checks": [c.to_dict() for c in self.checks],
        }


# ---------------------------------------------------------------- entry point


class Reference:
    """The reference side of verification, prepared once for any number of candidates (the
    rollback trials of one fold): its inputs are generated once, and its values are computed
    once per provider and kept (within CACHED_REFERENCE_BYTES); `check` then builds and runs
    only the candidate. ``verify(ref, cand, **settings)`` is ``Reference(ref, **settings).check(cand)``.
    `close()` (or ``with``) removes the temporary copy a model of 2 GiB or more needs.
    """

    def __init__(self, model, *, inputs=None, dims=None, providers=None, rtol=None, atol=None, seed=0):
        self.model = model
        self.graph = model_inputs.graph_model(model)
        self._settings = {"inputs": inputs, "dims": dims, "seed": seed, "providers": providers}
        self.rtol, self.atol = rtol, atol
        self._stack = contextlib.ExitStack()
        self._values: dict[tuple, dict] = {}  # (provider or REFERENCE, fetched sites) -> the reference's values
        self._cached_bytes = 0
        self._refusal: engines.Refused | None = None  # onnxruntime cannot build the reference's session
        self._shadow = _UNSET  # the float64 shadow (bnfold.shadow), made when first needed; None: none
        self._exact: dict[str, np.ndarray | None] = {}  # the shadow's values by name (see _shadow_values)
        self._dynamic = model_inputs.has_nonpositive_dims(self.graph)
        self._spatial_tried = [model_inputs.DEFAULT_SPATIAL]

    def __enter__(self) -> "Reference":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._values.clear()
        self._exact.clear()
        self._stack.close()

    @functools.cached_property
    def feeds(self) -> dict[str, np.ndarray]:
        inputs, dims, seed = self._settings["inputs"], self._settings["dims"], self._settings["seed"]
        if inputs is not None:
            return model_inputs.given_inputs(self.graph, inputs)
        return model_inputs.generate_inputs(self.graph, dims, seed, self._spatial_tried[-1])

    def _next_spatial_size(self) -> bool:
        """Move the generated inputs' default spatial size on (SPATIAL_SIZES) after the original
        did not run at this one; False when there is no other size to try."""
        settings = self._settings
        if settings["inputs"] is not None or not model_inputs.has_default_spatial(self.graph, settings["dims"]):
            return False
        left = [size for size in model_inputs.SPATIAL_SIZES if size not in self._spatial_tried]
        if not left:
            return False
        self._spatial_tried.append(left[0])
        for name in ("feeds", "_pins", "_runnable"):
            self.__dict__.pop(name, None)
        self._values.clear()
        self._exact.clear()
        self._cached_bytes, self._refusal = 0, None
        return True

    @functools.cached_property
    def providers(self) -> list[str]:
        return engines.check_providers(self._settings["providers"])

    def check(self, candidate, sites: dict[str, str] | None = None) -> Verification:
        """Run `candidate` on the reference's inputs and compare every graph output and fold
        site on every provider. `sites` maps site -> the fold made there; None: the sites the
        candidate records (bnfold.sites), else the values both name alike; {}: outputs only.

        When the original does not run on generated inputs, the next spatial size is tried
        (inputs.SPATIAL_SIZES); the note says which size was used.

        A mismatch is a failed Verification, not an exception; VerificationFailed means no
        engine could run the candidate. Bad inputs, dims or providers raise UsageError."""
        while True:
            try:
                verification = self._check(candidate, sites)
            except engines.ReferenceDidNotRun as err:
                if not self._next_spatial_size():
                    raise _sizes_tried(err, self._spatial_tried) from None
                continue
            verification = dataclasses.replace(verification, peak_rss_mb=memory.peak_rss_mb())
            if len(self._spatial_tried) > 1:
                tried = ", ".join(map(str, self._spatial_tried[:-1]))
                used = f"inputs at spatial size {self._spatial_tried[-1]} (the original did not run at {tried})"
                verification = dataclasses.replace(verification, note="; ".join(filter(None, [used, verification.note])))
            return verification

    def _check(self, candidate, sites) -> Verification:
        cand_graph = model_inputs.graph_model(candidate)
        feeds, providers = self.feeds, self.providers
        extra = [v.name for v in model_inputs.free_inputs(cand_graph) if v.name not in feeds]
        if extra:  # a candidate that needs an input the reference lacks cannot run
            note = f"the candidate has inputs the reference lacks: {', '.join(extra)}"
            return Verification(False, "onnxruntime", tuple(providers), (), 0.0, note)
        if sites is None:
            sites = site_names.recorded(cand_graph) or site_names.alike(self.graph, cand_graph)
        wanted = site_names.comparable(sites, self.graph, cand_graph)
        candidate = self._pinned_candidate(candidate, cand_graph)
        dynamic = model_inputs.has_nonpositive_dims(cand_graph)
        start = time.perf_counter()  # counts the reference's share too when it runs now
        checks, engine, used, note = [], "onnxruntime", (), ""
        for group, first in self._groups(list(wanted)):
            engine, values, note = self._run(candidate, group, dynamic)
            used = tuple(values)
            for provider, (ref, cand) in values.items():
                checks += self._judge(provider, ref, cand, {name: wanted[name] for name in group}, first)
        seconds = time.perf_counter() - start
        if self._pins:
            pinned = f"{len(self._pins)} quantized activations pinned to the original's integers"
            note = "; ".join(filter(None, [note, pinned]))
        return Verification(all(c.passed for c in checks), engine, used, tuple(checks), seconds, note)

    # --- quantized activations pinned (bnfold.pinning) ------------------------------------------

    @functools.cached_property
    def _pins(self) -> dict[str, np.ndarray]:
        """The original's integers at each activation QuantizeLinear (CPU), to pin in both
        models; {} for a model without any, or one that keeps external data."""
        names = pinning.activation_quantizers(self.graph)
        whole = pinning.pinned(self.graph, {}) if names else None
        if whole is None:
            return {}
        _, values, _ = engines.run_model(engines.with_outputs(whole, names), self.feeds, [CPU], "reference")
        found = next(iter(values.values()))
        return {name: found[name] for name in names if name in found}

    @functools.cached_property
    def _runnable(self):
        """The original as verification runs it: with its quantized activations pinned."""
        return pinning.pinned(self.graph, self._pins) if self._pins else self.model

    @property
    def _run_feeds(self) -> dict[str, np.ndarray]:
        return {**self.feeds, **self._pins} if self._pins else self.feeds

    def _pinned_candidate(self, candidate, cand_graph: onnx.ModelProto):
        """The candidate (read as `cand_graph`) with the same activations pinned; one that
        cannot be (external data) has both run unpinned from then on."""
        if not self._pins:
            return candidate
        pinned = pinning.pinned(cand_graph, self._pins)
        if pinned is None:
            self.__dict__.update(_pins={}, _runnable=self.model)
            self._values.clear()
            self._cached_bytes = 0
            return candidate
        return pinned

    def _groups(self, names: list[str]):
        """(sites, first) groups of about SITE_GROUP_BYTES each (sized by shape inference, else
        guessed from the inputs), the first also fetching the graph outputs."""
        guess = max(1, 8 * sum(a.nbytes for a in self.feeds.values()))
        known = site_names.sizes(self.graph, self.feeds, names) if names else {}
        for index, group in enumerate(site_names.groups(names, known, SITE_GROUP_BYTES, guess)):
            yield group, index == 0

    def _judge(self, provider: str, ref: dict, cand: dict, group: dict[str, str], first: bool) -> list[OutputCheck]:
        """Compare; a float tensor that fails on magnitude alone is judged again against the
        float64 shadow. Later groups compare their sites only."""
        if not first:
            ref, cand = ({n: v for n, v in values.items() if n in group} for values in (ref, cand))
        checks = compare_all(provider, ref, cand, self.rtol, self.atol)
        checks = [dataclasses.replace(c, kind=SITE, fold=group[c.output]) if c.output in group else c for c in checks]
        failed = [c.output for c in checks if not c.passed and not c.note and c.output in ref and c.output in cand]
        explicit = self.rtol is not None or self.atol is not None  # the user's own bound stands as given
        exact = self._shadow_values(failed) if failed and not explicit else {}
        return [
            judge_by_shadow(c, ref[c.output], cand[c.output], exact[c.output]) if c.output in exact else c
            for c in checks
        ]

    def _run(self, candidate, group: tuple, dynamic: bool) -> tuple[str, dict, str]:
        """(engine, {provider: (ref values, cand values)}, note): onnxruntime, else onnx.reference.
        `dynamic`: the candidate's inputs have dims <= 0 (see engines.ort_source)."""
        with contextlib.ExitStack() as stack:
            try:
                source = engines.ort_source(candidate, stack, group, dynamic)
                return "onnxruntime", {p: self._run_ort(source, p, group) for p in self.providers}, ""
            except engines.Refused as refusal:
                note = f"{refusal}; verified with onnx.reference"
        key = (REFERENCE, group)
        ref = self._values.get(key)
        if ref is None:
            ref = self._keep(key, engines.run_reference(self._runnable, self._run_feeds, "reference", group))
        return REFERENCE, {REFERENCE: (ref, engines.run_reference(candidate, self._run_feeds, "candidate", group))}, note

    def _run_ort(self, source, provider: str, group: tuple) -> tuple[dict, dict]:
        def candidate() -> dict:
            return engines.run_ort(engines.ort_session(source, provider, "candidate"), self._run_feeds, "candidate", provider)

        if self._build_together(source, provider, group):
            # Building sessions is most of verifying a deep net (onnxruntime resolves every
            # node; a deep one is built piece by piece as it runs): both sides build and run at
            # once on the CPU's cores. Only for small models: both sessions then live at once.
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                reference = pool.submit(self._reference_ort, provider, group)
                candidate_values = pool.submit(candidate)
                return reference.result(), candidate_values.result()  # the reference's refusal first
        # first: the reference's refusal sends both to onnx.reference
        return self._reference_ort(provider, group), candidate()

    def _build_together(self, source, provider: str, group: tuple) -> bool:
        if provider != CPU or (provider, group) in self._values or self._refusal is not None:
            return False
        size = len(source.model) if isinstance(source.model, bytes) else os.path.getsize(source.model)
        return size + self._external_bytes <= TOGETHER_MAX_BYTES

    @functools.cached_property
    def _external_bytes(self) -> int:
        """The size of the original's external data files (a session holds their weights too;
        the candidate's are about as big), 0 for a model in memory or too big to matter."""
        if isinstance(self.model, onnx.ModelProto) or os.path.getsize(self.model) > TOGETHER_MAX_BYTES:
            return 0
        folder = os.path.dirname(os.path.abspath(os.fspath(self.model)))
        locations = {external_ref(tensor, self.model).location for tensor in iter_tensors(self.graph) if is_external(tensor)}
        return sum(os.path.getsize(path) for path in (os.path.join(folder, name) for name in locations) if os.path.isfile(path))

    def _reference_ort(self, provider: str, group: tuple) -> dict[str, np.ndarray]:
        """The reference's values on `provider`: computed once, kept if small enough."""
        key = (provider, group)
        if key in self._values:
            return self._values[key]
        return self._reference_run(self._reference_session(provider, group), provider, group)

    def _reference_session(self, provider: str, group: tuple):
        if self._refusal is not None:
            raise self._refusal
        try:
            source = engines.ort_source(self._runnable, self._stack, group, self._dynamic)
            return engines.ort_session(source, provider, "reference")
        except engines.Refused as refusal:
            self._refusal = refusal
            raise

    def _reference_run(self, session, provider: str, group: tuple) -> dict[str, np.ndarray]:
        return self._keep((provider, group), engines.run_ort(session, self._run_feeds, "reference", provider))

    def _keep(self, key: tuple, values: dict) -> dict:
        size = sum(v.nbytes for v in values.values())
        if not key[1] or self._cached_bytes + size <= CACHED_REFERENCE_BYTES:  # the outputs always
            self._values[key] = values
            self._cached_bytes += size
        return values

    def _shadow_values(self, names: list[str]) -> dict[str, np.ndarray]:
        """The float64 shadow's values of `names` (bnfold.shadow); {} when there is none. Like
        the reference's own values they do not depend on the candidate: kept (within
        CACHED_REFERENCE_BYTES) for the other providers and the next candidates."""
        missing = [name for name in names if name not in self._exact]
        fresh = self._run_shadow(missing) if missing else {}
        for name in missing:  # None: the shadow cannot give it, and is not asked again
            value = fresh.get(name)
            size = value.nbytes if value is not None else 0
            if self._cached_bytes + size <= CACHED_REFERENCE_BYTES:
                self._exact[name] = value
                self._cached_bytes += size
        found = {name: fresh[name] if name in fresh else self._exact.get(name) for name in names}
        return {name: value for name, value in found.items() if value is not None}

    def _run_shadow(self, names: list[str]) -> dict[str, np.ndarray]:
        if self._shadow is _UNSET:
            self._shadow = _make_shadow(self.model)
        if self._shadow is None:
            return {}
        model = onnx.ModelProto()
        model.CopyFrom(self._shadow)
        try:
            _, values, _ = engines.run_model(engines.with_outputs(model, names), shadow.promote_feeds(self.feeds), [CPU], "shadow")
        except Exception:  # noqa: BLE001 - no engine runs the shadow: the plain bound stands
            return {}
        return {name: value for name, value in next(iter(values.values())).items() if name in names}


def _sizes_tried(err: Exception, sizes: list[int]) -> engines.ReferenceDidNotRun:
    if len(sizes) < 2:
        return err
    return engines.ReferenceDidNotRun(f"{err} (spatial sizes tried: {', '.join(map(str, sizes))})")


def _make_shadow(model) -> onnx.ModelProto | None:
    try:
        whole = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
        return shadow.promote(whole)
    except Exception:  # noqa: BLE001 - weights that cannot be read or promoted: no shadow
        return None


def verify(reference, candidate, *, inputs=None, dims=None, providers=None,
           rtol=None, atol=None, seed=0, sites=None, outputs_only: bool = False) -> Verification:
    """Run both models on the same inputs and compare every output and fold site on every
    provider (`sites`: as for `Reference.check`; `outputs_only`: graph outputs alone).

    A mismatch is a failed Verification, not an exception; VerificationFailed means neither
    engine could run a model. Bad inputs, dims or providers raise UsageError. Checking several
    candidates against one reference: `Reference`."""
    settings = dict(inputs=inputs, dims=dims, providers=providers, rtol=rtol, atol=atol, seed=seed)
    with Reference(reference, **settings) as prepared:
        return prepared.check(candidate, {} if outputs_only else sites)


class _CallableModule(types.ModuleType):
    """`bnfold.verify(...)` is the API function, and `bnfold.verify` is also this module: when
    the import system first loads it, it binds the module as the package's attribute. Calling
    the module calls the function, so both spellings work whichever binding is there."""

    def __call__(self, *args, **kwargs) -> Verification:
        return verify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "CPU", "CUDA", "REFERENCE", "OutputCheck", "Reference", "Verification", "available_providers",
    "compare_outputs", "default_tolerance", "generate_inputs", "load_problem", "run_model", "verify",
]
generate_inputs = model_inputs.generate_inputs
