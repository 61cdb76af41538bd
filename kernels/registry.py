"""One table picks the kernel: (device, kind) -> a factory that prepares a weight for that device.

A backend (qformat.kernels.cpu, later qformat.kernels.cuda) registers one factory per tensor kind
it runs. The model never branches on schemes: it asks `linear_op(device, tensor)` and calls the
returned op's `gemv` (one token), `gemm` (a block of tokens) or `rows` (embedding lookup).
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from qformat.schemes import Tensor


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


_TABLE: dict[tuple[str, str], Callable[[Tensor], LinearOp]] = {}


def register(device: str, kind: str, factory: Callable[[Tensor], LinearOp]) -> None:
    """Make `factory(tensor)` the way `device` runs tensors of `kind`."""
    _TABLE[(device, kind)] = factory


def linear_op(device: str, tensor: Tensor) -> LinearOp:
    """The registered op for `tensor` on `device`; NotImplementedError naming both if none."""
    _load_backend(device)
    factory = _TABLE.get((device, tensor.kind))
    if factory is None:
        raise NotImplementedError(f"no {device} kernel for tensor kind {tensor.kind!r} "
                                  f"(tensor {tensor.name}); known on {device}: "
                                  f"{', '.join(sorted(k for d, k in _TABLE if d == device)) or 'none'}")
    return factory(tensor)


_DECODERS: dict[str, Callable] = {}


def register_decoder(device: str, build: Callable) -> None:
    """`build(reader, args, cache, cos, sin, linears)` makes a one-call decode step for `device`,
    or None (linears: the model's ops by tensor name, "head" the output projection)."""
    _DECODERS[device] = build


def fused_decoder(device: str, reader, args, cache, cos, sin, linears: dict | None = None):
    """A callable (embedding, position) -> logits running a whole decode step in one compiled call,
    or None where the device has none or some tensor needs the per-operation path."""
    _load_backend(device)
    build = _DECODERS.get(device)
    return build(reader, args, cache, cos, sin, linears) if build is not None else None


_DEVICE_OPS: dict[str, object] = {}


def register_device_ops(device: str, ops: object) -> None:
    """`ops`: the model's per-token operations on `device` (kernels/cpu/device.py's methods)."""
    _DEVICE_OPS[device] = ops


def device_ops(device: str):
    """The per-token operations (RMSNorm, RoPE, SiLU gate, attention, arrays) of `device`."""
    _load_backend(device)
    if device not in _DEVICE_OPS:
        raise NotImplementedError(f"no backend for device {device!r} (known: cpu, cuda)")
    return _DEVICE_OPS[device]


def registered(device: str) -> list[str]:
    """Kinds that `device` has kernels for."""
    _load_backend(device)
    return sorted(k for d, k in _TABLE if d == device)


def _load_backend(device: str) -> None:
    # Importing a backend registers its kernels; importing it lazily keeps numba out of
    # `import qformat` and lets a machine without CUDA use the CPU table.
    if device == "cpu":
        from . import cpu  # noqa: F401
    elif device == "cuda":
        from . import cuda  # noqa: F401  (needs CuPy)
