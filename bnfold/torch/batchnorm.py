"""BatchNorm1d/2d/3d written from scratch, drop-in compatible with torch.nn.BatchNorm1d/2d/3d.

Training follows Algorithm 1 of Ioffe & Szegedy (2015), per channel c over the m = N*L (or
N*H*W, N*D*H*W) values x_i of that channel:

    mu    = 1/m * sum_i x_i
    var   = 1/m * sum_i (x_i - mu)^2                  (biased: used for normalising)
    x_hat = (x_i - mu) / sqrt(var + eps)
    y_i   = weight * x_hat + bias

and the running statistics are updated exactly as torch does:

    running_mean = (1 - momentum) * running_mean + momentum * mu
    running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1)   (unbiased)

with momentum=None meaning the cumulative average, momentum = 1 / num_batches_tracked.

Two backward implementations give the same gradients:
- "explicit" (default, faster on CPU): a torch.autograd.Function with the paper's backward,
  simplified to  dx = weight * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)),
  d weight = sum(dy * x_hat), d bias = sum(dy). It is once-differentiable.
- "autograd": the forward above on plain tensor ops, differentiated by autograd (supports
  higher-order gradients).

Inference (eval mode with running statistics) calls torch.nn.functional.batch_norm with
training=False, so that ONNX export (TorchScript or dynamo exporter) yields one
BatchNormalization node, which bnfold's ONNX folder treats like any other BN.

Inputs in float16/bfloat16 are normalised with statistics computed in float32 and the output
is cast back to the input dtype, as torch's CPU kernel does.
"""

from __future__ import annotations

import inspect
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from bnfold.errors import UsageError

__all__ = [
    "BatchNormBase", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "TorchLacksBias", "swap_in", "swap_out",
]

Impl = Literal["explicit", "autograd"]
_IMPLS = ("explicit", "autograd")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def _values_per_channel(x: Tensor) -> int:
    """m of Algorithm 1: N * L, N * H * W or N * D * H * W."""
    return x.shape[0] * math.prod(x.shape[2:])


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    """Broadcast shape of a per-channel vector against x: (1, C, 1, ...)."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _as_ncs(x: Tensor) -> Tensor:
    """View x as (N, C, S): a per-channel reduction is then one over the contiguous last axis
    followed by a small one over N (a view, no copy, for contiguous and channels-last input)."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def _channel_sum(x3: Tensor, dtype: torch.dtype) -> Tensor:
    return x3.sum(dim=2, dtype=dtype).sum(dim=0)


def _channel_sum_sq(x3: Tensor) -> Tensor:
    """sum over n, s of x[n, c, s]^2; vector_norm reduces without materialising x * x."""
    return torch.linalg.vector_norm(x3, dim=2).square().sum(dim=0)


_DOT_CHUNK = 1 << 18  # elements of _channel_dot's scratch buffer (1 MiB in float32)


def _channel_dot(a3: Tensor, b3: Tensor) -> Tensor:
    """sum over n, s of a[n, c, s] * b[n, c, s]. On CPU the product goes through a small scratch
    buffer a slice of N at a time: a full-size temporary would cost more than the arithmetic
    (tensors of 32 MiB and more are fresh mmaps for glibc, paid for in page faults)."""
    n, c, s = a3.shape
    rows = max(1, _DOT_CHUNK // max(1, c * s))
    if rows >= n or a3.device.type != "cpu":
        return (a3 * b3).sum(dim=2).sum(dim=0)
    scratch = torch.empty((rows, c, s), dtype=a3.dtype, device=a3.device)
    total = torch.zeros(c, dtype=a3.dtype, device=a3.device)
    for start in range(0, n, rows):
        part = scratch[: min(rows, n - start)]
        torch.mul(a3[start : start + rows], b3[start : start + rows], out=part)
        total += part.sum(dim=2).sum(dim=0)
    return total


def _affine_params(
    weight: Tensor | None, bias: Tensor | None, invstd: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """Per-channel scale = weight * invstd, and bias in the compute dtype."""
    scale = invstd if weight is None else invstd * weight.to(dtype)
    return scale, None if bias is None else bias.to(dtype)


class _BatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with the backward written out (Ioffe & Szegedy, section 3).

    forward(x, weight, bias, eps) -> (y, batch_mean, batch_var_biased); only y is differentiable.
    Saves what torch's kernel saves (x, mean, invstd). Each pass over the data is one fused torch
    op, and each direction allocates one full-size tensor (y, grad_x) and works in place in it:
    on CPU a fresh large tensor costs as much as the arithmetic (page faults).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        dtype = _compute_dtype(x)
        x3 = _as_ncs(x)
        m = x3.shape[0] * x3.shape[2]
        mean = _channel_sum(x3, dtype) / m
        y = x3 - mean[:, None]  # centred first: exact; promotes float16/bfloat16 to float32
        var = _channel_sum_sq(y) / m
        invstd = torch.rsqrt(var + eps)
        scale, shift = _affine_params(weight, bias, invstd, dtype)
        if shift is None:
            y.mul_(scale[:, None])
        else:
            torch.addcmul(shift[:, None], y, scale[:, None], out=y)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.m = m
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype).reshape(x.shape), mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor, _grad_mean: Tensor | None, _grad_var: Tensor | None):
        x, weight, mean, invstd = ctx.saved_tensors
        m = ctx.m
        dy = _as_ncs(grad_y)
        sum_dy = _channel_sum(dy, mean.dtype)  # = d bias
        buf = _as_ncs(x) - mean[:, None]  # x - mean, turned into grad_x in place below
        sum_dy_xc = _channel_dot(buf, dy)  # = d weight / invstd
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            scale, _ = _affine_params(weight, None, invstd, mean.dtype)
            # dx = scale * (dy - sum_dy/m - xc * invstd^2 * sum_dy_xc/m), split per channel into
            # xc * a + b + dy * scale: two fused elementwise passes over buf.
            a = -scale * invstd * invstd * sum_dy_xc / m
            b = -scale * sum_dy / m
            torch.addcmul(b[:, None], buf, a[:, None], out=buf)
            buf.addcmul_(dy, scale[:, None])
            grad_x = buf.reshape(grad_y.shape).to(grad_y.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xc * invstd).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None


def batch_norm_explicit(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN with the explicit backward. Returns (y, mean, biased var) per channel."""
    return _BatchNormFunction.apply(x, weight, bias, eps)


def batch_norm_autograd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN as plain tensor ops (Algorithm 1); autograd derives the backward."""
    dtype = _compute_dtype(x)
    xf = x.to(dtype)
    dims = [0] + list(range(2, x.dim()))
    shape = _channel_shape(x)
    mean = xf.mean(dim=dims, keepdim=True)
    xc = xf - mean
    var = (xc * xc).mean(dim=dims, keepdim=True)
    y = xc * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(dtype).reshape(shape)
    return y.to(x.dtype), mean.detach().reshape(-1), var.detach().reshape(-1)


class BatchNormBase(torch.nn.Module):
    """Shared code of BatchNorm1d/2d/3d; same attributes, parameters and buffers as
    torch.nn.modules.batchnorm._BatchNorm, so state_dicts load either way.

    `impl` (keyword only, not in the state_dict) picks the training backward: "explicit"
    (default) or "autograd".
    """

    _version = 2  # as torch's _NormBase: version 2 added num_batches_tracked
    _expected_dims: tuple[int, ...] = ()

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        impl: Impl = "explicit",
    ) -> None:
        super().__init__()
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.impl = impl
        if affine:
            self.weight = torch.nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = torch.nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            torch.nn.init.ones_(self.weight)
            if self.bias is not None:
                torch.nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        # As the installed torch prints it: `bias=` only where torch's BatchNorm has that
        # argument, or where this module has no bias (which such a torch cannot express).
        show_bias = _accepts_bias(torch.nn.BatchNorm2d) or (self.affine and self.bias is None)
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, {f'bias={self.bias is not None}, ' if show_bias else ''}"
            f"track_running_stats={self.track_running_stats}"
        )
        return text if self.impl == "explicit" else f"{text}, impl={self.impl!r}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args) -> None:
        # Checkpoints older than version 2 have no num_batches_tracked; torch defaults it to 0.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self._expected_dims:
            wanted = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(
                f"{type(self).__name__}: expected {wanted} input (got {x.dim()}D input "
                f"of shape {tuple(x.shape)})"
            )
        if not torch.jit.is_tracing() and x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected {self.num_features} channels in dim 1, "
                f"got input of shape {tuple(x.shape)}"
            )

    def _check_batch(self, x: Tensor) -> None:
        if _values_per_channel(x) == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, "
                f"got input size {x.size()}"
            )
        if self.eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, got {self.eps}")

    def _update_factor(self) -> float | None:
        """Count the batch; return the running-average factor, or None if nothing is tracked."""
        if not (self.training and self.track_running_stats):
            return None
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        if self.running_mean is None or self.running_var is None:
            return None
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, m: int, factor: float) -> None:
        unbiased = var * (m / (m - 1))
        self.running_mean.mul_(1.0 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1.0 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # As torch: batch statistics in training, and in eval when there are no buffers.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats:
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias,
                training=False, momentum=0.0, eps=self.eps,
            )
        self._check_batch(input)
        factor = self._update_factor()
        if input.numel() == 0:
            return input.clone()
        tracing = torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
        if self.impl == "explicit" and not tracing:
            y, mean, var = batch_norm_explicit(input, self.weight, self.bias, self.eps)
        else:
            y, mean, var = batch_norm_autograd(input, self.weight, self.bias, self.eps)
        if factor is not None:
            self._update_running_stats(mean, var, _values_per_channel(input), factor)
        return y


class BatchNorm1d(BatchNormBase):
    """Drop-in for torch.nn.BatchNorm1d: input (N, C) or (N, C, L)."""

    _expected_dims = (2, 3)


class BatchNorm2d(BatchNormBase):
    """Drop-in for torch.nn.BatchNorm2d: input (N, C, H, W)."""

    _expected_dims = (4,)


class BatchNorm3d(BatchNormBase):
    """Drop-in for torch.nn.BatchNorm3d: input (N, C, D, H, W)."""

    _expected_dims = (5,)


_TO_BNFOLD: dict[type, type] = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH: dict[type, type] = {v: k for k, v in _TO_BNFOLD.items()}


class TorchLacksBias(UsageError, ValueError):
    """swap_out met an affine BatchNorm without bias on a torch whose nn.BatchNorm has no `bias`
    argument. Inventing a zero bias would add a parameter (to state_dict, to an optimizer, to
    training), so the model is left as it was instead."""


def _accepts_bias(module_type: type) -> bool:
    """Whether `module_type(..., bias=...)` exists, read from the installed torch's signature:
    torch's BatchNorm gained the argument late (torch 2.11 has none, 2.13 has it); bnfold's
    always has it."""
    return "bias" in inspect.signature(module_type.__init__).parameters


def _convert(old: torch.nn.Module, new_type: type, where: str, **extra) -> torch.nn.Module:
    """A module of new_type sharing old's Parameter and buffer objects (so an optimizer holding
    them keeps working), hyper-parameters and training flag."""
    if _accepts_bias(new_type):
        extra["bias"] = old.bias is not None
    elif old.affine and old.bias is None:
        raise TorchLacksBias(
            f"cannot swap {where} (affine, bias=False) to torch.nn.{new_type.__name__}: torch "
            f"{torch.__version__}'s BatchNorm has no bias argument (torch 2.13 has one); "
            "upgrade torch or give the module a zero bias; the model was left unchanged"
        )
    new = new_type(
        old.num_features, eps=old.eps, momentum=old.momentum, affine=old.affine,
        track_running_stats=old.track_running_stats, device="meta", **extra,
    )
    for name, value in old.named_parameters(recurse=False):
        setattr(new, name, value)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(old, name))
    new.train(old.training)
    return new


def _swap(model: torch.nn.Module, mapping: dict[type, type], **extra) -> torch.nn.Module:
    """Every replacement is built before the first is set: a module that cannot be converted
    raises with `model` untouched, never half swapped."""
    if type(model) in mapping:
        return _convert(model, mapping[type(model)], "the model", **extra)
    replacements = [
        (parent, name, _convert(child, mapping[type(child)], repr(f"{prefix}.{name}".lstrip(".")), **extra))
        for prefix, parent in model.named_modules()
        for name, child in parent.named_children()
        if type(child) in mapping
    ]
    for parent, name, new in replacements:
        setattr(parent, name, new)
    return model


def swap_in(model: torch.nn.Module, *, impl: Impl = "explicit") -> torch.nn.Module:
    """Replace every torch.nn.BatchNorm1d/2d/3d in `model` by bnfold's equivalent, in place.

    Returns `model` itself (mutated), except when `model` is itself a BatchNorm: then the
    replacement is returned. The new modules share the old ones' Parameter and buffer tensors
    (same values, device, dtype; an optimizer over model.parameters() stays valid) and copy
    eps, momentum, affine, track_running_stats and the training flag. Only exact torch types are
    swapped (subclasses may override forward); hooks on the old modules are not carried over.
    `impl` is passed to the new modules (see BatchNormBase).
    """
    return _swap(model, _TO_BNFOLD, impl=impl)


def swap_out(model: torch.nn.Module) -> torch.nn.Module:
    """The reverse of swap_in: bnfold BatchNorm1d/2d/3d back to torch.nn, same rules."""
    return _swap(model, _TO_TORCH)
