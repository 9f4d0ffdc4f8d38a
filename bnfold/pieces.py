"""Deep graphs run as consecutive pieces, so that verifying them costs what their nodes cost.

onnxruntime's session building grows faster than the node count. Measured on the near-identity
Conv -> BN -> Relu chain (optimisations off, one 2-core CPU): about 70 us a node at 3,000 nodes,
100 us at 15,000, 230 us at 60,000, so the 20,000-block chain's original took 14 s to build
while running it took 0.2 s; from 100 to 300 nodes it is 22 us a node. A main graph of more than
CUT_ABOVE nodes is therefore cut, in its node order (topological, as ONNX requires), into pieces
of at most PIECE_NODES nodes, each a model
of its own: its inputs are the values the graph's inputs or earlier pieces give it, typed from
the arrays they hold; its initializers, the ones it reads; its outputs, the values later pieces
read and the values asked for. Values cross a cut unchanged and optimisations are off (no fusion
spans a cut), so the pieces compute exactly what the whole graph computes. Pieces are built one
at a time, so one piece's session lives at once.

A graph the cut cannot serve (not in topological order, a value asked for that no node makes, a
non-tensor value crossing a cut) raises Unsplittable; the caller then builds the whole graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import onnx

from bnfold.graph import names_read

CUT_ABOVE = 2048
PIECE_NODES = 256


class Unsplittable(Exception):
    """The graph cannot be run in pieces; run it whole."""


@dataclasses.dataclass(frozen=True)
class Piece:
    start: int  # main-graph node range
    stop: int
    reads: tuple[str, ...]  # values read that this piece does not make: inputs or initializers
    outputs: tuple[str, ...]  # values later pieces read, and values asked for
    last_use: tuple[str, ...]  # values no piece after this one reads (dropped after it runs)


def split(model: onnx.ModelProto, wanted: Sequence[str]) -> list[Piece]:
    """The pieces of `model`'s main graph, whose outputs together give `wanted`."""
    nodes, size = model.graph.node, PIECE_NODES
    made_in: dict[str, int] = {}
    reads_by_piece: list[list[str]] = []
    last_reader: dict[str, int] = {}
    for index, start in enumerate(range(0, len(nodes), size)):
        reads: dict[str, None] = {}
        for node in nodes[start:start + size]:
            for name in names_read(node):
                made = made_in.get(name)
                if made is None or made < index:
                    reads[name] = None
                    last_reader[name] = index
                elif made > index:
                    raise Unsplittable(f"value '{name}' is read before the node that makes it")
            for name in node.output:
                if name:
                    if made_in.get(name, index) < index:
                        raise Unsplittable(f"value '{name}' is made twice")
                    made_in[name] = index
        reads_by_piece.append(list(reads))
    missing = [name for name in wanted if name not in made_in]
    if missing:
        raise Unsplittable(f"no node makes '{missing[0]}'")
    pieces = []
    count = len(reads_by_piece)
    asked = set(wanted)
    outputs_by_piece: list[list[str]] = [[] for _ in range(count)]
    for name, index in made_in.items():
        if name in asked or last_reader.get(name, -1) > index:
            outputs_by_piece[index].append(name)
    last_use_by_piece: list[list[str]] = [[] for _ in range(count)]
    for name, index in last_reader.items():
        if name not in asked:
            last_use_by_piece[index].append(name)
    for index, start in enumerate(range(0, len(nodes), size)):
        pieces.append(Piece(
            start, min(start + size, len(nodes)), tuple(reads_by_piece[index]),
            tuple(outputs_by_piece[index]), tuple(last_use_by_piece[index]),
        ))
    return pieces


def piece_model(model: onnx.ModelProto, piece: Piece, values: dict[str, np.ndarray], constants: dict) -> bytes:
    """`piece` of `model` as a serialised model: what `values` holds is an input typed as it
    is; the rest it reads comes from `constants` (initializers by name), else is left for
    onnxruntime to name as missing."""
    graph = onnx.GraphProto(name=f"{model.graph.name}[{piece.start}:{piece.stop}]")
    graph.node.extend(model.graph.node[piece.start:piece.stop])
    for name in piece.reads:
        if name in values:
            graph.input.append(_typed(name, values[name]))
        elif name in constants:
            tensor = constants[name]
            (graph.sparse_initializer if isinstance(tensor, onnx.SparseTensorProto) else graph.initializer).append(tensor)
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in piece.outputs)
    shell = onnx.ModelProto(ir_version=model.ir_version, producer_name="bnfold")
    shell.opset_import.extend(model.opset_import)
    shell.functions.extend(model.functions)
    shell.graph.CopyFrom(graph)
    return shell.SerializeToString()


def _typed(name: str, value: np.ndarray) -> onnx.ValueInfoProto:
    try:
        element = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    except (KeyError, ValueError, TypeError):
        raise Unsplittable(f"value '{name}' has dtype {value.dtype}") from None
    return onnx.helper.make_tensor_value_info(name, element, value.shape)


def constants_of(model: onnx.ModelProto) -> dict:
    """Main-graph initializers (dense and sparse) by name."""
    found = {t.name: t for t in model.graph.initializer}
    found.update((t.values.name, t) for t in model.graph.sparse_initializer)
    return found


def run(model: onnx.ModelProto, pieces: list[Piece], wanted: Sequence[str], feeds: dict,
        run_piece: Callable[[bytes, dict], dict]) -> dict[str, np.ndarray]:
    """`wanted`'s values: each piece built and run in turn by `run_piece(serialised, feeds)`."""
    constants = constants_of(model)
    values = dict(feeds)
    asked = set(wanted)
    kept: dict[str, np.ndarray] = {}
    for piece in pieces:
        serialised = piece_model(model, piece, values, constants)
        fed = {name: values[name] for name in piece.reads if name in values}
        made = run_piece(serialised, fed)
        if len(made) < len(piece.outputs):  # a sequence, map or optional: not given back
            raise Unsplittable("a value crossing a cut is not a tensor")
        values.update(made)
        kept.update((name, value) for name, value in made.items() if name in asked)
        for name in piece.last_use:
            values.pop(name, None)
    return {name: kept[name] for name in wanted}
