"""Python API: fold / fold_file / check, external data, and the promise that nothing wrong is written."""

import hashlib

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfold
from bnfold import algebra
from conftest import assert_same_outputs, conv_bn_relu_chain, count_bn, make_model, value_info


def conv_chain(rng, blocks=3, channels=8):
    return conv_bn_relu_chain(rng, blocks, channels)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_api_fold_model_proto_not_modified(rng):
    model = conv_chain(rng)
    before = model.SerializeToString()
    result = bnfold.fold(model)
    assert model.SerializeToString() == before
    assert result.modified and result.report.bn_after == 0
    assert result.report.rule_counts() == {"bn_into_conv": 3}


def test_api_fold_file_verifies_and_writes(tmp_path, rng):
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(rng), src)
    result = bnfold.fold_file(src)
    assert result.path == tmp_path / "m.folded.onnx"
    assert result.verification.passed and result.verification.engine == "onnxruntime"
    assert result.verification.max_rel_err() < 1e-5
    assert_same_outputs(onnx.load(src), onnx.load(result.path), rng)


def test_api_fold_file_external_data_keeps_layout(tmp_path, rng):
    src = tmp_path / "ext.onnx"
    onnx.save(conv_chain(rng), src, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    before = {p.name: sha(p) for p in tmp_path.iterdir()}
    result = bnfold.fold_file(src, tmp_path / "folded.onnx")
    assert result.verification.passed
    assert {p.name: sha(p) for p in tmp_path.iterdir() if p.name in before} == before, "input files changed"
    folded = onnx.load(result.path, load_external_data=False)
    locations = {e.value for t in folded.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"folded.onnx.data"}
    assert_same_outputs(onnx.load(src), onnx.load(result.path), rng)


def test_api_fold_file_wrong_fold_strict_is_not_written(tmp_path, rng, monkeypatch):
    """If a fold were wrong, verification catches it; with strict nothing is written."""
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(rng), src)
    real = algebra.bn_scale_shift
    monkeypatch.setattr(algebra, "bn_scale_shift", lambda *a, **k: (real(*a, **k)[0], real(*a, **k)[1] + 0.1))
    with pytest.raises(bnfold.VerificationFailed, match="nothing written") as err:
        bnfold.fold_file(src, strict=True)
    assert not err.value.verification.passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_api_fold_file_nothing_to_fold_still_writes(tmp_path, rng):
    src = tmp_path / "plain.onnx"
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [value_info("x", np.float32, [2, 3])], [value_info("y", np.float32, [2, 3])])
    onnx.save(model, src)
    result = bnfold.fold_file(src)
    assert not result.modified and result.verification is None
    assert onnx.load(result.path).graph == model.graph


def test_api_check_lists_foldable(rng):
    report = bnfold.check(conv_chain(rng, blocks=2))
    assert [f.bn for f in report.folded] == ["bn0", "bn1"]


def test_api_fold_path_invalid_model(tmp_path):
    with pytest.raises(bnfold.InvalidModel):
        bnfold.fold(tmp_path / "nope.onnx")


def test_api_report_to_dict_accounts_for_every_bn(rng):
    model = conv_chain(rng)
    model.graph.output.append(value_info("c1", np.float32, ["batch", 8, 8, 8]))
    data = bnfold.fold(model).to_dict()
    assert data["bn_before"] == 3 and data["bn_after"] == 1
    assert len(data["folded"]) + len(data["kept"]) == 3
    assert data["kept"][0]["reason"] == "Conv 'conv1' output 'c1' is a graph output"
    assert count_bn(bnfold.fold(model).model) == 1
