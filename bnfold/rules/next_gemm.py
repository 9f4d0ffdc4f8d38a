"""bn_into_next_gemm: BN -> Gemm becomes one Gemm (BN over the features A of a classifier head).

Gemm computes Y = alpha * A B' + beta * C with A [M, K] (transA=0) and B' = B (transB=0, [K, N])
or B^T (transB=1, B [N, K]). BN's channel axis 1 of A is K, B's input axis (0, or 1 when
transB=1). With A = scale * x + shift:
    Y = alpha * x (scale * B') + (beta * C + alpha * shift B')
so B's input axis is scaled by `scale`, C' = beta * C + alpha * (shift @ B') (created when absent,
broadcast to [N] or C's own shape) and beta becomes 1. With transA=1, BN's channels are A^T's
rows, the batch rows of the product: kept.
"""

from __future__ import annotations

import numpy as np

from bnfold import algebra
from bnfold.graph import node_label
from bnfold.report import Kept
from bnfold.rules.base import BackwardRule, BatchNorm, Plan, attribute


class BnIntoNextGemm(BackwardRule):
    name = "bn_into_next_gemm"
    consumer_ops = ("Gemm",)

    def plan(self, bn: BatchNorm, gemm, scale, shift, graph) -> Plan | Kept:
        if attribute(gemm, "transA", 0):
            return Kept(bn.label, f"Gemm '{node_label(gemm)}' has transA=1: BN's channels become the product's rows", graph.path)
        weight = self.weight(bn, graph, gemm, 1, "B")
        if isinstance(weight, Kept):
            return weight
        if weight.ndim != 2:
            return Kept(bn.label, f"Gemm '{node_label(gemm)}' B has rank {weight.ndim}, expected 2", graph.path)
        in_axis = 1 if attribute(gemm, "transB", 0) else 0
        bias = self.input_mismatch(bn, graph, gemm, weight.shape[in_axis], len(scale)) or self.optional_weight(bn, graph, gemm, 2, "C")
        if isinstance(bias, Kept):
            return bias
        alpha, beta = attribute(gemm, "alpha", 1.0), attribute(gemm, "beta", 1.0)
        new_bias = np.float64(alpha) * algebra.shift_through(weight, shift, in_axis=in_axis)
        if bias is not None:
            new_bias = new_bias + np.float64(beta) * bias.astype(np.float64)
        return Plan(
            bn,
            into=gemm,
            new_inputs=[
                (gemm, 1, algebra.cast_like(algebra.scale_input_channels(weight, scale, in_axis=in_axis), weight.dtype)),
                (gemm, 2, algebra.cast_like(new_bias, weight.dtype)),
            ],
            attributes=[(gemm, "beta", 1.0)],
            backward=True,
        )
