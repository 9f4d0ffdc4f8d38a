"""bn_into_conv_transpose: ConvTranspose -> BN becomes one ConvTranspose.

A ConvTranspose weight is [C_in, C_out/group, k...]: the output channel o = g * C_out/group + j
sits on axis 1 *within* input-channel block g, so the scale is applied per group
(W'[g, :, j] = scale[g * C_out/group + j] * W[g, :, j]); B' = scale * B + shift.
"""

from __future__ import annotations

from bnfold import algebra
from bnfold.report import Kept
from bnfold.rules.base import BatchNorm, ForwardRule, Plan, attribute


class BnIntoConvTranspose(ForwardRule):
    name = "bn_into_conv_transpose"
    producer_ops = ("ConvTranspose",)

    def plan(self, bn: BatchNorm, deconv, graph) -> Plan | Kept:
        weight = self.weight(bn, graph, deconv, 1, "weight W")
        if isinstance(weight, Kept):
            return weight
        groups = attribute(deconv, "group", 1)
        if weight.ndim < 2 or weight.shape[0] % groups:
            return Kept(bn.label, f"weight shape {weight.shape} does not fit group={groups}", graph.path)
        mismatch = self.channel_mismatch(bn, graph, deconv, weight.shape[1] * groups)
        if mismatch:
            return mismatch
        bias = self.optional_weight(bn, graph, deconv, 2, "bias B")
        if isinstance(bias, Kept):
            return bias
        new_weight = algebra.scale_along_axis(weight, bn.scale, axis=1, groups=groups)
        new_bias = algebra.fold_bias(bias, bn.scale, bn.shift)
        return Plan(
            bn,
            into=deconv,
            new_inputs=[
                (deconv, 1, algebra.cast_like(new_weight, weight.dtype)),
                (deconv, 2, algebra.cast_like(new_bias, weight.dtype)),
            ],
        )
