"""f16 qbins of tiny random models of every architecture against transformers (fp32).

Tolerances. The qbin stores linear and embedding weights as float16, norms and biases as f32;
the runtime computes in float32. Against transformers running the *same f16-rounded weights* in
fp32, the only differences are summation order and float32 transcendental ulps: max |Δlogit| <=
1e-4 x max |logit| (observed ~1e-6). Against the original fp32 weights, f16 rounding (relative
2**-11 per weight) adds up to ~1e-3 relative: allowed 1e-2 x max |logit|, and the argmax must
agree wherever transformers' top-2 margin exceeds that tolerance.
Both are checked for a 12-token prefill and for 16 single-token decode steps after it.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import make_tiny_checkpoint  # noqa: E402

from qformat.convert import convert  # noqa: E402
from qformat.reader import QbinReader  # noqa: E402
from qformat.schemes import Tensor  # noqa: E402
from qformat.runtime.generate import Session  # noqa: E402
from qformat.runtime.model import Transformer  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
CASES = {
    "llama-tied": dict(arch="llama", tied=True),
    "llama-untied": dict(arch="llama", tied=False),
    "llama3-rope": dict(arch="llama", tied=False, config_overrides={"rope_scaling": LLAMA3_ROPE,
                                                                    "rope_theta": 500000.0}),
    "mistral-window": dict(arch="mistral", tied=False, config_overrides={"sliding_window": 8}),
    "qwen2-bias": dict(arch="qwen2", tied=True),
    "qwen3-qknorm": dict(arch="qwen3", tied=False),
}
PREFILL, DECODE = 12, 16


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            folder = make_tiny_checkpoint(tmp_path_factory.mktemp(case), seed=3, **CASES[case])
            qbin = folder.parent / f"{case}.qbin"
            convert(folder, qbin, "f16", progress=False)
            cache[case] = folder, qbin
        return cache[case]

    return get


def hf_logits(folder, ids, round_f16: bool) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if round_f16:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.copy_(p.half().float())
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def runtime_logits(qbin, ids) -> np.ndarray:
    model = Transformer(QbinReader(qbin))
    out = [model.forward(ids[:PREFILL], 0, all_logits=True)]
    for pos in range(PREFILL, len(ids)):
        out.append(model.forward(ids[pos:pos + 1], pos)[None])
    return np.concatenate(out)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(built, case):
    folder, qbin = built(case)
    vocab = QbinReader(qbin).model.vocab_size
    ids = [int(i) for i in np.random.default_rng(5).integers(0, vocab, PREFILL + DECODE)]
    ours = runtime_logits(qbin, ids)
    same_weights = hf_logits(folder, ids, round_f16=True)
    scale = np.abs(same_weights).max()
    assert np.abs(ours - same_weights).max() <= 1e-4 * scale
    original = hf_logits(folder, ids, round_f16=False)
    tol = 1e-2 * np.abs(original).max()
    assert np.abs(ours - original).max() <= tol
    top2 = np.sort(original, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > tol
    assert (ours.argmax(-1) == original.argmax(-1))[clear].all()


BACKENDS = ["emulated", pytest.param("gpu", marks=pytest.mark.gpu)]


def cuda_backend(backend, request, monkeypatch) -> None:
    """"emulated": kernels/cuda with CuPy replaced by NumPy and the .cu kernels built for the host
    (tests/cuda_emulation.py); "gpu": the real device."""
    if backend == "emulated":
        from cuda_emulation import emulate_cuda

        emulate_cuda(monkeypatch, request.getfixturevalue("cuda_host"))


def run_logits(model, ids) -> np.ndarray:
    """A 12-token prefill, then single-token steps (the device's one-call decode step)."""
    out = [model.forward(ids[:PREFILL], 0, all_logits=True)]
    out += [model.forward(ids[pos:pos + 1], pos)[None] for pos in range(PREFILL, len(ids))]
    return np.concatenate(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_model_path_matches_transformers(built, case, backend, request, monkeypatch):
    """The CUDA backend's whole model path (device="cuda": per-op prefill, the decode step of
    kernels/cuda/decoder.py) against transformers on the same f16 weights. Prefill multiplies
    float16 activations and the KV cache is float16, so the bound is the f16 one of the module
    docstring."""
    cuda_backend(backend, request, monkeypatch)
    folder, qbin = built(case)
    vocab = QbinReader(qbin).model.vocab_size
    ids = [int(i) for i in np.random.default_rng(6).integers(0, vocab, PREFILL + 4)]
    ours = run_logits(Transformer(QbinReader(qbin), device="cuda"), ids)
    same_weights = hf_logits(folder, ids, round_f16=True)
    assert np.abs(ours - same_weights).max() <= 1e-2 * np.abs(same_weights).max()


# Files the converter writes, each with the layouts and sidecars it names (checked in the file).
CUDA_FILES = {
    "int4-g32": ("int4-g32", {}, ()),
    "int8": ("int8", {}, ()),
    "nf4-g64": ("nf4-g64", {}, ()),
    "int3-g32-2:4": ("int3-g32", dict(prune="2:4", prune_method="magnitude"), ("sparse_index",)),
    "int4-gptq-outliers": ("int4-g32", dict(method="gptq", outliers="1%"), ("perm", "outlier_rowptr")),
    "w8a8-smooth-static": ("w8a8", dict(smooth=0.5, act_static=True), ("act_scale",)),
    "w8a8-decomposed": ("w8a8", dict(outlier_threshold=1.0), ("fp_cols",)),
}
CALIB_TEXT = "Language models predict the next token. The weather is sunny today; 42 + 7 = 49. " * 60


# The emulated device (10-20 s a file) runs the files whose decode step differs most: q4 on shared
# int8 activations with a permutation and outliers, n:m sparsity, W8A8 with 16-bit columns; every
# layout's op is checked there against its reference (test_kernel_table.py), and a GPU runs all.
EMULATED_FILES = ("int4-gptq-outliers", "int3-g32-2:4", "w8a8-decomposed")


@pytest.mark.parametrize("case, backend", [(c, "emulated") for c in EMULATED_FILES]
                         + [pytest.param(c, "gpu", marks=pytest.mark.gpu) for c in CUDA_FILES])
def test_cuda_quantized_model_matches_cpu(built, case, backend, request, monkeypatch, tmp_path):
    """Quantized files on the CUDA path against the CPU backend: decode computes the CPU's
    numbers (q4 on int8 activations, the rest in float), prefill float16 activations where the
    CPU prefills 4-bit weights on int8 ones (3% like test_outliers; else 1%)."""
    folder, _ = built("llama-untied")
    scheme, options, roles = CUDA_FILES[case]
    qbin, calib = tmp_path / "q.qbin", tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT)
    convert(folder, qbin, scheme, progress=False, calib=str(calib), calib_samples=4, calib_seqlen=32, **options)
    reader = QbinReader(qbin)
    held = {role for name in reader.names() if name.startswith("layers.") for role in reader[name].arrays}
    assert held.issuperset(roles), case
    ids = [int(i) for i in np.random.default_rng(7).integers(0, reader.model.vocab_size, PREFILL + 4)]
    cpu = run_logits(Transformer(reader), ids)
    cuda_backend(backend, request, monkeypatch)
    ours = run_logits(Transformer(QbinReader(qbin), device="cuda"), ids)
    tol = 3e-2 if "int4" in scheme else 1e-2
    assert np.abs(ours - cpu).max() <= tol * np.abs(cpu).max()


def test_greedy_golden_matches_transformers(built):
    """Exact greedy tokens of a tiny llama equal transformers' greedy decoding (same f16 weights)."""
    import qformat

    folder, qbin = built("llama-untied")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    m = qformat.load(qbin, threads=1)
    prompt = m.tokenizer.encode("The capital of France is", add_bos=False)
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16)
    expected = hf[0, len(prompt):].tolist()
    got = list(prompt)
    session = Session(m.transformer)
    logits = session.feed(got)
    for _ in range(16):
        token = int(np.argmax(logits))
        got.append(token)
        logits = session.step(token)
    assert got[len(prompt):] == expected


@pytest.mark.parametrize("scheme,tol", [("int8", 0.05), ("int4-g32", 0.25)])
def test_quantized_model_stays_close_to_f16(built, tmp_path, scheme, tol):
    folder, qbin = built("llama-untied")
    qq = tmp_path / f"{scheme}.qbin"
    convert(folder, qq, scheme, progress=False, clip_search=False)
    vocab = QbinReader(qbin).model.vocab_size
    ids = [int(i) for i in np.random.default_rng(6).integers(0, vocab, PREFILL + DECODE)]
    ref, got = runtime_logits(qbin, ids), runtime_logits(qq, ids)
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()


@pytest.mark.parametrize("case", ["qwen2-bias", "qwen3-qknorm", "mistral-window"])
def test_fused_decode_step_equals_per_operation_path(built, tmp_path, case):
    """The one-call decode step (kernels/cpu/fused.py) computes what the per-op path computes."""
    folder, _ = built(case)
    qq = tmp_path / "q.qbin"
    convert(folder, qq, "int4-g32", progress=False, clip_search=False)
    fused, plain = Transformer(QbinReader(qq)), Transformer(QbinReader(qq), fused=False)
    assert fused.fused is not None and plain.fused is None
    vocab = fused.args.vocab_size
    ids = [int(i) for i in np.random.default_rng(8).integers(0, vocab, 20)]
    fused.forward(ids[:4], 0)
    plain.forward(ids[:4], 0)
    for pos in range(4, 20):
        a, b = fused.forward(ids[pos:pos + 1], pos), plain.forward(ids[pos:pos + 1], pos)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_offsets_decode_fused_and_per_operation_alike(built, tmp_path):
    """A file whose grouped tensors carry offsets (spec §4.2, what a GGUF Q4_1 imports to) decodes
    alike on the fused step and the per-op path, and close to the file it came from."""
    from qbin_testutil import add_offsets
    from qformat.writer import QbinWriter

    folder, _ = built("llama-untied")
    qq, qo = tmp_path / "q.qbin", tmp_path / "offsets.qbin"
    convert(folder, qq, "int4-g32", progress=False, clip_search=False)
    r = QbinReader(qq)
    rng = np.random.default_rng(9)
    with QbinWriter(qo) as w:
        for name in r.names():
            t = r[name]
            if t.kind == "q4":
                t = add_offsets(Tensor(t.name, t.kind, t.shape, dict(t.arrays), t.group_size, t.symmetric), rng)
            w.add_tensor(t)
        w.finish(model=r.model, tokenizer=r.tokenizer, chat_template=r.chat_template, generation=r.generation,
                 provenance=r.provenance)
    assert "offsets" in QbinReader(qo)["layers.0.attn.wq"].arrays
    fused, plain = Transformer(QbinReader(qo)), Transformer(QbinReader(qo), fused=False)
    assert fused.fused is not None
    ids = [int(i) for i in np.random.default_rng(8).integers(0, fused.args.vocab_size, 12)]
    fused.forward(ids[:4], 0)
    plain.forward(ids[:4], 0)
    # the two paths share every kernel, but a prompt may prefill on a different one (the int8
    # activation GEMM vs per-token GEMVs), and a rounding flip of an int8 activation then moves
    # the logits by ~1e-3; leaving the offsets out moves them by far more than this bound
    for pos in range(4, 12):
        a, b = fused.forward(ids[pos:pos + 1], pos), plain.forward(ids[pos:pos + 1], pos)
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-2 * np.abs(b).max())


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g64-sym"])
def test_int8_activation_decode_stays_close_to_float_path(built, tmp_path, scheme):
    """Decode's 4-bit GEMVs round the activations to int8 per group (kernels/cpu/quant.py); a
    prefill of the same tokens runs the same weights with float activations (dequantize + BLAS).
    Allowed: 3% of the largest logit (measured 0.7% on this model)."""
    folder, _ = built("llama-untied")
    qq = tmp_path / f"{scheme}.qbin"
    convert(folder, qq, scheme, progress=False, clip_search=False)
    vocab = QbinReader(qq).model.vocab_size
    ids = [int(i) for i in np.random.default_rng(10).integers(0, vocab, 16)]
    float_path = Transformer(QbinReader(qq)).forward(ids, 0, all_logits=True)
    model = Transformer(QbinReader(qq))
    decoded = np.stack([model.forward(ids[p:p + 1], p) for p in range(len(ids))])
    err = np.abs(decoded - float_path).max() / np.abs(float_path).max()
    print(f"{scheme}: max |decode - float| / max |logit| = {err:.2e}")
    assert 0 < err <= 3e-2


def test_a_context_that_is_not_a_multiple_of_the_block_size(built):
    """--context 20 (blocks of 16): the last block is mapped, and its positions decode as with
    the model's whole context."""
    _, qbin = built("llama-untied")
    ids = [int(i) for i in np.random.default_rng(12).integers(0, QbinReader(qbin).model.vocab_size, 20)]
    short, whole = Transformer(QbinReader(qbin), context=20), Transformer(QbinReader(qbin))
    for model in (short, whole):
        model.forward(ids[:3], 0)
    for pos in range(3, 20):
        np.testing.assert_array_equal(short.forward(ids[pos:pos + 1], pos), whole.forward(ids[pos:pos + 1], pos))
