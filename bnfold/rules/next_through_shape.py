"""bn_through_shape_into_next_matmul / _gemm: BN -> ops that only move data -> MatMul or Gemm.

The backward twin of bn_through_shape_into_*: BN [N, C, L] -> Transpose(0, 2, 1) -> [N, L, C] ->
MatMul(B [C, K]) (a BN1d before a Linear on a sequence), or BN [N, C, 1, 1] -> Squeeze -> Gemm.
When every element on the consumer input's contracted last axis at index k came from BN's
channel k (channel_axis proves it from static shapes), the consumer sees y = scale[k] * x + shift[k]
per contracted index k, and folds exactly as bn_into_next_matmul / bn_into_next_gemm:
B's rows scaled, shift @ B into the bias. The ops in between stay and read BN's input.
The single Flatten/Reshape to [N, C*H*W] that repeats channels over positions is
bn_through_flatten_*'s (tried first); this rule needs the channel axis itself to be the last axis.
"""

from __future__ import annotations

from bnfold.graph import DEFAULT_DOMAINS, node_label, reads_only_metadata
from bnfold.report import Kept
from bnfold.rules.base import BatchNorm, Plan, data_input_reason, dropout_mode_reason, finite_or_kept, sole_reader
from bnfold.rules.channel_axis import SHAPE_OPS, Tracked, describe, follow
from bnfold.rules.next_gemm import BnIntoNextGemm
from bnfold.rules.next_matmul import BnIntoNextMatMul
from bnfold.rules.through_shape import MAX_PATH


def walk_forward(bn: BatchNorm, graph) -> tuple[list, object] | Kept:
    """(the shape-only ops after BN, the op they lead to), each value on the way read by the next
    op only, as its data input, and not a graph output; or Kept with why not."""
    chain, node, value = [], bn.node, bn.y
    while len(chain) < MAX_PATH:
        reader = sole_reader(bn, graph, node, value)
        if isinstance(reader, Kept):
            return reader
        reason = data_input_reason(reader, value)
        if reason:
            return Kept(bn.label, reason, graph.path)
        if reader.domain not in DEFAULT_DOMAINS or reader.op_type not in SHAPE_OPS:
            return chain, reader
        reason = dropout_mode_reason(reader, graph)
        if reason:
            return Kept(bn.label, reason, graph.path)
        chain.append(reader)
        node, value = reader, reader.output[0]
    return Kept(bn.label, f"more than {MAX_PATH} shape-only ops after BN", graph.path)


def path_end(bn: BatchNorm, graph) -> tuple[list, int]:
    """Read-only and unchecked: the readers at the end of the shape-only ops after BN (the first
    such op where a value fans out), and how many such ops were passed."""
    value, steps = bn.y, 0
    while True:
        readers = [n for n in graph.users(value) if not reads_only_metadata(n, value)]
        step = next((n for n in readers if n.domain in DEFAULT_DOMAINS and n.op_type in SHAPE_OPS and n.input[0] == value), None)
        if step is None or steps >= MAX_PATH:
            return readers, steps
        value, steps = step.output[0], steps + 1


class NextThroughShape:
    """Mixin for a backward rule: shape-only ops between BN and its consumer, BN's channel axis
    proven to become the consumer input's last (contracted) axis."""

    def targets(self, bn: BatchNorm, graph) -> bool:
        readers, steps = path_end(bn, graph)
        return steps > 0 and any(self.is_consumer(n) for n in readers)

    def is_consumer(self, node) -> bool:
        return node.domain in DEFAULT_DOMAINS and node.op_type in self.consumer_ops

    def match(self, bn: BatchNorm, graph) -> Plan | Kept:
        found = walk_forward(bn, graph)
        if isinstance(found, Kept):
            return found
        chain, consumer = found
        reason = prove_contracted(bn, graph, chain, consumer)
        if reason:
            return reason
        plan = self.plan(bn, consumer, bn.scale, bn.shift, graph)
        return plan if isinstance(plan, Kept) else finite_or_kept(bn, graph, plan)


def prove_contracted(bn: BatchNorm, graph, chain, consumer) -> Kept | None:
    """None when BN's channel axis 1 provably becomes the last axis of the consumer's input."""
    found = graph.model.value_type(bn.x) or graph.model.value_type(bn.y)
    dims = None if found is None else found[1]
    if dims is None or len(dims) < 2:
        return Kept(bn.label, f"the rank of BN input '{bn.x}' is unknown", graph.path)
    tracked = Tracked(tuple(bn.channels if i == 1 else d for i, d in enumerate(dims)), 1)
    for node in chain:
        tracked = follow(node, tracked, graph)
        if isinstance(tracked, str):
            return Kept(bn.label, f"BN's channel axis 1 is not provably the contracted axis: {tracked}", graph.path)
    last = len(tracked.dims) - 1
    if tracked.axis == last:
        return None
    path = " -> ".join(describe(node) for node in chain)
    where = f"{consumer.op_type} '{node_label(consumer)}'"
    return Kept(bn.label, f"{path} puts BN's channel axis on axis {tracked.axis}, {where} contracts axis {last}", graph.path)


class BnThroughShapeIntoNextMatMul(NextThroughShape, BnIntoNextMatMul):
    name = "bn_through_shape_into_next_matmul"


class BnThroughShapeIntoNextGemm(NextThroughShape, BnIntoNextGemm):
    name = "bn_through_shape_into_next_gemm"
