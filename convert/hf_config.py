"""Read a Hugging Face config.json / generation_config.json into qformat's dataclasses.

Both transformers 4 (rope_theta + rope_scaling) and transformers 5 (rope_parameters) styles
are accepted. Every refusal is a ValueError with one line naming the key and the fix.
"""
from __future__ import annotations

import math
from typing import Any

from qformat.config import GenerationDefaults, ModelArgs, RopeScaling

from .architectures import ARCHITECTURES, Architecture, lookup

# transformers' class defaults for keys a config.json may omit (identical for the four classes).
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_TIE = False  # LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config all default to False
_DEFAULT_NORM_EPS = 1e-6


def architecture_of(config: dict[str, Any]) -> Architecture:
    """The supported Architecture named by config.json's "architectures" list."""
    names = config.get("architectures") or []
    if not names:
        model_type = config.get("model_type", "?")
        raise ValueError(f"config.json has no 'architectures' entry (model_type {model_type!r}); "
                         "add e.g. \"architectures\": [\"LlamaForCausalLM\"]")
    return lookup(names[0])


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _first_id(value: Any) -> int | None:
    ids = _as_id_list(value)
    return ids[0] if ids else None


def _either(config: dict[str, Any], generation: dict[str, Any], key: str) -> Any:
    """config.json's value for key, else generation_config.json's (None counts as absent)."""
    value = config.get(key)
    return generation.get(key) if value is None else value


# config.json "layer_types" entries -> ModelArgs.layer_types
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}
# config.json hidden_act / hidden_activation -> ModelArgs.activation
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def rope_settings(config: dict[str, Any]) -> tuple[float, RopeScaling | None, float | None]:
    """(rope_theta, rope_scaling, the local theta of sliding layers or None) from either config
    style; transformers 5 gives the two of Gemma 3 as rope_parameters per layer type."""
    params = config.get("rope_parameters")
    local = config.get("rope_local_base_freq")  # transformers 4, Gemma 3
    if isinstance(params, dict) and "rope_type" not in params and "rope_theta" not in params:
        if set(params) - set(_LAYER_TYPES):
            raise ValueError(f"config.json rope_parameters has unknown layer types ({', '.join(params)})")
        sliding = params.get("sliding_attention") or {}
        if sliding.get("rope_type", "default") != "default":
            raise ValueError("config.json rope_parameters of sliding_attention layers are scaled; only unscaled "
                             "local RoPE is supported")
        local = sliding.get("rope_theta")
        params = params.get("full_attention") or sliding
    theta, scaling = _rope_of(config, params)
    local = float(local) if local is not None else None
    if local == theta and scaling is None:
        local = None  # one table serves both kinds of layer
    return theta, scaling, local


def _rope_of(config: dict[str, Any], params: Any) -> tuple[float, RopeScaling | None]:
    if isinstance(params, dict):  # transformers 5: everything in one dict
        theta = params.get("rope_theta", config.get("rope_theta", _DEFAULT_ROPE_THETA))
        scaling = params
    else:  # transformers 4
        theta = config.get("rope_theta", _DEFAULT_ROPE_THETA)
        scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    max_pos = int(config.get("max_position_embeddings", 2048))
    if kind == "default":
        return float(theta), None
    if kind == "longrope":  # transformers' _compute_longrope_parameters
        if "short_factor" not in scaling or "long_factor" not in scaling:
            raise ValueError("config.json RoPE scaling longrope needs short_factor and long_factor")
        original = int(scaling.get("original_max_position_embeddings")
                       or config.get("original_max_position_embeddings") or max_pos)
        factor = float(scaling.get("factor") or max_pos / original)
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return float(theta), RopeScaling("longrope", factor, original_max_position=original,
                                         short_factor=[float(f) for f in scaling["short_factor"]],
                                         long_factor=[float(f) for f in scaling["long_factor"]],
                                         attention_factor=float(attention))
    if kind == "linear":
        return float(theta), RopeScaling("linear", float(scaling["factor"]))
    if kind == "llama3":
        return float(theta), RopeScaling(
            "llama3",
            float(scaling["factor"]),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position=int(scaling.get("original_max_position_embeddings", max_pos)),
        )
    raise ValueError(f"RoPE scaling type {kind!r} is not supported (supported: default, linear, llama3, longrope)")


def _sliding_window(arch: Architecture, config: dict[str, Any], n_layers: int) -> tuple[int | None, list[str]]:
    """(sliding_window, layer_types): the window and which layers keep to it ([]: all)."""
    if arch.sliding_window_key is None:
        return None, []
    if arch.sliding_window_switch is not None and not config.get(arch.sliding_window_switch, False):
        return None, []
    window = config.get(arch.sliding_window_key)
    if window is None:
        return None, []
    types = config.get("layer_types")
    if types is None and arch.layer_pattern is not None:
        pattern = int(config.get(arch.layer_pattern_key, arch.layer_pattern) if arch.layer_pattern_key
                      else arch.layer_pattern)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    if types is None and arch.sliding_window_switch is not None:
        # Qwen2/3 apply the window only to some layers (max_window_layers): without layer_types
        # the converter cannot tell which
        raise ValueError(f"config.json sets {arch.sliding_window_switch}=true without layer_types; add the "
                         f"per-layer list (transformers 5 writes it) to convert {arch.hf_name}")
    if types is None:
        return int(window), []
    if len(types) != n_layers or any(t not in _LAYER_TYPES for t in types):
        raise ValueError(f"config.json layer_types must list {n_layers} of {', '.join(_LAYER_TYPES)}")
    kinds = [_LAYER_TYPES[t] for t in types]
    if all(k == "full" for k in kinds):
        return None, []
    return int(window), [] if all(k == "sliding" for k in kinds) else kinds


def _rotary_dim(config: dict[str, Any], head_dim: int) -> int | None:
    """The dims of each head RoPE rotates, from partial_rotary_factor (Phi-4-mini: 0.75), as
    transformers truncates it; None: all of them."""
    params = config.get("rope_parameters")
    factor = (params or {}).get("partial_rotary_factor") if isinstance(params, dict) else None
    factor = float(factor if factor is not None else config.get("partial_rotary_factor", 1.0))
    if factor == 1.0:
        return None
    dim = int(head_dim * factor)
    if not 0 < dim <= head_dim or dim % 2:
        raise ValueError(f"config.json partial_rotary_factor {factor} gives {dim} rotary dims of head_dim "
                         f"{head_dim}; an even count up to head_dim is needed")
    return dim


def _nope_layers(config: dict[str, Any], n_layers: int) -> list[int]:
    """SmolLM3's layers without RoPE: no_rope_layers has 1 where a layer uses RoPE (or, without
    it, every no_rope_layer_interval-th layer has none)."""
    uses = config.get("no_rope_layers")
    if uses is None and config.get("no_rope_layer_interval"):
        interval = int(config["no_rope_layer_interval"])
        uses = [int((i + 1) % interval != 0) for i in range(n_layers)]
    if uses is None:
        return []
    if len(uses) < n_layers:
        raise ValueError(f"config.json no_rope_layers has {len(uses)} entries for {n_layers} layers")
    return [i for i in range(n_layers) if not uses[i]]


def model_args(config: dict[str, Any], generation: dict[str, Any] | None = None, *,
               has_lm_head: bool = True) -> ModelArgs:
    """ModelArgs from config.json (and generation_config.json for extra EOS ids).

    A checkpoint without lm_head.weight is tied whatever the config says.
    """
    arch = architecture_of(config)
    generation = generation or {}
    try:
        dim = int(config["hidden_size"])
        n_heads = int(config["num_attention_heads"])
        n_layers = int(config["num_hidden_layers"])
        ffn_dim = int(config["moe_intermediate_size"] if arch.moe and "moe_intermediate_size" in config
                      else config["intermediate_size"])
        vocab = int(config["vocab_size"])
        n_experts = int(config.get("num_local_experts") or config["num_experts"]) if arch.moe else 0
        per_token = int(config["num_experts_per_tok"]) if arch.moe else 0
        shared_ffn_dim = int(config[arch.shared_ffn_key] or 0) if arch.shared_ffn_key else 0
    except KeyError as e:
        raise ValueError(f"config.json lacks required key {e.args[0]!r}") from None
    if arch.moe and (config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1):
        raise ValueError("config.json gives some layers a dense MLP (mlp_only_layers / decoder_sparse_step); "
                         "only models whose every layer is a mixture of experts are supported")
    if not arch.shared_ffn_key and (config.get("shared_expert_intermediate_size") or config.get("n_shared_experts")):
        raise ValueError(f"config.json gives {arch.hf_name} shared experts, which it runs without; "
                         "only Qwen2-MoE's shared expert is supported")
    act_key = "hidden_activation" if config.get("hidden_activation") else "hidden_act"
    act = config.get(act_key, "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json {act_key} {act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    head_dim = config.get("head_dim") or dim // n_heads
    theta, scaling, local_theta = rope_settings(config)
    window, layer_types = _sliding_window(arch, config, n_layers)
    rotary_dim = _rotary_dim(config, int(head_dim))
    if not any(t == "sliding" for t in layer_types):
        local_theta = None  # no layer would rotate by it
    eos = _as_id_list(config.get("eos_token_id"))
    eos += [i for i in _as_id_list(generation.get("eos_token_id")) if i not in eos]
    tie = config.get("tie_word_embeddings", _DEFAULT_TIE) or not has_lm_head
    return ModelArgs(
        arch=arch.arch,
        vocab_size=vocab,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim),
        ffn_dim=ffn_dim,
        norm_eps=float(config.get("rms_norm_eps", _DEFAULT_NORM_EPS)),
        rope_theta=theta,
        max_seq_len=int(config.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(tie),
        rope_scaling=scaling,
        qkv_bias=arch.qkv_bias,
        qk_norm=arch.qk_norm,
        sliding_window=window,
        layer_types=layer_types,
        rope_local_theta=local_theta,
        nope_layers=_nope_layers(config, n_layers),
        activation=_ACTIVATIONS[act],
        embed_scale=math.sqrt(dim) if arch.embed_scale else None,
        pre_norms=arch.pre_norms,
        post_norms=arch.post_norms,
        qk_norm_per_head=arch.qk_norm_per_head,
        attn_scale=(float(config["query_pre_attn_scalar"]) ** -0.5 if config.get("query_pre_attn_scalar")
                    else None),
        attn_softcap=_optional_float(config.get("attn_logit_softcapping")),
        final_softcap=_optional_float(config.get("final_logit_softcapping")),
        rotary_dim=rotary_dim,
        n_experts=n_experts,
        experts_per_token=per_token,
        shared_ffn_dim=shared_ffn_dim,
        norm_topk=bool(config.get(arch.norm_topk_key, False)) if arch.norm_topk_key else True,
        bos_token_id=_first_id(_either(config, generation, "bos_token_id")),
        eos_token_ids=eos,
        pad_token_id=_first_id(_either(config, generation, "pad_token_id")),
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def generation_defaults(generation: dict[str, Any] | None) -> GenerationDefaults:
    """Sampling defaults from generation_config.json; do_sample=false means greedy (temperature 0)."""
    g = generation or {}
    temperature = g.get("temperature")
    if g.get("do_sample") is False:
        temperature = 0.0
    return GenerationDefaults(
        temperature=None if temperature is None else float(temperature),
        top_k=None if g.get("top_k") is None else int(g["top_k"]),
        top_p=None if g.get("top_p") is None else float(g["top_p"]),
        min_p=None if g.get("min_p") is None else float(g["min_p"]),
        repetition_penalty=None if g.get("repetition_penalty") is None else float(g["repetition_penalty"]),
        max_new_tokens=None if g.get("max_new_tokens") is None else int(g["max_new_tokens"]),
    )


_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def hf_config_of(args: ModelArgs, dtype: str = "float16") -> dict[str, Any]:
    """The config.json transformers and vLLM read for ModelArgs: the inverse of model_args
    (model_args(hf_config_of(a)) == a for every architecture of the Llama family it exports)."""
    arch = next((a for a in ARCHITECTURES.values() if a.arch == args.arch), None)
    if arch is None or args.arch not in _MODEL_TYPES:
        raise ValueError(f"architecture {args.arch!r} has no Hugging Face export (supported: "
                         f"{', '.join(_MODEL_TYPES)})")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
    s = args.rope_scaling
    if s is not None:
        rope.update(rope_type=s.kind, factor=s.factor)
        if s.kind == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position)
    config: dict[str, Any] = {
        "architectures": [arch.hf_name], "model_type": _MODEL_TYPES[args.arch],
        "vocab_size": args.vocab_size, "hidden_size": args.dim, "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps, "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        # transformers 5 reads rope_parameters, transformers 4 and vLLM's older loaders rope_theta/rope_scaling
        "rope_parameters": rope, "rope_theta": args.rope_theta,
        "rope_scaling": None if s is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "bos_token_id": args.bos_token_id,
        "eos_token_id": (args.eos_token_ids[0] if len(args.eos_token_ids) == 1 else list(args.eos_token_ids))
        if args.eos_token_ids else None,
        "pad_token_id": args.pad_token_id, "dtype": dtype, "torch_dtype": dtype,
        "attention_bias": args.qkv_bias and args.arch == "llama", "mlp_bias": False,
    }
    if arch.sliding_window_key is not None:
        config[arch.sliding_window_key] = args.sliding_window
        if arch.sliding_window_switch is not None:
            config[arch.sliding_window_switch] = False
    return config

