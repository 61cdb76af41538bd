"""Calibration data for GPTQ and AWQ: token windows, where they come from, and their hash.

Sources (the `--calib` option):
  "pydoc"  the built-in corpus of qformat.corpus (CPython's pydoc topics), second half of its token
           stream, so the windows perplexity is measured on are never calibrated on;
  "self"   text sampled from the unquantized model itself, starting from its BOS token (or a
           token of the pydoc stream when it has none): the model's own distribution, no domain;
  "mix"    half pydoc windows, half self-sampled windows;
  a path   a UTF-8 text file, tokenized whole.
Windows are drawn at seeded random offsets, so a conversion is reproducible; the SHA-256 of the
token matrix goes into the file's provenance.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qformat.corpus import calibration_ids, token_stream

BUILTIN_SOURCES = ("pydoc", "self", "mix")
# Measured on SmolLM2-135M, GPTQ int4-g64, 64 x 512 tokens (README): pydoc ppl 15.05 / prose 24.68,
# mix 15.24 / 24.47 (lowest KL and highest top-1 out of domain), self 16.27 / 25.24.
DEFAULT_SOURCE = "mix"
DEFAULT_SAMPLES = 128
DEFAULT_SEQLEN = 512


class CalibrationError(ValueError):
    """Calibration data that cannot be used; the message is one line naming the fix."""


@dataclass(frozen=True)
class Calibration:
    """A (samples, seqlen) matrix of token ids and a description of where it came from."""

    tokens: np.ndarray  # (samples, seqlen) int64
    source: str

    @property
    def sha256(self) -> str:
        """SHA-256 of the token ids as little-endian int32: identifies the exact data used."""
        return hashlib.sha256(np.ascontiguousarray(self.tokens, dtype="<i4").tobytes()).hexdigest()

    def describe(self) -> str:
        n, t = self.tokens.shape
        return f"{self.source}, {n} x {t} tokens, sha256 {self.sha256[:12]}"


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer through transformers (tokenizer.json or SentencePiece)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def sample_windows(ids: np.ndarray, samples: int, seqlen: int, seed: int = 0) -> np.ndarray:
    """`samples` windows of `seqlen` tokens at seeded random offsets of the stream `ids`.

    When the stream holds enough tokens the windows do not overlap (offsets are drawn from the
    non-overlapping tiling); otherwise offsets are drawn freely and windows may overlap.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < seqlen:
        raise CalibrationError(f"calibration text has {len(ids)} tokens, fewer than one window of "
                               f"{seqlen}; give a longer text or a smaller --calib-seqlen")
    rng = np.random.default_rng(seed)
    tiles = len(ids) // seqlen
    if tiles >= samples:
        starts = np.sort(rng.choice(tiles, size=samples, replace=False)) * seqlen
    else:
        starts = np.sort(rng.integers(0, len(ids) - seqlen + 1, size=samples))
    return np.stack([ids[s:s + seqlen] for s in starts])


def pydoc_ids(tokenizer) -> np.ndarray:
    """The calibration half of the built-in corpus' token stream."""
    return np.asarray(calibration_ids(token_stream(lambda t: _encode(tokenizer, t))), np.int64)


def self_sampled(model_dir: str | Path, tokenizer, samples: int, seqlen: int, seed: int = 0,
                 batch: int = 32) -> np.ndarray:
    """Windows of text sampled (temperature 1, no top-k/p) from the unquantized model itself.

    Each window starts with one token: BOS when the model has one, else a token of the pydoc
    stream, so generation needs no prompt data.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    bos = tokenizer.bos_token_id
    starts = np.full(samples, bos, np.int64) if bos is not None else sample_windows(pydoc_ids(tokenizer), samples, 1, seed)[:, 0]
    out = []
    with torch.no_grad():
        for i in range(0, samples, batch):
            ids = torch.as_tensor(starts[i:i + batch], device=device)[:, None]
            cache = None
            step = ids
            rows = [ids]
            for _ in range(seqlen - 1):
                res = model(input_ids=step, past_key_values=cache, use_cache=True)
                cache = res.past_key_values
                probs = torch.softmax(res.logits[:, -1].float(), dim=-1)
                step = torch.multinomial(probs, 1, generator=gen)
                rows.append(step)
            out.append(torch.cat(rows, dim=1).cpu().numpy())
    del model
    return np.concatenate(out, axis=0).astype(np.int64)


def cache_dir() -> Path:
    """Where sampled calibration windows are kept: $QFORMAT_CACHE/calib, else ~/.cache/qformat/calib
    (or $XDG_CACHE_HOME/qformat/calib)."""
    root = os.environ.get("QFORMAT_CACHE")
    if root:
        return Path(root) / "calib"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qformat" / "calib"


def cached_self_sampled(model_dir: str | Path, tokenizer, samples: int, seqlen: int, seed: int,
                        fingerprint: str | None) -> np.ndarray:
    """self_sampled, reusing an earlier draw of the same model (`fingerprint`: a hash of its
    files), sample count, length, seed and torch version: sampling SmolLM2-135M's 64 x 512 tokens
    takes minutes on a 2-core CPU, several times the quantization itself."""
    import torch

    if fingerprint is None:
        return self_sampled(model_dir, tokenizer, samples, seqlen, seed)
    key = hashlib.sha256(f"{fingerprint}|{samples}|{seqlen}|{seed}|{torch.__version__}".encode()).hexdigest()[:24]
    path = cache_dir() / f"self-{key}.npy"
    try:
        cached = np.load(path)
        if cached.shape == (samples, seqlen):
            return cached.astype(np.int64)
    except (OSError, ValueError):
        pass
    tokens = self_sampled(model_dir, tokenizer, samples, seqlen, seed)
    try:  # a cache that cannot be written costs time, never the conversion
        path.parent.mkdir(parents=True, exist_ok=True)
        # hidden and not .npy until renamed: a conversion killed here leaves no entry to mistake
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp", delete=False) as f:
            np.save(f, tokens.astype(np.int32))
        os.replace(f.name, path)
    except OSError:
        pass
    return tokens


def calibration_tokens(model_dir: str | Path, source: str = DEFAULT_SOURCE, samples: int = DEFAULT_SAMPLES,
                       seqlen: int = DEFAULT_SEQLEN, seed: int = 0, tokenizer=None,
                       fingerprint: str | None = None) -> Calibration:
    """The calibration matrix for `source` ("pydoc", "self", "mix" or a text file's path).

    fingerprint: a hash identifying the model's files; when given, self-sampled windows are
    cached under cache_dir() and reused by later conversions of the same model.
    """
    if samples < 1 or seqlen < 2:
        raise CalibrationError(f"calibration needs at least 1 sample of 2 tokens (got {samples} x {seqlen})")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
    if source == "pydoc":
        return Calibration(sample_windows(pydoc_ids(tokenizer), samples, seqlen, seed), "pydoc")
    if source == "self":
        return Calibration(cached_self_sampled(model_dir, tokenizer, samples, seqlen, seed, fingerprint), "self")
    if source == "mix":
        half = samples // 2
        parts = [sample_windows(pydoc_ids(tokenizer), samples - half, seqlen, seed)]
        if half:
            parts.append(cached_self_sampled(model_dir, tokenizer, half, seqlen, seed, fingerprint))
        return Calibration(np.concatenate(parts, axis=0), "mix")
    path = Path(source)
    if not path.is_file():
        raise CalibrationError(f"--calib {source!r}: no such file; give a UTF-8 text file or one of "
                               f"{', '.join(BUILTIN_SOURCES)}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path}: not UTF-8 text ({e}); convert it to UTF-8") from None
    ids = np.asarray(_encode(tokenizer, text), np.int64)
    return Calibration(sample_windows(ids, samples, seqlen, seed), f"file {path.name}")
