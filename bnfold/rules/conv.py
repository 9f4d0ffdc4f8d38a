"""bn_into_conv: Conv -> BN becomes one Conv.

W' = scale[o] * W[o, ...] along the output-channel axis 0 (any group count: with groups the
output channels still run along axis 0), B' = scale * B + shift (B = 0 when absent).
"""

from __future__ import annotations

from bnfold.rules.base import WeightAndBiasRule


class BnIntoConv(WeightAndBiasRule):
    name = "bn_into_conv"
    producer_ops = ("Conv",)

    def weight_layout(self, bn, conv, weight, graph):
        return 0, 1
