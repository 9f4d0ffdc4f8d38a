"""The fold report: what happened to every BatchNormalization node, and the exit code it implies.

Every BN of the input ends up as exactly one record: `Folded` (into which node, by which rule)
or `Kept` (with a reason a user can act on). BN written out as arithmetic (a chain of constant
Mul / Add / Sub / Div, see bnfold.rules.affine_chain) gets records of its own, in `affine_folded`
and `affine_kept`: `bn` is the chain's first op, `ops` its op types ("Sub+Div+Mul+Add"); they are
not BatchNormalization nodes and never count in bn_before / bn_after.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

SCHEMA_VERSION = 1
BATCHNORM = "BatchNormalization"
ROLLED_BACK = "(rolled back)"  # how a kept record's reason ends when verification undid its fold


@dataclasses.dataclass(frozen=True)
class Folded:
    bn: str  # the BatchNormalization node's name (or its output name when unnamed)
    into: str  # the node that absorbed it
    rule: str  # the rule's name, e.g. "bn_into_conv"
    graph: str = ""  # "" for the main graph, else the path of the subgraph ("If_0/then_branch")
    ops: str = BATCHNORM  # what was folded: a BN, or an affine chain's op types ("Mul+Add")
    # The fold site: the value that carried BN's output in the original and is now computed by
    # the folded layer (forward), or the output of the layer that absorbed BN (backward). Both
    # models name it alike, so verification compares it there (see bnfold.sites).
    site: str = ""
    # Folded into a weight a DequantizeLinear makes (bnfold.weights): its scale took BN's scale;
    # `bias_rounding`: an int32 bias quantized again, its largest rounding in steps (<= 0.5).
    quantized: bool = False
    bias_rounding: float | None = None

    def to_dict(self) -> dict:
        site = {"site": self.site} if self.site else {}
        quantized = {"quantized": True, "bias_rounding_steps": self.bias_rounding} if self.quantized else {}
        return {"bn": self.bn, "status": "folded", "into": self.into, "rule": self.rule, "graph": self.graph,
                **site, **_ops(self.ops), **quantized}


@dataclasses.dataclass(frozen=True)
class Kept:
    bn: str
    reason: str
    graph: str = ""
    ops: str = BATCHNORM

    def to_dict(self) -> dict:
        return {"bn": self.bn, "status": "kept", "reason": self.reason, "graph": self.graph, **_ops(self.ops)}


@dataclasses.dataclass(frozen=True)
class ChannelSpread:
    """A folded layer whose output channels' max|W| differ by over bnfold.readiness.THRESHOLD:
    per-tensor int8 loses its narrow channels, per-channel quantization does not."""

    layer: str  # the layer node's name (or op and output name when unnamed)
    ratio: float  # largest / smallest per-channel max|W|, all-zero channels left out
    channels: int  # output channels of the layer
    graph: str = ""  # "" for the main graph, else the subgraph's path (as in Folded)
    zero_channels: int = 0  # channels whose weights are all zero (left out of the ratio)

    def to_dict(self) -> dict:
        return {
            "layer": self.layer, "graph": self.graph, "ratio": float(f"{self.ratio:.6g}"),
            "channels": self.channels, "zero_channels": self.zero_channels,
        }


def _ops(ops: str) -> dict:
    """Only chain records carry "ops" (BN records keep their schema-1 keys)."""
    return {} if ops == BATCHNORM else {"ops": ops}


@dataclasses.dataclass(frozen=True)
class FoldReport:
    """Outcome of one fold: one record per BatchNormalization node of the input."""

    folded: tuple[Folded, ...] = ()
    kept: tuple[Kept, ...] = ()
    bn_before: int = 0
    bn_after: int = 0
    seconds: float = 0.0
    affine_folded: tuple[Folded, ...] = ()  # BN written out as arithmetic, folded
    affine_kept: tuple[Kept, ...] = ()
    warnings: tuple[str, ...] = ()  # what loading found and tolerated (bnfold.findings)
    noops_removed: dict = dataclasses.field(default_factory=dict)  # op type -> no-op nodes removed (bnfold.noops)
    # initializers listed as graph inputs that the fold read as constants, and why ("IR 3 model",
    # "--freeze-initializer-inputs"); the frozen ones it no longer lists (bnfold.initializer_inputs)
    constant_inputs: tuple[str, ...] = ()
    constant_inputs_reason: str = ""
    unlisted_inputs: tuple[str, ...] = ()
    peak_rss_mb: float | None = None  # the process's peak memory when the fold was done (bnfold.memory)
    # quantization readiness (bnfold.readiness): the folded layers whose per-channel weight
    # ranges spread over the threshold, worst first (the threshold: None when not looked for);
    # float32/16 subnormals the folds flushed to zero
    channel_spread: tuple[ChannelSpread, ...] = ()
    channel_spread_threshold: float | None = None
    subnormals_flushed: int = 0

    @property
    def modified(self) -> bool:
        return bool(self.folded or self.affine_folded or self.noops_removed)

    @property
    def rolled_back(self) -> tuple[Kept, ...]:
        """BN (and chains) whose fold verification undid (bnfold.rollback)."""
        return tuple(k for k in (*self.kept, *self.affine_kept) if k.reason.endswith(ROLLED_BACK))

    def to_check_dict(self) -> dict:
        """The report of a dry run (`bnfold check`): the model as it is, and what would fold.
        `bn_after` is the BN count now; `bn_after_fold` after a fold; records say "foldable"."""
        data = self.to_dict()
        for key in ("folded", "affine_folded"):
            for record in data[key]:
                record["status"] = "foldable"
        data["foldable"], data["affine_foldable"] = data.pop("folded"), data.pop("affine_folded")
        data["noops_removable"] = data.pop("noops_removed")
        data.pop("rolled_back")
        data.update(dry_run=True, bn_after=self.bn_before, bn_after_fold=self.bn_after)
        return data

    def rule_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(f.rule for f in self.folded).items()))

    def affine_rule_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(f.rule for f in self.affine_folded).items()))

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "bn_before": self.bn_before,
            "bn_after": self.bn_after,
            "rules": self.rule_counts(),
            "folded": [f.to_dict() for f in self.folded],
            "kept": [k.to_dict() for k in self.kept],
            "affine_rules": self.affine_rule_counts(),
            "affine_folded": [f.to_dict() for f in self.affine_folded],
            "affine_kept": [k.to_dict() for k in self.affine_kept],
            "rolled_back": [k.graph + k.bn for k in self.rolled_back],
            "noops_removed": dict(self.noops_removed),
            "warnings": list(self.warnings),
            "constant_inputs": {
                "reason": self.constant_inputs_reason or None,
                "names": list(self.constant_inputs),
                "no_longer_inputs": list(self.unlisted_inputs),
            },
            "seconds": round(self.seconds, 6),
            "peak_rss_mb": None if self.peak_rss_mb is None else round(self.peak_rss_mb, 1),
            "channel_spread": {"threshold": self.channel_spread_threshold, "layers": [s.to_dict() for s in self.channel_spread]},
            "subnormals_flushed": self.subnormals_flushed,
        }
