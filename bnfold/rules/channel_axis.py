"""Where a channel axis goes through ops that only move data: the proof behind bn_through_shape_*.

A BN may fold into a producer through Identity / Dropout / Transpose / Reshape / Flatten /
Squeeze / Unsqueeze only when every element on BN's channel c came from the producer's channel c.
This module follows one axis (with the static dims known so far) through each such op, or says
why it cannot:

- Transpose moves the axis to perm.index(axis); Squeeze and Unsqueeze shift it past the removed
  or inserted axes (squeezing the axis itself loses it);
- Reshape and Flatten keep row-major order: the element at flat index i has channel
  (i // inner) % C, inner being the product of the dims after the axis. In the output it lies on
  axis b exactly when dims[b] == C and the product of the dims after b is `inner`: then its
  coordinate on b is that same (i // inner) % C. The dims before the axis need not be known.

Dims come from each op's own semantics (constant perm / axes / target shape, with Reshape's 0 and
-1 resolved) and are completed by the model's type info (ONNX shape inference).
"""

from __future__ import annotations

import dataclasses
import math

import onnx

from bnfold.graph import GraphIndex, attribute, node_label

SHAPE_OPS = frozenset({"Identity", "Dropout", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})


@dataclasses.dataclass(frozen=True)
class Tracked:
    """A tensor's dims (None where unknown) and the position of the followed axis in them."""

    dims: tuple[int | None, ...]
    axis: int

    @property
    def channels(self) -> int | None:
        return self.dims[self.axis]

    @property
    def inner(self) -> int | None:
        """Elements per step along the axis (product of the dims after it), None if unknown."""
        return product(self.dims[self.axis + 1:])


def product(dims) -> int | None:
    return None if None in dims else math.prod(dims)


def shape_text(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def describe(node: onnx.NodeProto) -> str:
    """How an op on the path is named in reasons, with the attribute that decides the axis."""
    text = f"{node.op_type} '{node_label(node)}'"
    if node.op_type == "Transpose":
        perm = attribute(node, "perm", None)
        return f"{text} perm {list(perm) if perm is not None else 'reversed'}"
    if node.op_type == "Flatten":
        return f"{text} axis={attribute(node, 'axis', 1)}"
    return text


def follow(node: onnx.NodeProto, tracked: Tracked, graph: GraphIndex) -> Tracked | str:
    """The axis after `node` (one of SHAPE_OPS, reading the tracked tensor as input 0), or why
    it cannot be followed."""
    step = _STEPS[node.op_type](node, tracked, graph)
    if isinstance(step, str):
        return step
    found = graph.model.value_type(node.output[0])
    return refine(step, None if found is None else found[1])


def refine(tracked: Tracked, known) -> Tracked:
    return Tracked(merge(tracked.dims, known), tracked.axis)


def merge(dims, known) -> tuple[int | None, ...]:
    """Fill dims the op's semantics left unknown from declared or inferred ones of the same rank."""
    if known is None or len(known) != len(dims):
        return tuple(dims)
    return tuple(d if d is not None else k for d, k in zip(dims, known))


def _same(node, tracked: Tracked, graph) -> Tracked:
    return tracked


def _transpose(node, tracked: Tracked, graph) -> Tracked | str:
    rank = len(tracked.dims)
    perm = attribute(node, "perm", None)
    perm = list(reversed(range(rank))) if perm is None else [int(p) for p in perm]
    if sorted(perm) != list(range(rank)):
        return f"{describe(node)} is not a permutation of {rank} axes"
    return Tracked(tuple(tracked.dims[p] for p in perm), perm.index(tracked.axis))


def _axes(node, graph: GraphIndex) -> list[int] | None | str:
    """Squeeze/Unsqueeze axes: an attribute before opset 13, a constant input from 13 on."""
    if graph.model.opset(node.domain) < 13:
        axes = attribute(node, "axes", None)
        return None if axes is None else [int(a) for a in axes]
    if len(node.input) < 2 or not node.input[1]:
        return None
    value = graph.constant(node.input[1])
    if value is None:
        return f"{describe(node)} axes are not a constant (they come from {graph.describe_source(node.input[1])})"
    return [int(a) for a in value.reshape(-1)]


def _normalised(node, axes: list[int], rank: int) -> list[int] | str:
    if any(not -rank <= a < rank for a in axes) or len({a % rank for a in axes}) != len(axes):
        return f"{describe(node)} axes {axes} are not distinct axes of a rank-{rank} tensor"
    return sorted(a % rank for a in axes)


def _unsqueeze(node, tracked: Tracked, graph) -> Tracked | str:
    axes = _axes(node, graph)
    if axes is None:
        return f"{describe(node)} has no axes"
    if isinstance(axes, str):
        return axes
    rank = len(tracked.dims) + len(axes)
    inserted = _normalised(node, axes, rank)
    if isinstance(inserted, str):
        return inserted
    dims = list(tracked.dims)
    for position in inserted:  # ascending, so each lands at its output position
        dims.insert(position, 1)
    old_positions = [i for i in range(rank) if i not in inserted]
    return Tracked(tuple(dims), old_positions[tracked.axis])


def _squeeze(node, tracked: Tracked, graph) -> Tracked | str:
    axes = _axes(node, graph)
    if isinstance(axes, str):
        return axes
    rank = len(tracked.dims)
    if axes is None:
        if None in tracked.dims:
            return f"{describe(node)} removes every axis of length 1 and shape {shape_text(tracked.dims)} is not static"
        removed = [i for i, d in enumerate(tracked.dims) if d == 1]
    else:
        removed = _normalised(node, axes, rank)
        if isinstance(removed, str):
            return removed
    if tracked.axis in removed:
        return f"{describe(node)} removes axis {tracked.axis}, the followed channel axis"
    dims = tuple(d for i, d in enumerate(tracked.dims) if i not in removed)
    return Tracked(dims, tracked.axis - sum(1 for i in removed if i < tracked.axis))


def _flatten(node, tracked: Tracked, graph) -> Tracked | str:
    rank = len(tracked.dims)
    axis = int(attribute(node, "axis", 1))
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis <= rank:
        return f"{describe(node)} is out of range for a rank-{rank} tensor"
    return regroup(node, tracked, (product(tracked.dims[:axis]), product(tracked.dims[axis:])))


def _reshape(node, tracked: Tracked, graph: GraphIndex) -> Tracked | str:
    if graph.model.opset(node.domain) < 5:
        target = attribute(node, "shape", None)
    else:
        value = graph.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        target = None if value is None else value.reshape(-1)
    target = None if target is None else [int(v) for v in target]
    allowzero = attribute(node, "allowzero", 0)
    dims = None if target is None else resolve_target(target, tracked.dims, allowzero)
    found = graph.model.value_type(node.output[0])
    known = None if found is None else found[1]
    if dims is None and known is None:
        return f"{describe(node)} target shape is not a constant and its output shape is unknown"
    dims = merge(dims, known) if dims is not None else known
    if target is not None and keeps_prefix(target, tracked, allowzero):
        return Tracked(dims, tracked.axis)
    return regroup(node, tracked, dims)


def keeps_prefix(target: list[int], tracked: Tracked, allowzero: int) -> bool:
    """A target that copies every dim up to and including the axis (0 entries or equal static
    dims) keeps the axis where it is, whatever the (maybe symbolic) dims after it: with the same
    element count, the dims after it multiply to the same `inner`."""
    if len(target) <= tracked.axis:
        return False
    prefix = zip(target[: tracked.axis + 1], tracked.dims)
    return all((v == 0 and not allowzero) or (d is not None and v == d) for v, d in prefix)


def resolve_target(target: list[int], dims, allowzero: int) -> list[int | None]:
    """Reshape's output dims from its target: 0 copies the input dim (unless allowzero), -1 is
    what the element count leaves (when that count is static)."""
    out = []
    for i, v in enumerate(target):
        if v == 0 and not allowzero:
            out.append(dims[i] if i < len(dims) else None)
        else:
            out.append(None if v == -1 else v)
    if target.count(-1) == 1:
        rest = product([d for d, v in zip(out, target) if v != -1])
        total = product(dims)
        if rest and total is not None and total % rest == 0:
            out[target.index(-1)] = total // rest
    return out


def regroup(node, tracked: Tracked, dims) -> Tracked | str:
    """The axis after a row-major regrouping into `dims` (Reshape, Flatten), or why it is lost."""
    channels, inner = tracked.channels, tracked.inner
    if channels is None or inner is None:
        return f"{describe(node)} input shape {shape_text(tracked.dims)} is not static after axis {tracked.axis}"
    after = 1
    for b in reversed(range(len(dims))):
        if dims[b] == channels and after == inner:
            return Tracked(tuple(dims), b)
        if dims[b] is None:
            return f"{describe(node)} output shape {shape_text(dims)} is not static"
        after *= dims[b]
        if inner and after > inner:
            break
    return f"{describe(node)} to {shape_text(dims)} mixes axis {tracked.axis} (length {channels}) of {shape_text(tracked.dims)} with other axes"


_STEPS = {
    "Identity": _same,
    "Dropout": _same,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Flatten": _flatten,
    "Reshape": _reshape,
}
