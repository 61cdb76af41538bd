"""Every architecture beyond the Llama family's first rows (Gemma 2, Gemma 3, OLMo 2, SmolLM3,
Phi-3, Phi-4-mini; Mixtral, Qwen3-MoE and Qwen2-MoE at the end), as a tiny random transformers model:
converted at f16, int8 and int4, run on the CPU (per-op path and fused decode step) and the
emulated CUDA device, against transformers.

The prompt runs past the tiny models' 8-position sliding window (Gemma) so that windowed layers
are checked where the window cuts; SmolLM3's second layer has no RoPE, Gemma 3's two layers
rotate by different tables, Phi-3's fused projections are split at conversion and its LongRoPE
(trained on 16 positions, extended to 64) runs on its long factors past position 16, Phi-4-mini
rotates 12 of each head's 20 dims. Tolerances:
- f16 against transformers on the same f16-rounded weights: 1e-4 of the largest logit (the
  module docstring of test_runtime_model.py), on the CPU; 1e-2 on CUDA (f16 KV cache).
- int8 and int4 against transformers running the file's dequantized weights: 1e-4 where the
  runtime computes with float activations (int8 everywhere, int4's prefill), 8e-2 for int4's
  decode steps, which round the activations to int8 per group (kernels/cpu/quant.py; measured
  1.4e-2 to 5.6e-2 on these models, whose logits all lie within about ±1.4).
- greedy decoding: the same 32 tokens as transformers' generate on the f16-rounded weights, on
  each backend.
- mixtures: as above (int8 and int4 with each expert's dequantized rows in transformers 5's 3-D
  expert parameters), the router kept in f32 on both sides (the file stores it so).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import make_tiny_checkpoint  # noqa: E402

from qformat import tensors as T  # noqa: E402
from qformat.convert import convert  # noqa: E402
from qformat.convert.architectures import lookup, tensor_rules  # noqa: E402
from qformat.reader import QbinReader  # noqa: E402
from qformat.runtime.generate import Session  # noqa: E402
from qformat.runtime.model import Transformer  # noqa: E402

# case -> make_tiny_checkpoint's arguments (Phi-4-mini: tied, RoPE on 12 of each head's 20 dims)
CASES = {
    "gemma2": dict(arch="gemma2", tied=True), "gemma3": dict(arch="gemma3", tied=True),
    "olmo2": dict(arch="olmo2", tied=False), "smollm3": dict(arch="smollm3", tied=True),
    "phi3": dict(arch="phi3", tied=False),
    "phi4-mini": dict(arch="phi3", tied=True, config_overrides={
        "partial_rotary_factor": 0.6, "rope_scaling": {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(6)],
                                                       "long_factor": [2.0 + 0.5 * i for i in range(6)]}}),
}
ARCHS = list(CASES)
PREFILL, DECODE = 12, 8
BACKENDS = ["cpu", "cpu-per-op", "emulated-cuda", pytest.param("gpu", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = make_tiny_checkpoint(tmp_path_factory.mktemp(arch), seed=2, **CASES[arch])
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def files(folders, tmp_path_factory):
    cache = {}

    def get(arch, scheme):
        if (arch, scheme) not in cache:
            qbin = tmp_path_factory.mktemp(f"{arch}-{scheme}") / "model.qbin"
            convert(folders(arch), qbin, scheme, progress=False, clip_search=False)
            cache[arch, scheme] = qbin
        return cache[arch, scheme]

    return get


def hf_model(folder, qbin=None, round_f16: bool = False):
    """transformers' model of the checkpoint, in float32; with qbin, every 2-D weight replaced by
    the file's dequantized tensor (norms stay: the file stores Gemma's 1 + w, the checkpoint w),
    a mixture's experts each into its slice of transformers 5's 3-D expert parameters."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        if round_f16:
            for p in params.values():
                if p.ndim == 2:
                    p.copy_(p.half().float())
        if qbin is not None:
            reader = QbinReader(qbin)
            arch = lookup(model.config.architectures[0])
            # a part of a fused tensor (Phi-3) goes to its rows of the fused parameter
            parts = {}
            for layer in range(reader.model.n_layers):
                for fused, split in arch.split_parts(reader.model, layer):
                    starts = np.cumsum([0] + [rows for _, rows in split])
                    parts.update({hf: (fused, int(a), int(b)) for (hf, _), a, b in zip(split, starts, starts[1:])})
            for hf, name, role in tensor_rules(arch, reader.model.n_layers):
                if role in ("linear", "embed", "head") and name in reader:
                    w = torch.from_numpy(reader[name].dequantize())
                    if hf not in params and arch.moe:
                        copy_experts(params, name, w)
                        continue
                    fused, a, b = parts.get(hf, (hf, None, None))
                    params[fused][a:b].copy_(w)
    return model


def copy_experts(params: dict, name: str, w: torch.Tensor) -> None:
    """A stacked expert tensor into transformers 5's (experts, rows, cols) parameters of its layer:
    gate_up_proj holds each expert's gate rows, then its up rows; down_proj its down rows."""
    entry, layer = T.parse_name(name)
    experts = params[f"model.layers.{layer}.mlp.experts.{'down_proj' if entry is T.FFN_DOWN else 'gate_up_proj'}"]
    rows = w.reshape(experts.shape[0], -1, w.shape[1])
    half = experts.shape[1] // 2
    target = {T.FFN_GATE: experts[:, :half], T.FFN_UP: experts[:, half:], T.FFN_DOWN: experts}[entry]
    target.copy_(rows)


def hf_logits(model, ids) -> np.ndarray:
    """transformers' logits of one prompt (L,) or of a batch of prompts (B, L)."""
    batch = np.atleast_2d(np.asarray(ids))
    with torch.no_grad():
        logits = model(torch.from_numpy(batch)).logits.numpy()
    return logits if np.ndim(ids) == 2 else logits[0]


def backend_model(qbin, backend: str, request, monkeypatch, context: int | None = None) -> Transformer:
    if backend in ("emulated-cuda", "gpu"):
        if backend == "emulated-cuda":
            from cuda_emulation import emulate_cuda

            emulate_cuda(monkeypatch, request.getfixturevalue("cuda_host"))
        return Transformer(QbinReader(qbin), device="cuda", context=context)
    return Transformer(QbinReader(qbin), fused=backend == "cpu", context=context)


def run_logits(model: Transformer, ids) -> np.ndarray:
    """A prefill, then single-token decode steps (the fused or CUDA one-call step); for a batch
    (B, L), each prompt so in turn, from position 0 of the same cache."""
    if np.ndim(ids) == 2:
        return np.stack([run_logits(model, row) for row in ids])
    out = [model.forward(ids[:PREFILL], 0, all_logits=True)]
    out += [model.forward(ids[pos:pos + 1], pos)[None] for pos in range(PREFILL, len(ids))]
    return np.concatenate(out)


def prompt(qbin, seed: int = 5) -> list[int]:
    vocab = QbinReader(qbin).model.vocab_size
    return [int(i) for i in np.random.default_rng(seed).integers(0, vocab, PREFILL + DECODE)]


def prompts(qbin, seed: int = 5, n: int = 3) -> np.ndarray:
    """A batch (n, PREFILL + DECODE) of random prompts."""
    return np.array([prompt(qbin, seed + 100 * b) for b in range(n)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_f16_logits_match_transformers(folders, files, arch, backend, request, monkeypatch):
    qbin = files(arch, "f16")
    ids = prompts(qbin)
    ours = run_logits(backend_model(qbin, backend, request, monkeypatch), ids)
    theirs = hf_logits(hf_model(folders(arch), round_f16=True), ids)
    tol = 1e-2 if backend in ("emulated-cuda", "gpu") else 1e-4
    assert np.abs(ours - theirs).max() <= tol * np.abs(theirs).max()


@pytest.mark.parametrize("scheme,decode_tol", [("int8", 1e-4), ("int4-g32", 8e-2)])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantized_logits_match_transformers_on_the_dequantized_weights(folders, files, arch, scheme, decode_tol):
    assert_close_to_dequantized(folders(arch), files(arch, scheme), decode_tol, f"{arch} {scheme}")


def assert_close_to_dequantized(folder, qbin, decode_tol: float, label: str) -> None:
    """The file's prefill and decode logits against transformers on its dequantized weights."""
    ids = prompts(qbin, seed=6)
    model = Transformer(QbinReader(qbin))
    ours = run_logits(model, ids)
    theirs = hf_logits(hf_model(folder, qbin), ids)
    scale = np.abs(theirs).max()
    prefill, decode = (np.abs(ours - theirs)[:, rows].max() / scale for rows in (slice(PREFILL), slice(PREFILL, None)))
    print(f"{label}: max |ours - transformers| / max |logit|: prefill {prefill:.2e}, decode {decode:.2e}")
    assert prefill <= (decode_tol if prefills_on_int8(model) else 1e-4)
    assert decode <= decode_tol


def prefills_on_int8(model: Transformer) -> bool:
    """Whether some projection runs a prompt's rows on int8 activations as it runs decode rows
    (q4 on AVX512-VNNI CPUs, kernels/cpu/gemm_vnni.py): the prompt then has decode's error."""
    return any(getattr(getattr(step, "op", None), "act_group", None) is not None
               for layer in model.layers for step in layer.steps)


GREEDY = [(arch, backend) for arch in ARCHS for backend in ("cpu", "cpu-per-op", "emulated-cuda")]
GREEDY += [pytest.param(arch, "gpu", marks=pytest.mark.gpu) for arch in ARCHS]


@pytest.mark.parametrize("arch,backend", GREEDY)
def test_greedy_text_equals_transformers(folders, files, arch, backend, request, monkeypatch):
    """32 greedy tokens after a short prompt, as transformers' generate gives them. Phi-3's
    within its original 16 positions (the short factors): past them transformers rotates each
    new token by the long factors and its cached keys by the short ones, which no fixed RoPE
    table reproduces (the runtime, as llama.cpp, picks one set by its context: see
    test_longrope_...)."""
    qbin = files(arch, "f16")
    context, new = (16, 11) if arch.startswith("phi") else (None, 32)
    model = backend_model(qbin, backend, request, monkeypatch, context)
    start = prompt(qbin, seed=7)[:5]
    with torch.no_grad():
        hf = hf_model(folders(arch), round_f16=True).generate(torch.tensor([start]), max_new_tokens=new,
                                                              min_new_tokens=new, do_sample=False)
    session = Session(model)
    logits = session.feed(list(start))
    got = []
    for _ in range(new):
        got.append(int(np.argmax(logits)))
        logits = session.step(got[-1])
    assert got == hf[0, len(start):].tolist()


@pytest.mark.parametrize("arch,method", [("gemma3", "awq"), ("phi3", "awq"), ("gemma2", "gptq"), ("olmo2", "gptq"),
                                         ("smollm3", "gptq")])
def test_calibrated_methods_quantize_every_architecture(folders, files, arch, method, tmp_path):
    """GPTQ and AWQ run through the calibration layer of convert/layerwise.py (checked against
    the runtime in test_block.py). On the calibration text their int4 file's logits are closer to
    f16's than int4 RTN's (a random model has no other text worth measuring on)."""
    import qformat

    text = "Language models predict the next token. The weather is sunny today; 42 + 7 = 49. "
    calib = tmp_path / "calib.txt"
    calib.write_text(text * 60)
    qbin = tmp_path / "q.qbin"
    convert(folders(arch), qbin, "int4-g32", progress=False, method=method, calib=str(calib), calib_samples=4,
            calib_seqlen=32)
    ids = qformat.load(qbin).tokenizer.encode(text * 2, add_bos=False)[:32]
    ref = Transformer(QbinReader(files(arch, "f16"))).forward(ids, 0, all_logits=True)
    got = Transformer(QbinReader(qbin)).forward(ids, 0, all_logits=True)
    rtn = Transformer(QbinReader(files(arch, "int4-g32"))).forward(ids, 0, all_logits=True)
    scale = np.abs(ref).max()
    err, rtn_err = (np.sqrt(np.mean((x - ref) ** 2)) / scale for x in (got, rtn))
    print(f"{arch} {method}: rms |int4 - f16| / max |logit| = {err:.3f} (RTN {rtn_err:.3f})")
    assert err < rtn_err


def test_qinfo_shows_what_the_blocks_do(files):
    from qformat.qinfo import render, summarize

    def info(arch: str) -> str:
        return render(summarize(QbinReader(files(arch, "f16"))))

    text = info("gemma3")
    for part in ("gemma3", "qk norm", "sliding window 8 on 1 of 2 layers", "local rope theta 10000.0",
                 "gelu_tanh gate", "embeddings x8.944", "post-norms", "attention scale 0.2041"):
        assert part in text, part
    text = info("olmo2")
    assert "qk norm over whole projections" in text and "no pre-norms" in text
    assert "no RoPE in layers [1]" in info("smollm3")
    assert "logit soft cap 3.0" in info("gemma2")


def test_released_config_styles():
    """config.json as the released checkpoints write it (transformers 4: no layer_types, Gemma 3's
    local base as rope_local_base_freq, SmolLM3's NoPE layers by interval), read as transformers
    reads it."""
    from qformat.convert.hf_config import model_args

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=32, vocab_size=100)
    g3 = model_args(dict(common, architectures=["Gemma3ForCausalLM"], sliding_window=512, sliding_window_pattern=6,
                         rope_theta=1000000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=256,
                         rope_scaling={"rope_type": "linear", "factor": 8.0}, hidden_activation="gelu_pytorch_tanh"))
    assert g3.layer_types == ["sliding"] * 5 + ["full"] + ["sliding"] * 5 + ["full"]
    assert (g3.rope_local_theta, g3.rope_theta, g3.rope_scaling.factor) == (10000.0, 1000000.0, 8.0)
    assert g3.activation == "gelu_tanh" and g3.attn_scale == 256 ** -0.5 and g3.embed_scale == 8.0
    assert g3.window_of(0) == 512 and g3.window_of(5) is None
    g2 = model_args(dict(common, architectures=["Gemma2ForCausalLM"], sliding_window=4096,
                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0))
    assert g2.layer_types == ["sliding", "full"] * 6 and (g2.attn_softcap, g2.final_softcap) == (50.0, 30.0)
    s3 = model_args(dict(common, architectures=["SmolLM3ForCausalLM"], no_rope_layer_interval=4))
    assert s3.nope_layers == [3, 7, 11] and s3.sliding_window is None
    olmo = model_args(dict(common, architectures=["Olmo2ForCausalLM"]))
    assert (olmo.pre_norms, olmo.post_norms, olmo.qk_norm, olmo.qk_norm_per_head) == (False, True, True, False)
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        model_args(dict(common, architectures=["LlamaForCausalLM"], hidden_act="relu"))
    with pytest.raises(ValueError, match="Gemma3ForCausalLM.*Olmo2ForCausalLM.*SmolLM3ForCausalLM.*Phi3ForCausalLM"):
        model_args(dict(common, architectures=["PhiForCausalLM"]))
    phi = model_args(dict(common, architectures=["Phi3ForCausalLM"], max_position_embeddings=131072,
                          original_max_position_embeddings=4096, sliding_window=2047,
                          rope_scaling={"type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16}))
    assert phi.rope_scaling.kind == "longrope" and phi.rope_scaling.factor == 32.0
    assert abs(phi.rope_scaling.attention_factor - (1 + np.log(32) / np.log(4096)) ** 0.5) < 1e-12
    assert phi.sliding_window == 2047 and phi.layer_types == []
    assert model_args(dict(common, architectures=["Phi3ForCausalLM"], partial_rotary_factor=0.75)).rotary_dim == 24
    with pytest.raises(ValueError, match="partial_rotary_factor 0.1 gives 3 rotary dims"):
        model_args(dict(common, architectures=["Phi3ForCausalLM"], partial_rotary_factor=0.1))


@pytest.mark.parametrize("arch", ["phi3", "phi4-mini"])
@pytest.mark.parametrize("backend", ["cpu", "cpu-per-op", "emulated-cuda"])
def test_longrope_short_and_long_contexts(folders, files, arch, backend, request, monkeypatch):
    """A context within the original 16 positions rotates by the short factors, a longer one by
    the long factors, both scaled by the attention factor: each as transformers computes a
    sequence of that length (one prefill, then decode steps to its end)."""
    qbin = files(arch, "f16")
    theirs_model = hf_model(folders(arch), round_f16=True)
    tol = 1e-2 if backend == "emulated-cuda" else 1e-4
    for context, n in ((16, 14), (64, 40)):
        ids = [int(i) for i in np.random.default_rng(n).integers(0, QbinReader(qbin).model.vocab_size, n)]
        model = backend_model(qbin, backend, request, monkeypatch, context)
        ours = np.concatenate([model.forward(ids[:n - 4], 0, all_logits=True)]
                              + [model.forward(ids[p:p + 1], p)[None] for p in range(n - 4, n)])
        theirs = hf_logits(theirs_model, ids)
        assert np.abs(ours - theirs).max() <= tol * np.abs(theirs).max(), context


# ---------------------------------------------------------------------------- mixtures of experts

MOE = {"mixtral": dict(arch="mixtral", tied=False), "qwen3-moe": dict(arch="qwen3_moe", tied=True),
       "qwen2-moe": dict(arch="qwen2_moe", tied=False)}


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory):
    cache = {}

    def get(case, scheme):
        if case not in cache:
            cache[case] = make_tiny_checkpoint(tmp_path_factory.mktemp(case), seed=2, **MOE[case])
        if (case, scheme) not in cache:
            qbin = tmp_path_factory.mktemp(f"{case}-{scheme}") / "model.qbin"
            convert(cache[case], qbin, scheme, progress=False, clip_search=False)
            cache[case, scheme] = qbin
        return cache[case], cache[case, scheme]

    return get


def moe_hf_model(folder):
    """transformers on the f16-rounded weights, the router's excepted (the file keeps it in f32)."""
    from tiny_models import ROUTERS

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and not name.endswith(ROUTERS):
                p.copy_(p.half().float())
    return model


@pytest.mark.parametrize("case, backend", [(c, b) for c in MOE for b in ("cpu", "cpu-per-op", "emulated-cuda")])
def test_moe_f16_logits_match_transformers(moe_files, case, backend, request, monkeypatch):
    """Prefill (rows of one prompt routed to each expert: one product per expert) and decode
    steps (the fused step's routing in numba; the CUDA step's on the host, eagerly)."""
    folder, qbin = moe_files(case, "f16")
    ids = prompts(qbin)
    ours = run_logits(backend_model(qbin, backend, request, monkeypatch), ids)
    theirs = hf_logits(moe_hf_model(folder), ids)
    tol = 1e-2 if backend == "emulated-cuda" else 1e-4
    assert np.abs(ours - theirs).max() <= tol * np.abs(theirs).max()


@pytest.mark.parametrize("case", list(MOE))
def test_moe_stacks_experts_and_keeps_the_router(moe_files, case):
    """Each expert's matrices are its rows of one stacked tensor per projection (spec §3.1);
    the router stays float32; int4 runs close to f16 (as test_runtime_model allows int4-g32)."""
    folder, f16 = moe_files(case, "f16")
    _, q4 = moe_files(case, "int4-g32")
    r = QbinReader(q4)
    a = r.model
    assert a.moe and a.n_experts == 4 and a.experts_per_token == 2
    assert r["layers.0.ffn.w1"].shape == (4 * a.ffn_dim, a.dim) and r["layers.0.ffn.w2"].shape == (4 * a.dim, a.ffn_dim)
    assert r["layers.0.ffn.router"].kind == "f32"
    if case == "qwen2-moe":  # the shared expert: a dense MLP of its own width, its gate in float32
        assert a.shared_ffn_dim == 72 and r["layers.0.ffn.shared_gate"].kind == "f32"
        assert r["layers.0.ffn.shared_w1"].shape == (72, a.dim) and r["layers.0.ffn.shared_w2"].kind == "q4"
    from qformat.qinfo import render, summarize

    assert "4 experts, 2 per token" in render(summarize(r))
    assert ("a shared expert of 72" in render(summarize(r))) == (case == "qwen2-moe")
    from qformat.convert.checkpoint import Checkpoint

    expert = "model.layers.0.block_sparse_moe.experts.2.w2.weight" if case == "mixtral" else \
        "model.layers.0.mlp.experts.2.down_proj.weight"
    want = Checkpoint(folder).read(expert).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(QbinReader(f16)["layers.0.ffn.w2"].dequantize()[2 * a.dim:3 * a.dim], want)
    ids = prompt(q4, seed=9)
    ref = Transformer(QbinReader(f16)).forward(ids, 0, all_logits=True)
    got = Transformer(r).forward(ids, 0, all_logits=True)
    assert np.abs(got - ref).max() <= 0.25 * np.abs(ref).max()


@pytest.mark.parametrize("scheme,decode_tol", [("int8", 1e-4), ("int4-g32", 8e-2)])
@pytest.mark.parametrize("case", list(MOE))
def test_moe_quantized_logits_match_transformers_on_the_dequantized_weights(moe_files, case, scheme, decode_tol):
    """As for the dense architectures: each expert's dequantized rows (and a shared expert's) in
    transformers' own mixture, the router in float32 on both sides."""
    assert_close_to_dequantized(*moe_files(case, scheme), decode_tol, f"{case} {scheme}")


@pytest.mark.parametrize("case, backend", [(c, b) for c in MOE for b in ("cpu", "emulated-cuda")])
def test_moe_greedy_text_equals_transformers(moe_files, case, backend, request, monkeypatch):
    folder, qbin = moe_files(case, "f16")
    model = moe_hf_model(folder)
    start = prompt(qbin, seed=7)[:5]
    with torch.no_grad():
        hf = model.generate(torch.tensor([start]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    session = Session(backend_model(qbin, backend, request, monkeypatch))
    logits = session.feed(list(start))
    got = []
    for _ in range(32):
        got.append(int(np.argmax(logits)))
        logits = session.step(got[-1])
    assert got == hf[0, len(start):].tolist()


def test_moe_refuses_what_it_does_not_run(moe_files, tmp_path):
    from qformat.convert.hf_config import model_args
    from qformat.convert.plan import ConvertError

    folder, _ = moe_files("mixtral", "f16")
    calib = tmp_path / "calib.txt"
    calib.write_text("Language models predict the next token. " * 60)
    for options in (dict(method="gptq", act_order=True, static_groups=False), dict(method="awq", outliers="1%"),
                    dict(prune="2:4"), dict(target_bpw=4.0)):
        with pytest.raises(ConvertError, match="does not handle mixtures of experts"):
            convert(folder, tmp_path / "g.qbin", "int4-g32", progress=False, calib=str(calib), **options)
        assert not (tmp_path / "g.qbin").exists()
    common = dict(architectures=["Qwen3MoeForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, vocab_size=100, num_experts=8, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="dense MLP"):
        model_args(dict(common, mlp_only_layers=[1]))
    with pytest.raises(ValueError, match="only Qwen2-MoE's shared expert"):
        model_args(dict(common, shared_expert_intermediate_size=64))


@pytest.mark.parametrize("arch", ["gemma3", "phi4-mini"])
def test_qformat_load_generates(files, arch):
    """The public API on these files: greedy text from qformat.load(...).generate is the model's
    own argmax steps, decoded by the file's tokenizer, up to an end token."""
    import qformat

    m = qformat.load(files(arch, "int4-g32"), threads=1)
    ids = m.tokenizer.encode("The capital of France is")
    text = "".join(m.generate(ids, max_tokens=8, temperature=0))
    session = Session(m.transformer)
    logits = session.feed(list(ids))
    want = []
    while len(want) < 8 and (not want or want[-1] not in m.transformer.args.eos_token_ids):
        want.append(int(np.argmax(logits)))
        logits = session.step(want[-1])
    want = [t for t in want if t not in m.transformer.args.eos_token_ids]
    assert text == m.tokenizer.decode(want)


@pytest.mark.parametrize("case,method,samples", [("mixtral", "gptq", 4), ("qwen3-moe", "awq", 4), ("mixtral", "gptq", 1),
                                                 ("qwen2-moe", "gptq", 4), ("qwen2-moe", "awq", 4)])
def test_moe_calibrates_each_expert(moe_files, case, method, samples, tmp_path):
    """GPTQ and AWQ quantize a mixture expert by expert on the calibration tokens routed to it
    (layerwise.moe_stage); on the calibration text the file is closer to f16 than int4 RTN. With
    one sample of 32 tokens each expert gets about 16, below MIN_EXPERT_TOKENS: all experts are
    calibrated on all 32."""
    import qformat

    folder, f16 = moe_files(case, "f16")
    _, rtn = moe_files(case, "int4-g32")
    text = "Language models predict the next token. The weather is sunny today; 42 + 7 = 49. "
    calib = tmp_path / "calib.txt"
    calib.write_text(text * 60)
    qbin = tmp_path / "q.qbin"
    convert(folder, qbin, "int4-g32", progress=False, method=method, calib=str(calib), calib_samples=samples,
            calib_seqlen=32)
    ids = qformat.load(qbin).tokenizer.encode(text * 2, add_bos=False)[:32]
    ref = Transformer(QbinReader(f16)).forward(ids, 0, all_logits=True)
    got, base = (Transformer(QbinReader(q)).forward(ids, 0, all_logits=True) for q in (qbin, rtn))
    err, rtn_err = (np.sqrt(np.mean((x - ref) ** 2)) / np.abs(ref).max() for x in (got, base))
    print(f"{case} {method}: rms |int4 - f16| / max |logit| = {err:.4f} (RTN {rtn_err:.4f})")
    assert err < rtn_err
