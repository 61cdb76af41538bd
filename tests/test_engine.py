"""The paged KV pool (runtime/kvcache.py) and continuous batching (runtime/engine.py) on tiny
models: many sequences in one step give the tokens each gives alone, and blocks come back."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import make_tiny_checkpoint  # noqa: E402

import qformat  # noqa: E402
from qformat.convert import convert  # noqa: E402
from qformat.runtime.engine import Engine, Request  # noqa: E402
from qformat.runtime.kvcache import BlockPool, PoolExhausted, SequenceKV  # noqa: E402
from qformat.runtime.model import Transformer  # noqa: E402
from qformat.runtime.sampling import SamplingParams  # noqa: E402

CASES = {"llama-int8": ("llama", "int8"), "llama-int4": ("llama", "int4-g32"),
         "mistral-window-f16": ("mistral", "f16")}


@pytest.fixture(scope="module")
def qbin(tmp_path_factory):
    cache = {}

    def get(case: str):
        if case not in cache:
            arch, scheme = CASES[case]
            overrides = {"sliding_window": 8} if arch == "mistral" else None
            folder = make_tiny_checkpoint(tmp_path_factory.mktemp(case), arch=arch, tied=True, seed=2,
                                          config_overrides=overrides)
            cache[case] = folder.parent / f"{case}.qbin"
            convert(folder, cache[case], scheme, progress=False, clip_search=False)
        return cache[case]

    return get


def prompts(vocab: int, n: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [[int(t) for t in rng.integers(3, vocab, 3 + 7 * i)] for i in range(n)]


def run_engine(model, requests: list[Request], **kw) -> list[list[int]]:
    engine = Engine(model.transformer, model.tokenizer, **kw)
    seqs = [engine.submit(r) for r in requests]
    engine.run_all()
    assert model.transformer.pool.blocks_in_use == 0
    return [s.generated for s in seqs]


@pytest.mark.parametrize("case", list(CASES))
def test_batched_equals_alone(qbin, case):
    """8 concurrent greedy requests of different prompt lengths (3 to 52 tokens), prefilled in
    chunks of 20 tokens interleaved with the others' decode steps, give the tokens of each run
    alone."""
    model = qformat.load(qbin(case), threads=1)
    reqs = [Request(p, max_tokens=12) for p in prompts(model.args.vocab_size, 8)]
    alone = [run_engine(model, [r], max_batch=1, prefill_chunk=20)[0] for r in reqs]
    together = run_engine(model, reqs, max_batch=8, prefill_chunk=20, step_tokens=30)
    assert together == alone
    assert all(len(t) == 12 for t in alone)  # no EOS: the requests name none


def test_sampled_requests_follow_their_seeds(qbin):
    model = qformat.load(qbin("llama-int8"), threads=1)
    params = SamplingParams(temperature=0.9, top_p=0.95)
    reqs = [Request(p, 10, params, seed=i) for i, p in enumerate(prompts(model.args.vocab_size, 4))]
    alone = [run_engine(model, [r], max_batch=1)[0] for r in reqs]
    assert run_engine(model, reqs, max_batch=4) == alone
    assert len({tuple(a) for a in alone}) == 4


def test_preemption_recomputes_and_keeps_the_tokens(qbin):
    """A pool of 6 blocks of 16 positions cannot hold four 30-token sequences at once: the newest
    are preempted, recomputed later, and still give their tokens alone."""
    path = qbin("llama-int8")
    model = qformat.load(path, threads=1)
    reqs = [Request(p[:20], max_tokens=10) for p in prompts(model.args.vocab_size, 8)[3:7]]
    alone = [run_engine(model, [r], max_batch=1)[0] for r in reqs]
    small = qformat.load(path, threads=1)
    small.transformer = Transformer(small.reader, context=64, kv_blocks=6)
    assert run_engine(small, reqs, max_batch=4) == alone


def test_cancel_frees_blocks_and_prefix_is_reused(qbin):
    model = qformat.load(qbin("llama-int8"), threads=1)
    pool = model.transformer.pool
    engine = Engine(model.transformer, model.tokenizer, max_batch=4)
    system = prompts(model.args.vocab_size, 6)[5][:40]  # two full blocks and a part
    first = engine.submit(Request(system + [5, 6], max_tokens=30))
    other = engine.submit(Request(system[:10], max_tokens=30))
    for _ in range(4):
        engine.step()
    assert pool.blocks_in_use > 0
    engine.cancel(first)
    engine.cancel(other)
    assert (first.finish_reason, other.finish_reason) == ("cancelled", "cancelled")
    assert pool.blocks_in_use == 0 and not engine.busy
    # the first prompt's full blocks stay published: a prompt that starts alike takes them
    again = engine.submit(Request(system + [9], max_tokens=3))
    engine.run_all()
    assert again.cached_tokens == 32 and again.prefill_tokens == len(system) + 1 - 32
    fresh = run_engine(qformat.load(qbin("llama-int8"), threads=1), [Request(system + [9], max_tokens=3)])[0]
    assert again.generated == fresh
    assert pool.blocks_in_use == 0


def test_stop_strings_eos_and_lengths(qbin):
    model = qformat.load(qbin("llama-int8"), threads=1)
    p = prompts(model.args.vocab_size, 1)[0]
    free = run_engine(model, [Request(p, max_tokens=8)])[0]
    engine = Engine(model.transformer, model.tokenizer)
    eos = engine.submit(Request(p, max_tokens=8, eos_ids=frozenset({free[3]})))
    text = model.tokenizer.decode(free)
    cut = text[len(model.tokenizer.decode(free[:2])):][:2]
    stop = engine.submit(Request(p, max_tokens=8, stop=(cut,))) if cut.strip() else None
    zero = engine.submit(Request(p, max_tokens=0))
    engine.run_all()
    assert eos.finish_reason == "eos" and eos.generated == free[:free.index(free[3])]
    assert zero.finish_reason == "length" and zero.generated == []
    if stop is not None:
        assert stop.finish_reason == "stop" and cut not in stop.take()


def test_pool_blocks_and_copy_on_write(qbin):
    args = qformat.load(qbin("llama-int8"), threads=1).args
    pool = BlockPool(args, 4, context=64, block_size=4)
    a = SequenceKV(pool)
    a.reserve(6)
    pool.k[:, a.slots[:6]] = 1.0
    a.written([1, 2, 3, 4, 5, 6])  # block 0 full: published
    b = SequenceKV(pool)
    assert b.match([1, 2, 3, 4, 7, 8]) == 4 and b.blocks[0] == a.blocks[0] and pool.refs[a.blocks[0]] == 2
    a.truncate(2)  # a keeps 2 positions of a shared block: it gets a copy of its own
    assert a.blocks[0] != b.blocks[0] and (pool.k[:, a.slots[:2]] == 1.0).all()
    with pytest.raises(PoolExhausted):
        c = SequenceKV(pool)
        c.reserve(4 * 4)
    c.free()
    a.free()
    b.free()
    assert pool.blocks_in_use == 0 and pool.blocks_free == 4
