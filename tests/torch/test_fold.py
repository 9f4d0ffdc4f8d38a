"""bnfold.torch.fold: numeric parity for every layer kind, and one test per refusal (its reason text).

Parity compares the folded GraphModule with the ORIGINAL module in eval mode, with non-trivial
running statistics, so a wrong axis, group layout or bias shows in the outputs.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bnfold.torch.fold import UntraceableModule, fold  # noqa: E402


def bn_implementations():
    """torch.nn's BatchNorm always; bnfold's own once bnfold.torch.batchnorm exists."""
    impls = [pytest.param(nn, id="torch")]
    try:
        from bnfold.torch import batchnorm
    except ImportError:
        pass
    else:
        impls.append(pytest.param(batchnorm, id="bnfold"))
    return impls


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(20261124)


def randomize(bn):
    """Running stats and affine parameters far from the identity: a wrong fold cannot hide."""
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n))
        bn.running_var.copy_(torch.rand(n) * 1.5 + 0.5)
        if bn.weight is not None:
            bn.weight.copy_((torch.rand(n) * 1.5 + 0.5) * torch.sign(torch.randn(n)))
            bn.bias.copy_(torch.randn(n))
    return bn


def tolerance(dtype):
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}


def assert_parity(model, *inputs, folded: int, kept: int = 0, **fold_options):
    """Fold, check the record counts, and compare with the unfolded module in eval mode."""
    result = fold(model, example_inputs=inputs, **fold_options)
    assert (len(result.folded), len(result.kept)) == (folded, kept), result.to_dict()
    assert not result.module.training
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected, actual = reference(*inputs), result.module(*inputs)
    torch.testing.assert_close(actual, expected, **tolerance(inputs[0].dtype))
    return result


def kept_reason(model, *inputs) -> str:
    result = fold(model, example_inputs=inputs or None)
    assert not result.folded and len(result.kept) == 1, result.to_dict()
    return result.kept[0].reason


class Pair(nn.Module):
    """One layer, one BN: the smallest foldable graph."""

    def __init__(self, layer, bn):
        super().__init__()
        self.layer, self.bn = layer, randomize(bn)

    def forward(self, x):
        return self.bn(self.layer(x))


# --------------------------------------------------------------------------- parity

CONV = {1: (nn.Conv1d, nn.ConvTranspose1d), 2: (nn.Conv2d, nn.ConvTranspose2d), 3: (nn.Conv3d, nn.ConvTranspose3d)}
SPATIAL = {1: (9,), 2: (6, 7), 3: (4, 5, 4)}


@pytest.mark.parametrize("impl", bn_implementations())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("groups", [1, 2, 4], ids=["g1", "g2", "depthwise"])
@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "convtranspose"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_bn_folds_with_parity(impl, dtype, bias, groups, transpose, dim):
    layer = CONV[dim][transpose](4, 8, 3, groups=groups, bias=bias)
    model = Pair(layer, getattr(impl, f"BatchNorm{dim}d")(8)).to(dtype)
    result = assert_parity(model, torch.randn(2, 4, *SPATIAL[dim], dtype=dtype), folded=1)
    assert result.folded[0].rule == ("bn_into_conv_transpose" if transpose else "bn_into_conv")
    assert result.module.layer.bias is not None and result.module.layer.weight.dtype == dtype


@pytest.mark.parametrize("impl", bn_implementations())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_bn1d_2d_input_folds_with_parity(impl, dtype, bias):
    model = Pair(nn.Linear(12, 5, bias=bias), impl.BatchNorm1d(5)).to(dtype)
    result = assert_parity(model, torch.randn(7, 12, dtype=dtype), folded=1)
    assert result.folded[0].rule == "bn_into_linear"


def test_conv_padding_modes_and_output_padding_fold_with_parity():
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=2, padding_mode="reflect"), randomize(nn.BatchNorm2d(6)),
        nn.ConvTranspose2d(6, 4, 3, stride=2, output_padding=1, groups=2), randomize(nn.BatchNorm2d(4)),
    )
    assert_parity(model, torch.randn(2, 3, 5, 5), folded=2)


def test_bn_chain_folds_both_into_one_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomize(nn.BatchNorm2d(4)), randomize(nn.BatchNorm2d(4)))
    result = assert_parity(model, torch.randn(2, 3, 6, 6), folded=2)
    assert [f.into for f in result.folded] == ["0", "0"]


def test_conv2d_bn2d_folds_without_example_inputs():
    """BatchNorm2d takes only 4-D input, which proves Conv2d's output is batched."""
    result = fold(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert len(result.folded) == 1 and result.modified


@pytest.mark.parametrize("impl", bn_implementations())
def test_training_mode_bn_folds_with_running_stats(impl):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomize(impl.BatchNorm2d(4))).train()
    result = assert_parity(model, torch.randn(2, 3, 6, 6), folded=1)
    assert not any(m.training for m in result.module.modules())


class Functional(nn.Module):
    """F.batch_norm with constant (buffer) statistics, the form a hand-written model uses."""

    def __init__(self, training=False, computed_mean=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.gamma, self.beta = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.offset = nn.Parameter(torch.zeros(4))  # a Parameter is traced, not frozen into a constant
        self.is_training, self.computed_mean = training, computed_mean

    def forward(self, x):
        mean = self.mean + self.offset if self.computed_mean else self.mean
        return nn.functional.batch_norm(self.conv(x), mean, self.var, self.gamma, self.beta, self.is_training)


def test_functional_batch_norm_constant_stats_folds():
    result = assert_parity(Functional(), torch.randn(2, 3, 6, 6), folded=1)
    assert "batch_norm" not in result.module.code


def test_functional_batch_norm_non_constant_stats_kept():
    reason = kept_reason(Functional(computed_mean=True), torch.randn(2, 3, 6, 6))
    assert reason == "functional batch_norm with non-constant stats: running_mean is add"


def test_functional_batch_norm_without_example_inputs_kept():
    assert kept_reason(Functional()).startswith("rank unknown: pass example_inputs")


def test_functional_batch_norm_training_true_kept():
    reason = kept_reason(Functional(training=True), torch.randn(2, 3, 6, 6))
    assert reason == "functional batch_norm with training=True normalises with batch statistics"


# --------------------------------------------------------------------------- refusals


class FanOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), randomize(nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_fan_out_kept():
    reason = kept_reason(FanOut())
    assert reason.startswith("conv (Conv2d) output also feeds add")


class SharedOneBN(nn.Module):
    """The same conv at two call sites; only the first is followed by a BN."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), randomize(nn.BatchNorm2d(3))

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class SharedTwoBN(nn.Module):
    """The same conv at two call sites, each followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1, self.bn2 = randomize(nn.BatchNorm2d(3)), randomize(nn.BatchNorm2d(3))

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x))


def test_shared_conv_folded_site_gets_own_copy():
    model = SharedOneBN()
    result = assert_parity(model, torch.randn(2, 3, 5, 5), folded=1)
    assert result.folded[0].into == "conv_bnfold"
    assert torch.equal(result.module.conv.weight, model.conv.weight)  # the other call site is unchanged
    assert result.module.conv_bnfold is not result.module.conv
    assert "self.conv(x)" in result.module.code and "self.conv_bnfold(x)" in result.module.code


def test_shared_conv_each_site_gets_its_own_fold():
    result = assert_parity(SharedTwoBN(), torch.randn(2, 3, 5, 5), folded=2)
    # The first site gets a copy; the second is then the conv's only call, so it is fused in place.
    assert [f.into for f in result.folded] == ["conv_bnfold", "conv"]
    assert "self.conv(x)" in result.module.code and "self.conv_bnfold(x)" in result.module.code


@pytest.mark.filterwarnings("ignore:.*script_method.*:DeprecationWarning")  # importing torch's fuser
def test_shared_conv_torch_fx_fuser_comparison():
    """torch.fx.experimental.optimization.fuse replaces the shared conv at EVERY call site.

    In torch 2.13 it folds bn1 into `conv`, then folds bn2 into the already-fused conv, and both
    call sites use the result (max error ~4 on this model). bnfold must match the reference.
    """
    from torch.fx.experimental.optimization import fuse

    x = torch.randn(2, 3, 5, 5)
    for model in (SharedTwoBN().eval(), SharedOneBN().eval()):
        with torch.no_grad():
            expected = model(x)
            torch_error = (fuse(model)(x) - expected).abs().max().item()
            bnfold_error = (fold(model).module(x) - expected).abs().max().item()
        assert bnfold_error < 1e-5
        assert bnfold_error <= torch_error  # documents: torch's fuser is no better on this case


class LinearOnSequence(nn.Module):
    """Linear over the last axis of (N, 4, 8), then BatchNorm1d(4) over axis 1: not foldable."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 4), randomize(nn.BatchNorm1d(4))

    def forward(self, x):
        return self.bn(self.fc(x))


def test_linear_rank3_bn1d_kept():
    model, x = LinearOnSequence().eval(), torch.randn(2, 4, 8)
    assert kept_reason(model, x) == (
        "Linear output is 3-D: BatchNorm normalises axis 1, which is Linear's feature axis (the last) only for 2-D output"
    )
    # Why: a naive fold scales Linear's output features, but BN scales the sequence positions.
    scale = model.bn.weight / torch.sqrt(model.bn.running_var + model.bn.eps)
    naive = copy.deepcopy(model.fc)
    with torch.no_grad():
        naive.weight.mul_(scale[:, None])
        naive.bias.copy_((naive.bias - model.bn.running_mean) * scale + model.bn.bias)
        assert not torch.allclose(naive(x), model(x), atol=1e-3)
    assert torch.allclose(fold(model, example_inputs=x).module(x), model(x))


def test_linear_bn1d_without_example_inputs_kept():
    assert kept_reason(LinearOnSequence()).startswith("rank unknown: pass example_inputs")
    assert kept_reason(Pair(nn.Linear(12, 5), nn.BatchNorm1d(5))).startswith("rank unknown: pass example_inputs")


def test_conv1d_unbatched_input_bn1d_kept():
    """Conv1d on unbatched (C, L) input gives (C_out, L): BatchNorm1d then normalises L, not C_out."""
    model, x = Pair(nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6)).eval(), torch.randn(4, 6)
    assert kept_reason(model, x).startswith("Conv1d output is 2-D:")
    assert kept_reason(model).startswith("rank unknown: pass example_inputs")


def test_channel_mismatch_kept():
    model = nn.Sequential(nn.Linear(8, 4), randomize(nn.BatchNorm1d(6)))  # (N, 6, 8) -> (N, 6, 4): runs
    assert kept_reason(model, torch.randn(2, 6, 8)) == "BatchNorm has 6 features but 0 (Linear) has 4 output channels"


def test_track_running_stats_false_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert kept_reason(model).startswith("track_running_stats=False")


class BNAfterRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), randomize(nn.BatchNorm2d(4))

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


def test_bn_after_relu_kept():
    assert kept_reason(BNAfterRelu()) == "no Conv/ConvTranspose/Linear before it: its input comes from relu (relu)"


def test_bn_at_input_kept():
    assert kept_reason(nn.Sequential(nn.BatchNorm2d(3))) == (
        "no Conv/ConvTranspose/Linear before it: its input comes from the graph input 'input'"
    )


def test_layer_subclass_with_own_forward_kept():
    class Scaled(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    assert kept_reason(Pair(Scaled(3, 4, 3), nn.BatchNorm2d(4))).startswith("no Conv/ConvTranspose/Linear before it")


def test_non_finite_stats_kept():
    model = Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.bn.running_var[0] = float("nan")
    assert kept_reason(model).startswith("cannot fold:")


def test_input_module_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomize(nn.BatchNorm2d(4)), nn.ReLU()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold(model, example_inputs=torch.randn(2, 3, 6, 6))
    assert all(m.training for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert isinstance(model[1], nn.BatchNorm2d)


def test_untraceable_module_raises_one_line():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UntraceableModule, match="cannot trace DataDependent with torch.fx") as info:
        fold(DataDependent())
    assert "\n" not in str(info.value)


def test_report_to_dict():
    result = fold(BNAfterRelu())
    assert result.to_dict()["bn_before"] == 1 and result.to_dict()["kept"][0]["status"] == "kept"
    assert not result.modified


def test_public_name_is_the_function():
    import bnfold.torch
    import bnfold.torch.export  # noqa: F401  (importing the submodules must not rebind the names)
    import bnfold.torch.fold  # noqa: F401

    assert callable(bnfold.torch.fold) and callable(bnfold.torch.export)


def test_bn_with_forward_hook_kept():
    model = Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.bn.register_forward_hook(lambda module, inputs, output: None)
    assert kept_reason(model) == "BatchNorm2d has forward hooks, which would no longer run"


def test_tied_weight_not_mutated():
    """conv_b shares conv_a's weight Parameter; folding the BN after conv_a must not change conv_b."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a, self.conv_b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
            self.conv_b.weight = self.conv_a.weight
            self.bn = randomize(nn.BatchNorm2d(3))

        def forward(self, x):
            return self.bn(self.conv_a(x)) + self.conv_b(x)

    result = assert_parity(Tied(), torch.randn(2, 3, 4, 4), folded=1)
    assert result.module.conv_b.weight is not result.module.conv_a.weight


def test_bn_called_with_keyword_input_folds():
    class Keyword(Pair):
        def forward(self, x):
            return self.bn(input=self.layer(x))

    assert_parity(Keyword(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), torch.randn(2, 3, 5, 5), folded=1)
