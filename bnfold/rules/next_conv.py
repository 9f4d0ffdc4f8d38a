"""bn_into_next_conv: BN -> Conv becomes one Conv (BN before the Conv, as in pre-activation nets).

Conv weight W is [C_out, C_in/group, k...]; output channel o belongs to group g(o) = o // (C_out/group)
and reads input channel c = g(o) * C_in/group + j at weight position j. With y = scale * x + shift:
    W'[o, j, k...] = W[o, j, k...] * scale[c]        B'[o] = B[o] + sum_{j,k} W[o, j, k...] * shift[c]
(any group count, depthwise included; strides and dilations do not matter). This only holds when
every kernel tap reads a real input: a zero the Conv pads in stands for BN(x) = shift before the
fold but for 0 after it. So explicit pads must be zero, auto_pad VALID, or SAME with a total pad
(ceil(n/stride) - 1) * stride + (k - 1) * dilation + 1 - n <= 0 on every axis: always true for a
kernel extent of 1 (ceil(n/s) - 1 <= (n - 1)/s), else checked on the static input size. A BN
whose shift is exactly zero folds whatever the padding (padding 0 stays 0).
"""

from __future__ import annotations

import math

import numpy as np

from bnfold import algebra
from bnfold.graph import node_label
from bnfold.report import Kept
from bnfold.rules.base import BackwardRule, BatchNorm, Plan, attribute

SAME = ("SAME_UPPER", "SAME_LOWER")


class BnIntoNextConv(BackwardRule):
    name = "bn_into_next_conv"
    consumer_ops = ("Conv",)

    def plan(self, bn: BatchNorm, conv, scale, shift, graph) -> Plan | Kept:
        weight = self.weight(bn, graph, conv, 1, "weight W")
        if isinstance(weight, Kept):
            return weight
        groups = attribute(conv, "group", 1)
        if weight.ndim < 3 or groups < 1 or weight.shape[0] % groups:
            return Kept(bn.label, f"Conv '{node_label(conv)}' weight shape {weight.shape} does not fit group={groups}", graph.path)
        mismatch = self.input_mismatch(bn, graph, conv, weight.shape[1] * groups, len(scale))
        bias = mismatch or self.optional_weight(bn, graph, conv, 2, "bias B")
        if isinstance(bias, Kept):
            return bias
        padding = padding_reason(conv, weight, graph, bn.x) if np.any(shift) else ""
        if padding:
            return Kept(bn.label, f"Conv '{node_label(conv)}' {padding}: a shifted input is not a shifted output", graph.path)
        new_weight = algebra.scale_input_channels(weight, scale, groups=groups)
        new_bias = algebra.shift_through(weight, shift, groups=groups)
        if bias is not None:
            new_bias = new_bias + bias.astype(np.float64)
        return Plan(
            bn,
            into=conv,
            new_inputs=[
                (conv, 1, algebra.cast_like(new_weight, weight.dtype)),
                (conv, 2, algebra.cast_like(new_bias, weight.dtype)),
            ],
            backward=True,
        )


def padding_reason(conv, weight, graph, x: str) -> str:
    """How `conv` may read zeros beyond its input, or "" when it provably reads none."""
    auto_pad = attribute(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return ""
    if auto_pad not in SAME:
        return "pads the input with zeros" if any(attribute(conv, "pads", [])) else ""
    spatial = weight.ndim - 2
    kernel = attribute(conv, "kernel_shape", list(weight.shape[2:]))
    strides = attribute(conv, "strides", [1] * spatial)
    dilations = attribute(conv, "dilations", [1] * spatial)
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if all(e == 1 for e in extents):
        return ""
    found = graph.model.value_type(x)
    dims = None if found is None or found[1] is None else found[1][2:]
    if dims is None or len(dims) != spatial or None in dims:
        return f"uses auto_pad={auto_pad} on an input of unknown size (it may pad with zeros)"
    needed = [(math.ceil(n / s) - 1) * s + e - n for n, s, e in zip(dims, strides, extents)]
    return f"pads the input with zeros (auto_pad={auto_pad})" if any(p > 0 for p in needed) else ""
