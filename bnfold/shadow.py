"""The float64 shadow: the original model with every floating-point tensor promoted to float64.

Verification compares the candidate with the original's float32 (or float16) result. Over tens
of thousands of layers that result is itself far from the exact answer, and a correct fold,
rounding differently, lands as far on another side: the plain bound cannot tell rounding from a
wrong fold. The shadow computes (to within float64 rounding) the exact answer, so a failed
comparison can be judged again: is the candidate further from the exact answer than the original
is? (`bnfold.compare.judge_by_shadow`).

Weights, constants, inputs, declared types and the float targets of Cast and of dtype
attributes become float64. A model this cannot promote faithfully (quantized ops, ops whose
float inputs must stay float32 unless a constant feeds them, such as Resize's scales, custom
domains, sparse tensors) has no shadow: `promote` returns None, or the shadow does not run, and
the plain bound stands.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.tensors import all_graphs

FLOATS = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})
DOUBLE = onnx.TensorProto.DOUBLE
# Ops with a float input or output that float64 may not take (per the ONNX spec), or whose
# meaning is tied to the dtype: no faithful shadow.
UNPROMOTABLE = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "ConvInteger", "MatMulInteger", "RoiAlign", "GridSample", "STFT",
})
# Float inputs that must stay float32 whatever the data's type: Resize's and Upsample's scales.
# Kept as they are when an initializer feeds them; computed ones make the shadow fail to run.
FLOAT32_INPUTS = {"Resize": (2,), "Upsample": (1,)}
DEFAULT_DOMAINS = ("", "ai.onnx")


def promote(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A float64 copy of `model` (whose tensors must be in memory, not external), or None."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for graph in all_graphs(copy.graph):
        if graph.sparse_initializer or not _promote_graph(graph):
            return None
    return copy


def promote_feeds(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: a.astype(np.float64) if a.dtype.kind == "f" or a.dtype.kind == "V" else a for name, a in feeds.items()}


def _promote_graph(graph: onnx.GraphProto) -> bool:
    keep = {node.input[i] for node in graph.node for i in FLOAT32_INPUTS.get(node.op_type, ()) if i < len(node.input)}
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name not in keep and value.type.HasField("tensor_type") and value.type.tensor_type.elem_type in FLOATS:
            value.type.tensor_type.elem_type = DOUBLE
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type in FLOATS and tensor.name not in keep:
            graph.initializer[i].CopyFrom(_double(tensor))
    return all(_promote_node(node) for node in graph.node)


def _promote_node(node: onnx.NodeProto) -> bool:
    if node.domain not in DEFAULT_DOMAINS or node.op_type in UNPROMOTABLE:
        return False
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in FLOATS:
            attr.t.CopyFrom(_double(attr.t))
        elif attr.type == onnx.AttributeProto.INT and attr.name in ("to", "dtype") and attr.i in FLOATS:
            attr.i = DOUBLE
        elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
            value = np.array(attr.f if attr.name == "value_float" else list(attr.floats), dtype=np.float64)
            attr.CopyFrom(onnx.helper.make_attribute("value", numpy_helper.from_array(value)))
    return True


def _double(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name)
