"""The format's group quantizer in torch, for the calibrated methods (GPTQ, AWQ).

It evaluates the very formulas of qformat.schemes.quantize_rtn (float16-rounded scales, integer
zero-points, NF4 nearest level with ties to the lower level) so that the codes a method chooses
here are the codes stored, and dequantize to the same float32 values as the NumPy reference.
`to_tensor` builds the stored Tensor from those codes; nothing is re-quantized afterwards.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import numpy as np
import torch

from qformat.constants import NF4_LEVELS
from qformat.packing import pack_codes
from qformat.schemes import KINDS, Scheme, Tensor, compress_nm, encode_log_scales, log_scale

_F16_TINY = 2.0**-24  # smallest positive float16, as qformat.schemes.f16_scale
_F16_MAX = 65504.0
_NF4 = torch.from_numpy(NF4_LEVELS.copy())
_NF4_MIDS = (_NF4[1:] + _NF4[:-1]) / 2


@contextmanager
def one_thread():
    """Run a loop of many small tensor ops on one CPU thread. Measured on a busy 2-core machine:
    GPTQ's column loop took 2-8 s with 2 threads (every tiny op waits at an OpenMP barrier for
    a descheduled thread) and 0.1 s with one. Big matrix products outside keep all threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def f16_scale(s: torch.Tensor) -> torch.Tensor:
    """A float32 scale rounded to the float16 that is stored, back as float32; never zero."""
    return torch.nan_to_num(s).clamp(_F16_TINY, _F16_MAX).to(torch.float16).to(torch.float32)


def stored_scale(s: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """A float32 scale rounded to what `scheme` stores, back as float32: float16, or the log grid
    of spec §4.3 for a "-dq" scheme (qformat.schemes.log_scale itself, so the two agree bit for bit)."""
    if not scheme.log_scales:
        return f16_scale(s)
    return torch.from_numpy(log_scale(s.detach().cpu().numpy()).astype(np.float32)).to(s.device)


def is_nf4(scheme: Scheme) -> bool:
    return KINDS[scheme.kind].nf4


def qmax(scheme: Scheme) -> int:
    return (1 << KINDS[scheme.kind].bits) - 1


def group_params(w: torch.Tensor, scheme: Scheme, ratio: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each (..., 1), for groups w (..., G) shrunk by `ratio` ((...,) or scalar).

    zero is the integer zero-point as float32 (2**(bits-1) when symmetric, 0 for NF4).
    """
    r = torch.as_tensor(ratio, dtype=torch.float32, device=w.device)
    if r.ndim:
        r = r[..., None]
    if is_nf4(scheme):
        scale = stored_scale(w.abs().amax(-1, keepdim=True) * r, scheme)
        return scale, torch.zeros_like(scale)
    top = qmax(scheme)
    if scheme.symmetric:
        scale = stored_scale(2.0 * (w.abs().amax(-1, keepdim=True) * r) / top, scheme)
        return scale, torch.full_like(scale, float(1 << (KINDS[scheme.kind].bits - 1)))
    lo = torch.clamp(w.amin(-1, keepdim=True), max=0.0) * r
    hi = torch.clamp(w.amax(-1, keepdim=True), min=0.0) * r
    scale = stored_scale((hi - lo) / top, scheme)
    zero = torch.clamp(torch.round(-lo / scale), 0, top)
    return scale, zero


def codes_of(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Integer codes (as float32) of w under (scale, zero), broadcasting."""
    if is_nf4(scheme):
        return torch.bucketize((w / scale).contiguous(), _NF4_MIDS.to(w.device)).to(torch.float32)
    return torch.clamp(torch.round(w / scale) + zero, 0, qmax(scheme))


def dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Float32 values of codes, exactly as the NumPy reference computes them."""
    if is_nf4(scheme):
        return _NF4.to(codes.device)[codes.long()] * scale
    return (codes - zero) * scale


def fake_quant(w: torch.Tensor, scheme: Scheme, ratio: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Quantize-dequantize a (rows, k) weight group by group (the last group may be partial)."""
    rows, k = w.shape
    g = scheme.group_for(k)
    out = torch.empty_like(w)
    for j in range(0, k, g):
        part = w[:, j:j + g]
        r = ratio if not torch.is_tensor(ratio) or ratio.ndim < 2 else ratio[:, j // g]
        s, z = group_params(part, scheme, r)
        out[:, j:j + g] = dequant(codes_of(part, s, z, scheme), s, z, scheme)
    return out


def to_tensor(name: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, scheme: Scheme,
              perm: np.ndarray | None = None) -> Tensor:
    """The stored Tensor from codes (rows, k) in stored column order and per-group (rows, n_groups)
    scales (as `scheme` stores them: stored_scale) and zero-points; perm: stored column j is input
    channel perm[j]."""
    rows, k = codes.shape
    group = scheme.group_for(k)
    kind = KINDS[scheme.kind]
    arrays = {"codes": pack_codes(codes.cpu().numpy().astype(np.uint8), group, kind.bits)}
    if scheme.log_scales:
        arrays["scales"], arrays["scale_exp"] = encode_log_scales(scales.cpu().numpy())
    else:
        arrays["scales"] = scales.cpu().numpy().astype(np.float16)
    if not scheme.symmetric and not kind.nf4:
        arrays["zeros"] = zeros.cpu().numpy().astype(np.uint8)
    if perm is not None:
        arrays["perm"] = np.ascontiguousarray(perm, dtype=np.int32)
    return Tensor(name, kind.name, (rows, k), arrays, group, scheme.symmetric or kind.nf4)


def to_nm_tensor(name: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, scheme: Scheme,
                 keep: np.ndarray, n: int, m: int) -> Tensor:
    """The n:m compressed Tensor (spec §6.3) from codes (rows, k) in input order and the keep
    mask (rows, k): the kept codes of each group of G input columns form a stored group of
    G·n/m codes, so the per-group scales and zero-points carry over unchanged."""
    rows, k = codes.shape
    group = scheme.group_for(k)
    kept, index = compress_nm(codes.cpu().numpy(), keep, n, m)
    stored = dataclasses.replace(scheme, group_size=group * n // m)
    dense = to_tensor(name, torch.from_numpy(kept), scales, zeros, stored)
    return Tensor(name, dense.kind, (rows, k), dict(dense.arrays, sparse_index=index), group, dense.symmetric,
                  sparsity=(n, m))


def quantize_to_tensor(name: str, w: torch.Tensor, scheme: Scheme, ratio: torch.Tensor | float = 1.0) -> Tensor:
    """Round-to-nearest of w (rows, k) with per-group ratios (rows, n_groups) or a scalar."""
    rows, k = w.shape
    g = scheme.group_for(k)
    codes, scales, zeros = [], [], []
    for j in range(0, k, g):
        part = w[:, j:j + g]
        r = ratio if not torch.is_tensor(ratio) or ratio.ndim < 2 else ratio[:, j // g]
        s, z = group_params(part, scheme, r)
        codes.append(codes_of(part, s, z, scheme))
        scales.append(s)
        zeros.append(z)
    return to_tensor(name, torch.cat(codes, 1), torch.cat(scales, 1), torch.cat(zeros, 1), scheme)


CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 .. 0.5; 1.0 first so ties keep min/max


def output_clip_search(w: torch.Tensor, h: torch.Tensor, scheme: Scheme, grid=CLIP_GRID) -> torch.Tensor:
    """Per-group clipping ratios (rows, n_groups) minimizing each group's output error eᵀ H_gg e.

    h is the (k, k) input Gram matrix XᵀX; like AWQ's clip search, groups are scored
    independently (the cross-group terms of the output error are ignored).
    """
    with one_thread():
        return _clip_search(w, h, scheme, grid)


def _clip_search(w: torch.Tensor, h: torch.Tensor, scheme: Scheme, grid) -> torch.Tensor:
    rows, k = w.shape
    g = scheme.group_for(k)
    best_r = torch.ones(rows, -(-k // g), device=w.device)
    for gi, j in enumerate(range(0, k, g)):
        part = w[:, j:j + g]
        hg = h[j:j + g, j:j + g]
        best = None
        for r in grid:
            s, z = group_params(part, scheme, r)
            e = dequant(codes_of(part, s, z, scheme), s, z, scheme) - part
            err = ((e @ hg) * e).sum(1)
            if best is None:
                best = err
                continue
            better = err < best
            best = torch.where(better, err, best)
            best_r[better, gi] = r
    return best_r
