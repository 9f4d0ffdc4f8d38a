"""Large models through fold_file: only the tensors a fold touches are read, the others are
copied byte for byte (embedded: bnfold.wire's stubs; external data: copy-then-append).

The size thresholds are lowered so small models take the large-model path; every output is
checked against the original in onnxruntime (fold_file's own verification, plus conftest's).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfold
from bnfold import io, loading
from bnfold.errors import InvalidModel, WriteFailed
from tests.conftest import assert_same_outputs, bn_node, make_model, tensor, value_info


@pytest.fixture
def lazy(monkeypatch):
    """Every file is 'large', every tensor of 256 bytes or more stays on disk until needed."""
    monkeypatch.setattr(loading, "LAZY_MIN_FILE", 0)
    monkeypatch.setattr(loading, "LAZY_MIN_TENSOR", 256)


def conv_bn_conv(rng) -> onnx.ModelProto:
    """x -> Conv(W1) -> BN -> Relu -> Conv(W2) -> y: W1 (1152 B) changes, W2 (2304 B) does not."""
    inits = [
        tensor("W1", rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32)),
        tensor("W2", rng.normal(0, 0.5, (8, 8, 3, 3)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node(inits, "c", "b", rng, 8, name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    shape = [1, 4, 5, 5]
    return make_model(nodes, [value_info("x", np.float32, shape)], [value_info("y", np.float32, [1, 8, 5, 5])], inits)


def record_of(model: onnx.ModelProto, name: str) -> bytes:
    """The serialized TensorProto of initializer `name`: what a byte-for-byte copy preserves."""
    return next(t for t in model.graph.initializer if t.name == name).SerializeToString()


def test_lazy_fold_file_unchanged_tensor_copied_verbatim_verifies(tmp_path, rng, lazy, reads):
    model = conv_bn_conv(rng)
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    result = bnfold.fold_file(src, tmp_path / "out.onnx")
    assert result.verification.passed and result.report.bn_after == 0
    written = (tmp_path / "out.onnx").read_bytes()
    assert record_of(model, "W2") in written  # copied as it was, not re-encoded
    assert "W2" not in reads and reads.count("W1") == 1
    folded = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(folded, full_check=True)
    assert_same_outputs(model, folded, rng)


def test_lazy_load_big_tensors_stay_on_disk(tmp_path, rng, lazy):
    model = conv_bn_conv(rng)
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    loaded = io.load_model(src, lazy=True)
    assert set(loaded.stubs) == {"W1", "W2"}
    stubs = {t.name: t for t in loaded.model.graph.initializer if t.name in loaded.stubs}
    assert all(not t.HasField("raw_data") and io.is_external(t) for t in stubs.values())
    assert np.array_equal(io.read_tensor(stubs["W2"], loaded.base_dir), onnx.numpy_helper.to_array(model.graph.initializer[1]))
    assert io.load_model(src).stubs == {}  # not lazy unless asked


def test_lazy_in_place_verifies(tmp_path, rng, lazy):
    model = conv_bn_conv(rng)
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    result = bnfold.fold_file(src, in_place=True)
    assert result.verification.passed
    assert_same_outputs(model, onnx.load(src), rng)


def test_lazy_input_changed_before_save_refused(tmp_path, rng, lazy):
    """The unchanged tensors are copied from the input at save time: an input rewritten since
    it was read would give wrong bytes, so the save fails instead."""
    src = tmp_path / "m.onnx"
    src.write_bytes(conv_bn_conv(rng).SerializeToString())
    loaded = io.load_model(src, lazy=True)
    result = bnfold.api.fold_model(loaded.model, base_dir=loaded.base_dir)
    os.utime(src, ns=(0, 0))
    with pytest.raises(WriteFailed, match="changed since it was read"):
        io.save_model(result.model, tmp_path / "out.onnx", source=loaded)
    assert not (tmp_path / "out.onnx").exists()


def test_lazy_raw_data_size_mismatch_refused_like_eager(tmp_path, rng, lazy):
    model = conv_bn_conv(rng)
    model.graph.initializer[1].dims[0] = 9  # 2304 bytes for a [9, 8, 3, 3] tensor
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    messages = []
    for lazy_load in (True, False):
        with pytest.raises(InvalidModel) as err:
            io.load_model(src, lazy=lazy_load)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "holds 2304 bytes of data, expected 2592" in messages[0]


def test_lazy_truncated_file_same_error_as_eager(tmp_path, rng, lazy):
    src = tmp_path / "m.onnx"
    src.write_bytes(conv_bn_conv(rng).SerializeToString()[:-700])
    messages = []
    for lazy_load in (True, False):
        with pytest.raises(InvalidModel) as err:
            io.load_model(src, lazy=lazy_load)
        messages.append(str(err.value))
    assert messages[0] == messages[1]


def test_lazy_external_data_unchanged_tensor_keeps_offset_verifies(tmp_path, rng, reads):
    """External data: the data file is copied, the folded tensors appended; the unchanged W2
    keeps its offset and bytes, and only the tensors a fold touches are read."""
    model = conv_bn_conv(rng)
    src = tmp_path / "m.onnx"
    saved = onnx.ModelProto()
    saved.CopyFrom(model)  # save_model moves the tensors of what it is given out
    onnx.save_model(saved, src, save_as_external_data=True, location="m.data", size_threshold=0)
    result = bnfold.fold_file(src, tmp_path / "out.onnx")
    assert result.verification.passed
    data_in, data_out = (tmp_path / "m.data").read_bytes(), (tmp_path / "out.onnx.data").read_bytes()
    assert data_out.startswith(data_in)  # a copy, then appended tensors
    entries = lambda m, name: {e.key: e.value for e in next(t for t in m.graph.initializer if t.name == name).external_data}
    before = onnx.load(src, load_external_data=False)
    after = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert entries(after, "W2") == {**entries(before, "W2"), "location": "out.onnx.data"}
    assert "W2" not in reads and reads.count("W1") == 1
    assert_same_outputs(model, onnx.load(tmp_path / "out.onnx"), rng)


def test_lazy_second_bn_reads_spilled_weight_verifies(tmp_path, rng, lazy):
    """Conv -> BN -> BN: the second fold reads the weight the first one made, which went to
    the spill file (big enough), not into memory."""
    model = conv_bn_conv(rng)
    inits = list(model.graph.initializer)
    second = bn_node(inits, "b", "b2", rng, 8, name="bn2")
    model.graph.initializer.extend(inits[len(model.graph.initializer):])
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.input[0] = "b2"
    model.graph.node.insert(2, second)
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    loaded = io.load_model(src, lazy=True)
    result = bnfold.api.fold_model(loaded.model, base_dir=loaded.base_dir, spill=loaded.spill)
    assert result.report.bn_after == 0 and len(loaded.spill.stubs) >= 2  # W1 twice: after bn, after bn2
    io.save_model(result.model, tmp_path / "out.onnx", source=loaded)
    assert_same_outputs(model, onnx.load(tmp_path / "out.onnx"), rng)


def test_lazy_rollback_refolds_with_spill_kept(tmp_path, rng, lazy, monkeypatch):
    """A wrong fold (bias off by 0.5, as a rule bug would make) is found and undone; the refolds
    spill their tensors to the same file and the output is still whole and correct."""
    from bnfold.rules.base import WeightAndBiasRule

    real = WeightAndBiasRule.plan

    def wrong_plan(self, bn, node, graph):
        plan = real(self, bn, node, graph)
        n, position, bias = plan.new_inputs[1]
        plan.new_inputs[1] = (n, position, (bias + 0.5).astype(bias.dtype))
        return plan

    monkeypatch.setattr(WeightAndBiasRule, "plan", wrong_plan)
    model = conv_bn_conv(rng)
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    result = bnfold.fold_file(src, tmp_path / "out.onnx")
    (kept,) = result.report.kept
    assert kept.bn == "bn" and "verification" in kept.reason
    assert_same_outputs(model, onnx.load(tmp_path / "out.onnx"), rng)


def test_lazy_stub_edited_in_place_refused(tmp_path, rng, lazy):
    """Editing a stub (not replacing it, as every fold does) would leave the output pointing
    into the input file: refused, nothing written."""
    src = tmp_path / "m.onnx"
    src.write_bytes(conv_bn_conv(rng).SerializeToString())
    loaded = io.load_model(src, lazy=True)
    next(t for t in loaded.model.graph.initializer if t.name == "W2").doc_string = "edited"
    with pytest.raises(ValueError, match="'W2' was edited in place"):
        io.save_model(loaded.model, tmp_path / "out.onnx", source=loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
