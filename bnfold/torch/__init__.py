"""PyTorch side of bnfold (the `bnfold[torch]` extra): the only package that imports torch.

- `BatchNorm1d/2d/3d`: training-mode BatchNorm written from scratch (Ioffe & Szegedy, Algorithm 1),
  drop-in compatible with torch.nn.BatchNorm*.
- `fold(module)`: a torch.fx pass folding BN into the preceding Conv/ConvTranspose/Linear.
- `export(module, args, path)`: fold, export to ONNX, verify in onnxruntime.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "BatchNorm1d": "bnfold.torch.batchnorm",
    "BatchNorm2d": "bnfold.torch.batchnorm",
    "BatchNorm3d": "bnfold.torch.batchnorm",
    "swap_in": "bnfold.torch.batchnorm",
    "swap_out": "bnfold.torch.batchnorm",
    "fold": "bnfold.torch.fold",
    "TorchFoldResult": "bnfold.torch.fold",
    "export": "bnfold.torch.export",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnfold.torch' has no attribute {name!r}")
