"""Prove each fold: a fold that fails verification is found by bisection, undone, and reported.

A wrong fold is simulated by breaking one rule for chosen BN (what a bug in a rule would do);
the output must then verify against the original independently of bnfold (conftest helpers).
"""

import onnx
import pytest
from click.testing import CliRunner

import bnfold
from bnfold.cli import main
from bnfold.report import Folded
from bnfold.rollback import find_failing_folds
from bnfold.rules.base import WeightAndBiasRule
from bnfold.verify import Reference, available_providers
from conftest import assert_same_outputs, conv_bn_relu_chain, count_bn
from test_verify import count_reference_work


def conv_chain(rng, blocks: int, channels: int = 4):
    return conv_bn_relu_chain(rng, blocks, channels, batch=1, size=6)


@pytest.fixture
def break_folds_of(monkeypatch):
    """Make the Conv-family rule fold the named BN wrongly (bias off by 0.5)."""

    def apply(*labels):
        real = WeightAndBiasRule.plan

        def wrong_plan(self, bn, node, graph):
            plan = real(self, bn, node, graph)
            if bn.label in labels and not isinstance(plan, bnfold.Kept):
                n, position, bias = plan.new_inputs[1]
                plan.new_inputs[1] = (n, position, (bias + 0.5).astype(bias.dtype))
            return plan

        monkeypatch.setattr(WeightAndBiasRule, "plan", wrong_plan)

    return apply


def folds(n):
    return [Folded(f"bn{i}", f"conv{i}", "bn_into_conv") for i in range(n)]


def counting_trial(bad, combos=()):
    calls = []

    def trial(subset):
        calls.append(list(subset))
        names = {f.bn for f in subset}
        failed = bool(names & set(bad)) or any(set(c) <= names for c in combos)
        return not failed, 1.0 if failed else 0.0

    return trial, calls


def test_find_failing_folds_single_culprit_logarithmic_trials():
    trial, calls = counting_trial(["bn37"])
    failing = find_failing_folds(folds(64), trial, error=1.0)
    assert [f.bn for f in failing] == ["bn37"]
    assert len(calls) <= 2 * 6, "bisection, not one trial per fold"


def test_find_failing_folds_two_culprits_both_found():
    trial, _ = counting_trial(["bn2", "bn9"])
    assert sorted(f.bn for f in find_failing_folds(folds(12), trial, error=1.0)) == ["bn2", "bn9"]


def test_find_failing_folds_failing_only_together_names_no_culprit():
    """bn1 and bn6 pass alone but fail together: no fold is wrong (a wrong fold fails alone),
    the combination only accumulates rounding, so no fold is named to undo."""
    trial, calls = counting_trial([], combos=[("bn1", "bn6")])
    assert find_failing_folds(folds(8), trial, error=1.0) == {}
    assert len(calls) == 2, "both halves pass: no deeper search"


def test_find_failing_folds_culprit_found_beside_rounding():
    """bn3 is wrong; bn10 and bn14 only drift together: bn3 alone is named."""
    trial, _ = counting_trial(["bn3"], combos=[("bn10", "bn14")])
    assert [f.bn for f in find_failing_folds(folds(16), trial, error=1.0)] == ["bn3"]


def test_rollback_wrong_fold_undone_rest_folded(tmp_path, rng, break_folds_of):
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(rng, blocks=6), src)
    break_folds_of("bn4")
    result = bnfold.fold_file(src)
    assert result.verification.passed
    assert [k.bn for k in result.report.kept] == ["bn4"]
    assert result.report.kept[0].reason.startswith("verification failed: max abs error")
    assert result.report.rule_counts() == {"bn_into_conv": 5}
    folded = onnx.load(result.path)
    assert count_bn(folded) == 1
    assert_same_outputs(onnx.load(src), folded, rng)


def test_rollback_all_folds_wrong_writes_unfolded_model(tmp_path, rng, break_folds_of):
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(rng, blocks=3), src)
    break_folds_of("bn0", "bn1", "bn2")
    result = bnfold.fold_file(src)
    assert not result.modified and result.verification is None
    assert sorted(k.bn for k in result.report.kept) == ["bn0", "bn1", "bn2"]
    assert_same_outputs(onnx.load(src), onnx.load(result.path), rng)


def test_rollback_strict_fails_and_writes_nothing(tmp_path, rng, break_folds_of):
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(rng, blocks=3), src)
    break_folds_of("bn1")
    with pytest.raises(bnfold.VerificationFailed, match="--strict"):
        bnfold.fold_file(src, strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_rollback_cli_reports_kept_fold_and_strict_exits_1(tmp_path, rng, break_folds_of):
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(rng, blocks=3), src)
    break_folds_of("bn1")
    runner = CliRunner()
    ok = runner.invoke(main, [str(src)])
    assert ok.exit_code == 0, ok.output
    assert "kept bn1: verification failed" in ok.stderr
    (tmp_path / "m.folded.onnx").unlink()
    strict = runner.invoke(main, [str(src), "--strict"])
    assert strict.exit_code == 1, strict.output
    assert not (tmp_path / "m.folded.onnx").exists()


def test_rollback_fold_that_breaks_the_model_is_undone(tmp_path, rng, monkeypatch):
    """A fold whose output no engine can run (here: a weight of the wrong shape) is a failed
    verification too: rolled back, reported, the rest folded."""
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_chain(rng, blocks=3, channels=4, batch=1, size=6), src)
    real = WeightAndBiasRule.plan

    def breaking_plan(self, bn, node, graph):
        plan = real(self, bn, node, graph)
        if bn.label == "bn2" and not isinstance(plan, bnfold.Kept):
            n, position, weight = plan.new_inputs[0]
            plan.new_inputs[0] = (n, position, weight[:, :2])  # 2 input channels instead of 4
        return plan

    monkeypatch.setattr(WeightAndBiasRule, "plan", breaking_plan)
    result = bnfold.fold_file(src)
    assert [(k.bn, k.reason) for k in result.report.kept] == [
        ("bn2", "verification failed: the model with this fold did not run (rolled back)")
    ]
    assert_same_outputs(onnx.load(src), onnx.load(result.path), rng)


def test_rollback_strict_fold_that_breaks_the_model_says_it_did_not_run(tmp_path, rng, monkeypatch):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu_chain(rng, blocks=2, channels=4, batch=1, size=6), src)
    real = WeightAndBiasRule.plan

    def breaking_plan(self, bn, node, graph):
        plan = real(self, bn, node, graph)
        n, position, weight = plan.new_inputs[0]
        plan.new_inputs[0] = (n, position, weight[:, :2])
        return plan

    monkeypatch.setattr(WeightAndBiasRule, "plan", breaking_plan)
    with pytest.raises(bnfold.VerificationFailed, match="run the candidate model.*--strict") as err:
        bnfold.fold_file(src, strict=True)
    assert "max abs error" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def break_plan(monkeypatch, label, how):
    """Make the Conv-family rule fold `label` wrongly: a bias off by 0.5 ("wrong") or a weight
    that no engine accepts ("not running": onnxruntime refuses the candidate's session)."""
    real = WeightAndBiasRule.plan

    def broken(self, bn, node, graph):
        plan = real(self, bn, node, graph)
        if bn.label == label and not isinstance(plan, bnfold.Kept):
            slot = 1 if how == "wrong" else 0
            n, position, value = plan.new_inputs[slot]
            plan.new_inputs[slot] = (n, position, (value + 0.5).astype(value.dtype) if how == "wrong" else value[:, :2])
        return plan

    monkeypatch.setattr(WeightAndBiasRule, "plan", broken)


@pytest.mark.parametrize("how", ["wrong", "not running"])
def test_rollback_trials_original_run_once_per_provider(tmp_path, rng, monkeypatch, how):
    """Each trial builds and runs only its candidate: over the whole fold (first check, the
    trials, the check after rolling back) the original's session is built and run once per
    provider, and its inputs are generated once."""
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(rng, blocks=6), src)
    break_plan(monkeypatch, "bn4", how)
    counts = count_reference_work(monkeypatch)
    checked = []
    real_check = Reference.check

    def check(self, candidate, sites=None):
        checked.append(candidate)
        return real_check(self, candidate, sites)

    monkeypatch.setattr(Reference, "check", check)
    result = bnfold.fold_file(src)
    assert [k.bn for k in result.report.kept] == ["bn4"] and result.verification.passed
    if how == "wrong":  # its fold site fails first: blamed directly, no trial
        assert len(checked) == 2, "the first check and the final check"
    else:  # the candidate does not run: no site to blame, bisection
        assert len(checked) >= 5, "the first check, at least three bisection trials, the final check"
    providers = len(available_providers())
    assert counts == {"sessions": providers, "runs": providers, "inputs": 1}
    assert_same_outputs(onnx.load(src), onnx.load(result.path), rng)


def test_rollback_blamed_by_first_failing_site_without_trials(tmp_path, rng, monkeypatch):
    """Two wrong folds in a chain: each round blames the first failing site (every site before
    it verified); two rounds, no bisection trial, and only those two BN are kept."""
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(rng, blocks=6), src)
    real = WeightAndBiasRule.plan

    def broken(self, bn, node, graph):
        plan = real(self, bn, node, graph)
        if bn.label in ("bn1", "bn4") and not isinstance(plan, bnfold.Kept):
            n, position, value = plan.new_inputs[1]
            plan.new_inputs[1] = (n, position, (value + 0.5).astype(value.dtype))
        return plan

    monkeypatch.setattr(WeightAndBiasRule, "plan", broken)
    checked = []
    real_check = Reference.check
    monkeypatch.setattr(Reference, "check", lambda self, c, sites=None: (checked.append(c), real_check(self, c, sites))[1])
    result = bnfold.fold_file(src)
    assert sorted(k.bn for k in result.report.kept) == ["bn1", "bn4"] and result.verification.passed
    assert len(checked) == 3, "the first check, one after each blamed fold"
    assert_same_outputs(onnx.load(src), onnx.load(result.path), rng)
