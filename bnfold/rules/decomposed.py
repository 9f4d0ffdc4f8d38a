"""affine_into_*: fold a BN written out as arithmetic (bnfold.rules.affine_chain) like a BN.

A recognised chain computes y = scale * x + shift per channel, exactly what an inference-mode BN
computes, so each BN rule's checks and weight arithmetic apply unchanged: affine_into_conv uses
bn_into_conv's plan, affine_into_next_conv bn_into_next_conv's (with its padding condition), and
so on. Only the graph edit differs: every op of the chain goes, not one BN node. Forward: the
producer takes over the chain's last output (a MatMul gets one Add(shift) after it unless the
shift is 0). Backward: the consumer reads the chain's input (a MatMul may get one Add after it).

A fold must remove ops: MatMul -> Add(bias) already is the folded form and stays. A chain is
reported (folded, or kept with the reason) only when it has a neighbour a rule folds into: a
Conv, ConvTranspose, Gemm, or a MatMul on provably 2-D [N, C] data (the bias Add of a rank-3
Linear or an attention scale is not BN written out, and says nothing useful).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bnfold.graph import GraphIndex, node_label
from bnfold.report import Folded, Kept
from bnfold.rules.affine_chain import ARITHMETIC_OPS, AffineChain, match_chain, value_dims
from bnfold.rules.base import Plan, apply_new_tensors, match_consumer, plan_changes, plan_site
from bnfold.rules.conv import BnIntoConv
from bnfold.rules.conv_transpose import BnIntoConvTranspose
from bnfold.rules.gemm import BnIntoGemm
from bnfold.rules.matmul import BnIntoMatMul
from bnfold.rules.next_conv import BnIntoNextConv
from bnfold.rules.next_gemm import BnIntoNextGemm
from bnfold.rules.next_matmul import BnIntoNextMatMul
from bnfold.rules.through_flatten import BnThroughFlattenIntoGemm, BnThroughFlattenIntoMatMul


class AffineRule:
    """A BN rule applied to an affine chain, named affine_<what the BN rule folds into>."""

    def __init__(self, bn_rule, on_matmul_data: bool = False):
        self.bn_rule = bn_rule
        self.name = "affine_" + bn_rule.name.removeprefix("bn_")
        self.direction = bn_rule.direction
        self.on_matmul_data = on_matmul_data  # the chain's data is the MatMul's own input or output

    def targets(self, chain: AffineChain, graph: GraphIndex) -> bool:
        return self.bn_rule.targets(chain, graph)

    def reportable(self, chain: AffineChain, graph: GraphIndex) -> bool:
        return not self.on_matmul_data or _rank(chain.x, graph) == 2

    def match(self, chain: AffineChain, graph: GraphIndex) -> Plan | Kept:
        return self.bn_rule.match(chain, graph)


AFFINE_RULES = (
    AffineRule(BnIntoConv()),
    AffineRule(BnIntoConvTranspose()),
    AffineRule(BnIntoGemm()),
    AffineRule(BnIntoMatMul(), on_matmul_data=True),
    AffineRule(BnIntoNextConv()),
    AffineRule(BnIntoNextGemm()),
    AffineRule(BnIntoNextMatMul(), on_matmul_data=True),
    AffineRule(BnThroughFlattenIntoGemm()),
    AffineRule(BnThroughFlattenIntoMatMul()),
)


def fold_chain(chain: AffineChain, graph: GraphIndex, rules) -> Folded | Kept | None:
    """Fold `chain` forward if possible, else backward; Kept with the reasons, or None when
    there is nothing to report (no neighbour a rule folds into, or already minimal)."""
    reasons, minimal = [], False
    for direction in ("forward", "backward"):
        rule, result = _match_direction(chain, graph, rules, direction)
        if isinstance(result, Plan):
            plan = _without_zero_bias(result)
            if _ops_added(plan) < len(chain.ops):
                record = Folded(chain.label, node_label(plan.into), rule.name, graph.path, ops=chain.op_types, site=plan_site(plan))
                graph.moved_sites([*plan_changes(plan), *(op.node.output[0] for op in chain.ops)], record.site)
                apply_chain_plan(plan, chain, graph)
                return record
            minimal = True
        elif result is not None:
            reasons.append(result if direction == "forward" else f"next: {result}")
    if minimal or not reasons:
        return None
    return Kept(chain.label, "; ".join(reasons), graph.path, ops=chain.op_types)


def _match_direction(chain: AffineChain, graph: GraphIndex, rules, direction: str):
    """(rule, its Plan or the reason it refused), (None, None) when no reportable neighbour."""
    targeting = [r for r in AFFINE_RULES if r.direction == direction and r.targets(chain, graph)]
    if not targeting and direction == "backward":
        return None, _blocked_reason(chain, graph)
    if not any(r.reportable(chain, graph) for r in targeting):
        return None, None
    rule = next((r for r in targeting if r in rules), None)
    if rule is None:
        return None, f"rule {', '.join(r.name for r in targeting)} is not enabled"
    if chain.reason:
        return rule, chain.reason
    result = rule.match(chain, graph)
    return rule, result if isinstance(result, Plan) else result.reason


def _blocked_reason(chain: AffineChain, graph: GraphIndex) -> str | None:
    """Why a chain whose output feeds a Conv / Gemm (or a MatMul on 2-D data) among other readers,
    or is also a graph output, cannot fold into it; None when it feeds no such op."""
    matmul = _rank(chain.x, graph) == 2
    linear = [n for n in graph.users(chain.y) if n.op_type in ("Conv", "Gemm") or (matmul and n.op_type == "MatMul")]
    path = match_consumer(chain, graph)
    return path.reason if linear and isinstance(path, Kept) else None


def _rank(name: str, graph: GraphIndex) -> int | None:
    dims = value_dims(name, graph)
    return None if dims is None else len(dims)


def _without_zero_bias(plan: Plan) -> Plan:
    """A chain without a shift (Mul, Div) needs no Add after a MatMul."""
    if plan.bn_becomes_add is not None and not np.any(plan.bn_becomes_add):
        plan = dataclasses.replace(plan, bn_becomes_add=None)
    if plan.bias_after is not None and not np.any(plan.bias_after):
        plan = dataclasses.replace(plan, bias_after=None)
    return plan


def _ops_added(plan: Plan) -> int:
    return int(plan.bn_becomes_add is not None) + int(plan.bias_after is not None)


def apply_chain_plan(plan: Plan, chain: AffineChain, graph: GraphIndex) -> None:
    """The plan's new tensors in, the chain's ops out (each first turned into Identity of its
    data operand, then removed the way a folded BN is)."""
    apply_new_tensors(plan, graph)
    last = chain.ops[-1].node
    for op in chain.ops:
        node = op.node
        data = node.input[op.data]
        if node is last and plan.bn_becomes_add is not None:
            graph.replace_node(node, "Add", [data])
            graph.set_constant_input(node, 1, plan.bn_becomes_add, f"{node.output[0]}_bnfold_shift")
            return
        graph.replace_node(node, "Identity", [data])
        if plan.backward:
            graph.short_circuit(node)
        else:
            graph.bypass(node, node.output[0])


def prime_types(index) -> None:
    """Look up the types the chain proofs need before any fold edits the model: a value without
    a declared type makes ModelIndex run ONNX shape inference once, and on a half-edited model
    (folded nodes not swept yet) inference leaves later values untyped."""
    for graph in index.graphs:
        for node in graph.nodes:
            if node.op_type in ARITHMETIC_OPS and len(node.input) == 2 and any(graph.constant(n) is not None for n in node.input):
                for name in node.input:
                    index.value_type(name)


class ChainFolder:
    """Folds the affine chains of one graph; one record per chain that has something to report."""

    def __init__(self, graph: GraphIndex, rules, skip=None):
        self.graph, self.rules, self.skip = graph, rules, skip or {}
        self.folded: list[Folded] = []
        self._kept: dict[int, Kept] = {}

    @property
    def kept(self) -> list[Kept]:
        return list(self._kept.values())

    def sweep(self) -> bool:
        """Fold chains until a pass over the graph folds none; whether any was folded."""
        before = len(self.folded)
        progress = True
        while progress:
            progress = False
            for node in self.graph.live_nodes():
                progress |= isinstance(self._fold(node), Folded)
        return len(self.folded) > before

    def _fold(self, node) -> Folded | Kept | None:
        chain = None if id(node) in self.graph.removed else match_chain(node, self.graph)
        reason = None if chain is None else self.skip.get((self.graph.path, chain.label))
        if reason:
            result = Kept(chain.label, reason, self.graph.path, ops=chain.op_types)
        else:
            result = None if chain is None else fold_chain(chain, self.graph, self.rules)
        self._kept.pop(id(node), None)
        if isinstance(result, Kept):
            self._kept[id(node)] = result
        elif isinstance(result, Folded):
            self.folded.append(result)
        return result
