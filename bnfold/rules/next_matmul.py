"""bn_into_next_matmul: BN -> MatMul with a 2-D activation x [N, C] and a constant B [C, K].

BN's channel axis 1 of x is the contracted axis, B's rows. With y = scale * x + shift:
    y @ B = x @ (scale[:, None] * B) + shift @ B
so B's rows are scaled and the bias shift @ B [K] is added to the product: absorbed by the
constant operand of an Add that is the product's only reader (MatMul -> Add(bias), a Linear
layer), else a new Add after the MatMul. For rank 3 [N, L, C], BN's axis 1 is L, not the
contracted axis, and the fold would be wrong: kept.
"""

from __future__ import annotations

import numpy as np

from bnfold import algebra
from bnfold.graph import DEFAULT_DOMAINS, node_label, reads_only_metadata
from bnfold.report import Kept
from bnfold.rules.base import BackwardRule, BatchNorm, Plan, is_float


class BnIntoNextMatMul(BackwardRule):
    name = "bn_into_next_matmul"
    consumer_ops = ("MatMul",)

    def input_affine(self, bn: BatchNorm, path, graph):
        rank = graph.model.rank(bn.x) or graph.model.rank(bn.y)
        if rank is None:
            return Kept(bn.label, "cannot prove the MatMul input is 2-D [N, C] (rank unknown)", graph.path)
        if rank != 2:
            return Kept(bn.label, f"MatMul input has rank {rank}: BN normalises axis 1, not the contracted last axis", graph.path)
        return bn.scale, bn.shift

    def plan(self, bn: BatchNorm, matmul, scale, shift, graph) -> Plan | Kept:
        weight = self.weight(bn, graph, matmul, 1, "weight (second input)")
        if isinstance(weight, Kept):
            return weight
        if weight.ndim != 2:
            return Kept(bn.label, f"MatMul '{node_label(matmul)}' weight has rank {weight.ndim}, expected 2", graph.path)
        mismatch = self.input_mismatch(bn, graph, matmul, weight.shape[0], len(scale))
        if mismatch:
            return mismatch
        new_weight = (matmul, 1, algebra.cast_like(algebra.scale_input_channels(weight, scale, in_axis=0), weight.dtype))
        bias = algebra.shift_through(weight, shift, in_axis=0)
        add = match_bias_add(matmul, graph)
        if add is not None:
            node, position, value = add
            new_bias = (node, position, algebra.cast_like(value.astype(np.float64) + bias, value.dtype))
            return Plan(bn, into=matmul, new_inputs=[new_weight, new_bias], backward=True)
        if graph.model.opset("") < 7:
            return Kept(bn.label, "adding the bias needs Add with broadcasting (opset >= 7)", graph.path)
        return Plan(bn, into=matmul, new_inputs=[new_weight], backward=True, bias_after=algebra.cast_like(bias, weight.dtype))


def match_bias_add(matmul, graph):
    """(Add, position, value) of a float constant the product's only reader adds, or None."""
    product = matmul.output[0]
    readers = [n for n in graph.users(product) if not reads_only_metadata(n, product)]
    if graph.is_graph_output(product) or len(readers) != 1:
        return None
    add = readers[0]
    if add.op_type != "Add" or add.domain not in DEFAULT_DOMAINS or list(add.input).count(product) != 1:
        return None
    position = 1 - list(add.input).index(product)
    value = graph.constant(add.input[position])
    return None if value is None or not is_float(value) else (add, position, value)
