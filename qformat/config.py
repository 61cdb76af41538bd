"""The dataclasses stored in a qbin header. The converter writes `asdict(...)` of each; the
runtime rebuilds them with `from_dict`, which ignores keys a newer minor version added."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass `cls` from a header dict, dropping unknown keys (forward compatibility)."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            continue
        sub = _NESTED.get((cls.__name__, key))
        kwargs[key] = from_dict(sub, value) if sub is not None and value is not None else value
    return cls(**kwargs)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: "linear" (positions / factor) or "llama3" (Llama 3.1 rule)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a decoder-only transformer of the Llama family."""

    arch: str  # "llama", "mistral", "qwen2", "qwen3"
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    rope_theta: float
    max_seq_len: int
    tie_embeddings: bool
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    @property
    def q_dim(self) -> int:
        """Width of the queries (and of attention's output): n_heads x head_dim."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the keys and of the values: n_kv_heads x head_dim."""
        return self.n_kv_heads * self.head_dim


@dataclass(frozen=True)
class SelfTestCase:
    text: str
    ids: list[int]


@dataclass(frozen=True)
class TokenizerInfo:
    """Where the tokenizer lives in the file and how to use it."""

    kind: str  # "hf-json" (tokenizers' tokenizer.json) or "sentencepiece" (model proto)
    tensor: str  # name of the "bytes" tensor holding the tokenizer file
    add_bos: bool = False
    selftest: list[SelfTestCase] = field(default_factory=list)

    def __post_init__(self) -> None:
        cases = [c if isinstance(c, SelfTestCase) else from_dict(SelfTestCase, c) for c in self.selftest]
        object.__setattr__(self, "selftest", cases)


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults from the checkpoint's generation_config.json (None: not given)."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class Provenance:
    """Where a file came from, so that it can be reproduced and audited."""

    source: str = ""
    source_files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    converter: str = ""
    command: str = ""
    scheme: str = ""
    method: str = ""
    calibration_sha256: str | None = None
    created: str = ""  # ISO 8601 UTC; the one field that differs between identical conversions
    # per-tensor schemes chosen for a budget (spec §2.4): target_bpw or max_kl, budget_bytes,
    # candidates, score, samples, predicted_kl; None when one scheme was asked for
    allocation: dict | None = None

    def __post_init__(self) -> None:
        # a header is untrusted input: wrong types must fail here, not later in qinfo
        for name in ("source", "converter", "command", "scheme", "method", "created"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string")
        if self.calibration_sha256 is not None and not isinstance(self.calibration_sha256, str):
            raise TypeError("calibration_sha256 must be a string or null")
        if self.allocation is not None and not isinstance(self.allocation, dict):
            raise TypeError("allocation must be an object or null")
        if not isinstance(self.source_files, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.source_files.items()):
            raise TypeError("source_files must map file names to SHA-256 strings")


_NESTED = {("ModelArgs", "rope_scaling"): RopeScaling}
