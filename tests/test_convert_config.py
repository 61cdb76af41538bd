"""config.json parsing (transformers 4 and 5 styles) into ModelArgs."""
from __future__ import annotations

import pytest

from qformat.config import RopeScaling
from qformat.convert.architectures import ARCHITECTURES, tensor_rules
from qformat.convert.hf_config import generation_defaults, model_args


def config(arch="LlamaForCausalLM", **extra):
    base = {"architectures": [arch], "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 100, "rms_norm_eps": 1e-5}
    base.update(extra)
    return base


def test_defaults_follow_transformers():
    m = model_args(config())
    assert (m.arch, m.head_dim, m.n_kv_heads, m.rope_theta, m.rope_scaling) == ("llama", 16, 4, 10000.0, None)
    assert m.tie_embeddings is False and m.eos_token_ids == [] and m.bos_token_id is None


def test_no_lm_head_means_tied():
    assert model_args(config(tie_word_embeddings=False), has_lm_head=False).tie_embeddings


def test_transformers4_llama3_rope():
    m = model_args(config(rope_theta=5e5, max_position_embeddings=131072, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    assert m.rope_theta == 5e5 and m.max_seq_len == 131072
    assert m.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


def test_transformers4_linear_rope_with_legacy_type_key():
    m = model_args(config(rope_scaling={"type": "linear", "factor": 2.0}))
    assert m.rope_scaling == RopeScaling("linear", 2.0)


def test_transformers5_rope_parameters():
    m = model_args(config(rope_parameters={"rope_theta": 1e6, "rope_type": "default"}))
    assert m.rope_theta == 1e6 and m.rope_scaling is None
    m = model_args(config(rope_parameters={"rope_theta": 5e5, "rope_type": "llama3", "factor": 32.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192}))
    assert m.rope_scaling.kind == "llama3" and m.rope_scaling.factor == 32.0


@pytest.mark.parametrize("kind", ["yarn", "dynamic"])
def test_unsupported_rope_refused(kind):
    with pytest.raises(ValueError, match=f"'{kind}' is not supported"):
        model_args(config(rope_scaling={"rope_type": kind, "factor": 4.0}))


def test_longrope_without_its_factors_is_refused():
    with pytest.raises(ValueError, match="longrope needs short_factor and long_factor"):
        model_args(config(rope_scaling={"rope_type": "longrope", "factor": 4.0}))


def test_eos_lists_merge_config_and_generation():
    m = model_args(config(eos_token_id=[5, 6]), {"eos_token_id": [6, 7], "bos_token_id": 3})
    assert m.eos_token_ids == [5, 6, 7] and m.bos_token_id == 3


def test_arch_flags_and_sliding_window():
    assert model_args(config("Qwen2ForCausalLM", sliding_window=4096, use_sliding_window=False)).qkv_bias
    assert model_args(config("Qwen2ForCausalLM", sliding_window=4096)).sliding_window is None
    with pytest.raises(ValueError, match="use_sliding_window"):
        model_args(config("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=4096))
    q3 = model_args(config("Qwen3ForCausalLM", head_dim=32))
    assert q3.qk_norm and q3.head_dim == 32 and not q3.qkv_bias
    assert model_args(config("MistralForCausalLM", sliding_window=4096, head_dim=None)).sliding_window == 4096
    assert model_args(config("MistralForCausalLM", sliding_window=None)).sliding_window is None


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match="unsupported architecture GemmaForCausalLM; supported: LlamaForCausalLM"):
        model_args(config("GemmaForCausalLM"))
    with pytest.raises(ValueError, match="'architectures'"):
        model_args(config(architectures=[]))
    bad = config()
    del bad["vocab_size"]
    with pytest.raises(ValueError, match="vocab_size"):
        model_args(bad)
    with pytest.raises(ValueError, match="hidden_act"):
        model_args(config(hidden_act="gelu"))


def test_tensor_rules_follow_flags():
    names = {q for _, q, _ in tensor_rules(ARCHITECTURES["Qwen2ForCausalLM"], 1)}
    assert {"layers.0.attn.bq", "layers.0.attn.bk", "layers.0.attn.bv"} <= names
    assert "layers.0.attn.q_norm" not in names
    names = {q for _, q, _ in tensor_rules(ARCHITECTURES["Qwen3ForCausalLM"], 1)}
    assert {"layers.0.attn.q_norm", "layers.0.attn.k_norm"} <= names and "layers.0.attn.bq" not in names


def test_generation_defaults():
    g = generation_defaults({"do_sample": True, "temperature": 0.7, "top_k": 50, "repetition_penalty": 1.1})
    assert (g.temperature, g.top_k, g.top_p, g.repetition_penalty) == (0.7, 50, None, 1.1)
    assert generation_defaults({"do_sample": False, "temperature": 0.7}).temperature == 0.0
