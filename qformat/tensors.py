"""The tensor names of a qbin file (spec/qbin.md §3.1), as one table.

The converter maps checkpoint names onto these entries, the runtime's model and both decode
steps read the tensors they name, and qinfo classifies them; none of them spells a name itself
(as gguf-py keeps its MODEL_TENSOR names in constants.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .config import ModelArgs


@dataclass(frozen=True)
class TensorName:
    """One entry of the name contract: `key` is the name itself, or a layer's part of it
    (`layers.{i}.<key>`); `shape` names the ModelArgs fields that give each dimension."""

    key: str
    shape: tuple[str, ...]
    role: str  # embed (lookup), head (output projection), linear (a decoder projection), router, norm, bias
    group: str  # qinfo's class: embeddings, attention, mlp, head, norms, biases
    per_layer: bool = True
    flag: str | None = None  # the ModelArgs flag without which the tensor does not exist

    def name(self, layer: int | None = None) -> str:
        """The tensor's name in a file (layer: the decoder layer, for per-layer entries)."""
        if not self.per_layer:
            return self.key
        if layer is None:
            raise ValueError(f"{self.key} is a per-layer tensor; give the layer")
        return f"layers.{layer}.{self.key}"

    def shape_of(self, args: ModelArgs) -> tuple[int, ...]:
        """The shape the contract gives this tensor in a model of `args`."""
        return tuple(int(getattr(args, d)) for d in self.shape)

    def present(self, args: ModelArgs) -> bool:
        """Whether a file of `args` holds this tensor (the head only when untied)."""
        if self.role == "head":
            return not args.tie_embeddings
        return self.flag is None or bool(getattr(args, self.flag))


TOK_EMBEDDINGS = TensorName("tok_embeddings", ("vocab_size", "dim"), "embed", "embeddings", per_layer=False)
ATTN_NORM = TensorName("attn_norm", ("dim",), "norm", "norms", flag="pre_norms")
ATTN_Q = TensorName("attn.wq", ("q_dim", "dim"), "linear", "attention")
ATTN_Q_BIAS = TensorName("attn.bq", ("q_dim",), "bias", "biases", flag="qkv_bias")
ATTN_K = TensorName("attn.wk", ("kv_dim", "dim"), "linear", "attention")
ATTN_K_BIAS = TensorName("attn.bk", ("kv_dim",), "bias", "biases", flag="qkv_bias")
ATTN_V = TensorName("attn.wv", ("kv_dim", "dim"), "linear", "attention")
ATTN_V_BIAS = TensorName("attn.bv", ("kv_dim",), "bias", "biases", flag="qkv_bias")
ATTN_OUT = TensorName("attn.wo", ("dim", "q_dim"), "linear", "attention")
ATTN_Q_NORM = TensorName("attn.q_norm", ("q_norm_dim",), "norm", "norms", flag="qk_norm")
ATTN_K_NORM = TensorName("attn.k_norm", ("k_norm_dim",), "norm", "norms", flag="qk_norm")
ATTN_POST_NORM = TensorName("attn_post_norm", ("dim",), "norm", "norms", flag="post_norms")
FFN_NORM = TensorName("ffn_norm", ("dim",), "norm", "norms", flag="pre_norms")
FFN_ROUTER = TensorName("ffn.router", ("n_experts", "dim"), "router", "mlp", flag="moe")
# a mixture of experts stacks its experts' matrices along the rows, expert e's rows e·rows.. (spec §3.1)
FFN_GATE = TensorName("ffn.w1", ("gate_rows", "dim"), "linear", "mlp")
FFN_UP = TensorName("ffn.w3", ("gate_rows", "dim"), "linear", "mlp")
FFN_DOWN = TensorName("ffn.w2", ("down_rows", "ffn_dim"), "linear", "mlp")
# a shared expert (Qwen2-MoE): a dense SwiGLU MLP every token runs, gated by sigmoid(shared_gate · x)
FFN_SHARED_GATE = TensorName("ffn.shared_w1", ("shared_ffn_dim", "dim"), "linear", "mlp", flag="shared_expert")
FFN_SHARED_UP = TensorName("ffn.shared_w3", ("shared_ffn_dim", "dim"), "linear", "mlp", flag="shared_expert")
FFN_SHARED_DOWN = TensorName("ffn.shared_w2", ("dim", "shared_ffn_dim"), "linear", "mlp", flag="shared_expert")
FFN_SHARED_ROUTER = TensorName("ffn.shared_gate", ("shared_gate_rows", "dim"), "router", "mlp", flag="shared_expert")
FFN_POST_NORM = TensorName("ffn_post_norm", ("dim",), "norm", "norms", flag="post_norms")
OUTPUT_NORM = TensorName("norm", ("dim",), "norm", "norms", per_layer=False)
OUTPUT = TensorName("output", ("vocab_size", "dim"), "head", "head", per_layer=False)

# Every entry, in the order a converter writes them (embeddings, each layer's, then the rest).
TENSORS: tuple[TensorName, ...] = (
    TOK_EMBEDDINGS, ATTN_NORM, ATTN_Q, ATTN_Q_BIAS, ATTN_K, ATTN_K_BIAS, ATTN_V, ATTN_V_BIAS, ATTN_OUT,
    ATTN_Q_NORM, ATTN_K_NORM, ATTN_POST_NORM, FFN_NORM, FFN_ROUTER, FFN_GATE, FFN_UP, FFN_DOWN,
    FFN_SHARED_GATE, FFN_SHARED_UP, FFN_SHARED_DOWN, FFN_SHARED_ROUTER, FFN_POST_NORM, OUTPUT_NORM, OUTPUT,
)
# The Hugging Face name of every entry, as transformers' Llama family spells it ("{i}" the layer);
# an architecture renames some (convert/architectures.py) but never a projection, so that an adapter
# in peft's layout finds its projection by these names (runtime/lora.py).
HF_NAMES = {
    TOK_EMBEDDINGS: "model.embed_tokens.weight",
    ATTN_NORM: "model.layers.{i}.input_layernorm.weight",
    ATTN_Q: "model.layers.{i}.self_attn.q_proj.weight",
    ATTN_Q_BIAS: "model.layers.{i}.self_attn.q_proj.bias",
    ATTN_K: "model.layers.{i}.self_attn.k_proj.weight",
    ATTN_K_BIAS: "model.layers.{i}.self_attn.k_proj.bias",
    ATTN_V: "model.layers.{i}.self_attn.v_proj.weight",
    ATTN_V_BIAS: "model.layers.{i}.self_attn.v_proj.bias",
    ATTN_OUT: "model.layers.{i}.self_attn.o_proj.weight",
    ATTN_Q_NORM: "model.layers.{i}.self_attn.q_norm.weight",
    ATTN_K_NORM: "model.layers.{i}.self_attn.k_norm.weight",
    ATTN_POST_NORM: "",  # only under an architecture's renames
    FFN_NORM: "model.layers.{i}.post_attention_layernorm.weight",
    FFN_ROUTER: "",
    FFN_GATE: "model.layers.{i}.mlp.gate_proj.weight",
    FFN_UP: "model.layers.{i}.mlp.up_proj.weight",
    FFN_DOWN: "model.layers.{i}.mlp.down_proj.weight",
    FFN_SHARED_GATE: "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
    FFN_SHARED_UP: "model.layers.{i}.mlp.shared_expert.up_proj.weight",
    FFN_SHARED_DOWN: "model.layers.{i}.mlp.shared_expert.down_proj.weight",
    FFN_SHARED_ROUTER: "model.layers.{i}.mlp.shared_expert_gate.weight",
    FFN_POST_NORM: "",
    OUTPUT_NORM: "model.norm.weight",
    OUTPUT: "lm_head.weight",
}
# The bias of each projection that has one (qkv_bias).
BIAS_OF = {ATTN_Q: ATTN_Q_BIAS, ATTN_K: ATTN_K_BIAS, ATTN_V: ATTN_V_BIAS}
# The name of the bytes tensor the converter stores the tokenizer file in.
TOKENIZER = "tokenizer"

_BY_KEY = {t.key: t for t in TENSORS}
_LAYER_NAME = re.compile(r"layers\.(\d+)\.(.+)")


def parse_name(name: str) -> tuple[TensorName, int | None] | None:
    """(entry, layer) of a tensor name of the contract, or None for a name outside it."""
    m = _LAYER_NAME.fullmatch(name)
    if m is not None:
        entry = _BY_KEY.get(m[2])
        return (entry, int(m[1])) if entry is not None and entry.per_layer else None
    entry = _BY_KEY.get(name)
    return (entry, None) if entry is not None and not entry.per_layer else None


def file_order(n_layers: int, exists: Callable[[TensorName], bool]) -> list[tuple[TensorName, int | None]]:
    """(entry, layer) of every tensor for which `exists(entry)`, in the order a file stores them:
    the embeddings, each layer's tensors, then the final norm and the head."""
    first = [t for t in TENSORS if not t.per_layer and t.role == "embed"]
    layer = [t for t in TENSORS if t.per_layer]
    last = [t for t in TENSORS if not t.per_layer and t.role != "embed"]
    out = [(t, None) for t in first if exists(t)]
    out += [(t, i) for i in range(n_layers) for t in layer if exists(t)]
    return out + [(t, None) for t in last if exists(t)]


def head_name(args: ModelArgs) -> str:
    """The output projection's tensor: `output`, or the embeddings when they are tied."""
    return (TOK_EMBEDDINGS if args.tie_embeddings else OUTPUT).name()


def tensor_group(name: str) -> str:
    """qinfo's class of a tensor name (embeddings, attention, mlp, head, norms, biases), or
    "other" for a name outside the contract."""
    parsed = parse_name(name)
    return parsed[0].group if parsed is not None else "other"
