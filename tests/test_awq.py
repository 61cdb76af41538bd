"""AWQ: the scale search, the folding (which must leave the float model unchanged) and the
clipping search, on synthetic layers and a tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qformat.schemes import parse_scheme
from qformat.convert.awq import AwqMethod, fold, search_scales
from qformat.convert.groupquant import fake_quant, output_clip_search, quantize_to_tensor
from qformat.convert.layerwise import input_stats


def outlier_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Activations with a few salient channels, as LLM inputs have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, torch.randperm(k, generator=g)[: k // 16]] *= 20.0
    return x


def out_err(x, w, w_hat) -> float:
    return float(torch.linalg.norm(x @ w.T - x @ w_hat.T))


@pytest.mark.parametrize("scheme_name", ["int4-g64", "int3-g64", "int2-g64", "nf4-g64", "int4-g64-sym"])
def test_awq_scales_reduce_output_error(scheme_name):
    scheme = parse_scheme(scheme_name)
    x = outlier_inputs(1000, 160)
    w = torch.randn(64, 160, generator=torch.Generator().manual_seed(1))
    st = input_stats([x])
    s, alpha = search_scales([w], [scheme], st.gram, st.abs_mean)
    assert alpha > 0
    awq = fake_quant(w * s, scheme) / s
    rtn = fake_quant(w, scheme)
    assert out_err(x, w, awq) < 0.95 * out_err(x, w, rtn)


def test_output_clip_search_never_worse_than_minmax():
    scheme = parse_scheme("int3-g64")
    x = outlier_inputs(500, 136, seed=2)
    w = torch.randn(32, 136, generator=torch.Generator().manual_seed(3))
    w[:, 5] *= 8  # weight outliers make clipping pay
    gram = x.T @ x
    ratios = output_clip_search(w, gram, scheme)
    assert ratios.shape == (32, 3) and (ratios < 1).any()
    t = quantize_to_tensor("w", w, scheme, ratios)
    np.testing.assert_array_equal(t.dequantize(), fake_quant(w, scheme, ratios).numpy())
    for g, cols in enumerate([slice(0, 64), slice(64, 128), slice(128, 136)]):
        e_clip = (w - fake_quant(w, scheme, ratios))[:, cols]
        e_plain = (w - fake_quant(w, scheme))[:, cols]
        h = gram[cols, cols]
        assert torch.all(((e_clip @ h) * e_clip).sum(1) <= ((e_plain @ h) * e_plain).sum(1) * (1 + 1e-5))


def test_quantize_replaces_weights_by_stored_values():
    scheme = parse_scheme("int4-g64")
    x = outlier_inputs(300, 96)
    w = {"attn.wq": torch.randn(32, 96), "attn.wk": torch.randn(16, 96)}
    stored = AwqMethod().quantize(list(w), input_stats([x]), w, {n: scheme for n in w})
    for n, t in stored.items():
        np.testing.assert_array_equal(t.dequantize(), w[n].numpy())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_folding_leaves_float_logits_unchanged(tiny_checkpoint, arch):
    """Scales folded into attn_norm/q,k,v, ffn_norm/gate,up and up-rows/down give the same model."""
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoint(arch)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    sd = model.state_dict()
    n_layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    hf = {"attn_norm": "input_layernorm.weight", "attn.wq": "self_attn.q_proj.weight",
          "attn.wk": "self_attn.k_proj.weight", "attn.wv": "self_attn.v_proj.weight",
          "ffn_norm": "post_attention_layernorm.weight", "ffn.w1": "mlp.gate_proj.weight",
          "ffn.w3": "mlp.up_proj.weight", "ffn.w2": "mlp.down_proj.weight"}
    g = torch.Generator().manual_seed(1)
    for i in range(n_layers):
        w = {k: sd[f"model.layers.{i}.{v}"].clone() for k, v in hf.items()}
        dim, ffn = w["attn.wq"].shape[1], w["ffn.w2"].shape[1]
        fold(w, ["attn.wq", "attn.wk", "attn.wv"], "attn_norm", torch.exp(torch.randn(dim, generator=g)))
        fold(w, ["ffn.w1", "ffn.w3"], "ffn_norm", torch.exp(torch.randn(dim, generator=g)))
        fold(w, ["ffn.w2"], "ffn.w3", torch.exp(torch.randn(ffn, generator=g)))
        for k, v in hf.items():
            assert not torch.allclose(w[k], sd[f"model.layers.{i}.{v}"])  # every tensor really changed
            sd[f"model.layers.{i}.{v}"].copy_(w[k])
    model.load_state_dict(sd)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=2e-4, rtol=1e-4)
