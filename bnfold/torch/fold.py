"""torch.fx pass folding BatchNorm into the Conv / ConvTranspose / Linear call that feeds it.

An inference-mode BN is a per-channel affine map on axis 1 (see `bnfold.algebra`, which does the
arithmetic in float64 for both the ONNX and the torch side):

    BN(y) = scale * y + shift,   scale = weight / sqrt(running_var + eps),
                                 shift = bias - running_mean * scale

so after y = W x + b it becomes (scale * W) x + (scale * b + shift), scaled along W's
output-channel axis: Conv and Linear axis 0, ConvTranspose axis 1 within each group (its weight
is [C_in, C_out/groups, k...]). The result is cast back to the layer's dtype; a bias is created
when the layer had none.

The pass prefers keeping a BN to folding it wrongly, where common fusers do not:
- a layer called at several sites is never changed: the folded site gets its own fused copy;
- a layer output that also feeds something else (fan-out) is kept;
- BN normalises axis 1. A Linear's features are its LAST axis, and a conv's channels are on
  axis 1 only for batched input, so the fold needs the rank of the layer's output: known from
  `example_inputs` (shape propagation) or implied by the BN class (BatchNorm2d takes only 4-D
  input); otherwise kept with "rank unknown: pass example_inputs";
- BN without running statistics (track_running_stats=False) normalises with batch statistics
  even in eval mode: kept.

The result is an eval-mode GraphModule meant for inference: a BN in training mode is folded with
its running statistics, and the module is traced in eval mode. The input module is never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect

import numpy as np
import torch
from torch import fx, nn

from bnfold import algebra
from bnfold.errors import BnfoldError, UsageError
from bnfold.report import SCHEMA_VERSION, Folded, Kept

# Layer class -> (rule name, weight axis of the output channels).
_LAYERS: dict[type, tuple[str, int]] = {
    nn.Conv1d: ("bn_into_conv", 0),
    nn.Conv2d: ("bn_into_conv", 0),
    nn.Conv3d: ("bn_into_conv", 0),
    nn.ConvTranspose1d: ("bn_into_conv_transpose", 1),
    nn.ConvTranspose2d: ("bn_into_conv_transpose", 1),
    nn.ConvTranspose3d: ("bn_into_conv_transpose", 1),
    nn.Linear: ("bn_into_linear", 0),
}
# The input ranks a BN class accepts (its _check_input_dim); BN normalises axis 1 of them.
_BN_RANKS = {"BatchNorm1d": (2, 3), "BatchNorm2d": (4,), "BatchNorm3d": (5,)}


class UntraceableModule(BnfoldError):
    """torch.fx cannot trace the module (data-dependent control flow, unsupported Python, ...)."""


@dataclasses.dataclass(frozen=True)
class TorchFoldResult:
    """Outcome of `fold`: the eval-mode GraphModule and one record per BN call in the graph."""

    module: fx.GraphModule
    folded: tuple[Folded, ...] = ()
    kept: tuple[Kept, ...] = ()
    modified: bool = False

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "modified": self.modified,
            "bn_before": len(self.folded) + len(self.kept),
            "bn_after": len(self.kept),
            "folded": [f.to_dict() for f in self.folded],
            "kept": [k.to_dict() for k in self.kept],
        }


@dataclasses.dataclass(frozen=True)
class _Stats:
    """An inference-mode BN's parameters, wherever they came from (module or functional call)."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    ranks: tuple[int, ...] | None  # input ranks the BN accepts; None: any


@dataclasses.dataclass(frozen=True)
class _Candidate:
    bn_node: fx.Node
    producer: fx.Node
    layer: nn.Module
    scale: np.ndarray  # float64, per output channel
    shift: np.ndarray
    rule: str
    axis: int
    constants: tuple[fx.Node, ...] = ()  # get_attr nodes only the functional BN used


def fold(module: nn.Module, *, concrete_args=None, example_inputs=None) -> TorchFoldResult:
    """Fold every foldable BN of `module` into the layer before it; `module` is left as it was.

    `example_inputs` (a tensor or tuple, passed positionally) lets the pass see tensor ranks,
    which Linear -> BatchNorm1d and Conv1d -> BatchNorm1d need to be proven foldable.
    """
    gm = _trace(module, concrete_args)
    if example_inputs is not None:
        _propagate_shapes(gm, example_inputs)
    folded, kept = [], []
    for node in list(gm.graph.nodes):
        if not _is_bn_node(node, gm):
            continue
        name = _bn_name(node, gm)
        match = match_bn(node, gm)
        if isinstance(match, str):
            kept.append(Kept(name, match))
        else:
            folded.append(Folded(name, apply_fold(gm, match), match.rule))
    if folded:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return TorchFoldResult(gm.eval(), tuple(folded), tuple(kept), bool(folded))


# --------------------------------------------------------------------------- tracing


@functools.lru_cache(maxsize=None)
def _bn_classes() -> tuple[type, ...]:
    """torch's BN base, plus bnfold's own when that module is installed."""
    classes: list[type] = [nn.modules.batchnorm._BatchNorm]
    try:
        from bnfold.torch.batchnorm import BatchNormBase
    except ImportError:
        pass
    else:
        classes.append(BatchNormBase)
    return tuple(classes)


def _is_bn_module(module) -> bool:
    return isinstance(module, _bn_classes())


class _Tracer(fx.Tracer):
    """Keeps every BN a leaf: bnfold's BN lives outside torch.nn, so fx would trace through it."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_bn_module(m) or super().is_leaf_module(m, module_qualified_name)


def _trace(module, concrete_args) -> fx.GraphModule:
    """Trace an eval-mode deep copy: the caller's module, its parameters and flags stay as they were."""
    if not isinstance(module, nn.Module):
        raise UsageError(f"fold expects a torch.nn.Module, got {type(module).__name__}")
    name = type(module).__name__
    try:
        root = copy.deepcopy(module).eval()
        graph = _Tracer().trace(root, concrete_args)
    except Exception as e:  # fx raises anything from TraceError to TypeError on Python it cannot follow
        raise UntraceableModule(
            f"cannot trace {name} with torch.fx ({type(e).__name__}: {_one_line(e)}); "
            "pass concrete_args, or fold its traceable submodules one by one"
        ) from None
    return fx.GraphModule(root, graph, name)


def _propagate_shapes(gm: fx.GraphModule, example_inputs) -> None:
    """Record every node's output shape (node.meta['tensor_meta']) by running the example once."""
    from torch.fx.passes.shape_prop import ShapeProp

    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as e:
        raise UsageError(
            f"example_inputs do not run through {type(gm).__name__}: {type(e).__name__}: {_one_line(e)}"
        ) from None


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- matching


def _is_bn_node(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return _is_bn_module(gm.get_submodule(node.target))
    return node.op == "call_function" and node.target is torch.nn.functional.batch_norm


def _bn_name(node: fx.Node, gm: fx.GraphModule) -> str:
    """The BN module's path; the call's node name too when the module is called more than once."""
    if node.op != "call_module":
        return node.name
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target)
    return node.target if calls == 1 else f"{node.target} (call {node.name})"


def match_bn(bn_node: fx.Node, gm: fx.GraphModule) -> _Candidate | str:
    """Read-only: the fold to apply, or the reason (str) the BN has to stay."""
    if bn_node.op == "call_module":
        source = bn_node.args[0] if bn_node.args else next(iter(bn_node.kwargs.values()), None)
        stats, constants = _module_stats(gm.get_submodule(bn_node.target)), ()
    else:
        stats, source, constants = _functional_stats(bn_node)
    if isinstance(stats, str):
        return stats
    layer = _producer_layer(source, gm)
    if layer is None:
        return f"no Conv/ConvTranspose/Linear before it: its input comes from {_describe(source, gm)}"
    problem = _layer_problem(layer, source, bn_node, gm) or _stats_problem(stats, layer, source, gm)
    if problem:
        return problem
    try:
        scale, shift = _scale_shift(stats)
    except algebra.BadStatistics as e:
        return f"cannot fold: {e}"
    rule, axis = _layer_kind(layer)
    return _Candidate(bn_node, source, layer, scale, shift, rule, axis, constants)


def _scale_shift(stats: _Stats) -> tuple[np.ndarray, np.ndarray]:
    gamma = 1.0 if stats.weight is None else _float64(stats.weight)
    beta = 0.0 if stats.bias is None else _float64(stats.bias)
    mean, var = _float64(stats.running_mean), _float64(stats.running_var)
    gamma, beta = np.broadcast_to(gamma, mean.shape), np.broadcast_to(beta, mean.shape)
    return algebra.bn_scale_shift(gamma, beta, mean, var, stats.eps)


def _module_stats(bn: nn.Module) -> _Stats | str:
    if bn.running_mean is None or bn.running_var is None:
        return (
            "track_running_stats=False: no running statistics, "
            "so it normalises with batch statistics even in eval mode"
        )
    if bn._forward_hooks or bn._forward_pre_hooks:
        return f"{type(bn).__name__} has forward hooks, which would no longer run"
    ranks = next((_BN_RANKS[c.__name__] for c in type(bn).__mro__ if c.__name__ in _BN_RANKS), None)
    return _Stats(bn.running_mean, bn.running_var, bn.weight, bn.bias, float(bn.eps), ranks)


def _functional_stats(node: fx.Node) -> tuple[_Stats | str, object, tuple[fx.Node, ...]]:
    """F.batch_norm folds only with get_attr statistics and a literal training=False."""
    bound = inspect.signature(torch.nn.functional.batch_norm).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if a["training"] is not False:
        return f"functional batch_norm with training={a['training']} normalises with batch statistics", None, ()
    tensors = {}
    for key in ("running_mean", "running_var", "weight", "bias"):
        value = a[key]
        if isinstance(value, fx.Node) and value.op == "get_attr":
            tensors[key] = _fetch_attr(node.graph.owning_module, value.target)
        elif value is None and key in ("weight", "bias"):
            tensors[key] = None
        else:
            return f"functional batch_norm with non-constant stats: {key} is {value}", None, ()
    if isinstance(a["eps"], fx.Node):
        return f"functional batch_norm with non-constant stats: eps is {a['eps']}", None, ()
    constants = tuple(a[k] for k in ("running_mean", "running_var", "weight", "bias") if isinstance(a[k], fx.Node))
    return _Stats(**tensors, eps=float(a["eps"]), ranks=None), a["input"], constants


def _fetch_attr(gm: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _layer_kind(layer: nn.Module) -> tuple[str, int] | None:
    """(rule, output-channel axis) for a supported layer whose forward is the stock one."""
    for cls in type(layer).__mro__:
        if cls in _LAYERS:
            # A subclass with its own forward (QAT, custom) does more than W x + b: not ours to fold.
            return _LAYERS[cls] if type(layer).forward is cls.forward else None
    return None


def _producer_layer(source, gm: fx.GraphModule) -> nn.Module | None:
    if not (isinstance(source, fx.Node) and source.op == "call_module"):
        return None
    layer = gm.get_submodule(source.target)
    return layer if _layer_kind(layer) else None


def _layer_problem(layer: nn.Module, producer: fx.Node, bn_node: fx.Node, gm: fx.GraphModule) -> str | None:
    """Why this call of the layer cannot absorb the BN, if it cannot."""
    desc = _describe(producer, gm)
    others = [_describe(u, gm) for u in producer.users if u is not bn_node]
    if others:
        return f"{desc} output also feeds {', '.join(others)}"
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return f"{desc} is a lazy module not initialised yet: run one forward pass first"
    if torch.nn.utils.parametrize.is_parametrized(layer):
        return f"{desc} has a parametrized weight (torch.nn.utils.parametrize): remove it first"
    if layer._forward_hooks or layer._forward_pre_hooks:
        return f"{desc} has forward hooks, which would see the folded output"
    return None


def _stats_problem(stats: _Stats, layer: nn.Module, producer: fx.Node, gm: fx.GraphModule) -> str | None:
    """Channel count and channel axis: the BN's axis 1 must be the layer's output channels."""
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    features = stats.running_mean.numel()
    if features != channels:
        return f"BatchNorm has {features} features but {_describe(producer, gm)} has {channels} output channels"
    return _rank_problem(layer, producer, stats.ranks)


def _rank_problem(layer: nn.Module, producer: fx.Node, bn_ranks) -> str | None:
    """The layer's channels sit on axis 1 only at one output rank; prove the output has it."""
    linear = isinstance(layer, nn.Linear)
    need = 2 if linear else layer.weight.dim()  # conv weight rank = batched output rank
    meta = producer.meta.get("tensor_meta")
    rank = len(meta.shape) if hasattr(meta, "shape") else None
    if rank == need or (rank is None and bn_ranks == (need,)):
        return None
    kind = type(layer).__name__
    why = (
        f"BatchNorm normalises axis 1, which is {kind}'s feature axis (the last) only for 2-D output"
        if linear
        else f"BatchNorm normalises axis 1, which is {kind}'s channel axis only for batched {need}-D output"
    )
    if rank is None and (bn_ranks is None or need in bn_ranks):
        return f"rank unknown: pass example_inputs ({why})"
    shown = f"is {rank}-D" if rank is not None else f"cannot be {need}-D for this BatchNorm"
    return f"{kind} output {shown}: {why}"


def _describe(node, gm: fx.GraphModule) -> str:
    """A node as a user can find it in their model."""
    if not isinstance(node, fx.Node):
        return f"a constant ({node!r})"
    if node.op == "placeholder":
        return f"the graph input {node.target!r}"
    if node.op == "output":
        return "the graph output"
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"{node.name} (.{node.target}())"
    if node.op == "get_attr":
        return f"the attribute {node.target}"
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"


# --------------------------------------------------------------------------- folding


def fold_layer(layer: nn.Module, scale: np.ndarray, shift: np.ndarray, axis: int) -> nn.Module:
    """A fused copy of `layer` (new weight and bias Parameters); `layer` itself is not touched."""
    groups = getattr(layer, "groups", 1)
    weight = algebra.scale_along_axis(_float64(layer.weight), scale, axis, groups)
    bias = algebra.fold_bias(None if layer.bias is None else _float64(layer.bias), scale, shift)
    bias_like = layer.weight if layer.bias is None else layer.bias
    fused = copy.deepcopy(layer)
    fused.weight = _parameter(weight, layer.weight)
    fused.bias = _parameter(bias, bias_like)
    return fused


def _float64(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as float64 numpy, from any device or dtype (bfloat16 included)."""
    return tensor.detach().to("cpu", torch.float64).numpy()


def _parameter(value: np.ndarray, like: torch.Tensor) -> nn.Parameter:
    tensor = torch.from_numpy(np.ascontiguousarray(value)).to(device=like.device, dtype=like.dtype)
    return nn.Parameter(tensor, requires_grad=like.requires_grad)


def apply_fold(gm: fx.GraphModule, c: _Candidate) -> str:
    """Swap the producer call to a fused layer, bypass and drop the BN; returns the fused path."""
    fused = fold_layer(c.layer, c.scale, c.shift, c.axis)
    path = c.producer.target
    if _used_only_by(gm, c.layer, c.producer):
        _set_submodule(gm, path, fused)
    else:  # shared layer: this call site gets its own copy, the other sites keep the original
        path = _unique_attr(gm, path.replace(".", "_") + "_bnfold")
        gm.add_submodule(path, fused)
        c.producer.target = path
    c.bn_node.replace_all_uses_with(c.producer)
    gm.graph.erase_node(c.bn_node)
    for constant in c.constants:
        if not constant.users:
            gm.graph.erase_node(constant)
    return path


def _used_only_by(gm: fx.GraphModule, layer: nn.Module, producer: fx.Node) -> bool:
    """No other call of `layer` and no get_attr of its parameters anywhere in the graph."""
    for node in gm.graph.nodes:
        if node is producer:
            continue
        if node.op == "call_module" and gm.get_submodule(node.target) is layer:
            return False
        if node.op == "get_attr" and _attr_owner(gm, node.target) is layer:
            return False
    return True


def _attr_owner(gm: fx.GraphModule, target: str):
    owner = target.rpartition(".")[0]
    try:
        return gm.get_submodule(owner) if owner else gm
    except AttributeError:  # the attribute of a plain object, not of a module
        return None


def _set_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, name, module)


def _unique_attr(gm: fx.GraphModule, base: str) -> str:
    name, n = base, 1
    while hasattr(gm, name):
        n += 1
        name = f"{base}{n}"
    return name
