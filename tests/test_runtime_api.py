"""The embedding API (qformat.load -> generate / logits / tokenizer), sampling and streaming."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

from tiny_models import make_tiny_checkpoint  # noqa: E402

import qformat  # noqa: E402
from qformat.convert import convert  # noqa: E402
from qformat.runtime.chat import Conversation  # noqa: E402
from qformat.runtime.generate import Session  # noqa: E402
from qformat.runtime.sampling import SamplingParams, filtered_probs, sample  # noqa: E402


@pytest.fixture(scope="module")
def qbins(tmp_path_factory):
    out = {}
    for tok in ("hf-json", "sentencepiece"):
        folder = make_tiny_checkpoint(tmp_path_factory.mktemp(tok), arch="llama", tied=True, tokenizer=tok, seed=1)
        out[tok] = folder.parent / f"{tok}.qbin"
        convert(folder, out[tok], "int8", progress=False, clip_search=False)
    return out


@pytest.fixture(scope="module")
def model(qbins):
    return qformat.load(qbins["hf-json"], threads=1)


def test_generate_streams_text_and_respects_max_tokens(model):
    pieces = list(model.generate("The capital of France is", max_tokens=10))
    assert all(isinstance(p, str) for p in pieces)
    assert model.stats.generated_tokens <= 10
    assert model.stats.stop_reason in ("length", "eos")
    # greedy is deterministic, and the text equals decoding the generated ids at once
    again = "".join(model.generate("The capital of France is", max_tokens=10))
    assert again == "".join(pieces)


def test_seed_makes_sampling_reproducible(model):
    kw = dict(max_tokens=12, temperature=1.5, top_k=50, seed=7)
    a = "".join(model.generate("Numbers:", **kw))
    b = "".join(model.generate("Numbers:", **kw))
    assert a == b
    outs = {"".join(model.generate("Numbers:", max_tokens=12, temperature=1.5, seed=s)) for s in range(6)}
    assert len(outs) > 1


def test_stop_string_ends_output_before_it(model):
    full = "".join(model.generate("The quick", max_tokens=24, temperature=1.0, seed=3))
    if len(full) < 4:
        pytest.skip("model stopped too early to pick a stop string")
    stop = full[2:4]
    cut = "".join(model.generate("The quick", max_tokens=24, temperature=1.0, seed=3, stop=[stop]))
    assert cut == full[:full.find(stop)]
    assert model.stats.stop_reason == "stop"


def test_logits_shape_and_prefix_cache_consistency(model):
    ids = model.tokenizer.encode("Quantization stores weights with fewer bits", add_bos=False)
    full = model.logits(ids)
    assert full.shape == (len(ids), model.args.vocab_size) and full.dtype == np.float32
    # feeding a prefix, then the rest through the cache, gives the same last logits
    session = Session(model.transformer)
    session.feed(ids[:4])
    last = session.feed(ids)
    assert session.last_prefilled == len(ids) - 4
    np.testing.assert_allclose(last, full[-1], rtol=1e-4, atol=1e-4 * np.abs(full).max())


def test_prompt_errors(model):
    with pytest.raises(ValueError, match="empty prompt"):
        next(iter(model.generate("", max_tokens=2)))
    with pytest.raises(ValueError, match="context"):
        model.generate(list(range(5)) * (model.context // 5 + 1))


def test_chat_template_and_multi_turn(model):
    conv = Conversation(system="Be brief.")
    first = "".join(model.chat(conv, "Hello", max_tokens=5))
    assert conv.messages[-1] == {"role": "assistant", "content": first}
    rendered = model.chat_prompt(conv)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>")
    assert rendered.endswith("<|im_start|>assistant\n")
    "".join(model.chat(conv, "Again", max_tokens=5))
    assert len(conv.messages) == 4
    # the second turn reused the cached first turn: only the new tokens were prefilled
    assert model.stats.prefill_tokens < model.stats.prompt_tokens


@pytest.mark.parametrize("kind", ["hf-json", "sentencepiece"])
def test_stream_decoder_completes_multibyte_characters(qbins, kind):
    tok = qformat.load(qbins[kind], threads=1).tokenizer
    text = "Grüße aus Köln, 東京 🙂 and naïve café"
    ids = tok.encode(text, add_bos=False)
    # the byte-level vocabulary is tiny, so multi-byte characters span several tokens
    assert len(ids) > len(text.encode("utf-8")) // 4
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_tokenizer_bos(qbins):
    tok = qformat.load(qbins["sentencepiece"], threads=1).tokenizer
    assert tok.encode("hi")[0] == tok.bos_id == 1  # the file says add_bos for this tokenizer
    assert tok.encode("hi", add_bos=False)[0] != 1


# ---------------------------------------------------------------------------- sampling

LOGITS = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05]))


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(), np.random.default_rng(0)) == 0


def test_top_k_restricts_support():
    rng = np.random.default_rng(0)
    seen = {sample(LOGITS, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(300)}
    assert seen == {0, 1}


def test_top_p_and_min_p():
    p = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_p=0.7))
    assert set(np.nonzero(p)[0]) == {0, 1}  # 0.4 + 0.3 reaches 0.7
    p = filtered_probs(LOGITS, SamplingParams(temperature=1.0, min_p=0.3))
    assert set(np.nonzero(p)[0]) == {0, 1, 2}  # >= 0.3 * 0.4
    np.testing.assert_allclose(p.sum(), 1.0)


def test_sampling_follows_distribution_and_seed():
    draws = [sample(LOGITS, SamplingParams(temperature=1.0), np.random.default_rng(s)) for s in range(2000)]
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.04)
    a = [sample(LOGITS, SamplingParams(temperature=1.0), np.random.default_rng(9)) for _ in range(5)]
    b = [sample(LOGITS, SamplingParams(temperature=1.0), np.random.default_rng(9)) for _ in range(5)]
    assert a == b


def test_repetition_penalty_discourages_seen_tokens():
    p = SamplingParams(repetition_penalty=2.0)
    assert sample(LOGITS, p, np.random.default_rng(0), previous=np.array([0])) == 1


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(min_p=1.0), dict(top_k=-1)])
def test_bad_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_device_auto_falls_back_to_cpu_and_cuda_says_why(model):
    """Without a GPU (CI): "auto" runs on the CPU and says why; "cuda" is a ValueError naming
    the fix. (With one, "auto" must pick it.)"""
    from qformat.kernels.cuda.module import gpu_status
    from qformat.runtime.api import resolve_device

    has_gpu, detail = gpu_status()
    device, why = resolve_device("auto")
    if has_gpu:
        assert (device, why) == ("cuda", detail)
        return
    assert device == "cpu" and why.startswith("no GPU: ") and detail in why
    with pytest.raises(ValueError, match="--device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not one of"):
        resolve_device("tpu")
    assert qformat.load(model.reader.path, device="auto", threads=1).device == "cpu"
