"""No-op nodes, removed before the rules run, so that every rule folds through them.

Exporters wrap ops in nodes that compute nothing (paddle2onnx puts an Identity around almost
every op), and a BN behind one is a BN no rule sees. A node is a no-op when its first output is
its input, value for value:

- Identity;
- Dropout at inference (opset < 7: is_test=1; opset >= 12: training_mode absent or a constant
  false) whose mask output nothing reads;
- Cast to the type its input already has;
- Reshape, Flatten, Squeeze, Unsqueeze and Expand whose output shape is proven (static) equal
  to their input's;
- Add of a constant zero and Mul of a constant one that broadcasting does not enlarge.

Its readers then read its input. A no-op that writes a graph output is kept (the name must stay,
and a producer taking it over would change its own), as is one whose output a subgraph reads:
graph inputs and outputs keep their names, types and order. A fold that folds nothing leaves the
model as it was, no-ops included (see bnfold.api).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from bnfold.graph import DEFAULT_DOMAINS, GraphIndex, attribute

SHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand"})
TYPED_OPS = SHAPE_OPS | {"Cast", "Add", "Mul"}  # whose proof needs the values' types


def prime(graph: GraphIndex) -> None:
    """Ask for the types the proofs need before any edit (ONNX shape inference, run once,
    must see the graph as it was)."""
    for node in graph.nodes:
        if node.op_type in TYPED_OPS and node.domain in DEFAULT_DOMAINS:
            for name in (*node.input, *node.output[:1]):
                if name:
                    graph.model.value_type(name)


def remove_noops(graph: GraphIndex) -> Counter:
    """Remove the no-ops of one graph; how many of each op were removed."""
    removed: Counter = Counter()
    for node in graph.live_nodes():
        if node.op_type not in _CHECKS:  # most nodes: one field read, no call
            continue
        source = passed_through(node, graph)
        if source is not None and _remove(node, source, graph):
            removed[node.op_type] += 1
    return removed


def passed_through(node, graph: GraphIndex) -> str | None:
    """The input `node` passes through unchanged to its first output, or None."""
    if node.domain not in DEFAULT_DOMAINS or not node.input or not node.input[0] or not node.output:
        return None
    check = _CHECKS.get(node.op_type)
    return check(node, graph) if check is not None else None


def _identity(node, graph) -> str | None:
    return node.input[0] if len(node.output) == 1 else None


def _dropout(node, graph) -> str | None:
    if any(name and (graph.is_used(name) or graph.is_graph_output(name)) for name in node.output[1:]):
        return None  # the mask is read
    opset = graph.model.opset("")
    if opset < 7 and attribute(node, "is_test", 0) != 1:
        return None
    if opset >= 12 and len(node.input) > 2 and node.input[2]:
        training = graph.constant(node.input[2])
        if training is None or training.size != 1 or bool(training.reshape(())):
            return None
    return node.input[0]


def _cast(node, graph) -> str | None:
    found = graph.model.value_type(node.input[0])
    return node.input[0] if found is not None and found[0] and found[0] == attribute(node, "to") else None


def _same_shape(node, graph) -> str | None:
    before, after = graph.model.value_type(node.input[0]), graph.model.value_type(node.output[0])
    if before is None or after is None or before[1] is None or after[1] is None:
        return None
    static = all(isinstance(d, int) for d in (*before[1], *after[1]))
    return node.input[0] if static and before[1] == after[1] else None


def _neutral(value: float):
    """Add of `value` everywhere (0) or Mul by it (1): x when the constant does not broadcast x
    to a larger shape nor change its type."""

    def check(node, graph) -> str | None:
        if len(node.input) != 2:
            return None
        for data, other in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            constant = graph.constant(other)
            found = graph.model.value_type(data)
            if constant is None or graph.constant(data) is not None or found is None or found[1] is None:
                continue
            shape = found[1]
            if not all(isinstance(d, int) for d in shape) or not np.all(constant == value):
                continue
            try:
                broadcast = np.broadcast_shapes(tuple(shape), constant.shape)
            except ValueError:
                continue
            if broadcast == tuple(shape) and _same_dtype(found[0], constant):
                return data
        return None

    return check


def _same_dtype(elem_type: int, constant: np.ndarray) -> bool:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)) == constant.dtype
    except (KeyError, TypeError, ValueError):
        return False


_CHECKS = {
    "Identity": _identity,
    "Dropout": _dropout,
    "Cast": _cast,
    **dict.fromkeys(SHAPE_OPS, _same_shape),
    "Add": _neutral(0.0),
    "Mul": _neutral(1.0),
}


def _remove(node, source: str, graph: GraphIndex) -> bool:
    output = node.output[0]
    if graph.is_graph_output(output) or graph.read_by_subgraph(output):
        return False  # its name must stay, and a producer taking it over would change its own name
    graph.short_circuit(node, source)
    return True
