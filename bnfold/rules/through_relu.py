"""bn_scale_through_relu: producer -> Relu / LeakyRelu -> BN; BN's scale folds into the producer.

Relu and LeakyRelu are positively homogeneous: f(s * z) = s * f(z) for every s > 0 (s * z has
z's sign, so LeakyRelu picks the same branch). With a per-channel scale that is > 0 on every
channel,
    BN(f(z)) = scale * f(z) + shift = f(scale * z) + shift,
so the scale folds into the producer (Conv / ConvTranspose / Gemm / MatMul / MatMul + Add, by
that producer's own forward rule with a zero shift: W along its output channels, bias times
scale) and BN becomes Add(f(...), shift) along axis 1, or disappears when the shift is zero.
A zero or negative scale does not commute with f (relu(-z) != -relu(z)), and the shift never
moves through a non-linearity (relu(z + t) != relu(z) + t): such BN are kept.

Is it worth it when an Add remains? Yes, as a last resort: the BatchNormalization node is gone,
so runtimes and converters without it run the model, and an Add is half of BN's per-element
multiply-add (often fused as a bias by runtimes). But a BN folded entirely into the next op
(a backward rule) leaves nothing behind, so this rule defers to the backward rule that would fold
it and applies only when none can (e.g. Conv -> Relu -> BN -> Conv with zero padding, the
post-activation BN of many Keras models). With `--rules` excluding that backward rule, this
rule still defers to it (the BN is then kept, with both reasons).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bnfold import algebra
from bnfold.graph import DEFAULT_DOMAINS, node_label
from bnfold.report import Kept
from bnfold.rules.base import BatchNorm, ForwardRule, Plan, check_sole_use
from bnfold.rules.conv import BnIntoConv
from bnfold.rules.conv_transpose import BnIntoConvTranspose
from bnfold.rules.gemm import BnIntoGemm
from bnfold.rules.matmul import BnIntoMatMul, BnIntoMatMulAdd

ACTIVATIONS = ("Relu", "LeakyRelu")
# The forward rule that folds a scale into each producer (Add: MatMul + bias, a Linear layer).
PRODUCER_RULES = {
    "Conv": BnIntoConv(),
    "ConvTranspose": BnIntoConvTranspose(),
    "Gemm": BnIntoGemm(),
    "MatMul": BnIntoMatMul(),
    "Add": BnIntoMatMulAdd(),
}


class BnScaleThroughRelu(ForwardRule):
    """`defer_to`: the backward rules whose full fold is preferred to this one's (it leaves an
    Add); given by the registry, which knows them, so that this module need not import it."""

    name = "bn_scale_through_relu"
    producer_ops = ACTIVATIONS

    def __init__(self, defer_to=()):
        self.defer_to = tuple(defer_to)

    def targets(self, bn: BatchNorm, graph) -> bool:
        return super().targets(bn, graph) and inner_producer(graph.producer[bn.x], graph) is not None

    def plan(self, bn: BatchNorm, activation, graph) -> Plan | Kept:
        rule, producer = inner_producer(activation, graph)
        sole = check_sole_use(bn, graph, producer, activation.input[0], activation)
        if isinstance(sole, Kept):
            return sole
        reason = positive_scale_reason(bn, activation, graph) or backward_preferred(bn, activation, graph, self.defer_to)
        if reason:
            return reason
        plan = rule.plan(dataclasses.replace(bn, shift=np.zeros_like(bn.shift)), producer, graph)
        return plan if isinstance(plan, Kept) else with_shift_after(bn, plan, graph)


def inner_producer(activation, graph):
    """(forward rule, node) for the op computing the activation's input, or None."""
    node = graph.producer.get(activation.input[0]) if activation.input else None
    if node is None or node.domain not in DEFAULT_DOMAINS or node.op_type not in PRODUCER_RULES:
        return None
    if node.op_type == "Add":
        operands = (graph.producer.get(name) for name in node.input)
        if not any(n is not None and n.op_type == "MatMul" and n.domain in DEFAULT_DOMAINS for n in operands):
            return None
    return PRODUCER_RULES[node.op_type], node


def positive_scale_reason(bn: BatchNorm, activation, graph) -> Kept | None:
    bad = np.flatnonzero(~(bn.scale > 0))
    if not bad.size:
        return None
    first = int(bad[0])
    where = f"{activation.op_type} '{node_label(activation)}'"
    return Kept(
        bn.label,
        f"scale is not positive on {bad.size} of {bn.channels} channels (channel {first}: {bn.scale[first]:.3g}): "
        f"only a positive scale moves through {where}",
        graph.path,
    )


def backward_preferred(bn: BatchNorm, activation, graph, backward_rules) -> Kept | None:
    """Kept when a backward rule folds this BN entirely: better than leaving an Add."""
    rule = next((r for r in backward_rules if r.targets(bn, graph)), None)
    if rule is None or isinstance(rule.match(bn, graph), Kept):
        return None
    where = f"{activation.op_type} '{node_label(activation)}'"
    return Kept(bn.label, f"{rule.name} folds it entirely, preferred to moving the scale through {where}", graph.path)


def with_shift_after(bn: BatchNorm, plan: Plan, graph) -> Plan | Kept:
    """The producer's plan (scale only), with BN turned into Add(shift) on axis 1, or removed."""
    weight = getattr(plan.new_inputs[0][2], "value", plan.new_inputs[0][2])  # a QuantizedWrite: what the layer reads
    shift = algebra.cast_like(bn.shift, weight.dtype)
    plan = dataclasses.replace(plan, bn=bn, bn_becomes_add=None)
    if not np.any(shift):
        return plan
    if graph.model.opset("") < 7:
        return Kept(bn.label, "adding the shift needs Add with broadcasting (opset >= 7)", graph.path)
    rank = graph.model.rank(bn.x)
    if rank is None:  # MatMul and Gemm products are proven 2-D; a Conv's output has W's rank
        rank = weight.ndim if plan.into.op_type in ("Conv", "ConvTranspose") else 2
    return dataclasses.replace(plan, bn_becomes_add=shift.reshape((-1,) + (1,) * (rank - 2)))
