"""Random-weight qbin files of a given Llama shape, written straight from quantized arrays.

Speed does not depend on the weights' values, and a 7B model converted from a Hugging Face
checkpoint would need tens of GB of float weights first. Here each layer linear is one block of
random normal rows quantized by the scheme's NumPy quantizer, tiled to the full height (so its
codes and scales are distributed like real ones); norms are ones; embeddings are f16 and the
head int8 below 8 bits, as qconvert's --embed/--head auto stores them. No tokenizer: drive the
model with token ids (runtime.model.Transformer).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qformat import tensors as T
from qformat.config import ModelArgs, Provenance
from qformat.schemes import KINDS, Tensor, float_tensor, parse_scheme
from qformat.writer import QbinWriter

SHAPES = {
    "llama2-7b": ModelArgs(arch="llama", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                           head_dim=128, ffn_dim=11008, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
                           tie_embeddings=False, bos_token_id=1, eos_token_ids=[2]),
    "tiny": ModelArgs(arch="llama", vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=64, ffn_dim=512, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
                      tie_embeddings=False, bos_token_id=1, eos_token_ids=[2]),
    # Mixtral-like but small: 8 experts of 1408, 2 per token; and the dense model of the same
    # active parameters (one MLP of 2 x 1408), for bench_decode.py --synthetic
    "moe-8x2": ModelArgs(arch="mixtral", vocab_size=32000, dim=1024, n_layers=12, n_heads=16, n_kv_heads=4,
                         head_dim=64, ffn_dim=1408, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
                         tie_embeddings=False, bos_token_id=1, eos_token_ids=[2], n_experts=8, experts_per_token=2),
    "moe-8x2-dense": ModelArgs(arch="llama", vocab_size=32000, dim=1024, n_layers=12, n_heads=16, n_kv_heads=4,
                               head_dim=64, ffn_dim=2816, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
                               tie_embeddings=False, bos_token_id=1, eos_token_ids=[2]),
}
# Rows quantized per tensor before tiling.
BLOCK_ROWS = 256


def random_linear(name: str, rows: int, cols: int, scheme: str, rng: np.random.Generator) -> Tensor:
    """A `scheme` tensor of shape (rows, cols): BLOCK_ROWS random rows quantized, then tiled."""
    block = rng.standard_normal((min(rows, BLOCK_ROWS), cols)).astype(np.float32) * 0.02
    if scheme == "f16":
        t = float_tensor(name, block, "f16")
    else:
        t = parse_scheme(scheme).quantize(name, block)
    reps = -(-rows // block.shape[0])
    arrays = {role: np.ascontiguousarray(np.tile(a, (reps,) + (1,) * (a.ndim - 1))[:rows])
              for role, a in t.arrays.items()}
    return Tensor(name, t.kind, (rows, cols), arrays, t.group_size, t.symmetric)


def write_random_qbin(path: Path, args: ModelArgs, scheme: str, seed: int = 0) -> Path:
    """Write (once; reused when present) a random `scheme` model of shape `args` at path."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    low_bits = scheme != "f16" and KINDS[parse_scheme(scheme).kind].bits < 8
    head_scheme = "int8" if low_bits else scheme
    with QbinWriter(path, overwrite=True) as w:
        for entry, layer in T.file_order(args.n_layers, lambda t: t.present(args)):
            name, shape = entry.name(layer), entry.shape_of(args)
            if entry.role in ("norm", "bias"):
                w.add_tensor(float_tensor(name, np.ones(shape, np.float32), "f32"))
            elif entry.role == "router":  # random, so that tokens spread over the experts
                w.add_tensor(float_tensor(name, rng.standard_normal(shape).astype(np.float32), "f32"))
            else:
                tensor_scheme = {"embed": "f16", "head": head_scheme}.get(entry.role, scheme)
                w.add_tensor(random_linear(name, *shape, tensor_scheme, rng))
        w.finish(model=args, provenance=Provenance(source="random weights (bench/synthetic.py)", scheme=scheme,
                                                   method="random"))
    return path
