"""Fold sites: the values verification compares besides the graph outputs.

A fold's site is the value that carried BN's output in the original and is now computed by the
folded layer (forward), or the output of the layer that absorbed BN (backward); both models name
it alike (bnfold's folds keep names). Comparing it there catches a wrong fold whatever the head
of the network does (a saturated sigmoid, a softmax over thousands of classes, an ArgMax), and
the failing site names the fold.

Where the sites come from:
- a fold bnfold just made: its records (`from_folds`);
- a model bnfold wrote: the `bnfold.fold_sites` metadata entry it records (`record`/`recorded`),
  a JSON object {"sites": {site: "bn into layer", ...}};
- any other candidate: the values both main graphs name alike that a layer, a BN or a
  per-channel arithmetic op produces in the original (`alike`).
"""

from __future__ import annotations

import json
import math

import onnx

METADATA_KEY = "bnfold.fold_sites"
# Producers in the original whose outputs are worth comparing when no fold sites are recorded:
# where a folding tool's changes show.
_SITE_PRODUCERS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Add", "Sub", "Mul", "Div",
})


def from_folds(folds) -> dict[str, str]:
    """Site -> what was folded there, for the main graph's Folded records."""
    return {f.site: f"{f.bn} into {f.into}" for f in folds if f.site and not f.graph}


def record(model: onnx.ModelProto, sites: dict[str, str]) -> None:
    """Write `sites` into the model's metadata, with those an earlier fold recorded."""
    merged = {**(recorded(model) or {}), **sites}
    entries = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(entries)
    if merged:
        model.metadata_props.add(key=METADATA_KEY, value=json.dumps({"sites": merged}, sort_keys=True))


def recorded(model: onnx.ModelProto) -> dict[str, str] | None:
    """The sites a bnfold output records; None when it records none (or the entry is not ours)."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                sites = json.loads(prop.value).get("sites")
            except (ValueError, AttributeError):
                return None
            if isinstance(sites, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in sites.items()):
                return sites
    return None


def alike(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> dict[str, str]:
    """Values both main graphs produce under one name, produced in the reference by an op of
    _SITE_PRODUCERS, in the reference's order."""
    produced = {name for node in candidate.graph.node for name in node.output if name}
    return {
        name: "" for node in reference.graph.node if node.op_type in _SITE_PRODUCERS
        for name in node.output if name in produced
    }


def comparable(sites: dict[str, str], reference: onnx.ModelProto, candidate: onnx.ModelProto) -> dict[str, str]:
    """The sites both main graphs produce that are not graph outputs already (compared anyway),
    in the reference's graph order (so the first failing one is the first wrong fold)."""
    outputs = {o.name for o in reference.graph.output}
    produced = {name for node in candidate.graph.node for name in node.output if name}
    order = [name for node in reference.graph.node for name in node.output]
    return {name: sites[name] for name in order if name in sites and name in produced and name not in outputs}


def sizes(graph: onnx.ModelProto, feeds: dict, names) -> dict[str, int]:
    """Bytes of each value `names` takes on these inputs, by shape inference with the inputs'
    shapes fixed to the feeds'; a value it cannot size is left out."""
    model = _without_weights(graph)
    for value in model.graph.input:
        if value.name in feeds and value.type.HasField("tensor_type"):
            shape = value.type.tensor_type.shape
            shape.ClearField("dim")
            for size in feeds[value.name].shape:
                shape.dim.add().dim_value = size
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a model shape inference cannot follow: sizes unknown
        return {}
    wanted, found = set(names), {}
    for value in (*inferred.graph.value_info, *inferred.graph.output):
        tensor = value.type.tensor_type
        if value.name in wanted and tensor.elem_type and all(d.HasField("dim_value") for d in tensor.shape.dim):
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
            found[value.name] = itemsize * math.prod(d.dim_value for d in tensor.shape.dim)
    return found


def groups(names: list[str], size_of: dict[str, int], budget: int, unknown: int) -> list[tuple[str, ...]]:
    """`names` in order, cut into groups of at most `budget` bytes (a value alone may exceed it);
    `unknown`: the size assumed for a value `size_of` does not know. Always one group at least."""
    cut, current, total = [], [], 0
    for name in names:
        size = size_of.get(name, unknown)
        if current and total + size > budget:
            cut.append(tuple(current))
            current, total = [], 0
        current.append(name)
        total += size
    return [*cut, tuple(current)]


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference without the weights' bytes: an initializer of more than a
    few values becomes a typed graph input (its shape is all inference needs); small ones
    (shape constants a Reshape reads) stay."""
    shell = onnx.ModelProto(ir_version=model.ir_version)
    shell.opset_import.extend(model.opset_import)
    shell.functions.extend(model.functions)
    graph = shell.graph
    for field in ("node", "input", "output", "value_info"):
        getattr(graph, field).extend(getattr(model.graph, field))
    listed = {value.name for value in graph.input}
    for tensor in model.graph.initializer:
        if math.prod(tensor.dims) <= 64:
            graph.initializer.add().CopyFrom(tensor)
        elif tensor.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return shell
