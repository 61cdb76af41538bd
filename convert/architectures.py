"""Supported Hugging Face architectures, as data.

A new architecture adds a row to ARCHITECTURES (and, if it brings a new kind of tensor, an entry
to qformat.tensors with the flag that enables it and its HF name here); what its blocks compute
differently comes from ModelArgs fields that hf_config.py reads from config.json. The flags of
Architecture are ModelArgs' (qkv_bias, qk_norm, pre_norms, post_norms), so a tensor's flag names
both.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from qformat import tensors as T


@dataclass(frozen=True)
class Architecture:
    """How one HF architecture maps onto qbin's ModelArgs and tensor names."""

    hf_name: str  # config.json "architectures"[0]
    arch: str  # ModelArgs.arch
    qkv_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    qk_norm: bool = False  # RMSNorm on q and k before RoPE (Qwen3, Gemma 3, OLMo 2)
    qk_norm_per_head: bool = True  # ... of each head, or of the whole projection (OLMo 2)
    pre_norms: bool = True  # input_layernorm / post_attention_layernorm before the sublayers
    post_norms: bool = False  # norms of the sublayers' outputs (Gemma 2/3 with pre-norms, OLMo 2 without)
    # config key holding the sliding-window size, honoured only when `sliding_window_switch`
    # is absent or true in config.json (Qwen2/3 keep the key but switch the window off).
    sliding_window_key: str | None = None
    sliding_window_switch: str | None = None
    # without config.json "layer_types": every `layer_pattern`-th layer is full, the others
    # sliding (Gemma 2: 2; Gemma 3: config key sliding_window_pattern, default 6)
    layer_pattern: int | None = None
    layer_pattern_key: str | None = None
    norm_offset: float = 0.0  # added to every norm weight at conversion: Gemma's norms multiply by (1 + w)
    embed_scale: bool = False  # the embeddings' rows are multiplied by sqrt(hidden_size) (Gemma)
    renames: tuple[tuple[T.TensorName, str], ...] = ()  # HF names that differ from T.HF_NAMES'
    # fused HF tensors split at conversion into the tensors listed, stacked along the rows in
    # that order, each with the ModelArgs field giving its rows (Phi-3's qkv_proj, gate_up_proj)
    splits: tuple[tuple[str, tuple[tuple[T.TensorName, str], ...]], ...] = ()
    # a mixture of experts: each qbin tensor stacked from its experts' HF tensors ("{e}" the
    # expert), and the config key of norm_topk (None: always renormalized, Mixtral)
    moe: bool = False
    stacks: tuple[tuple[T.TensorName, str], ...] = ()
    norm_topk_key: str | None = None
    shared_ffn_key: str | None = None  # config key of a shared expert's intermediate size (Qwen2-MoE)

    @property
    def shared_expert(self) -> bool:
        """Whether its mixtures have a shared expert (the flag of the shared expert's tensors)."""
        return self.shared_ffn_key is not None

    def split_parts(self, args, layer: int) -> list[tuple[str, list[tuple[str, int]]]]:
        """(fused HF name, [(HF name of a part, its rows), ...]) of each split tensor of a layer."""
        names = {**T.HF_NAMES, **dict(self.renames)}
        return [(fused.format(i=layer), [(names[t].format(i=layer), int(getattr(args, rows))) for t, rows in parts])
                for fused, parts in self.splits]

    def stack_parts(self, args, layer: int) -> list[tuple[str, list[str]]]:
        """(the stacked tensor's HF-side name, its experts' HF names in order) of each stacked
        tensor of a layer."""
        names = {**T.HF_NAMES, **dict(self.renames)}
        return [(names[t].format(i=layer), [part.format(i=layer, e=e) for e in range(args.n_experts)])
                for t, part in self.stacks]


# Gemma 2/3 and OLMo 2 name their norms by place: post_attention_layernorm is attention's
# post-norm there, not the MLP's pre-norm as in Llama.
_POST_NORMS = ((T.ATTN_POST_NORM, "model.layers.{i}.post_attention_layernorm.weight"),
               (T.FFN_POST_NORM, "model.layers.{i}.post_feedforward_layernorm.weight"))
_GEMMA_NORMS = _POST_NORMS + ((T.FFN_NORM, "model.layers.{i}.pre_feedforward_layernorm.weight"),)

ARCHITECTURES: dict[str, Architecture] = {
    a.hf_name: a
    for a in (
        Architecture("LlamaForCausalLM", "llama"),
        Architecture("MistralForCausalLM", "mistral", sliding_window_key="sliding_window"),
        Architecture("Qwen2ForCausalLM", "qwen2", qkv_bias=True,
                     sliding_window_key="sliding_window", sliding_window_switch="use_sliding_window"),
        Architecture("Qwen3ForCausalLM", "qwen3", qk_norm=True,
                     sliding_window_key="sliding_window", sliding_window_switch="use_sliding_window"),
        Architecture("Gemma2ForCausalLM", "gemma2", post_norms=True, sliding_window_key="sliding_window",
                     layer_pattern=2, norm_offset=1.0, embed_scale=True, renames=_GEMMA_NORMS),
        Architecture("Gemma3ForCausalLM", "gemma3", qk_norm=True, post_norms=True, sliding_window_key="sliding_window",
                     layer_pattern=6, layer_pattern_key="sliding_window_pattern", norm_offset=1.0, embed_scale=True,
                     renames=_GEMMA_NORMS),
        Architecture("Olmo2ForCausalLM", "olmo2", qk_norm=True, qk_norm_per_head=False, pre_norms=False,
                     post_norms=True, renames=_POST_NORMS),
        Architecture("SmolLM3ForCausalLM", "smollm3", sliding_window_key="sliding_window",
                     sliding_window_switch="use_sliding_window"),
        Architecture("Phi3ForCausalLM", "phi3", sliding_window_key="sliding_window", splits=(
            ("model.layers.{i}.self_attn.qkv_proj.weight", ((T.ATTN_Q, "q_dim"), (T.ATTN_K, "kv_dim"),
                                                            (T.ATTN_V, "kv_dim"))),
            ("model.layers.{i}.mlp.gate_up_proj.weight", ((T.FFN_GATE, "ffn_dim"), (T.FFN_UP, "ffn_dim"))))),
        Architecture("MixtralForCausalLM", "mixtral", sliding_window_key="sliding_window", moe=True,
                     renames=((T.FFN_ROUTER, "model.layers.{i}.block_sparse_moe.gate.weight"),),
                     stacks=((T.FFN_GATE, "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight"),
                             (T.FFN_UP, "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight"),
                             (T.FFN_DOWN, "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"))),
        Architecture("Qwen3MoeForCausalLM", "qwen3_moe", qk_norm=True, moe=True, norm_topk_key="norm_topk_prob",
                     sliding_window_key="sliding_window", sliding_window_switch="use_sliding_window",
                     renames=((T.FFN_ROUTER, "model.layers.{i}.mlp.gate.weight"),),
                     stacks=((T.FFN_GATE, "model.layers.{i}.mlp.experts.{e}.gate_proj.weight"),
                             (T.FFN_UP, "model.layers.{i}.mlp.experts.{e}.up_proj.weight"),
                             (T.FFN_DOWN, "model.layers.{i}.mlp.experts.{e}.down_proj.weight"))),
        Architecture("Qwen2MoeForCausalLM", "qwen2_moe", qkv_bias=True, moe=True, norm_topk_key="norm_topk_prob",
                     sliding_window_key="sliding_window", sliding_window_switch="use_sliding_window",
                     shared_ffn_key="shared_expert_intermediate_size",
                     renames=((T.FFN_ROUTER, "model.layers.{i}.mlp.gate.weight"),),
                     stacks=((T.FFN_GATE, "model.layers.{i}.mlp.experts.{e}.gate_proj.weight"),
                             (T.FFN_UP, "model.layers.{i}.mlp.experts.{e}.up_proj.weight"),
                             (T.FFN_DOWN, "model.layers.{i}.mlp.experts.{e}.down_proj.weight"))),
    )
}


@dataclass(frozen=True)
class TensorRule:
    """One HF tensor name pattern -> its entry in the qbin tensor name table (qformat.tensors),
    which gives its qbin name, its role (how it is stored: "embed", "head", "linear", "norm",
    "bias") and the flag without which it does not exist."""

    hf: str  # "{i}" stands for the layer index
    tensor: T.TensorName

    def hf_name(self, layer: int | None = None) -> str:
        return self.hf.format(i=layer)

    def qbin_name(self, layer: int | None = None) -> str:
        return self.tensor.name(layer)

    @property
    def role(self) -> str:
        return self.tensor.role

    @property
    def per_layer(self) -> bool:
        return self.tensor.per_layer


TENSOR_MAP: tuple[TensorRule, ...] = tuple(TensorRule(T.HF_NAMES[t], t) for t in T.TENSORS)

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
    def exists(t: T.TensorName) -> bool:
        return t.flag is None or bool(getattr(arch, t.flag))

    names = {**T.HF_NAMES, **dict(arch.renames)}
    return [(names[t].format(i=layer), t.name(layer), t.role) for t, layer in T.file_order(n_layers, exists)]
