"""RoPE's tables from ModelArgs (spec §2.1: rope_theta and rope_scaling, rope_local_theta,
nope_layers), in float32 NumPy, for every backend: the attention step of qformat.block rotates
by one of these (its `rope` field indexes rope_variants)."""
from __future__ import annotations

import math

import numpy as np

from .config import ROPE_LOCAL, ROPE_NONE, ModelArgs


def rope_variants(args: ModelArgs) -> tuple[int, ...]:
    """The RoPE tables some layer of the model uses (config.ROPE_GLOBAL, ROPE_LOCAL, ROPE_NONE),
    in that order: an attention step's `rope` is its table's index here."""
    return tuple(sorted({args.rope_of(layer) for layer in range(args.n_layers)}))


def model_rope_tables(args: ModelArgs, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (len(rope_variants), n_positions, rope_dim // 2) float32 for a context of
    n_positions: the global table (rope_theta, rope_scaling), the local one (rope_local_theta,
    unscaled) and for layers without RoPE the identity (cos 1, sin 0: the rotation leaves q and k
    exactly as they are)."""
    tables = []
    for variant in rope_variants(args):
        if variant == ROPE_NONE:
            half = args.rope_dim // 2
            tables.append((np.ones((n_positions, half), np.float32), np.zeros((n_positions, half), np.float32)))
            continue
        local = variant == ROPE_LOCAL
        cos, sin = rope_tables(rope_inv_freq(args, local, n_positions), n_positions)
        sc = args.rope_scaling
        if not local and sc is not None and sc.kind == "longrope" and sc.attention_factor != 1.0:
            cos, sin = cos * np.float32(sc.attention_factor), sin * np.float32(sc.attention_factor)
        tables.append((cos, sin))
    return np.stack([c for c, _ in tables]), np.stack([s for _, s in tables])


def rope_inv_freq(args: ModelArgs, local: bool = False, n_positions: int | None = None) -> np.ndarray:
    """RoPE inverse frequencies (rope_dim / 2,), with linear, Llama 3 or LongRoPE scaling, in
    float32; local: those of sliding layers (rope_local_theta, no scaling). LongRoPE divides by
    its long factors when the context (n_positions) exceeds original_max_position, as
    transformers does for a sequence that long (llama.cpp decides by its context alike)."""
    hd = args.rope_dim  # partial rotary: frequencies over the rotated dims only
    theta = args.rope_local_theta if local else args.rope_theta
    inv = (1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))).astype(np.float32)
    sc = None if local else args.rope_scaling
    if sc is None:
        return inv
    if sc.kind == "longrope":
        long = n_positions is not None and n_positions > sc.original_max_position
        ext = np.asarray(sc.long_factor if long else sc.short_factor, np.float32)
        exponents = np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)
        return (np.float32(1.0) / (ext * np.power(np.float32(theta), exponents))).astype(np.float32)
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
    raise NotImplementedError(f"RoPE scaling kind {sc.kind!r} is not supported (known: linear, llama3, longrope)")


def rope_tables(inv_freq: np.ndarray, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables (n_positions, inv_freq.size) in float32, as transformers computes them."""
    pos = np.arange(n_positions, dtype=np.float32)
    freqs = pos[:, None] * inv_freq[None, :].astype(np.float32)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)
