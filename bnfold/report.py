"""The fold report: what happened to every BatchNormalization node, and the exit code it implies.

Every BN of the input ends up as exactly one record: `Folded` (into which node, by which rule)
or `Kept` (with a reason a user can act on).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Folded:
    bn: str  # the BatchNormalization node's name (or its output name when unnamed)
    into: str  # the node that absorbed it
    rule: str  # the rule's name, e.g. "bn_into_conv"
    graph: str = ""  # "" for the main graph, else the path of the subgraph ("If_0/then_branch")

    def to_dict(self) -> dict:
        return {"bn": self.bn, "status": "folded", "into": self.into, "rule": self.rule, "graph": self.graph}


@dataclasses.dataclass(frozen=True)
class Kept:
    bn: str
    reason: str
    graph: str = ""

    def to_dict(self) -> dict:
        return {"bn": self.bn, "status": "kept", "reason": self.reason, "graph": self.graph}


@dataclasses.dataclass(frozen=True)
class FoldReport:
    """Outcome of one fold: one record per BatchNormalization node of the input."""

    folded: tuple[Folded, ...] = ()
    kept: tuple[Kept, ...] = ()
    bn_before: int = 0
    bn_after: int = 0
    seconds: float = 0.0

    @property
    def modified(self) -> bool:
        return bool(self.folded)

    def rule_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(f.rule for f in self.folded).items()))

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "bn_before": self.bn_before,
            "bn_after": self.bn_after,
            "rules": self.rule_counts(),
            "folded": [f.to_dict() for f in self.folded],
            "kept": [k.to_dict() for k in self.kept],
            "seconds": round(self.seconds, 6),
        }
