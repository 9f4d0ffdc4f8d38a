"""Bugs the quantized property test (test_property.py, graph_cases(quantized=True)) found, in the
folding of BN into weights that DequantizeLinear makes and in verification's fold sites (float
models too), each as a minimal model.

A test of a bug not fixed yet is marked xfail(strict=True) and states what bnfold should do;
the property test tolerates such a bug (counted in test_property.KNOWN_BUGS_SEEN) so that it
keeps looking for others. Fixed ones stay as regression tests.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from conftest import run_ort


def per_tensor_conv_bn(opset: int, gamma) -> onnx.ModelProto:
    """x [1, 1, 4] -> Conv(W = DequantizeLinear(int8 [C, 1, 1], scalar scale 0.05, scalar zero
    point 0)) -> BN(scale `gamma`, B 0.5, mean 0, var 1) -> y: a per-tensor quantized weight."""
    channels = len(gamma)
    inits = [numpy_helper.from_array(np.full([channels, 1, 1], 3, np.int8), "Wq"),
             numpy_helper.from_array(np.array(0.05, np.float32), "ws"),
             numpy_helper.from_array(np.array(0, np.int8), "wzp")]
    params = [np.asarray(gamma), np.full(channels, 0.5), np.zeros(channels), np.ones(channels)]
    inits += [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(["s", "b", "m", "v"], params)]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "ws", "wzp"], ["Wd"], name="dq"),
             helper.make_node("Conv", ["x", "Wd"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def dequantize_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear"]


def scalar_scales(model: onnx.ModelProto) -> bool:
    """Every DequantizeLinear reads a scalar scale and has no axis (DequantizeLinear-10..12)."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return all(values[n.input[1]].ndim == 0 and not any(a.name == "axis" for a in n.attribute) for n in dequantize_nodes(model))


@pytest.mark.parametrize("opset", [10, 12])
@pytest.mark.parametrize("gamma", [[2.0], [2.0, -2.0]], ids=["one-channel", "equal-magnitudes"])
def test_regression_opset_below_13_per_tensor_weight_stays_per_tensor(opset, gamma):
    """Regression (found by the quantized property test on da87e6e, fixed in
    6d9a3c1): before opset 13 DequantizeLinear has one scale per tensor and no `axis`.
    weights.scaled let a BN whose |scale| is the same on every channel (one channel, or +-a)
    fold into a per-tensor weight, rightly, but wrote the new scale as a [C] vector with axis=0:
    the folded model failed onnx.checker ("Unrecognized attribute: axis for operator
    DequantizeLinear") and onnxruntime refused to load it (INVALID_GRAPH). The scale must stay a
    scalar, scale * |s|, without an axis."""
    model = per_tensor_conv_bn(opset, gamma)
    result = bnfold.fold(model)
    assert result.report.bn_after == 0 and result.report.folded[0].quantized
    onnx.checker.check_model(result.model, full_check=True)
    assert scalar_scales(result.model)
    x = {"x": np.arange(4, dtype=np.float32).reshape(1, 1, 4)}
    np.testing.assert_allclose(run_ort(result.model, x)[0], run_ort(model, x)[0], rtol=1e-5, atol=1e-6)


def test_regression_opset_below_13_per_tensor_int32_bias_stays_per_tensor():
    """Regression (the same bug, fixed in 6d9a3c1) for an int32 bias: x [1, 1, 4] -> Conv(float
    W [1, 1, 1], B = DequantizeLinear(int32 [1000], scalar scale 0.001)) -> BN(one channel, scale
    2) at opset 10. weights.rebiased quantized the folded bias again (rightly) but wrote scale
    [1] with axis=0: onnx.checker and onnxruntime refused the folded model."""
    inits = [numpy_helper.from_array(np.full([1, 1, 1], 0.15, np.float32), "W"),
             numpy_helper.from_array(np.array([1000], np.int32), "Bq"), numpy_helper.from_array(np.array(0.001, np.float32), "bs")]
    inits += [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(["s", "b", "m", "v"], [[2.0], [0.5], [0.0], [1.0]])]
    nodes = [helper.make_node("DequantizeLinear", ["Bq", "bs"], ["Bd"], name="dq_b"),
             helper.make_node("Conv", ["x", "W", "Bd"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    result = bnfold.fold(model)
    assert result.report.bn_after == 0 and result.report.folded[0].quantized
    onnx.checker.check_model(result.model, full_check=True)
    assert scalar_scales(result.model)
    x = {"x": np.arange(4, dtype=np.float32).reshape(1, 1, 4)}
    np.testing.assert_allclose(run_ort(result.model, x)[0], run_ort(model, x)[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- found on the way, not quantized


def assert_right_and_verified(src, folded, x: np.ndarray) -> None:
    """`folded` (bnfold.fold of `src`) computes what `src` does on `x`, and fold_file's own
    verification agrees: nothing rolled back, every BN folded, verification passed."""
    np.testing.assert_allclose(run_ort(folded.model, {"x": x})[0], run_ort(onnx.load(src), {"x": x})[0], rtol=1e-5, atol=1e-5)
    result = bnfold.fold_file(src)
    assert result.report.rolled_back == () and result.report.bn_after == 0, result.report.to_dict()["rolled_back"]
    assert result.verification.status == "passed"



def test_bn_into_next_matmul_with_bias_add_verifies(tmp_path):
    """Found by running the quantized random graphs through fold_file (verification and rollback),
    but a float model shows it: x [2, 4] -> BN 'bn' -> MatMul 'mm' (W [4, 3]) -> Add 'add' (b [3])
    -> y. bn_into_next_matmul scales W's rows and moves shift @ W into the Add's constant b, so
    the fold is exact at y (error ~2e-7), but the fold's site (Folded.site, what verification
    compares for that fold) is 'm', the product, which now lacks shift @ W: the site check fails
    (max abs error ~0.77) and fold_file rolled the correct fold back ("verification failed"). The
    site of a backward fold whose bias went into the following Add is that Add's output."""
    rng = np.random.default_rng(0)
    names = ["bn_scale", "bn_B", "bn_mean", "bn_var"]
    params = [rng.uniform(0.5, 2, 4) * np.array([-1, 1, -1, 1]), rng.normal(0, 1, 4), rng.normal(0, 1, 4), rng.uniform(0.5, 2, 4)]
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, [4, 3]).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 1, [3]).astype(np.float32), "b")]
    inits += [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(names, params)]
    nodes = [helper.make_node("BatchNormalization", ["x", *names], ["n"], name="bn"),
             helper.make_node("MatMul", ["n", "W"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    folded = bnfold.fold(src)
    assert [f.rule for f in folded.report.folded] == ["bn_into_next_matmul"]
    assert_right_and_verified(src, folded, rng.normal(size=[2, 4]).astype(np.float32))



def test_bn_into_conv_then_scale_through_relu_verifies(tmp_path):
    """Found like the one above (the quantized random graphs through fold_file), float too:
    x [1, 3, 6, 6] -> Conv 'layer' (W [4, 3, 3, 3]) -> BN 'bn1' (scale of both signs) -> Relu ->
    BN 'bn2' (scale > 0) -> y. fold() folds bn1 into the Conv (site 'n1', bn1's output, which
    the Conv now writes), then bn2's scale through the Relu into the same Conv (bn2 becomes
    Add(shift)): the model is exact at y (error ~1e-6), but the Conv's output 'n1' is now
    bn2's scale times the original 'n1'. Verification compares fold sites in the final model, so
    bn1's site fails (max abs error ~2.4) and fold_file rolls bn1 back, and with it bn2 (its
    producer is no longer the Conv): nothing is folded. In larger graphs the same stale site
    made fold_file raise VerificationFailed ("each fold verifies on its own, so the difference
    is float rounding the folds accumulate"). A fold's site must be compared where the later
    folds left it unchanged (or before they are applied)."""
    rng = np.random.default_rng(0)

    def bn(name, x, y, positive):
        gamma = rng.uniform(0.5, 2, 4) * (1 if positive else np.array([-1, 1, -1, 1]))
        names = [f"{name}_{k}" for k in ("s", "b", "m", "v")]
        params = [gamma, rng.normal(0, 1, 4), rng.normal(0, 1, 4), rng.uniform(0.5, 2, 4)]
        inits = [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(names, params)]
        return inits, helper.make_node("BatchNormalization", [x, *names], [y], name=name)

    inits1, bn1 = bn("bn1", "c", "n1", positive=False)
    inits2, bn2 = bn("bn2", "r", "y", positive=True)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, [4, 3, 3, 3]).astype(np.float32), "W"), *inits1, *inits2]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="layer"), bn1, helper.make_node("Relu", ["n1"], ["r"], name="relu"), bn2]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    folded = bnfold.fold(src)
    assert [f.rule for f in folded.report.folded] == ["bn_into_conv", "bn_scale_through_relu"]
    assert_right_and_verified(src, folded, rng.normal(size=[1, 3, 6, 6]).astype(np.float32))



def test_bn_into_matmul_add_then_affine_merge_verifies(tmp_path):
    """The same kind, a third way (found the same way, float too): x [2, 4] -> MatMul 'mm'
    (W [4, 3]) -> Add 'add' (b) -> BN 'bn' -> Add 'addk' (k) -> y. bn_into_matmul_add folds the
    BN (site 'n', which the bias Add now writes), then affine_into_matmul merges that bias Add
    into Add 'addk': the MatMul now writes 'n' without b and the shift, so bn's site is stale
    (max abs error ~1.1) and fold_file rolled the correct fold back. Fixed: the chain fold moves the
    site to its own (GraphIndex.moved_sites)."""
    rng = np.random.default_rng(0)
    names = ["bn_s", "bn_b", "bn_m", "bn_v"]
    params = [rng.uniform(0.5, 2, 3) * np.array([-1, 1, 1]), rng.normal(0, 1, 3), rng.normal(0, 1, 3), rng.uniform(0.5, 2, 3)]
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, [4, 3]).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 1, [3]).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 1, [3]).astype(np.float32), "k")]
    inits += [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(names, params)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), helper.make_node("Add", ["m", "b"], ["a"], name="add"),
             helper.make_node("BatchNormalization", ["a", *names], ["n"], name="bn"), helper.make_node("Add", ["n", "k"], ["y"], name="addk")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    folded = bnfold.fold(src)
    assert [f.rule for f in folded.report.folded] == ["bn_into_matmul_add"]
    assert [f.rule for f in folded.report.affine_folded] == ["affine_into_matmul"]
    assert_right_and_verified(src, folded, rng.normal(size=[2, 4]).astype(np.float32))
