"""The proof that a folded model computes what the original computes.

Both models run on the same inputs (bnfold.inputs) on every engine and provider
(bnfold.engines), and their outputs are compared tensor by tensor (bnfold.compare).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time

import numpy as np

from bnfold import engines
from bnfold import inputs as model_inputs
from bnfold.compare import OutputCheck, compare_all, compare_outputs, default_tolerance, json_float
from bnfold.engines import CPU, CUDA, REFERENCE, available_providers, load_problem, run_model

@dataclasses.dataclass(frozen=True)
class Verification:
    """Outcome of one comparison; ``seconds`` counts session building and runs only."""

    passed: bool
    engine: str  # "onnxruntime" | "onnx.reference"
    providers: tuple[str, ...]
    checks: tuple[OutputCheck, ...]
    seconds: float
    note: str = ""

    def _checks(self, provider):
        return [c for c in self.checks if provider is None or c.provider == provider]

    def max_abs_err(self, provider: str | None = None) -> float:
        return max((c.max_abs_err for c in self._checks(provider)), default=0.0)

    def max_rel_err(self, provider: str | None = None) -> float:
        return max((c.max_rel_err for c in self._checks(provider)), default=0.0)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "engine": self.engine,
            "providers": list(self.providers),
            "max_abs_err": json_float(self.max_abs_err()),
            "max_rel_err": json_float(self.max_rel_err()),
            "seconds": float(self.seconds),
            "note": self.note,
            "checks": [c.to_dict() for c in self.checks],
        }



# ---------------------------------------------------------------- entry point


class Reference:
    """The reference side of verification, prepared once for any number of candidates (the
    rollback trials of one fold): its inputs are generated once, and it is run once per
    provider, its session built once; `check` then builds and runs only the candidate.

    Its graph is read at once, the rest done on the first `check`, in the order `verify` has
    always used, so ``verify(ref, cand, **settings)`` is ``Reference(ref, **settings).check(cand)``.
    `close()` (or ``with``) removes the temporary copy a model of 2 GiB or more needs.
    """

    def __init__(self, model, *, inputs=None, dims=None, providers=None, rtol=None, atol=None, seed=0):
        self.model = model
        self.graph = model_inputs.graph_model(model)
        self._settings = {"inputs": inputs, "dims": dims, "seed": seed, "providers": providers}
        self.rtol, self.atol = rtol, atol
        self._stack = contextlib.ExitStack()
        self._source = None  # what onnxruntime builds the reference's sessions from
        self._sessions: dict = {}  # provider -> session whose outputs are not known yet
        self._outputs: dict = {}  # provider (or REFERENCE) -> the reference's outputs
        self._refusal: engines.Refused | None = None  # onnxruntime cannot build the reference's session

    def __enter__(self) -> "Reference":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._sessions.clear()
        self._source = None
        self._stack.close()

    @functools.cached_property
    def feeds(self) -> dict[str, np.ndarray]:
        inputs, dims, seed = self._settings["inputs"], self._settings["dims"], self._settings["seed"]
        return model_inputs.generate_inputs(self.graph, dims, seed) if inputs is None else model_inputs.given_inputs(self.graph, inputs)

    @functools.cached_property
    def providers(self) -> list[str]:
        return engines.check_providers(self._settings["providers"])

    def check(self, candidate) -> Verification:
        """Run `candidate` on the reference's inputs and compare every output on every provider.

        A mismatch is a failed Verification, not an exception; VerificationFailed means no
        engine could run the candidate. Bad inputs, dims or providers raise UsageError."""
        cand_graph = model_inputs.graph_model(candidate)
        feeds, providers = self.feeds, self.providers
        extra = [v.name for v in model_inputs.free_inputs(cand_graph) if v.name not in feeds]
        if extra:  # a candidate that needs an input the reference lacks cannot run
            note = f"the candidate has inputs the reference lacks: {', '.join(extra)}"
            return Verification(False, "onnxruntime", tuple(providers), (), 0.0, note)
        start = time.perf_counter()  # counts the reference's share too when it runs now
        engine, outputs, note = self._run(candidate)
        seconds = time.perf_counter() - start
        checks = tuple(c for p, (ref, cand) in outputs.items() for c in compare_all(p, ref, cand, self.rtol, self.atol))
        return Verification(all(c.passed for c in checks), engine, tuple(outputs), checks, seconds, note)

    def _run(self, candidate) -> tuple[str, dict, str]:
        """(engine, {provider: (ref_out, cand_out)}, note): onnxruntime, else onnx.reference."""
        with contextlib.ExitStack() as stack:
            try:
                return "onnxruntime", self._run_ort(engines.ort_source(candidate, stack)), ""
            except engines.Refused as refusal:
                note = f"{refusal}; verified with onnx.reference"
        if REFERENCE not in self._outputs:
            self._outputs[REFERENCE] = engines.run_reference(self.model, self.feeds, "reference")
        outputs = (self._outputs[REFERENCE], engines.run_reference(candidate, self.feeds, "candidate"))
        return REFERENCE, {REFERENCE: outputs}, note

    def _run_ort(self, source) -> dict[str, tuple[dict, dict]]:
        """Build every session first (a refusal sends both models to onnx.reference), then run."""
        candidates = {p: (self._prepare(p), engines.ort_session(source, p, "candidate")) for p in self.providers}
        return {
            p: (self._ort_outputs(p), engines.run_ort(session, self.feeds, "candidate", p))
            for p, (_, session) in candidates.items()
        }

    def _prepare(self, provider: str) -> None:
        """Make sure the reference's outputs on `provider` can be had: its session, built once."""
        if self._refusal is not None:
            raise self._refusal
        if provider in self._outputs or provider in self._sessions:
            return
        if self._source is None:
            self._source = engines.ort_source(self.model, self._stack)
        try:
            self._sessions[provider] = engines.ort_session(self._source, provider, "reference")
        except engines.Refused as refusal:
            self._refusal = refusal
            raise

    def _ort_outputs(self, provider: str) -> dict[str, np.ndarray]:
        """The reference's outputs on `provider`, run once; its session is not needed after."""
        if provider not in self._outputs:
            self._outputs[provider] = engines.run_ort(self._sessions[provider], self.feeds, "reference", provider)
            del self._sessions[provider]
            if not self._sessions:  # run on every provider: a serialised model is not needed again
                self._source = None
        return self._outputs[provider]


def verify(reference, candidate, *, inputs=None, dims=None, providers=None,
           rtol=None, atol=None, seed=0) -> Verification:
    """Run both models on the same inputs and compare every output on every provider.

    A mismatch is a failed Verification, not an exception; VerificationFailed means neither
    engine could run a model. Bad inputs, dims or providers raise UsageError. Checking several
    candidates against one reference: `Reference`."""
    settings = dict(inputs=inputs, dims=dims, providers=providers, rtol=rtol, atol=atol, seed=seed)
    with Reference(reference, **settings) as prepared:
        return prepared.check(candidate)



__all__ = [
    "CPU", "CUDA", "REFERENCE", "OutputCheck", "Reference", "Verification", "available_providers",
    "compare_outputs", "default_tolerance", "generate_inputs", "load_problem", "run_model", "verify",
]
generate_inputs = model_inputs.generate_inputs
