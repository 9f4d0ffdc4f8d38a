"""bn_into_gemm: Gemm -> BN becomes one Gemm.

Gemm computes Y = alpha * A' B' + beta * C with a 2-D output [M, N], so BN's channel axis 1 is
Gemm's N. B' is scaled along N (B's axis 1, or axis 0 when transB=1);
C' = scale * (beta * C) + shift broadcast to [N] or C's own shape, and beta becomes 1.
"""

from __future__ import annotations

import numpy as np

from bnfold import algebra
from bnfold.report import Kept
from bnfold.rules.base import BatchNorm, ForwardRule, Plan, attribute


class BnIntoGemm(ForwardRule):
    name = "bn_into_gemm"
    producer_ops = ("Gemm",)
    quantized_weights = True

    def plan(self, bn: BatchNorm, gemm, graph) -> Plan | Kept:
        weight = self.weight(bn, graph, gemm, 1, "B")
        if isinstance(weight, Kept):
            return weight
        if weight.ndim != 2:
            return Kept(bn.label, f"Gemm B has rank {weight.ndim}, expected 2", graph.path)
        axis = 0 if attribute(gemm, "transB", 0) else 1
        mismatch = self.channel_mismatch(bn, graph, gemm, weight.shape[axis])
        if mismatch:
            return mismatch
        bias = self.optional_weight(bn, graph, gemm, 2, "C")
        if isinstance(bias, Kept):
            return bias
        if bias is not None and bias.ndim > 2:
            return Kept(bn.label, f"Gemm C has rank {bias.ndim}, expected at most 2", graph.path)
        beta = attribute(gemm, "beta", 1.0)
        scaled_bias = None if bias is None else np.float64(beta) * bias.astype(np.float64)
        new_weight = self.scaled_weight(bn, graph, gemm, 1, weight, axis)
        if isinstance(new_weight, Kept):
            return new_weight
        new_bias = self.new_bias(bn, graph, gemm, 2, algebra.fold_bias(scaled_bias, bn.scale, bn.shift, channel_axis=-1), weight.dtype)
        if isinstance(new_bias, Kept):
            return new_bias
        return Plan(bn, into=gemm, new_inputs=[(gemm, 1, new_weight), (gemm, 2, new_bias)], attributes=[(gemm, "beta", 1.0)])
