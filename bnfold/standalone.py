"""`--standalone affine`: a BN no rule could fold becomes Mul(x, scale) -> Add(., shift).

For runtimes and converters without BatchNormalization. An inference-mode BN is the per-channel
affine map y = scale * x + shift (bnfold.algebra), so one Mul and one Add with the precomputed
constants compute it; the constants have shape [C, 1, ..., 1] (rank of x minus 1), which
broadcasts on x's axis 1 whatever the batch size and spatial size. They are computed in float64
and cast to the data's dtype (which BatchNormalization-15 lets differ from the statistics').

Only BN that passed the shared checks (inference mode, constant statistics) are converted, and
only with a known rank and dtype of x. The others stay, and the report says why.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold import algebra
from bnfold.graph import DEFAULT_DOMAINS, GraphIndex, node_label
from bnfold.report import Folded, Kept
from bnfold.rules.base import match_batchnorm

MODES = ("keep", "affine")
RULE = "standalone_affine"


def convert_kept(graph: GraphIndex, kept: list[Kept], skip=None) -> tuple[list[Folded], list[Kept]]:
    """Turn the kept BN of `graph` into Mul + Add where possible: (converted, still kept)."""
    nodes = {
        node_label(n): n
        for n in graph.live_nodes()
        if n.op_type == "BatchNormalization" and n.domain in DEFAULT_DOMAINS
    }
    converted, left = [], []
    for record in kept:
        node = nodes.get(record.bn)
        result = record
        if node is not None and record.graph == graph.path and not (skip or {}).get((graph.path, record.bn)):
            result = convert(node, graph, record)
        (converted if isinstance(result, Folded) else left).append(result)
    return converted, left


def convert(node: onnx.NodeProto, graph: GraphIndex, record: Kept) -> Folded | Kept:
    """Replace one BN by Mul + Add, or keep it: `record`'s reason, plus why it stayed a BN."""
    bn = match_batchnorm(node, graph)
    if isinstance(bn, Kept):
        return record
    reason = _affine_reason(bn.x, graph)
    if reason:
        return Kept(record.bn, f"{record.reason}; standalone: {reason}", graph.path)
    elem_type, dims = graph.model.value_type(bn.x)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    shape = (bn.channels,) + (1,) * (len(dims) - 2)
    scale = algebra.cast_like(bn.scale.reshape(shape), dtype)
    shift = algebra.cast_like(bn.shift.reshape(shape), dtype)
    if not (np.all(np.isfinite(scale.astype(np.float64))) and np.all(np.isfinite(shift.astype(np.float64)))):
        return Kept(record.bn, f"{record.reason}; standalone: scale or shift overflows {np.dtype(dtype).name}", graph.path)
    _replace(node, bn.x, scale, shift, graph)
    return Folded(record.bn, node_label(node), RULE, graph.path, site=bn.y)


def _affine_reason(x: str, graph: GraphIndex) -> str:
    """Why BN's input cannot be normalised by a broadcast Mul + Add, or ""."""
    found = graph.model.value_type(x)
    if found is None or not found[0] or found[1] is None:
        return f"the rank or dtype of '{x}' is unknown: cannot lay the constants along axis 1"
    if len(found[1]) < 2:
        return f"'{x}' has rank {len(found[1])}, no channel axis 1"
    opset = graph.model.opset("")
    if opset < 7:
        return f"Mul/Add with broadcasting need opset >= 7 (model has {opset})"
    return ""


def _replace(node: onnx.NodeProto, x: str, scale: np.ndarray, shift: np.ndarray, graph: GraphIndex) -> None:
    """BN(x, ...) -> y becomes Mul(x, scale) -> y' and Add(y', shift) -> y (same output name)."""
    label = node_label(node)
    graph.replace_node(node, "Mul", [x])
    del node.output[1:]  # a foldable BN has no training outputs, only unused optional slots
    graph.set_constant_input(node, 1, scale, f"{label}_affine_scale")
    graph.add_bias_after(node, shift, f"{label}_affine_shift")
