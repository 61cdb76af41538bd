"""RoPE's tables from ModelArgs (spec §2.1: rope_theta and rope_scaling), in float32 NumPy, for
every backend: the attention step of qformat.block rotates by these."""
from __future__ import annotations

import math

import numpy as np

from .config import ModelArgs


def rope_inv_freq(args: ModelArgs) -> np.ndarray:
    """RoPE inverse frequencies (head_dim / 2,), with linear or Llama 3 scaling, in float32."""
    hd = args.head_dim
    inv = (1.0 / (args.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))).astype(np.float32)
    sc = args.rope_scaling
    if sc is None:
        return inv
    if sc.kind == "linear":
        return (inv / np.float32(sc.factor)).astype(np.float32)
    if sc.kind == "llama3":
        low_wavelen = sc.original_max_position / sc.low_freq_factor
        high_wavelen = sc.original_max_position / sc.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
        smooth = (sc.original_max_position / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
        smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise NotImplementedError(f"RoPE scaling kind {sc.kind!r} is not supported (known: linear, llama3)")


def rope_tables(inv_freq: np.ndarray, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables (n_positions, head_dim // 2) in float32, as transformers computes them."""
    pos = np.arange(n_positions, dtype=np.float32)
    freqs = pos[:, None] * inv_freq[None, :].astype(np.float32)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)
