"""bn_into_conv_transpose: ConvTranspose -> BN becomes one ConvTranspose.

A ConvTranspose weight is [C_in, C_out/group, k...]: the output channel o = g * C_out/group + j
sits on axis 1 *within* input-channel block g, so the scale is applied per group
(W'[g, :, j] = scale[g * C_out/group + j] * W[g, :, j]); B' = scale * B + shift.
"""

from __future__ import annotations

from bnfold.report import Kept
from bnfold.rules.base import WeightAndBiasRule, attribute


class BnIntoConvTranspose(WeightAndBiasRule):
    name = "bn_into_conv_transpose"
    producer_ops = ("ConvTranspose",)

    def weight_layout(self, bn, deconv, weight, graph):
        groups = attribute(deconv, "group", 1)
        if weight.ndim < 2 or groups < 1 or weight.shape[0] % groups:
            return Kept(bn.label, f"weight shape {weight.shape} does not fit group={groups}", graph.path)
        return 1, groups
