"""Fold, export to ONNX with torch.onnx, and prove the file against the ORIGINAL module.

The proof runs the written ONNX file in onnxruntime with graph optimisations disabled (onnxruntime
would otherwise fuse Conv+BN itself and hide what the file holds) on the caller's `args`, and
compares every output with the unfolded module in eval mode. A file that fails is never left at
`path`: it is written beside it, checked, and only then moved into place (bnfold.staging).

Exporter choice (torch 2.13): the default is the torch.export-based exporter (dynamo=True),
torch's own default since 2.9; the TorchScript exporter (dynamo=False) is deprecated. They differ
in what they do to BN on their own:
- dynamo=True, optimize=True: onnxscript's optimizer folds BN into Conv/Gemm by itself;
- dynamo=True, optimize=False (bnfold's default): every BN left by `fold` stays one
  BatchNormalization node, so the file shows exactly what bnfold did;
- dynamo=False: its constant folding fuses Conv+BN (not Gemm+BN) by itself.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import pathlib
import re
import time

import numpy as np
import onnx
import torch

from bnfold.errors import BnfoldError, UsageError, VerificationFailed
from bnfold.staging import stage_model
from bnfold.report import SCHEMA_VERSION
from bnfold.torch.fold import TorchFoldResult
from bnfold.torch.fold import fold as fold_module
from bnfold.verify import Verification, compare_outputs, run_model


class ExportFailed(BnfoldError):
    """torch.onnx could not export the module."""


@dataclasses.dataclass(frozen=True)
class TorchExportResult:
    """The written file, the fold report (None with fold=False) and the verification summary."""

    path: pathlib.Path
    fold_result: TorchFoldResult | None
    verification: Verification  # ONNX file (reference: the original module) per provider and output
    exporter: str  # "dynamo" or "torchscript"
    opset: int
    bn_left: int  # BatchNormalization nodes in the written file
    seconds: float

    @property
    def passed(self) -> bool:
        return self.verification.passed

    def max_abs_err(self) -> float:
        return self.verification.max_abs_err()

    def max_rel_err(self) -> float:
        return self.verification.max_rel_err()

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "path": str(self.path),
            "exporter": self.exporter,
            "opset": self.opset,
            "bn_left": self.bn_left,
            "fold": None if self.fold_result is None else self.fold_result.to_dict(),
            "verification": self.verification.to_dict(),
            "seconds": round(self.seconds, 6),
        }


def export(
    module: torch.nn.Module,
    args,
    path,
    *,
    fold: bool = True,
    dynamo: bool | None = None,
    optimize: bool = False,
    opset: int | None = None,
    input_names=None,
    output_names=None,
    dynamic_shapes=None,
    rtol: float | None = None,
    atol: float | None = None,
) -> TorchExportResult:
    """Fold `module` (unless fold=False), export it to `path` and verify it against `module`.

    `module` is not modified. The exported graph is the eval-mode (inference) one. Raises
    VerificationFailed (nothing written) when an output differs beyond tolerance.
    """
    start = time.perf_counter()
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    dynamo = True if dynamo is None else dynamo
    if dynamic_shapes is not None and not dynamo:
        raise UsageError("dynamic_shapes needs the dynamo exporter (dynamo=True)")
    expected = _reference_outputs(module, args)
    folded = fold_module(module, example_inputs=args) if fold else None
    target = folded.module if folded is not None else copy.deepcopy(module).eval()
    options = {"opset_version": opset, "input_names": input_names, "output_names": output_names}
    model = _to_onnx(target, args, dynamo, optimize, dynamic_shapes, options)
    with stage_model(model, path) as staged:
        verification = _verify_file(staged.path, model, args, expected, rtol, atol)
        written = staged.commit()
    exporter = "dynamo" if dynamo else "torchscript"
    bn_left = count_batchnorms(model)
    return TorchExportResult(
        written, folded, verification, exporter, _opset(model), bn_left, time.perf_counter() - start
    )


def _reference_outputs(module: torch.nn.Module, args: tuple) -> list[torch.Tensor]:
    """The original, unfolded module in eval mode, run on a copy so `module` keeps its flags."""
    reference = copy.deepcopy(module).eval()
    with torch.no_grad():
        return _tensor_leaves(reference(*args))


def _tensor_leaves(value) -> list[torch.Tensor]:
    """Outputs in the order torch.onnx flattens them (pytree order)."""
    from torch.utils._pytree import tree_flatten

    return [leaf for leaf in tree_flatten(value)[0] if isinstance(leaf, torch.Tensor)]


def _to_onnx(module, args, dynamo: bool, optimize: bool, dynamic_shapes, options: dict) -> onnx.ModelProto:
    """Run one torch.onnx exporter in memory; its failures become one ExportFailed line."""
    try:
        if dynamo:
            program = torch.onnx.export(
                module, args, dynamo=True, optimize=optimize, dynamic_shapes=dynamic_shapes, verbose=False,
                **options,
            )
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(module, args, buffer, dynamo=False, **options)
        return onnx.load_from_string(buffer.getvalue())
    except Exception as e:  # the exporters raise many types, with pages of context
        text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split())  # no terminal colours
        raise ExportFailed(f"torch.onnx.export failed ({type(e).__name__}: {text[:300]})") from None


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def count_batchnorms(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes anywhere: main graph, subgraphs, local functions."""

    def in_nodes(nodes) -> int:
        total = 0
        for node in nodes:
            total += node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")
            for attr in node.attribute:
                if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    total += sum(in_nodes(g.node) for g in [attr.g, *attr.graphs])
        return total

    return in_nodes(model.graph.node) + sum(in_nodes(f.node) for f in model.functions)


# --------------------------------------------------------------------------- verification


def _verify_file(path, model, args, expected, rtol, atol) -> Verification:
    """Run the written file on `args` and compare with the module's outputs, normwise as
    bnfold.verify does; raise VerificationFailed (carrying the Verification) on a mismatch."""
    names = [o.name for o in model.graph.output]
    if len(names) != len(expected):
        raise VerificationFailed(f"the ONNX file has {len(names)} outputs, the module returns {len(expected)}")
    feeds = _feeds(model, args)
    reference = dict(zip(names, (_numpy(t) for t in expected)))
    start = time.perf_counter()
    engine, outputs, note = run_model(str(path), feeds, which="exported")
    seconds = time.perf_counter() - start
    compared = tuple(c for p, out in outputs.items() for c in compare_outputs(p, reference, out, rtol, atol))
    result = Verification(all(c.passed for c in compared), engine, tuple(outputs), compared, seconds, note)
    if not result.passed:
        worst = max((c for c in compared if not c.passed), key=lambda c: c.max_abs_err)
        detail = worst.note or f"max abs error {worst.max_abs_err:.3g} (rtol={worst.rtol:g}, atol={worst.atol:g})"
        raise VerificationFailed(
            f"ONNX output {worst.output!r} differs from the module on {worst.provider}: {detail}; nothing was written",
            result,
        )
    return result


def _feeds(model: onnx.ModelProto, args: tuple) -> dict[str, np.ndarray]:
    """The tensors of `args`, in order, under the graph's input names (initializers excluded)."""
    initializers = {t.name for t in model.graph.initializer}
    names = [v.name for v in model.graph.input if v.name not in initializers]
    tensors = _tensor_leaves(args)
    if len(names) != len(tensors):
        raise UsageError(f"the ONNX file takes {len(names)} inputs but args hold {len(tensors)} tensors")
    return {name: _numpy(t) for name, t in zip(names, tensors)}


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """numpy has no bfloat16: hand its 16-bit words over as ml_dtypes.bfloat16, as verify does."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
