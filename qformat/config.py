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
    """RoPE frequency scaling. kind: "linear" (positions / factor), "llama3" (Llama 3.1 rule) or
    "longrope" (Phi-3: per-frequency divisors, short_factor up to original_max_position
    positions of context and long_factor past it, cos and sin times attention_factor)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    short_factor: list[float] = field(default_factory=list)
    long_factor: list[float] = field(default_factory=list)
    attention_factor: float = 1.0

    def __post_init__(self) -> None:
        # a header is untrusted input
        numbers = (self.factor, self.low_freq_factor, self.high_freq_factor, self.attention_factor)
        if not isinstance(self.kind, str) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                 for v in numbers):
            raise ValueError("rope_scaling needs a kind and numeric factors")
        for factors in (self.short_factor, self.long_factor):
            if not isinstance(factors, list) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                    for v in factors):
                raise ValueError("rope_scaling short_factor and long_factor must be lists of numbers")


# The RoPE tables a layer may rotate by (qformat.rope.rope_variants): the model's (rope_theta,
# rope_scaling), the local one of sliding layers (rope_local_theta), and none (the identity).
ROPE_GLOBAL, ROPE_LOCAL, ROPE_NONE = 0, 1, 2
LAYER_TYPES = ("full", "sliding")
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a decoder-only transformer of the Llama family."""

    arch: str  # "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2", "smollm3", "phi3", "mixtral", ...
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
    # per layer "full" or "sliding" (only "sliding" layers keep to sliding_window); empty: every
    # layer is "sliding" when sliding_window is set (Mistral), else "full"
    layer_types: list[str] = field(default_factory=list)
    rope_local_theta: float | None = None  # the RoPE base of "sliding" layers, unscaled (Gemma 3)
    nope_layers: list[int] = field(default_factory=list)  # layers without RoPE (SmolLM3)
    activation: str = "silu"  # the gated MLP's activation: "silu" or "gelu_tanh" (GeGLU, Gemma)
    embed_scale: float | None = None  # the embeddings' rows are multiplied by it (Gemma: sqrt(dim))
    pre_norms: bool = True  # RMSNorm before attention and before the MLP (all but OLMo 2)
    post_norms: bool = False  # RMSNorm of attention's and the MLP's outputs before the residual add
    qk_norm_per_head: bool = True  # q/k norm over each head (Qwen3, Gemma 3) or the whole projection (OLMo 2)
    attn_scale: float | None = None  # attention's score scale; None: 1 / sqrt(head_dim)
    attn_softcap: float | None = None  # scores ← cap · tanh(scores / cap) before the softmax (Gemma 2)
    final_softcap: float | None = None  # the same on the logits (Gemma 2)
    rotary_dim: int | None = None  # RoPE rotates the first rotary_dim dims of each head (Phi-4-mini); None: all
    # mixture of experts (Mixtral, Qwen3-MoE): every layer's MLP is n_experts SwiGLU experts of
    # ffn_dim, experts_per_token of them chosen per token by the router's softmax (renormalized
    # over the chosen with norm_topk); 0: one dense MLP
    n_experts: int = 0
    experts_per_token: int = 0
    norm_topk: bool = True
    # a shared expert beside the routed ones (Qwen2-MoE): a SwiGLU MLP of shared_ffn_dim that every
    # token runs, its output times sigmoid(shared_gate · x); 0: none
    shared_ffn_dim: int = 0
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        # a header is untrusted input: the block fields must have their types, and per-layer
        # tables must fit the layers the steps index
        for name in ("rope_local_theta", "embed_scale", "attn_scale", "attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number or null")
        for name in ("n_experts", "experts_per_token", "rotary_dim", "shared_ffn_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer")
        for name in ("pre_norms", "post_norms", "qk_norm_per_head", "norm_topk"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false")
        if not isinstance(self.layer_types, list) or not isinstance(self.nope_layers, list):
            raise ValueError("layer_types and nope_layers must be lists")
        if self.layer_types and (len(self.layer_types) != self.n_layers
                                 or any(t not in LAYER_TYPES for t in self.layer_types)):
            raise ValueError(f"layer_types must list {self.n_layers} of {', '.join(LAYER_TYPES)}")
        if any(not isinstance(i, int) or not 0 <= i < self.n_layers for i in self.nope_layers):
            raise ValueError(f"nope_layers must be layer indices below {self.n_layers}")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim must be even and at most head_dim {self.head_dim}")
        sc = self.rope_scaling
        if sc is not None and sc.kind == "longrope" and not (
                len(sc.short_factor) == len(sc.long_factor) == self.rope_dim // 2):
            raise ValueError(f"longrope short_factor and long_factor must each hold rotary dims / 2 = "
                             f"{self.rope_dim // 2} values")
        if self.moe and not 0 < self.experts_per_token <= self.n_experts:
            raise ValueError(f"experts_per_token must be 1..n_experts ({self.n_experts})")
        if self.shared_ffn_dim and (not self.moe or self.post_norms):
            raise ValueError("shared_ffn_dim needs a mixture of experts without post-norms")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")

    @property
    def q_dim(self) -> int:
        """Width of the queries (and of attention's output): n_heads x head_dim."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the keys and of the values: n_kv_heads x head_dim."""
        return self.n_kv_heads * self.head_dim

    @property
    def moe(self) -> bool:
        """Whether the MLPs are mixtures of experts."""
        return self.n_experts > 0

    @property
    def shared_expert(self) -> bool:
        """Whether each mixture has a shared expert (shared_ffn_dim > 0)."""
        return self.shared_ffn_dim > 0

    @property
    def shared_gate_rows(self) -> int:
        """Rows of the shared expert's gate: one logit per token."""
        return 1

    @property
    def gate_rows(self) -> int:
        """Rows of the gate and up tensors: every expert's stacked (ffn_dim each), or ffn_dim."""
        return self.n_experts * self.ffn_dim if self.moe else self.ffn_dim

    @property
    def down_rows(self) -> int:
        """Rows of the down tensor: every expert's stacked (dim each), or dim."""
        return self.n_experts * self.dim if self.moe else self.dim

    @property
    def rope_dim(self) -> int:
        """How many dims of each head RoPE rotates (the tables' width is half of it)."""
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim

    @property
    def q_norm_dim(self) -> int:
        """Width of the q norm's weight: one head, or all of q (qk_norm_per_head false)."""
        return self.head_dim if self.qk_norm_per_head else self.q_dim

    @property
    def k_norm_dim(self) -> int:
        """Width of the k norm's weight: one head, or all of k."""
        return self.head_dim if self.qk_norm_per_head else self.kv_dim

    def window_of(self, layer: int) -> int | None:
        """The sliding window of decoder layer `layer` (None: it attends to every position)."""
        if self.sliding_window is None:
            return None
        return self.sliding_window if not self.layer_types or self.layer_types[layer] == "sliding" else None

    def rope_of(self, layer: int) -> int:
        """Which of qformat.rope.rope_variants' tables layer `layer` rotates by."""
        if layer in self.nope_layers:
            return ROPE_NONE
        local = self.rope_local_theta is not None and self.layer_types and self.layer_types[layer] == "sliding"
        return ROPE_LOCAL if local else ROPE_GLOBAL


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
