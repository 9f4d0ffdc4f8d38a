"""bn_into_conv: Conv -> BN becomes one Conv.

W' = scale[o] * W[o, ...] along the output-channel axis 0 (any group count: with groups the
output channels still run along axis 0), B' = scale * B + shift (B = 0 when absent).
"""

from __future__ import annotations

from bnfold import algebra
from bnfold.report import Kept
from bnfold.rules.base import BatchNorm, ForwardRule, Plan


class BnIntoConv(ForwardRule):
    name = "bn_into_conv"
    producer_ops = ("Conv",)

    def plan(self, bn: BatchNorm, conv, graph) -> Plan | Kept:
        weight = self.weight(bn, graph, conv, 1, "weight W")
        if isinstance(weight, Kept):
            return weight
        mismatch = self.channel_mismatch(bn, graph, conv, weight.shape[0] if weight.ndim else 0)
        if mismatch:
            return mismatch
        bias = self.optional_weight(bn, graph, conv, 2, "bias B")
        if isinstance(bias, Kept):
            return bias
        new_weight = algebra.scale_along_axis(weight, bn.scale, axis=0)
        new_bias = algebra.fold_bias(bias, bn.scale, bn.shift)
        return Plan(
            bn,
            into=conv,
            new_inputs=[
                (conv, 1, algebra.cast_like(new_weight, weight.dtype)),
                (conv, 2, algebra.cast_like(new_bias, weight.dtype)),
            ],
        )
