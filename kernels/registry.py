"""One table picks the kernel: (device, kind, form) -> the op that runs such a weight there.

Each backend package (qformat.kernels.cpu, qformat.kernels.cuda) publishes, as module data:
  LINEAR_OPS  {(kind, form): factory(tensor) -> op}   the linear ops of every layout it runs
  DEVICE_OPS  the per-token operations (RMSNorm, RoPE, SiLU gate, attention, arrays)
  build_decoder(blocks, reader, args, cache, cos, sin, linears)   its one-call decode step, or None
The registry imports a backend the first time a device is asked for (numba, CuPy) and reads
those tables; backends never import the registry. The model never branches on schemes or
devices: it asks `linear_op(device, tensor)` and calls the returned op's `gemv` (one token),
`gemm` (a block of tokens) or `rows` (embedding lookup).
"""
from __future__ import annotations

from functools import lru_cache
from types import ModuleType
from typing import Protocol

import numpy as np

from qformat.schemes import Tensor, expand_log_scales

from .layouts import form_of


class LinearOp(Protocol):
    """A weight W (out_features, in_features) prepared for one device."""

    out_features: int
    in_features: int

    def gemv(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out (out_features,) = W @ x for x (in_features,) float32."""

    def gemm(self, x: np.ndarray) -> np.ndarray:
        """(n, out_features) = x @ W.T for x (n, in_features) float32."""

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), in_features) float32 rows of W (embedding lookup)."""


def _cpu() -> ModuleType:
    from . import cpu

    return cpu


def _cuda() -> ModuleType:
    from . import cuda  # CuPy itself is imported when a kernel first runs

    return cuda


# Importing a backend lazily keeps numba out of `import qformat` and lets a machine without
# CUDA use the CPU table.
BACKENDS = {"cpu": _cpu, "cuda": _cuda}


@lru_cache(maxsize=None)
def backend(device: str) -> ModuleType:
    """The backend package of `device`; NotImplementedError naming the known devices."""
    load = BACKENDS.get(device)
    if load is None:
        raise NotImplementedError(f"no backend for device {device!r} (known: {', '.join(BACKENDS)})")
    return load()


def linear_op(device: str, tensor: Tensor) -> LinearOp:
    """The op for `tensor` on `device`; NotImplementedError naming the layout and device if none.
    Log-coded scales (spec §4.3) run as their float16 values (QbinReader has decoded them already)."""
    tensor = expand_log_scales(tensor)
    ops = backend(device).LINEAR_OPS
    layout = (tensor.kind, form_of(tensor))
    factory = ops.get(layout)
    if factory is None:
        raise NotImplementedError(f"no {device} kernel for tensor kind {tensor.kind!r} in {layout[1]} form "
                                  f"(tensor {tensor.name}); known on {device}: "
                                  f"{', '.join(f'{k} {f}' for k, f in sorted(ops)) or 'none'}")
    return factory(tensor)


def lora_op(device: str, op: LinearOp, a: np.ndarray, b: np.ndarray) -> LinearOp:
    """`op` with a LoRA adapter beside it on `device`: W x + B (A x) for A (r, in) and B (out, r)
    float32, the adapter's scale already in B (kernels/lora.py)."""
    return backend(device).LoraOp(op, a, b, backend(device).DEVICE_OPS)


def fused_decoder(device: str, blocks: list, reader, args, cache, cos, sin, linears: dict):
    """A callable (embedding, position) -> logits running a whole decode step of `blocks`
    (qformat.block.decoder(args)) in one call, or None where the device has none or some tensor
    needs the per-operation path. linears: the model's ops by tensor name; cos, sin: the RoPE
    tables (NumPy)."""
    return backend(device).build_decoder(blocks, reader, args, cache, cos, sin, linears)


def device_ops(device: str):
    """The per-token operations (RMSNorm, RoPE, SiLU gate, attention, arrays) of `device`."""
    return backend(device).DEVICE_OPS


def registered(device: str) -> list[tuple[str, str]]:
    """(kind, form) of every layout `device` has ops for."""
    return sorted(backend(device).LINEAR_OPS)
