"""The one block description (qformat.block) and the torch layer of convert/layerwise.py, which
the calibrated methods quantize through, compute one model: for every architecture of the
converter and every ModelArgs flag that shapes a block, the torch layers' logits equal the
runtime's (which runs the description) on the same float32 weights."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tiny_models import make_tiny_checkpoint  # noqa: E402

from qformat import block as B  # noqa: E402
from qformat import tensors as T  # noqa: E402
from qformat.config import ModelArgs  # noqa: E402
from qformat.convert import convert  # noqa: E402
from qformat.convert.architectures import ARCHITECTURES, lookup, tensor_rules  # noqa: E402
from qformat.convert.checkpoint import Checkpoint  # noqa: E402
from qformat.convert.layerwise import embed, head_logits, layer_forward, rms_norm, rope_tables  # noqa: E402
from qformat.reader import QbinReader  # noqa: E402
from qformat.runtime.model import Transformer  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
CASES = {
    "llama-tied": dict(arch="llama", tied=True),
    "llama-untied-linear-rope": dict(arch="llama", tied=False,
                                     config_overrides={"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama3-rope": dict(arch="llama", tied=False, config_overrides={"rope_scaling": LLAMA3_ROPE,
                                                                    "rope_theta": 500000.0}),
    "mistral-window": dict(arch="mistral", tied=False, config_overrides={"sliding_window": 8}),
    "qwen2-bias": dict(arch="qwen2", tied=True),
    "qwen3-qknorm": dict(arch="qwen3", tied=False),
    "gemma2-softcaps-window": dict(arch="gemma2", tied=True),
    "gemma3-local-rope": dict(arch="gemma3", tied=True),
    "olmo2-post-norms": dict(arch="olmo2", tied=False),
    "smollm3-nope": dict(arch="smollm3", tied=True),
    "phi3-fused-longrope": dict(arch="phi3", tied=False),
    "mixtral-moe": dict(arch="mixtral", tied=False),
    "qwen3-moe-unnormalized-topk": dict(arch="qwen3_moe", tied=True),
    "qwen2-moe-shared-expert": dict(arch="qwen2_moe", tied=False),
    "phi4-mini-partial-rotary": dict(arch="phi3", tied=True, config_overrides={
        "partial_rotary_factor": 0.6, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 6,
                                                       "long_factor": [1.5 + 0.2 * i for i in range(6)]}}),
}
# ModelArgs fields that do not shape a block: sizes (every case varies none of them on purpose,
# the tiny models have their own) and token ids.
NOT_BLOCK_FLAGS = {"arch", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                   "norm_eps", "rope_theta", "max_seq_len", "bos_token_id", "eos_token_ids", "pad_token_id"}
TOKENS = 24


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            folder = make_tiny_checkpoint(tmp_path_factory.mktemp(case), seed=4, **CASES[case])
            qbin = tmp_path_factory.mktemp(f"{case}-qbin") / "model.qbin"
            convert(folder, qbin, "f32", progress=False)
            cache[case] = folder, qbin
        return cache[case]

    return get


def test_every_architecture_and_flag_has_a_case(built):
    """A new architecture or a new ModelArgs flag fails here until a case below exercises it:
    every flag takes more than one value over the cases."""
    args = [QbinReader(built(c)[1]).model for c in CASES]
    assert {a.arch for a in args} >= {a.arch for a in ARCHITECTURES.values()}
    for flag in {f.name for f in dataclasses.fields(ModelArgs)} - NOT_BLOCK_FLAGS:
        assert len({repr(getattr(a, flag)) for a in args}) > 1, f"every case has the same {flag}"


def torch_logits(folder, args: ModelArgs, ids: list[int]) -> np.ndarray:
    """The model through convert/layerwise.py's layer, float32 weights from the checkpoint."""
    ckpt = Checkpoint(folder)
    arch = lookup(ckpt_arch(folder))
    rules = tensor_rules(arch, args.n_layers)
    ckpt.add_offset([hf for hf, _, role in rules if role == "norm"], arch.norm_offset)  # as the converter reads them
    for i in range(args.n_layers):
        for fused, parts in arch.split_parts(args, i):
            ckpt.split(fused, parts)
        for stacked, parts in arch.stack_parts(args, i):
            ckpt.stack(stacked, parts)
    rope = rope_tables(args, len(ids), "cpu")
    with torch.no_grad():
        x = embed(torch.from_numpy(ckpt.read("model.embed_tokens.weight")), [ids], args)
        for i in range(args.n_layers):
            w = {T.parse_name(q)[0].key: torch.from_numpy(ckpt.read(hf)) for hf, q, _ in rules
                 if T.parse_name(q)[1] == i and hf in ckpt}
            x = layer_forward(x, w, args, rope, i)
        x = rms_norm(x, torch.from_numpy(ckpt.read("model.norm.weight")), args.norm_eps)
        head = "model.embed_tokens.weight" if args.tie_embeddings else "lm_head.weight"
        return head_logits(x, torch.from_numpy(ckpt.read(head)), args)[0].numpy()


def ckpt_arch(folder) -> str:
    import json

    return json.loads((folder / "config.json").read_text())["architectures"][0]


@pytest.mark.parametrize("case", list(CASES))
def test_calibration_layer_matches_the_runtime(built, case):
    folder, qbin = built(case)
    reader = QbinReader(qbin)
    ids = [int(i) for i in np.random.default_rng(11).integers(0, reader.model.vocab_size, TOKENS)]
    ours = Transformer(reader, fused=False).forward(ids, 0, all_logits=True)
    theirs = torch_logits(folder, reader.model, ids)
    # float32 both; RoPE tables in float64 (torch) vs float32 (runtime), summation order
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5 * np.abs(theirs).max())


def test_the_runtime_runs_exactly_the_description(built):
    """Every step of every block is run, by a step class the block's kind maps to."""
    from qformat.runtime import model as M

    _, qbin = built("qwen3-qknorm")
    t = Transformer(QbinReader(qbin), fused=False)
    description = B.decoder(t.args)
    assert [b.spec for b in t.layers + [t.output]] == description
    assert all(isinstance(run, M.STEPS[type(s)]) for b in t.layers for run, s in zip(b.steps, b.spec.steps))
    assert set(M.STEPS) == set(B.STEP_TYPES)
