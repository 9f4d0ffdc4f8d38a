"""PyTorch side of bnfold (the `bnfold[torch]` extra): the only package that imports torch.

- `BatchNorm1d/2d/3d`: training-mode BatchNorm written from scratch (Ioffe & Szegedy, Algorithm 1),
  drop-in compatible with torch.nn.BatchNorm*; `swap_in` / `swap_out` exchange them in a model.
- `fold(module)`: a torch.fx pass folding BN into the preceding Conv/ConvTranspose/Linear.
- `export(module, args, path)`: fold, export to ONNX, verify in onnxruntime.

The functions `fold` and `export` shadow their submodules' names on purpose (imported eagerly so
the attribute is always the function); `from bnfold.torch.fold import ...` still reaches the module.
"""

try:
    import torch as _torch  # noqa: F401
except ImportError as err:  # the ONNX side never needs torch; this side says how to get it
    raise ImportError("bnfold.torch needs PyTorch: pip install 'bnfold[torch]'") from err

from bnfold.torch.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, TorchLacksBias, swap_in, swap_out
from bnfold.torch.fold import TorchFoldResult, fold
from bnfold.torch.export import TorchExportResult, export  # noqa: I001 (after fold: export uses it)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "TorchExportResult",
    "TorchFoldResult",
    "TorchLacksBias",
    "export",
    "fold",
    "swap_in",
    "swap_out",
]
