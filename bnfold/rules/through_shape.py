"""bn_through_shape_into_*: producer -> ops that only move data -> BN, folded into the producer.

Conv / ConvTranspose / Gemm / MatMul (or MatMul + Add, a Linear layer) -> any chain of Identity,
Dropout (inference), Transpose, Reshape, Flatten, Squeeze, Unsqueeze -> BN. Those ops move
elements without changing them, so BN(move(z)) = move(scale * z + shift) with scale and shift
laid along the producer's channel axis, *provided* every element on BN's channel c (its axis 1)
came from the producer's channel c. channel_axis proves that from static shapes, else the BN is
kept with the path in the reason. The fold itself is then the producer's own: W scaled along its
output channels, the shift into its bias (bn_into_conv, bn_into_gemm, ...). A MatMul's channel is
the product's last axis (B's columns), whatever the product's rank; having no bias, it gets
Add(product, shift) right after it. The ops in between stay, BN goes.

Legal: Gemm [N, C] -> Unsqueeze(axes=[2, 3]) -> BN2d; Linear [N, L, C] -> Transpose(0, 2, 1) ->
BN1d; Conv [N, C, H, W] -> Reshape [N, C, H*W] -> BN1d. Kept: the same with the features on
another axis (Transpose(1, 0, 2), a Reshape that merges the channel with other axes).
"""

from __future__ import annotations

from bnfold import algebra
from bnfold.graph import DEFAULT_DOMAINS, node_label
from bnfold.report import Kept
from bnfold.rules.base import (
    BatchNorm,
    ForwardRule,
    Plan,
    check_sole_use,
    data_input_reason,
    dropout_mode_reason,
    finite_or_kept,
)
from bnfold.rules.channel_axis import SHAPE_OPS, Tracked, describe, follow
from bnfold.rules.conv import BnIntoConv
from bnfold.rules.conv_transpose import BnIntoConvTranspose
from bnfold.rules.gemm import BnIntoGemm
from bnfold.rules.matmul import BnIntoMatMulAdd, matmul_weight_2d

MAX_PATH = 32  # shape-only ops followed back from BN; real models have a handful


def walk_back(bn: BatchNorm, graph) -> tuple:
    """(the first op before BN that is not a shape-only op, the shape-only ops after it in data
    order); read-only and unchecked."""
    chain, value = [], bn.x
    node = graph.producer.get(value)
    while (
        node is not None and node.domain in DEFAULT_DOMAINS and node.op_type in SHAPE_OPS
        and node.output[0] == value and node.input and len(chain) < MAX_PATH
    ):
        chain.insert(0, node)
        value = node.input[0]
        node = graph.producer.get(value)
    return node, chain


def check_path(bn: BatchNorm, graph, producer, chain) -> Kept | None:
    """Every value on the way changes with the fold: it must be read by the next op only, as its
    data input, and not be a graph output; a Dropout must be in inference mode."""
    for node, reader in zip([producer, *chain], [*chain, bn.node]):
        value = reader.input[0]
        reason = data_input_reason(reader, value) or dropout_mode_reason(reader, graph)
        if reason:
            return Kept(bn.label, reason, graph.path)
        sole = check_sole_use(bn, graph, node, value, reader)
        if isinstance(sole, Kept):
            return sole
    return None


class ThroughShape(ForwardRule):
    """Mixin for a forward rule: shape-only ops sit between the producer and BN.

    Subclasses say where the producer's channel axis is (`start`) and how it folds (`plan`, the
    producer's own forward rule's where it has one: list this mixin first).
    """

    axis_name = "channel axis"

    def targets(self, bn: BatchNorm, graph) -> bool:
        producer, chain = walk_back(bn, graph)
        return bool(chain) and self.is_producer(producer, graph)

    def is_producer(self, node, graph) -> bool:
        return node is not None and node.domain in DEFAULT_DOMAINS and node.op_type in self.producer_ops

    def match(self, bn: BatchNorm, graph) -> Plan | Kept:
        producer, chain = walk_back(bn, graph)
        found = check_path(bn, graph, producer, chain) or self.start(bn, producer, graph)
        if isinstance(found, Kept):
            return found
        reason = self.prove(bn, graph, producer, chain, found)
        if reason:
            return reason
        plan = self.plan(bn, producer, graph)
        return plan if isinstance(plan, Kept) else finite_or_kept(bn, graph, plan)

    def prove(self, bn: BatchNorm, graph, producer, chain, start: Tracked) -> Kept | None:
        """None when the producer's channel axis provably becomes BN's axis 1, else why not."""
        what = f"{producer.op_type} '{node_label(producer)}' {self.axis_name} {start.axis}"
        tracked = start
        for node in chain:
            tracked = follow(node, tracked, graph)
            if isinstance(tracked, str):
                return Kept(bn.label, f"{what} is not provably BN's channel axis 1: {tracked}", graph.path)
        if tracked.axis == 1:
            return None
        path = " -> ".join(describe(node) for node in chain)
        return Kept(bn.label, f"{path} puts {what} on axis {tracked.axis}, BN normalises axis 1", graph.path)

    def start(self, bn: BatchNorm, producer, graph) -> Tracked | Kept:
        """Conv family: [N, C, spatial...], rank from the type info or the weight."""
        dims = output_dims(producer, graph)
        if dims is None:
            weight = graph.constant(producer.input[1]) if len(producer.input) > 1 else None
            dims = None if weight is None else (None,) * weight.ndim
        return start_at(bn, graph, producer, dims, 1)


def start_at(bn: BatchNorm, graph, producer, dims, axis: int | None) -> Tracked | Kept:
    """The producer's output with its channel axis (None: the last one); the channel count is
    BN's where unknown (the fold checks it against the weight)."""
    what = f"{producer.op_type} '{node_label(producer)}' output"
    if dims is None:
        return Kept(bn.label, f"the rank of {what} is unknown", graph.path)
    axis = len(dims) - 1 if axis is None else axis
    if not 0 <= axis < len(dims):
        return Kept(bn.label, f"{what} has rank {len(dims)}: no channel axis {axis}", graph.path)
    dims = tuple(bn.channels if i == axis and d is None else d for i, d in enumerate(dims))
    return Tracked(dims, axis)


def output_dims(node, graph):
    found = graph.model.value_type(node.output[0])
    return None if found is None else found[1]


class BnThroughShapeIntoConv(ThroughShape, BnIntoConv):
    name = "bn_through_shape_into_conv"


class BnThroughShapeIntoConvTranspose(ThroughShape, BnIntoConvTranspose):
    name = "bn_through_shape_into_conv_transpose"


class BnThroughShapeIntoGemm(ThroughShape, BnIntoGemm):
    name = "bn_through_shape_into_gemm"
    axis_name = "feature axis"

    def start(self, bn, gemm, graph):
        return start_at(bn, graph, gemm, output_dims(gemm, graph) or (None, None), 1)


class BnThroughShapeIntoMatMul(ThroughShape):
    """MatMul(A, B [K, C]): the product's last axis is B's columns, for any rank of A."""

    name = "bn_through_shape_into_matmul"
    producer_ops = ("MatMul",)
    axis_name = "feature axis"

    def start(self, bn, matmul, graph):
        return start_at(bn, graph, matmul, output_dims(matmul, graph), None)

    def plan(self, bn: BatchNorm, matmul, graph) -> Plan | Kept:
        weight = matmul_columns(self, bn, matmul, graph)
        if isinstance(weight, Kept):
            return weight
        if graph.model.opset("") < 7:
            return Kept(bn.label, "adding the shift needs Add with broadcasting (opset >= 7)", graph.path)
        new_weight = algebra.scale_along_axis(weight, bn.scale, axis=1)
        return Plan(
            bn,
            into=matmul,
            new_inputs=[(matmul, 1, algebra.cast_like(new_weight, weight.dtype))],
            bias_after=algebra.cast_like(bn.shift, weight.dtype),
        )


def matmul_columns(rule: ForwardRule, bn: BatchNorm, matmul, graph):
    """The constant 2-D B [K, C] of a MatMul whose C columns are BN's channels, or Kept."""
    weight = matmul_weight_2d(rule, bn, matmul, graph)
    if isinstance(weight, Kept):
        return weight
    return rule.channel_mismatch(bn, graph, matmul, weight.shape[1]) or weight


class BnThroughShapeIntoMatMulAdd(ThroughShape, BnIntoMatMulAdd):
    """MatMul -> Add(bias) (a Linear layer on [N, L, K]): bias' = scale * bias + shift on the last axis."""

    name = "bn_through_shape_into_matmul_add"
    axis_name = "feature axis"
    max_bias_rank = 99  # any rank: the feature axis is proven to be the product's last one

    def is_producer(self, node, graph) -> bool:
        if not super().is_producer(node, graph):
            return False
        operands = (graph.producer.get(name) for name in node.input)
        return any(n is not None and n.op_type == "MatMul" and n.domain in DEFAULT_DOMAINS for n in operands)

    def start(self, bn, add, graph):
        return start_at(bn, graph, add, output_dims(add, graph), None)

    def matmul_weight(self, bn: BatchNorm, matmul, graph):
        return matmul_columns(self, bn, matmul, graph)
