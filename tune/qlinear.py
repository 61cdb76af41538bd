"""A frozen qbin weight as a torch linear layer that autograd runs through: the quantized base of
QLoRA (Dettmers et al., 2023).

The weight stays in its file's layout (any kind, with its sidecars: permutation, outliers, 16-bit
columns, n:m positions); the forward and the backward pass each dequantize it a tile of rows at a
time (the format's NumPy reference, Tensor.row_range(...).dequantize(), exact for every kind), so
the float weight is never held whole. Only the input gets a gradient: the base is frozen. A W8A8
tensor trains on its dequantized weight; its activations' rounding is the runtime's.
"""
from __future__ import annotations

import numpy as np
import torch

from qformat.schemes import Tensor

TILE_BYTES = 8 << 20  # float32 rows dequantized per tile: ~8 MiB stays in cache while matmul reads it


class _DequantizedMatmul(torch.autograd.Function):
    """y = x @ W.T with W dequantized tile by tile, forward and backward (nothing of W is saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "FrozenQuantLinear") -> torch.Tensor:
        ctx.layer = layer
        out = x.new_empty(*x.shape[:-1], layer.out_features)
        for r0, w in layer.tiles(x.dtype):
            out[..., r0:r0 + w.shape[0]] = x @ w.T
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            for r0, w in ctx.layer.tiles(grad_out.dtype):
                part = grad_out[..., r0:r0 + w.shape[0]] @ w
                grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None


class FrozenQuantLinear(torch.nn.Module):
    """y = x W^T (+ bias) over a qbin Tensor of shape (out_features, in_features), frozen."""

    def __init__(self, weight: Tensor, bias: np.ndarray | None = None, tile_rows: int | None = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"{weight.name}: a linear weight is 2-D, not {weight.shape}")
        self.weight_tensor = weight
        self.out_features, self.in_features = weight.shape
        self.tile_rows = tile_rows or max(1, TILE_BYTES // (4 * self.in_features))
        self.register_buffer("bias", None if bias is None else torch.as_tensor(np.asarray(bias, np.float32)))

    def tiles(self, dtype: torch.dtype):
        """(first row, that tile's float weight rows as `dtype`) over the whole weight."""
        for r0 in range(0, self.out_features, self.tile_rows):
            rows = self.weight_tensor.row_range(r0, min(self.out_features, r0 + self.tile_rows)).dequantize()
            yield r0, torch.from_numpy(np.ascontiguousarray(rows, np.float32)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantizedMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        t = self.weight_tensor
        return f"{t.name}: {t.kind}, in_features={self.in_features}, out_features={self.out_features}"
