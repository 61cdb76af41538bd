"""Helpers for the format tests: sample files, raw file surgery, and an independent reference
of the packed-code layout and of dequantization, written from spec/qbin.md (not from
qformat.packing / qformat.schemes), so that a layout change in the library fails the tests."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import xxhash

from qformat import ModelArgs, QbinWriter, RopeScaling, Tensor, TokenizerInfo, parse_scheme
from qformat.config import GenerationDefaults, Provenance, SelfTestCase
from qformat.constants import ALIGNMENT, MAGIC, PREAMBLE, PREAMBLE_SIZE, NF4_LEVELS
from qformat.schemes import KINDS, quantize_rtn

# ---------------------------------------------------------------------------- raw files


def align_up(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def write_raw(path: Path, header: dict | str | bytes, data: bytes = b"", *, magic: bytes = MAGIC,
              major: int = 1, minor: int = 0, header_len: int | None = None, file_size: int | None = None,
              checksum: int | None = None) -> Path:
    """Write preamble + header + zero padding + data. Every preamble field is correct unless
    overridden, so a test breaks exactly one thing."""
    if isinstance(header, dict):
        raw = json.dumps(header, separators=(",", ":")).encode()
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = header
    body = raw + b"\0" * (align_up(PREAMBLE_SIZE + len(raw)) - PREAMBLE_SIZE - len(raw)) + data
    size = PREAMBLE_SIZE + len(body)
    preamble = PREAMBLE.pack(magic, major, minor, len(raw) if header_len is None else header_len,
                             size if file_size is None else file_size,
                             xxhash.xxh3_64_intdigest(raw) if checksum is None else checksum)
    Path(path).write_bytes(preamble + body)
    return Path(path)


def read_raw(path: Path) -> tuple[dict, dict, bytes]:
    """(preamble fields, header dict, data section bytes) of a well-formed file."""
    blob = Path(path).read_bytes()
    magic, major, minor, header_len, file_size, digest = PREAMBLE.unpack(blob[:PREAMBLE_SIZE])
    header = json.loads(blob[PREAMBLE_SIZE:PREAMBLE_SIZE + header_len])
    data = blob[align_up(PREAMBLE_SIZE + header_len):]
    pre = {"magic": magic, "major": major, "minor": minor}
    return pre, header, data


def rewrite_header(path: Path, mutate: Callable[[dict], object], out: Path | None = None, **preamble) -> Path:
    """Apply `mutate` to the header of `path` and write the file again (to `out`, default in
    place) with a correct length, size and checksum; data offsets are relative to the data
    section, so the data stays valid. `preamble` overrides write_raw's keyword fields."""
    pre, header, data = read_raw(path)
    mutate(header)
    kwargs = {"magic": pre["magic"], "major": pre["major"], "minor": pre["minor"], **preamble}
    return write_raw(out or path, header, data, **kwargs)


def array_entry(arr: np.ndarray, dtype: str, offset: int) -> dict:
    """A directory entry for `arr` stored at `offset` of the data section."""
    buf = np.ascontiguousarray(arr).tobytes()
    return {"dtype": dtype, "shape": list(arr.shape), "offset": offset, "nbytes": len(buf),
            "xxh3": xxhash.xxh3_64_hexdigest(buf)}


def flip_byte(path: Path, offset: int) -> None:
    """Invert every bit of one byte of the file."""
    blob = bytearray(Path(path).read_bytes())
    blob[offset] ^= 0xFF
    Path(path).write_bytes(bytes(blob))


# ---------------------------------------------------------------------------- sample files


def model_args(**overrides) -> ModelArgs:
    base = dict(arch="llama", vocab_size=64, dim=48, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=12,
                ffn_dim=64, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=256, tie_embeddings=False,
                rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), bos_token_id=1,
                eos_token_ids=[2, 3], pad_token_id=0)
    base.update(overrides)
    return ModelArgs(**base)


TOKENIZER_BYTES = b'{"version": "1.0", "model": {"type": "BPE"}}'


def metadata() -> dict:
    """finish() keyword arguments exercising every metadata dataclass."""
    return dict(
        model=model_args(),
        tokenizer=TokenizerInfo("hf-json", "tokenizer", add_bos=True,
                                selftest=[SelfTestCase("Hello world", [5, 6]), SelfTestCase("", [])]),
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
        generation=GenerationDefaults(temperature=0.6, top_p=0.9, max_new_tokens=64),
        provenance=Provenance(source="tiny", source_files={"model.safetensors": "ab" * 32},
                              converter="qconvert 0.1.0", command="qconvert tiny -o x.qbin",
                              scheme="int4-g32", method="rtn", calibration_sha256=None,
                              created="2026-01-01T00:00:00Z"),
    )


def add_outliers(t: Tensor, rng: np.random.Generator, per_row: int = 2, cols_dtype=np.int32) -> Tensor:
    rows, k = t.shape
    counts = rng.integers(0, per_row + 1, rows)
    rowptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    cols = np.concatenate([np.sort(rng.choice(k, c, replace=False)) for c in counts]).astype(cols_dtype)
    t.arrays["outlier_rowptr"] = rowptr
    t.arrays["outlier_cols"] = cols
    t.arrays["outlier_values"] = rng.standard_normal(int(rowptr[-1])).astype(np.float16)
    return t


def add_fp_cols(t: Tensor, rng: np.random.Generator, n: int = 3) -> Tensor:
    """16-bit columns on n random channels; the dense part stores zero there (spec §6.4)."""
    rows, k = t.shape
    cols = np.sort(rng.choice(k, n, replace=False))
    zero_dense_channels(t, cols)
    t.arrays["fp_cols"] = cols.astype(np.int32)
    t.arrays["fp_weight"] = rng.standard_normal((rows, n)).astype(np.float16)
    return t


def zero_dense_channels(t: Tensor, channels: np.ndarray) -> None:
    """Set t's codes for input channels `channels` (original numbering, through perm and n:m
    positions) to the code of zero: its group's zero-point, 2^(bits-1) when symmetric, NF4's 0."""
    from qformat.packing import pack_codes, unpack_codes
    from qformat.schemes import unpack_nm_index

    a = t.arrays
    rows, k = t.shape
    bits = KINDS[t.kind].bits
    group = min(t.group_size, k)
    if t.sparsity is not None:
        n, m = t.sparsity
        kc, gc = k * n // m, group * n // m
        stored = (np.arange(kc) // n) * m + unpack_nm_index(np.asarray(a["sparse_index"]), kc, m)
    else:
        kc, gc = k, group
        stored = np.broadcast_to(np.arange(k), (rows, k))
    channel = np.asarray(a["perm"])[stored] if "perm" in a else stored
    codes = unpack_codes(np.asarray(a["codes"]), kc, gc, bits)
    if "zeros" in a:
        zero = np.asarray(a["zeros"])[:, np.arange(kc) // gc]
    else:
        code = int(np.flatnonzero(NF4_LEVELS == 0.0)[0]) if KINDS[t.kind].nf4 else 2 ** (bits - 1)
        zero = np.full((rows, kc), code, np.uint8)
    hit = np.isin(channel, channels)
    codes[hit] = zero[hit]
    a["codes"] = pack_codes(codes, gc, bits)


def add_offsets(t: Tensor, rng: np.random.Generator) -> Tensor:
    """An affine tensor with its zeros replaced by float16 offsets (spec §4.2): -s·z plus a
    random fraction of a step, so that no integer zero-point could express the grid."""
    s = np.asarray(t.arrays["scales"], np.float32)
    z = (np.asarray(t.arrays.pop("zeros"), np.float32) if "zeros" in t.arrays
         else np.full(s.shape, 2.0 ** (BITS[t.kind] - 1), np.float32))
    t.arrays["offsets"] = (-s * (z + rng.uniform(-0.5, 0.5, z.shape))).astype(np.float16)
    return Tensor(t.name, t.kind, t.shape, t.arrays, t.group_size, False, t.sparsity, t.activation)


def add_perm(t: Tensor, rng: np.random.Generator) -> Tensor:
    t.arrays["perm"] = rng.permutation(t.shape[1]).astype(np.int32)
    return t


def pack_positions_2of4(pos: np.ndarray) -> np.ndarray:
    """Spec §6.3 for m = 4: 2-bit positions, four per byte, least significant bits first."""
    rows, kept = pos.shape
    padded = np.zeros((rows, -(-kept // 4) * 4), np.uint8)
    padded[:, :kept] = pos
    quads = padded.reshape(rows, -1, 4).astype(np.uint32)
    return (quads[..., 0] | quads[..., 1] << 2 | quads[..., 2] << 4 | quads[..., 3] << 6).astype(np.uint8)


def sparse_2of4(name: str, rows: int, k: int, group: int, kind: str, symmetric: bool,
                rng: np.random.Generator) -> Tensor:
    """A 2:4-sparse grouped tensor: the kept values are quantized as a dense (rows, k/2) tensor
    with group size group/2, and their in-block positions go to sparse_index."""
    kept = rng.standard_normal((rows, k // 2)).astype(np.float32)
    dense = quantize_rtn(name, kept, KINDS[kind], group // 2, symmetric)
    blocks = np.stack([np.sort(rng.choice(4, 2, replace=False)) for _ in range(rows * k // 4)])
    pos = blocks.reshape(rows, k // 2).astype(np.uint8)
    arrays = dict(dense.arrays, sparse_index=pack_positions_2of4(pos))
    return Tensor(name, kind, (rows, k), arrays, group, dense.symmetric, sparsity=(2, 4))


def sample_tensors(seed: int = 0) -> list[Tensor]:
    """A small model's worth of tensors covering every kind, dtype and sidecar the writer accepts."""
    rng = np.random.default_rng(seed)
    a = model_args()
    w = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    qdim = a.n_heads * a.head_dim
    kvdim = a.n_kv_heads * a.head_dim
    tensors = [
        parse_scheme("int4-g32").quantize("tok_embeddings", w(a.vocab_size, a.dim)),  # partial groups
        parse_scheme("f32").quantize("layers.0.attn_norm", w(a.dim)),
        add_perm(parse_scheme("nf4-g16").quantize("layers.0.attn.wq", w(qdim, a.dim)), rng),
        parse_scheme("bf16").quantize("layers.0.attn.wk", w(kvdim, a.dim)),
        parse_scheme("f16").quantize("layers.0.attn.wv", w(kvdim, a.dim)),
        add_outliers(parse_scheme("int3-g24-sym").quantize("layers.0.attn.wo", w(a.dim, qdim)), rng,
                     cols_dtype=np.uint16),
        parse_scheme("f32").quantize("layers.0.ffn_norm", w(a.dim)),
        add_fp_cols(add_outliers(parse_scheme("int3-g40").quantize("layers.0.ffn.w1", w(a.ffn_dim, a.dim)), rng), rng),
        parse_scheme("int8-g16-asym").quantize("layers.0.ffn.w3", w(a.ffn_dim, a.dim)),
        sparse_2of4("layers.0.ffn.w2", a.dim, a.ffn_dim, 16, "q2", False, rng),
        parse_scheme("f32").quantize("norm", w(a.dim)),
        parse_scheme("int8").quantize("output", w(a.vocab_size, a.dim)),  # per-channel, symmetric
    ]
    return tensors


def write_sample(path: Path, seed: int = 0, overwrite: bool = False) -> tuple[Path, dict[str, Tensor]]:
    """Write the sample model; returns (path, name -> the Tensor that was written)."""
    tensors = sample_tensors(seed)
    with QbinWriter(path, overwrite=overwrite) as wr:
        for t in tensors:
            wr.add_tensor(t)
        wr.add_bytes("tokenizer", TOKENIZER_BYTES)
        wr.finish(**metadata())
    return Path(path), {t.name: t for t in tensors}


# ---------------------------------------------------------------------------- reference (spec §4-§6)


def ref_unpack_planar(group_bytes: np.ndarray, bits: int) -> np.ndarray:
    """Spec §5: byte j holds code i*S + j in bits [i*b, (i+1)*b)."""
    s = len(group_bytes)
    codes = np.zeros(s * 8 // bits, np.uint8)
    for i in range(8 // bits):
        codes[i * s:(i + 1) * s] = (group_bytes >> (i * bits)) & ((1 << bits) - 1)
    return codes


def ref_pack_planar(codes: np.ndarray, bits: int) -> np.ndarray:
    s = len(codes) * bits // 8
    out = np.zeros(s, np.uint8)
    for i in range(8 // bits):
        out |= (codes[i * s:(i + 1) * s].astype(np.uint8) << (i * bits)).astype(np.uint8)
    return out


def ref_group_lengths(k: int, group: int) -> list[int]:
    return [min(group, k - start) for start in range(0, k, group)]


def ref_pack_row(row: np.ndarray, group: int, bits: int) -> np.ndarray:
    """Pack one row of codes per spec §5, group by group."""
    out = []
    for start, length in zip(range(0, len(row), group), ref_group_lengths(len(row), group)):
        padded = np.zeros(-(-length // 8) * 8, np.uint8)
        padded[:length] = row[start:start + length]
        if bits == 3:
            out += [ref_pack_planar(padded & 3, 2), ref_pack_planar(padded >> 2, 1)]
        else:
            out.append(ref_pack_planar(padded, bits))
    return np.concatenate(out) if out else np.zeros(0, np.uint8)


SPEC_PLANES = {3: (2, 1), 5: (4, 1), 6: (4, 2)}


def ref_unpack_row(packed: np.ndarray, k: int, group: int, bits: int) -> np.ndarray:
    codes, pos = [], 0
    for length in ref_group_lengths(k, group):
        p = -(-length // 8) * 8
        if bits in SPEC_PLANES:  # spec §5's table: (low width, high width)
            lo_w, hi_w = SPEC_PLANES[bits]
            split = pos + p * lo_w // 8
            low = ref_unpack_planar(packed[pos:split], lo_w)
            high = ref_unpack_planar(packed[split:pos + p * bits // 8], hi_w)
            group_codes = low | (high << lo_w)
        else:
            group_codes = ref_unpack_planar(packed[pos:pos + p * bits // 8], bits)
        codes.append(group_codes[:length])
        pos += p * bits // 8
    assert pos == len(packed), "row length disagrees with the spec's row_bytes"
    return np.concatenate(codes) if codes else np.zeros(0, np.uint8)


BITS = {"q8": 8, "q6": 6, "q5": 5, "q4": 4, "q3": 3, "q2": 2, "nf4": 4}


def ref_dequantize(t: Tensor) -> np.ndarray:
    """Spec §4.1 and §6, written independently of qformat.schemes (float64 then float32)."""
    if t.kind in ("f32", "f16"):
        return np.asarray(t.arrays["data"], np.float64).astype(np.float32)
    if t.kind == "bf16":
        return (t.arrays["data"].astype(np.uint32) << 16).view(np.float32)
    rows, k = t.shape
    bits = BITS[t.kind]
    n, m = t.sparsity or (1, 1)
    kc, gc = k * n // m, t.group_size * n // m
    dense = np.zeros((rows, kc))
    for r in range(rows):
        q = ref_unpack_row(np.asarray(t.arrays["codes"][r]), kc, gc, bits).astype(np.float64)
        g = np.arange(kc) // gc
        s = t.arrays["scales"][r].astype(np.float64)[g]
        if t.kind == "nf4":
            dense[r] = s * NF4_LEVELS.astype(np.float64)[q.astype(int)]
        elif "offsets" in t.arrays:  # §4.2: a float minimum per group, no zero-point
            dense[r] = s * q + t.arrays["offsets"][r].astype(np.float64)[g]
        else:
            z = t.arrays["zeros"][r].astype(np.float64)[g] if not t.symmetric else 2.0 ** (bits - 1)
            dense[r] = s * (q - z)
    w = dense
    if t.sparsity is not None:
        w = np.zeros((rows, k))
        idx = np.asarray(t.arrays["sparse_index"])
        for r in range(rows):
            for j in range(kc):
                p = (int(idx[r, j * 2 // 8]) >> (2 * (j % 4))) & 3 if m == 4 else \
                    (int(idx[r, j // 2]) >> (4 * (j % 2))) & 15
                w[r, (j // n) * m + p] = dense[r, j]
    if "perm" in t.arrays:
        unperm = np.zeros_like(w)
        for j, channel in enumerate(t.arrays["perm"]):
            unperm[:, channel] = w[:, j]
        w = unperm
    if "outlier_rowptr" in t.arrays:
        ptr = t.arrays["outlier_rowptr"]
        for r in range(rows):
            for e in range(ptr[r], ptr[r + 1]):
                w[r, int(t.arrays["outlier_cols"][e])] += float(t.arrays["outlier_values"][e])
    if "fp_cols" in t.arrays:
        for c, channel in enumerate(t.arrays["fp_cols"]):
            w[:, channel] += t.arrays["fp_weight"][:, c].astype(np.float64)
    return w.astype(np.float32)


def tensor_nbytes(t: Tensor) -> int:
    return sum(np.asarray(a).nbytes for a in t.arrays.values())


def n_params(t: Tensor) -> int:
    return math.prod(t.shape)

