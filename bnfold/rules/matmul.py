"""bn_into_matmul and bn_into_matmul_add: MatMul (+ Add) -> BN.

Only where the product is 2-D [N, C]: then BN's channel axis 1 is the product's last axis, the
columns of the constant weight B [K, C]. B' = B * scale along axis 1; the shift becomes a bias:
MatMul -> BN turns the BN into Add(product, shift); MatMul -> Add(bias) -> BN gets
bias' = scale * bias + shift. A rank-3 product [N, L, C] normalised over axis 1 (L) is not a
per-column scale of B and is kept.
"""

from __future__ import annotations

from bnfold import algebra
from bnfold.graph import DEFAULT_DOMAINS, node_label
from bnfold.report import Kept
from bnfold.rules.base import BatchNorm, ForwardRule, Plan, check_sole_use


def matmul_weight_2d(rule: ForwardRule, bn: BatchNorm, matmul, graph):
    """The constant 2-D weight B [K, C] of a MatMul, or Kept."""
    weight = rule.weight(bn, graph, matmul, 1, "weight (second input)")
    if isinstance(weight, Kept) or weight.ndim == 2:
        return weight
    return Kept(bn.label, f"MatMul '{node_label(matmul)}' weight has rank {weight.ndim}, expected 2", graph.path)


def match_matmul_weight(rule: ForwardRule, bn: BatchNorm, matmul, graph):
    """B of a 2-D MatMul feeding BN, or Kept with why the product is not provably [N, C]."""
    weight = matmul_weight_2d(rule, bn, matmul, graph)
    if isinstance(weight, Kept):
        return weight
    rank = graph.model.rank(bn.x)
    if rank is None:
        rank = graph.model.rank(matmul.input[0])
    if rank is None:
        return Kept(bn.label, "cannot prove the MatMul product is 2-D [N, C] (rank unknown)", graph.path)
    if rank != 2:
        return Kept(bn.label, f"MatMul product has rank {rank}: BN normalises axis 1, not the feature axis", graph.path)
    return rule.channel_mismatch(bn, graph, matmul, weight.shape[1]) or weight


class BnIntoMatMul(ForwardRule):
    name = "bn_into_matmul"
    producer_ops = ("MatMul",)
    quantized_weights = True

    def plan(self, bn: BatchNorm, matmul, graph) -> Plan | Kept:
        weight = match_matmul_weight(self, bn, matmul, graph)
        if isinstance(weight, Kept):
            return weight
        new_weight = self.scaled_weight(bn, graph, matmul, 1, weight, axis=1)
        if isinstance(new_weight, Kept):
            return new_weight
        return Plan(bn, into=matmul, new_inputs=[(matmul, 1, new_weight)], bn_becomes_add=algebra.cast_like(bn.shift, weight.dtype))


class BnIntoMatMulAdd(ForwardRule):
    name = "bn_into_matmul_add"
    producer_ops = ("Add",)
    quantized_weights = True

    def targets(self, bn: BatchNorm, graph) -> bool:
        """Only an Add with a MatMul operand: a residual Add is not this rule's business."""
        if not super().targets(bn, graph):
            return False
        add = graph.producer[bn.x]
        return any(_is_matmul(graph.producer.get(name)) for name in add.input)

    def plan(self, bn: BatchNorm, add, graph) -> Plan | Kept:
        found = self._matmul_and_bias(bn, add, graph)
        if isinstance(found, Kept):
            return found
        matmul, bias_position = found
        weight = self.matmul_weight(bn, matmul, graph)
        if isinstance(weight, Kept):
            return weight
        bias = self.weight(bn, graph, add, bias_position, "bias")
        if isinstance(bias, Kept):
            return bias
        if bias.ndim > self.max_bias_rank:
            return Kept(bn.label, f"Add bias has rank {bias.ndim}, expected at most {self.max_bias_rank}", graph.path)
        new_weight = self.scaled_weight(bn, graph, matmul, 1, weight, axis=1)
        if isinstance(new_weight, Kept):
            return new_weight
        new_bias = self.new_bias(bn, graph, add, bias_position, algebra.fold_bias(bias, bn.scale, bn.shift, channel_axis=-1), bias.dtype)
        if isinstance(new_bias, Kept):
            return new_bias
        return Plan(bn, into=matmul, new_inputs=[(matmul, 1, new_weight), (add, bias_position, new_bias)])

    max_bias_rank = 2  # the product is [N, C]

    def matmul_weight(self, bn: BatchNorm, matmul, graph):
        """B [K, C], once the product is proven [N, C] (or Kept)."""
        return match_matmul_weight(self, bn, matmul, graph)

    @staticmethod
    def _matmul_and_bias(bn: BatchNorm, add, graph):
        """The MatMul operand of the Add (used only by it) and the other operand's position."""
        for position, other in ((0, 1), (1, 0)):
            producer = graph.producer.get(add.input[position])
            if _is_matmul(producer):
                sole = check_sole_use(bn, graph, producer, add.input[position], add)
                return sole if isinstance(sole, Kept) else (producer, other)
        return Kept(bn.label, f"no foldable producer: input comes from Add '{node_label(add)}' without a MatMul operand", graph.path)


def _is_matmul(node) -> bool:
    return node is not None and node.op_type == "MatMul" and node.domain in DEFAULT_DOMAINS
