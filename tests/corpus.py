"""Models as real exporters write them, built here with seeded random weights (nothing can be
downloaded): the onnx package's own model-zoo test graphs (IR 3, opset 9, Caffe2 exports with
every weight also listed as a graph input), graph outputs of unknown rank as tf2onnx writes
them, and BN at old opsets. Used by tests/test_real_world.py and benchmarks/."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

LIGHT_ZOO = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
ZOO_WITH_BN = ("resnet50", "inception_v2", "shufflenet", "densenet121")


def zoo_model(name: str, rng: np.random.Generator) -> onnx.ModelProto:
    """onnx's `light_<name>.onnx` with real random weights: its weights are ConstantOfShape
    nodes (the graph ships without them), each replaced by a seeded initializer of that shape,
    listed as a graph input as IR 3 requires. BN statistics are randomised so a wrong fold shows."""
    model = onnx.load(os.path.join(LIGHT_ZOO, f"light_{name}.onnx"))
    graph = model.graph
    shapes = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    roles = _batchnorm_roles(graph)
    keep, made = [], []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in shapes:
            shape = tuple(int(d) for d in shapes[node.input[0]])
            made.append(numpy_helper.from_array(_weight(rng, shape, roles.get(node.output[0])), node.output[0]))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    used = {name for node in keep for name in node.input}
    stale = [t.name for t in graph.initializer if t.name not in used]
    _drop_initializers(graph, stale)
    graph.initializer.extend(made)
    graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in made)
    _drop_final_softmax(graph)
    return model


def _drop_final_softmax(graph: onnx.GraphProto) -> None:
    """Random weights saturate a softmax (one-hot probabilities hide any error): the graph
    output becomes the logits, under the output's name."""
    last = graph.node[-1]
    if last.op_type == "Softmax" and last.output[0] == graph.output[0].name:
        producer = next(n for n in graph.node if last.input[0] in n.output)
        producer.output[list(producer.output).index(last.input[0])] = last.output[0]
        graph.node.remove(last)


def _batchnorm_roles(graph: onnx.GraphProto) -> dict[str, str]:
    roles = {}
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            for role, name in zip(("x", "scale", "B", "mean", "var"), node.input):
                roles[name] = role
    return roles


def _weight(rng: np.random.Generator, shape: tuple[int, ...], role: str | None) -> np.ndarray:
    if role == "var":
        return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if role == "scale":
        return rng.uniform(0.5, 1.5, shape).astype(np.float32) * rng.choice([1, 1, 1, -1], shape).astype(np.float32)
    if role in ("B", "mean"):
        return rng.normal(0, 0.5, shape).astype(np.float32)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return rng.normal(0, np.sqrt(2.0 / max(fan_in, 1)), shape).astype(np.float32)


def _drop_initializers(graph: onnx.GraphProto, names) -> None:
    names = set(names)
    kept = [t for t in graph.initializer if t.name not in names]
    inputs = [i for i in graph.input if i.name not in names]
    del graph.initializer[:], graph.input[:]
    graph.initializer.extend(kept)
    graph.input.extend(inputs)


def unshaped_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with graph outputs declaring an element type and no shape (unknown
    rank), as tf2onnx writes them: onnx.checker refuses it, onnxruntime runs it."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for output in copy.graph.output:
        output.type.tensor_type.ClearField("shape")
    return copy


def near_identity_chain(
    rng: np.random.Generator, blocks: int, channels: int = 4, size: int = 8, offset: float = 0.0
) -> onnx.ModelProto:
    """`blocks` x (Conv 3x3 -> BN -> Relu), each block close to the identity, so values stay
    finite however deep, and float32 rounding accumulates over the depth. With `offset`, each
    Conv adds it as a bias and its BN subtracts it again as the mean (as a BN after a biased
    layer often does): the original rounds at the offset's magnitude in every block and drifts
    from the exact answer much sooner; the fold cancels the two exactly (in float64)."""
    inits, nodes, x = [], [], "x"
    eye = np.zeros((channels, channels, 3, 3), np.float32)
    eye[np.arange(channels), np.arange(channels), 1, 1] = 1.0
    for i in range(blocks):
        weight = eye + rng.normal(0, 0.02, eye.shape).astype(np.float32)
        # scale a little under 1 and a positive shift: each block pulls values towards about 1
        scale, mean = rng.uniform(0.9, 1.0, channels), rng.normal(0, 0.05, channels) + offset
        var, shift = rng.uniform(0.9, 1.1, channels), rng.normal(0.1, 0.02, channels)
        names = [f"W{i}", f"bn{i}_scale", f"bn{i}_B", f"bn{i}_mean", f"bn{i}_var", f"B{i}"]
        for name, value in zip(names, (weight, scale, shift, mean, var, np.full(channels, offset))):
            inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        nodes += [
            helper.make_node("Conv", [x, names[0], names[5]], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", [f"c{i}", *names[1:5]], [f"b{i}"], name=f"bn{i}"),
            helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        x = f"r{i}"
    graph = helper.make_graph(
        nodes, "near_identity_chain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["batch", channels, size, size])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
