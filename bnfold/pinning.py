"""Quantized activations pinned during verification, so a fold is judged by what it changes.

In a QDQ model an activation QuantizeLinear rounds float values to an integer grid. A fold is
exact only up to float rounding (a rescaled weight scale, a bias quantized again), so a value
lying within that rounding of a half step lands on the other integer after the fold, and every
layer after it sees a different input: a correct fold then fails a comparison of the outputs,
and each fold alone too, so verification would undo every fold of such a model. The original
run on another engine would differ the same way; the flip is not the fold's error.

So both models are run with the integers of every activation QuantizeLinear of the main graph
pinned to the original's: its output becomes a graph input fed with the value the original
computed (CPU), and each layer of either model sees the same quantized inputs. What each fold
changes is then compared where it happens (fold sites) and at the outputs, without the flips.
A QuantizeLinear whose input is a constant (a fake-quantized weight) is never pinned: that is
what a fold changes and what verification must see.
"""

from __future__ import annotations

import onnx

from bnfold.graph import DEFAULT_DOMAINS, names_read

SUFFIX = "_bnfold_pinned"


def activation_quantizers(model: onnx.ModelProto) -> list[str]:
    """Outputs of the main graph's QuantizeLinear nodes whose input depends on a graph input
    (not on constants alone), and that are not graph outputs themselves."""
    graph = model.graph
    if not any(node.op_type == "QuantizeLinear" for node in graph.node):  # most models: no walk
        return []
    constants = {t.name for t in graph.initializer}
    varying = {i.name for i in graph.input if i.name not in constants}
    outputs = {o.name for o in graph.output}
    found = []
    for node in graph.node:
        if any(name in varying for name in names_read(node)):
            varying.update(name for name in node.output if name)
            if (node.op_type == "QuantizeLinear" and node.domain in DEFAULT_DOMAINS and node.output
                    and node.input[0] in varying and node.output[0] not in outputs):
                found.append(node.output[0])
    return found


def pinned(model: onnx.ModelProto, names: dict) -> onnx.ModelProto | None:
    """A copy of `model` in which the outputs `names` (name -> the value they are pinned to)
    are graph inputs; None when the model keeps external data (it is then run as it is)."""
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type == "QuantizeLinear" and node.output and node.output[0] in names:
            node.output[0] += SUFFIX
    for name, value in names.items():
        element = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        copy.graph.input.append(onnx.helper.make_tensor_value_info(name, element, value.shape))
    return copy
