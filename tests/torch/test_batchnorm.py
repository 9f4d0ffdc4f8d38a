"""bnfold.torch.batchnorm against torch.nn.BatchNorm1d/2d/3d, in the manner of tinygrad's
test_nn.py::test_batchnorm2d: same parameters, same inputs, several training steps then eval;
outputs, running statistics, num_batches_tracked and gradients compared with dtype tolerances."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from bnfold.torch import batchnorm as bnf  # noqa: E402
from bnfold.torch.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase  # noqa: E402
from bnfold.torch.batchnorm import swap_in, swap_out  # noqa: E402

nn = torch.nn

SHAPES = {
    "NC": (6, 3),
    "NCL": (4, 3, 5),
    "NCHW": (3, 3, 4, 5),
    "NCDHW": (2, 3, 2, 3, 4),
}
PAIRS = {2: (BatchNorm1d, nn.BatchNorm1d), 3: (BatchNorm1d, nn.BatchNorm1d),
         4: (BatchNorm2d, nn.BatchNorm2d), 5: (BatchNorm3d, nn.BatchNorm3d)}
# (rtol, atol) for values of order 1: outputs and input grads in the input dtype, and the float32
# parameter grads / statistics computed from low-precision inputs.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
}
PARAM_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4),
             torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-3, 1e-3)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny; with several threads a busy machine makes every op wait for a
    core (OpenMP), which turns a ~10 s file into minutes. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def without_torch_bias_argument(monkeypatch) -> None:
    """Make the installed torch look like one whose BatchNorm has no `bias` argument (torch 2.11
    and older): _BatchNorm.__init__ with that signature, and _NormBase's repr without `bias=`.
    The real classes are patched, so bnfold reads them as it would read such a torch."""
    base = nn.modules.batchnorm
    init = base._BatchNorm.__init__

    def old_init(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None):
        init(self, num_features, eps, momentum, affine, track_running_stats, device, dtype)

    def old_extra_repr(self):
        return ("{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
                "track_running_stats={track_running_stats}".format(**self.__dict__))

    monkeypatch.setattr(base._BatchNorm, "__init__", old_init)
    monkeypatch.setattr(base._NormBase, "extra_repr", old_extra_repr)


@pytest.fixture(params=["installed", "no-bias-arg"])
def torch_flavour(request, monkeypatch):
    """Run a test on the installed torch and on it made to look like a torch whose BatchNorm has
    no `bias` argument."""
    if request.param == "no-bias-arg":
        without_torch_bias_argument(monkeypatch)
    return request.param


def make_pair(rank: int, channels: int = 3, impl: str = "explicit", **kwargs):
    """(bnfold module, torch module) with the same random weight and bias."""
    ours_cls, torch_cls = PAIRS[rank]
    ours = ours_cls(channels, impl=impl, **kwargs)
    ref = torch_cls(channels, **kwargs)
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            if ours.bias is not None:
                ours.bias.uniform_(-1.0, 1.0)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def batch(shape, dtype, gen, scale=3.0, offset=2.0):
    return (torch.randn(shape, generator=gen) * scale + offset).to(dtype)


def assert_close(actual, expected, tol, what):
    if expected is None:
        assert actual is None, what
        return
    rtol, atol = tol
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_same_state(ours, ref, dtype):
    for name in ("running_mean", "running_var"):
        assert_close(getattr(ours, name), getattr(ref, name), PARAM_TOL[dtype], name)
    assert_close(ours.num_batches_tracked, ref.num_batches_tracked, (0, 0), "num_batches_tracked")


def train_step(module, x, grad):
    x = x.detach().requires_grad_()  # keeps x's strides (channels-last, expanded, ...)
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad)
    return y, x.grad


@pytest.mark.parametrize("impl", ["explicit", "autograd"])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False), (False, False)],
                         ids=["affine-track", "noaffine-track", "affine-notrack", "noaffine-notrack"])
@pytest.mark.parametrize("momentum", [0.1, 0.3, None], ids=["m0.1", "m0.3", "mNone"])
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_batchnorm_train_then_eval_matches_torch(shape, dtype, momentum, affine, track, impl):
    gen = torch.Generator().manual_seed(0)
    # float16/bfloat16 inputs run with float32 parameters and statistics, as in torch.
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ours, ref = make_pair(len(shape), impl=impl, momentum=momentum, affine=affine,
                          track_running_stats=track, dtype=param_dtype)
    tol = TOL[dtype]
    for step in range(3):
        x, grad = batch(shape, dtype, gen), batch(shape, dtype, gen, 1.0, 0.0)
        y, gx = train_step(ours, x, grad)
        y_ref, gx_ref = train_step(ref, x, grad)
        assert y.dtype == dtype and gx.dtype == dtype
        assert_close(y, y_ref, tol, f"step {step} output")
        assert_close(gx, gx_ref, tol, f"step {step} grad input")
        if affine:
            assert_close(ours.weight.grad, ref.weight.grad, PARAM_TOL[dtype], "grad weight")
            assert_close(ours.bias.grad, ref.bias.grad, PARAM_TOL[dtype], "grad bias")
        assert_same_state(ours, ref, dtype)
    ours.eval(), ref.eval()
    x = batch(shape, dtype, gen)
    with torch.no_grad():
        assert_close(ours(x), ref(x), tol, "eval output")
    assert_same_state(ours, ref, dtype)


@pytest.mark.parametrize("impl", ["explicit", "autograd"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(5, 2), (3, 2, 2, 3)], ids=["NC", "NCHW"])
def test_batchnorm_gradcheck_float64_passes(shape, affine, impl):
    ours, _ = make_pair(len(shape), channels=2, impl=impl, affine=affine, dtype=torch.float64)
    x = batch(shape, torch.float64, torch.Generator().manual_seed(1)).requires_grad_()
    inputs = (x, ours.weight, ours.bias) if affine else (x,)

    def f(x, *params):
        if affine:
            ours.weight, ours.bias = params
        return ours(x)

    assert torch.autograd.gradcheck(f, inputs)
    if impl == "autograd":
        assert torch.autograd.gradgradcheck(f, inputs)


def test_batchnorm_explicit_double_backward_raises():
    ours = BatchNorm1d(2, impl="explicit")
    x = torch.randn(4, 2, requires_grad=True)
    (g,) = torch.autograd.grad(ours(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()


def test_batchnorm_sum_backward_expanded_grad_matches_torch():
    ours, ref = make_pair(4)
    x = batch((2, 3, 2, 2), torch.float32, torch.Generator().manual_seed(2))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ours(xa) * 2).sum().backward()
    (ref(xb) * 2).sum().backward()
    assert_close(xa.grad, xb.grad, (1e-5, 1e-5), "grad input")
    assert_close(ours.weight.grad, ref.weight.grad, (1e-5, 1e-5), "grad weight")


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "expanded"])
def test_batchnorm_non_contiguous_input_matches_torch(layout):
    ours, ref = make_pair(4)
    x = batch((3, 3, 4, 5), torch.float32, torch.Generator().manual_seed(3))
    grad = torch.randn(x.shape)
    if layout == "channels_last":
        x, grad = (t.to(memory_format=torch.channels_last) for t in (x, grad))
    elif layout == "transposed":
        x, grad = x.transpose(2, 3), grad.transpose(2, 3)
    else:
        x, grad = x[:1].expand(4, -1, -1, -1), grad[:1].expand(4, -1, -1, -1)
    (y, gx), (y_ref, gx_ref) = train_step(ours, x, grad), train_step(ref, x, grad)
    assert_close(y, y_ref, TOL[torch.float32], "output")
    assert_close(gx, gx_ref, TOL[torch.float32], "grad input")
    assert_same_state(ours, ref, torch.float32)


@pytest.mark.parametrize("chunk", [7, 24], ids=["one-row", "ragged"])
def test_batchnorm_chunked_backward_matches_torch(chunk, monkeypatch):
    """Large CPU inputs reduce dy * (x - mean) a slice of N at a time; force it on a small one."""
    monkeypatch.setattr(bnf, "_DOT_CHUNK", chunk)
    ours, ref = make_pair(4)
    x = batch((5, 3, 2, 2), torch.float32, torch.Generator().manual_seed(9))
    grad = torch.randn(x.shape)
    (y, gx), (y_ref, gx_ref) = train_step(ours, x, grad), train_step(ref, x, grad)
    assert_close(y, y_ref, TOL[torch.float32], "output")
    assert_close(gx, gx_ref, TOL[torch.float32], "grad input")
    assert_close(ours.weight.grad, ref.weight.grad, PARAM_TOL[torch.float32], "grad weight")


@pytest.mark.parametrize("impl", ["explicit", "autograd"])
def test_batchnorm_grad_of_parameters_only_matches_torch(impl):
    ours, ref = make_pair(4, impl=impl)
    x = batch((3, 3, 4, 5), torch.float32, torch.Generator().manual_seed(8))
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert_close(ours.weight.grad, ref.weight.grad, PARAM_TOL[torch.float32], "grad weight")
    assert_close(ours.bias.grad, ref.bias.grad, PARAM_TOL[torch.float32], "grad bias")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batchnorm_low_precision_module_matches_torch(dtype):
    """Parameters and statistics in the low-precision dtype too (model.half())."""
    ours, ref = make_pair(4)
    ours.to(dtype), ref.to(dtype)
    x = batch((3, 3, 4, 5), dtype, torch.Generator().manual_seed(4))
    grad = torch.randn(x.shape).to(dtype)
    (y, gx), (y_ref, gx_ref) = train_step(ours, x, grad), train_step(ref, x, grad)
    assert_close(y, y_ref, TOL[dtype], "output")
    assert_close(gx, gx_ref, TOL[dtype], "grad input")
    assert_close(ours.weight.grad, ref.weight.grad, TOL[dtype], "grad weight")
    assert_close(ours.running_var, ref.running_var, TOL[dtype], "running_var")


def test_batchnorm_training_does_not_call_torch_batch_norm(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("training used torch's batch norm kernel")

    for owner, name in [(torch.nn.functional, "batch_norm"), (torch, "batch_norm"),
                        (torch, "native_batch_norm"), (torch, "_native_batch_norm_legit")]:
        monkeypatch.setattr(owner, name, forbidden)
    for impl in ("explicit", "autograd"):
        ours = BatchNorm2d(3, impl=impl)
        ours(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()
        assert ours.num_batches_tracked.item() == 1


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)],
                         ids=["NC", "NCL", "NCHW", "NCDHW"])
def test_batchnorm_single_value_per_channel_training_raises(shape):
    ours, _ = make_pair(len(shape))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ours(torch.randn(shape))
    ours.eval()
    assert ours(torch.randn(shape)).shape == shape  # running statistics: fine


def test_batchnorm_single_value_without_running_stats_eval_raises():
    ours = BatchNorm2d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="got input size"):
        ours(torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize("cls,shape,wanted", [
    (BatchNorm1d, (2, 3, 4, 5), "2D or 3D"),
    (BatchNorm1d, (3,), "2D or 3D"),
    (BatchNorm2d, (2, 3, 4), "4D"),
    (BatchNorm3d, (2, 3, 4, 5), "5D"),
])
def test_batchnorm_wrong_rank_raises(cls, shape, wanted):
    with pytest.raises(ValueError, match=f"expected {wanted} input \\(got {len(shape)}D input"):
        cls(3)(torch.randn(shape))


def test_batchnorm_wrong_channel_count_raises():
    with pytest.raises(ValueError, match="expected 3 channels in dim 1"):
        BatchNorm2d(3)(torch.randn(2, 4, 2, 2))


def test_batchnorm_nonpositive_eps_training_raises():
    with pytest.raises(ValueError, match="eps must be positive"):
        BatchNorm1d(3, eps=0.0)(torch.randn(4, 3))


def test_batchnorm_unknown_impl_raises():
    with pytest.raises(ValueError, match="impl must be one of"):
        BatchNorm1d(3, impl="fast")


def test_batchnorm_empty_batch_matches_torch():
    ours, ref = make_pair(4)
    y, y_ref = ours(torch.randn(0, 3, 2, 2)), ref(torch.randn(0, 3, 2, 2))
    assert y.shape == y_ref.shape == (0, 3, 2, 2)
    assert_same_state(ours, ref, torch.float32)


@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"track_running_stats": False},
                                    {"bias": False}, {"momentum": None, "eps": 1e-3}],
                         ids=["default", "noaffine", "notrack", "nobias", "cma-eps"])
def test_batchnorm_attributes_and_repr_match_torch(kwargs, torch_flavour):
    if "bias" in kwargs and not bnf._accepts_bias(nn.BatchNorm2d):
        pytest.skip(f"no bias argument on this BatchNorm (torch {torch.__version__}, {torch_flavour})")
    ours, ref = make_pair(4, **kwargs)
    assert isinstance(ours, BatchNormBase) and isinstance(ours, nn.Module)
    assert repr(ours) == repr(ref)
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_batchnorm_repr_shows_non_default_impl():
    assert "impl='autograd'" in repr(BatchNorm2d(4, impl="autograd"))


@pytest.mark.parametrize("direction", ["torch_to_bnfold", "bnfold_to_torch"])
@pytest.mark.parametrize("rank", [2, 4, 5])
def test_batchnorm_state_dict_round_trip_same_outputs(rank, direction, torch_flavour):
    gen = torch.Generator().manual_seed(5)
    shape = {2: (6, 3), 4: (3, 3, 2, 2), 5: (2, 3, 2, 2, 2)}[rank]
    ours, ref = make_pair(rank)
    src, dst = (ref, ours) if direction == "torch_to_bnfold" else (ours, ref)
    for _ in range(2):
        src(batch(shape, torch.float32, gen))
    dst.load_state_dict(src.state_dict(), strict=True)
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    src.eval(), dst.eval()
    x = batch(shape, torch.float32, gen)
    assert_close(dst(x), src(x), (1e-6, 1e-6), "eval output")
    src.train(), dst.train()
    assert_close(dst(x), src(x), (1e-5, 1e-5), "train output")


def test_batchnorm_state_dict_without_num_batches_tracked_loads_as_torch():
    """A version-1 checkpoint (before num_batches_tracked) loads with the count reset to 0."""
    ours = BatchNorm2d(3)
    ours.num_batches_tracked.fill_(7)
    state = ours.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    ours.load_state_dict(state)
    assert ours.num_batches_tracked.item() == 0


def test_batchnorm_reset_running_stats_and_parameters():
    ours, _ = make_pair(4)
    ours(torch.randn(4, 3, 2, 2) + 3)
    ours.reset_running_stats()
    assert torch.equal(ours.running_mean, torch.zeros(3))
    assert torch.equal(ours.running_var, torch.ones(3))
    assert ours.num_batches_tracked.item() == 0
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(3)) and torch.equal(ours.bias, torch.zeros(3))


class Net(nn.Module):
    """Every BN rank, nested in containers, plus a torch.nn BN subclass that must be left alone."""

    class KeepMe(nn.BatchNorm1d):
        pass

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU())
        self.conv3d = nn.Conv3d(2, 4, 1)
        self.bn3d = nn.BatchNorm3d(4, eps=1e-3, affine=False)
        self.head = nn.ModuleList([nn.Linear(16 + 4, 8), nn.BatchNorm1d(8, momentum=None),
                                   self.KeepMe(8)])

    def forward(self, x):
        a = self.conv(x).flatten(1)[:, :16]
        b = self.bn3d(self.conv3d(x.unsqueeze(2))).mean(dim=(2, 3, 4))
        h = self.head[0](torch.cat([a, b], dim=1))
        return self.head[2](self.head[1](h))


def bn_types(model):
    return [type(m) for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, BatchNormBase))]


def test_swap_in_then_swap_out_keeps_state_and_outputs(torch_flavour):
    gen = torch.Generator().manual_seed(6)
    model = Net()
    for _ in range(2):
        model(torch.randn(4, 2, 5, 5, generator=gen))
    reference = copy.deepcopy(model)
    params = {name: p for name, p in model.named_parameters()}
    x = torch.randn(4, 2, 5, 5, generator=gen)

    assert swap_in(model) is model
    assert bn_types(model) == [BatchNorm2d, BatchNorm3d, BatchNorm1d, Net.KeepMe]
    assert model.head[1].momentum is None and model.bn3d.eps == 1e-3 and not model.bn3d.affine
    # The very same Parameter objects: an optimizer built before the swap still works.
    assert all(p is params[name] for name, p in model.named_parameters())
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    model.eval(), reference.eval()
    assert torch.equal(model(x), reference(x))  # eval: the same inference kernel
    model.train(), reference.train()
    assert_close(model(x), reference(x), (1e-5, 1e-5), "train output after swap_in")
    for key, value in reference.state_dict().items():
        assert_close(model.state_dict()[key], value, (1e-5, 1e-5), key)

    model.eval()
    before = model(x)
    assert swap_out(model) is model
    assert bn_types(model) == bn_types(reference)
    assert not any(m.training for m in model.modules())
    assert torch.equal(model(x), before)


def test_swap_in_root_batchnorm_returns_replacement(torch_flavour):
    bn = nn.BatchNorm2d(3, momentum=0.2).eval()
    swapped = swap_in(bn)
    assert type(swapped) is BatchNorm2d and not swapped.training and swapped.momentum == 0.2
    assert swapped.weight is bn.weight and swapped.running_var is bn.running_var
    assert type(swap_out(swapped)) is nn.BatchNorm2d


def test_swap_in_passes_impl():
    model = swap_in(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), impl="autograd")
    assert model[1].impl == "autograd"


def test_swap_in_keeps_dtype():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    swap_in(model)
    assert model[1].weight.dtype == model[1].running_mean.dtype == torch.float64
    assert model(torch.randn(4, 3, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("rank", [2, 4])
def test_batchnorm_eval_onnx_export_is_one_batchnormalization(rank, dynamo, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    gen = torch.Generator().manual_seed(7)
    shape = (4, 3) if rank == 2 else (2, 3, 4, 5)
    ours, _ = make_pair(rank)
    for _ in range(3):
        ours(batch(shape, torch.float32, gen))
    ours.eval()
    x = batch(shape, torch.float32, gen)
    path = tmp_path / "bn.onnx"
    extra = {"optimize": False} if dynamo else {}
    # optimize=False: the dynamo exporter's optimizer would fold a BN that follows a Conv.
    torch.onnx.export(ours, (x,), str(path), dynamo=dynamo, verbose=False, **extra)
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node] == ["BatchNormalization"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = ours(x)
    assert_close(torch.from_numpy(out), expected, (1e-5, 1e-5), "onnxruntime output")


def test_batchnorm_module_has_no_stray_public_names():
    assert set(bnf.__all__) >= {"BatchNormBase", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
                                "swap_in", "swap_out"}


def test_swap_out_bias_less_without_torch_bias_argument_raises_untouched(monkeypatch):
    without_torch_bias_argument(monkeypatch)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), BatchNorm2d(4), nn.Conv2d(4, 4, 1), BatchNorm2d(4, bias=False))
    x = torch.randn(3, 2, 4, 4)
    before = model(x)
    with pytest.raises(bnf.TorchLacksBias, match=r"cannot swap '3' \(affine, bias=False\) to torch.nn.BatchNorm2d: "
                       r"torch .*'s BatchNorm has no bias argument \(torch 2.13 has one\)"):
        swap_out(model)
    assert bn_types(model) == [BatchNorm2d, BatchNorm2d]  # not half swapped
    assert torch.equal(model(x), before)
    with pytest.raises(ValueError, match="cannot swap the model"):  # also a ValueError, as documented
        swap_out(BatchNorm2d(3, bias=False))


def test_swap_out_bias_less_with_torch_bias_argument_keeps_no_bias():
    if not bnf._accepts_bias(nn.BatchNorm2d):
        pytest.skip(f"torch {torch.__version__}'s BatchNorm has no bias argument")
    ours, _ = make_pair(4, bias=False)
    ours(batch(SHAPES["NCHW"], torch.float32, torch.Generator().manual_seed(8)))
    x = torch.randn(*SHAPES["NCHW"])
    expected = ours.eval()(x)
    swapped = swap_out(ours)
    assert type(swapped) is nn.BatchNorm2d and swapped.bias is None and swapped.weight is ours.weight
    assert torch.equal(swapped(x), expected)


def test_batchnorm_repr_without_torch_bias_argument_shows_bias_only_when_absent(monkeypatch):
    without_torch_bias_argument(monkeypatch)
    assert repr(BatchNorm2d(3)) == repr(nn.BatchNorm2d(3))
    assert "bias=False" in repr(BatchNorm2d(3, bias=False))  # not expressible there: shown
    assert repr(BatchNorm2d(3, affine=False)) == repr(nn.BatchNorm2d(3, affine=False))


def test_without_torch_bias_argument_simulation_refuses_bias(monkeypatch):
    """The simulation behind the `no-bias-arg` cases is faithful where it matters."""
    without_torch_bias_argument(monkeypatch)
    with pytest.raises(TypeError, match="bias"):
        nn.BatchNorm2d(3, bias=True)
    assert "bias=" not in repr(nn.BatchNorm1d(3)) and not bnf._accepts_bias(nn.BatchNorm3d)
