"""bn_through_flatten_into_gemm / _matmul: BN [N, C, H, W] -> Flatten -> Gemm or MatMul.

The classifier / face-recognition head BN2d -> Dropout -> Flatten -> Linear (Dropout and Identity
in inference keep the values and are skipped over). Flatten(axis=1), or a Reshape to
[N, C*H*W], lays sample n's values out in C-major order: feature f = c*H*W + p holds channel
c = f // (H*W). So the flattened features see the per-feature affine map
    scale_f = scale[f // (H*W)],   shift_f = shift[f // (H*W)]
(np.repeat over the H*W positions), which then folds into the Gemm or MatMul exactly as a BN on
[N, C*H*W] would (bn_into_next_gemm / bn_into_next_matmul). Needs the static spatial size of BN's
input; any rank >= 2 works the same way (H*W is the product of the axes after the channel axis).
"""

from __future__ import annotations

import numpy as np

from bnfold.graph import node_label
from bnfold.report import Kept
from bnfold.rules.base import BatchNorm, Path, attribute
from bnfold.rules.next_gemm import BnIntoNextGemm
from bnfold.rules.next_matmul import BnIntoNextMatMul


class ThroughFlatten:
    """Mixin for a backward rule: a Flatten/Reshape to [N, C*H*W] sits between BN and the consumer."""

    through_flatten = True

    def input_affine(self, bn: BatchNorm, path: Path, graph):
        found = graph.model.value_type(bn.x) or graph.model.value_type(bn.y)
        dims = None if found is None else found[1]
        if dims is None or len(dims) < 2 or None in dims[2:]:
            shape = "unknown" if dims is None else "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
            reason = f"the spatial size of '{bn.x}' is not static (shape {shape})"
            return Kept(bn.label, f"cannot expand BN over the flattened features: {reason}", graph.path)
        positions = int(np.prod(dims[2:], dtype=np.int64))
        reason = flatten_reason(path.flatten, dims, bn.channels * positions, graph)
        if reason:
            return Kept(bn.label, reason, graph.path)
        return np.repeat(bn.scale, positions), np.repeat(bn.shift, positions)


def flatten_reason(node, dims, features: int, graph) -> str:
    """Why `node` (Flatten or Reshape) does not provably give [N, features] rows, or ""."""
    if node.op_type == "Reshape":
        return reshape_reason(node, dims, features, graph)
    axis = attribute(node, "axis", 1)
    if axis in (1, 1 - len(dims)):
        return ""
    return f"Flatten '{node_label(node)}' has axis={axis}, not 1: its rows are not the samples"


def reshape_reason(node, dims, features: int, graph) -> str:
    """Rows are samples when the output is [?, features] (same element count: ? = N), by its type
    or by a constant target shape [N | 0 | -1, features] or [N | 0, -1] (0 copies the input dim)."""
    label = f"Reshape '{node_label(node)}'"
    out = graph.model.value_type(node.output[0])
    if out is not None and out[1] is not None and len(out[1]) == 2 and out[1][1] == features:
        return ""
    target = graph.constant(node.input[1]) if len(node.input) > 1 else None
    if target is None:
        return f"{label} target shape is not a constant and its output shape is unknown"
    values = [int(v) for v in target.reshape(-1)]
    if len(values) == 2:
        copy = not attribute(node, "allowzero", 0)
        second = dims[1] if values[1] == 0 and copy else values[1]
        first_is_n = (values[0] == 0 and copy) or (dims[0] is not None and values[0] == dims[0])
        if second == features or (second == -1 and first_is_n):
            return ""
    return f"{label} target shape {values} is not [N, C*H*W] = [N, {features}]"


class BnThroughFlattenIntoGemm(ThroughFlatten, BnIntoNextGemm):
    name = "bn_through_flatten_into_gemm"


class BnThroughFlattenIntoMatMul(ThroughFlatten, BnIntoNextMatMul):
    name = "bn_through_flatten_into_matmul"
