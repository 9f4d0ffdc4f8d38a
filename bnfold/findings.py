"""What onnx.checker says about a model, split into what stops a fold and what does not.

bnfold folds what can be analysed and run, not only what the checker accepts in every detail:
tf2onnx and many other converters declare graph inputs or outputs with an element type and no
shape (unknown rank), which the checker refuses and onnxruntime runs. So a checker complaint is

- a warning (one line each; the fold goes on and verification proves the result as usual) when
  it is a graph input or output declared without a shape, or when the model, checker or not,
  loads in onnxruntime (or, for ops onnxruntime has no kernel for, in onnx.reference);
- fatal (`InvalidModel`, exit 2) when no engine can load the model either (an edge nobody
  produces, a cycle, an unknown op), and for every complaint under `strict` (`--check-model`).

What is fatal before the checker runs (not a model, unknown opsets, invalid names, tensors that
do not fit their shapes, broken external data) is `bnfold.loading`'s.
"""

from __future__ import annotations

import pathlib

import onnx

from bnfold.errors import InvalidModel, one_line
from bnfold.tensors import all_graphs, is_external, iter_tensors

_CHECKER_ERRORS = (onnx.checker.ValidationError, ValueError, OSError)


def check_model(path: pathlib.Path, model: onnx.ModelProto, whole_file: bool, strict: bool = False) -> tuple[str, ...]:
    """Run the checker; returns the warnings, or raises InvalidModel for what is fatal.

    `whole_file`: `model` is the whole file as parsed (checked by path, as the checker reads
    external data relative to the model); else a lazy load's skeleton, checked as a proto.
    """
    try:
        onnx.checker.check_model(str(path) if whole_file else checkable_copy(model))
        return ()
    except _CHECKER_ERRORS as e:
        complaint = one_line(str(e))
    if strict:
        raise InvalidModel(f"cannot load {path}: onnx checker: {complaint}")
    copy = checkable_copy(model)
    warnings = list(fill_missing_shapes(copy))
    try:
        onnx.checker.check_model(copy)
        return tuple(warnings)
    except _CHECKER_ERRORS as e:
        complaint = one_line(str(e))
    from bnfold.verify import load_problem  # onnxruntime: imported only for a model the checker refuses

    problem = load_problem(path)
    if problem is not None:
        raise InvalidModel(f"cannot load {path}: onnx checker: {complaint} ({problem})")
    return (*warnings, f"onnx checker: {complaint} (onnxruntime loads the model: folding goes on)")


def checkable_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy the checker can take as a proto: external tensors (already checked against their
    files by bnfold.external) emptied to zero elements, so it looks for no data file."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in iter_tensors(copy):
        if is_external(tensor):
            del tensor.external_data[:], tensor.dims[:]
            tensor.ClearField("data_location")
            tensor.dims.append(0)
    return copy


def fill_missing_shapes(model: onnx.ModelProto):
    """Yield a warning for each graph input or output (any graph) whose tensor type has no
    shape, giving it an empty one in `model` (a copy for the checker, never the output)."""
    for graph in all_graphs(model.graph):
        where = f" of subgraph '{graph.name}'" if graph is not model.graph else ""
        for kind, values in (("input", graph.input), ("output", graph.output)):
            for value in values:
                tensor_type = value.type.tensor_type if value.type.HasField("tensor_type") else None
                if tensor_type is not None and not tensor_type.HasField("shape"):
                    tensor_type.shape.SetInParent()
                    yield f"graph {kind} '{value.name}'{where} declares no shape (unknown rank)"
