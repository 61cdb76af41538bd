"""Supported Hugging Face architectures, as data.

A new architecture of the Llama family adds a row to ARCHITECTURES (and, if it brings a new kind
of tensor, a row to TENSOR_MAP with the flag that enables it); no code changes elsewhere.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """How one HF architecture maps onto qbin's ModelArgs and tensor names."""

    hf_name: str  # config.json "architectures"[0]
    arch: str  # ModelArgs.arch
    qkv_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    # config key holding the sliding-window size, honoured only when `sliding_window_switch`
    # is absent or true in config.json (Qwen2/3 keep the key but switch the window off).
    sliding_window_key: str | None = None
    sliding_window_switch: str | None = None


ARCHITECTURES: dict[str, Architecture] = {
    a.hf_name: a
    for a in (
        Architecture("LlamaForCausalLM", "llama"),
        Architecture("MistralForCausalLM", "mistral", sliding_window_key="sliding_window"),
        Architecture("Qwen2ForCausalLM", "qwen2", qkv_bias=True,
                     sliding_window_key="sliding_window", sliding_window_switch="use_sliding_window"),
        Architecture("Qwen3ForCausalLM", "qwen3", qk_norm=True,
                     sliding_window_key="sliding_window", sliding_window_switch="use_sliding_window"),
    )
}


@dataclass(frozen=True)
class TensorRule:
    """One HF tensor name pattern -> qbin name. `role` decides how the tensor is stored.

    roles: "embed" (token embeddings), "head" (LM head), "linear" (a quantizable projection),
    "norm" and "bias" (kept in float32). `needs` names the Architecture flag that must be set
    for the tensor to exist.
    """

    hf: str  # "{i}" stands for the layer index
    qbin: str
    role: str
    needs: str | None = None

    def hf_name(self, layer: int | None = None) -> str:
        return self.hf.format(i=layer)

    def qbin_name(self, layer: int | None = None) -> str:
        return self.qbin.format(i=layer)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


# Order here is the order tensors are written in (and so the file's byte order).
TENSOR_MAP: tuple[TensorRule, ...] = (
    TensorRule("model.embed_tokens.weight", "tok_embeddings", "embed"),
    TensorRule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm", "norm"),
    TensorRule("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.wq", "linear"),
    TensorRule("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.attn.bq", "bias", "qkv_bias"),
    TensorRule("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.wk", "linear"),
    TensorRule("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.attn.bk", "bias", "qkv_bias"),
    TensorRule("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.wv", "linear"),
    TensorRule("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.attn.bv", "bias", "qkv_bias"),
    TensorRule("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.wo", "linear"),
    TensorRule("model.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attn.q_norm", "norm", "qk_norm"),
    TensorRule("model.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attn.k_norm", "norm", "qk_norm"),
    TensorRule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm", "norm"),
    TensorRule("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.ffn.w1", "linear"),
    TensorRule("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.ffn.w3", "linear"),
    TensorRule("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.ffn.w2", "linear"),
    TensorRule("model.norm.weight", "norm", "norm"),
    TensorRule("lm_head.weight", "output", "head"),
)

# Checkpoint entries that carry no weights (old Llama checkpoints saved RoPE's inverse
# frequencies as a buffer); they are recomputed from the config and never read.
IGNORED_HF_TENSORS = (re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),)


def supported_names() -> str:
    """The supported HF architecture names, for error messages and help."""
    return ", ".join(ARCHITECTURES)


def lookup(hf_architecture: str) -> Architecture:
    """The Architecture for an HF name; ValueError naming the supported ones otherwise."""
    try:
        return ARCHITECTURES[hf_architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {hf_architecture}; supported: {supported_names()}") from None


def tensor_rules(arch: Architecture, n_layers: int) -> list[tuple[str, str, str]]:
    """(hf name, qbin name, role) of every tensor the architecture can have, in write order.

    The LM head is listed last; it is absent from tied checkpoints.
    """
    out = []
    global_first = [r for r in TENSOR_MAP if not r.per_layer and r.role == "embed"]
    per_layer = [r for r in TENSOR_MAP if r.per_layer and (r.needs is None or getattr(arch, r.needs))]
    global_last = [r for r in TENSOR_MAP if not r.per_layer and r.role != "embed"]
    for r in global_first:
        out.append((r.hf_name(), r.qbin_name(), r.role))
    for i in range(n_layers):
        for r in per_layer:
            out.append((r.hf_name(i), r.qbin_name(i), r.role))
    for r in global_last:
        out.append((r.hf_name(), r.qbin_name(), r.role))
    return out
