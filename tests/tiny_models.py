"""Tiny random Hugging Face checkpoints built by transformers, for tests (nothing downloaded).

make_tiny_checkpoint() writes an ordinary HF model folder: config.json, safetensors weights
(single or sharded), generation_config.json and a tokenizer trained here on a small text,
either tokenizer.json (the `tokenizers` library, byte-level BPE) or tokenizer.model
(SentencePiece with byte fallback). Layer widths are chosen so that group sizes 32, 64 and 128
all leave a partial last group somewhere.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2", "smollm3", "phi3", "mixtral", "qwen3_moe",
         "qwen2_moe")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the tokenizers are trained on: prose, code, digits and some non-ASCII.
_TRAINING_LINES = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "for i in range(10): total += i * 2  # running sum",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159",
    "Grüße aus Köln, naïve café, 東京, emoji 🙂 and more text.",
    "Language models predict the next token from the previous ones.",
    "Quantization stores weights with fewer bits per value.",
    "The weather today is sunny with a light breeze from the west.",
    "She sells sea shells by the sea shore; the shells she sells are surely seashells.",
]


# A mixture's router weights and shared-expert gates (kept in float32), by their names in
# transformers' modules.
ROUTERS = ("block_sparse_moe.gate.weight", "mlp.gate.weight", "mlp.shared_expert_gate.weight")


def training_text(repeat: int = 20) -> list[str]:
    """The tokenizer training corpus (lines), deterministic."""
    return [line for _ in range(repeat) for line in _TRAINING_LINES]


def _hf_json_tokenizer(dst: Path) -> tuple[int, dict[str, int]]:
    """Train a byte-level BPE, save tokenizer.json + tokenizer_config.json + chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text(), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dst)
    ids = {"bos": tok.token_to_id("<|im_start|>"), "eos": tok.token_to_id("<|im_end|>")}
    return tok.get_vocab_size(), ids


def _sentencepiece_tokenizer(dst: Path) -> tuple[int, dict[str, int]]:
    """Train a SentencePiece model, save tokenizer.model + tokenizer_config.json (template inside)."""
    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()), model_writer=proto, vocab_size=400, hard_vocab_limit=False,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        # as Llama's and Mistral's models: no normalization, whitespace kept (what GGUF assumes)
        normalization_rule_name="identity", remove_extra_whitespaces=False,
    )
    (dst / "tokenizer.model").write_bytes(proto.getvalue())
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer", "chat_template": CHAT_TEMPLATE}
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return _sp_size(proto.getvalue()), {"bos": 1, "eos": 2}


def _sp_size(proto: bytes) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=proto).get_piece_size()


def _config(arch: str, vocab: int, tied: bool, ids: dict[str, int], overrides: dict):
    import transformers

    common = dict(
        vocab_size=vocab, hidden_size=80, intermediate_size=144, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
    )
    per_arch = {
        "llama": (transformers.LlamaConfig, {}),
        "mistral": (transformers.MistralConfig, {"sliding_window": 64, "head_dim": 20}),
        "qwen2": (transformers.Qwen2Config, {}),
        "qwen3": (transformers.Qwen3Config, {"head_dim": 24}),  # head_dim != hidden / heads
        # soft caps small enough that tanh bends the tiny model's scores and logits; layer 0
        # sliding, layer 1 global
        "gemma2": (transformers.Gemma2Config, {"head_dim": 24, "query_pre_attn_scalar": 32, "sliding_window": 8,
                                               "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
                                               "layer_types": ["sliding_attention", "full_attention"]}),
        # local RoPE 10k on the sliding layer, the global one 1M and linearly scaled
        "gemma3": (transformers.Gemma3TextConfig, {
            "head_dim": 24, "query_pre_attn_scalar": 24, "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}}),
        "olmo2": (transformers.Olmo2Config, {}),
        "smollm3": (transformers.SmolLM3Config, {"no_rope_layers": [1, 0], "pad_token_id": ids["eos"]}),  # layer 1: NoPE
        # fused qkv_proj and gate_up_proj; LongRoPE trained on 16 positions, extended to 64
        "phi3": (transformers.Phi3Config, {
            "max_position_embeddings": 64, "original_max_position_embeddings": 16, "pad_token_id": ids["eos"],
            "rope_scaling": {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(10)],
                             "long_factor": [2.0 + 0.5 * i for i in range(10)]}}),
        # 4 experts, 2 per token
        "mixtral": (transformers.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}),
        "qwen3_moe": (transformers.Qwen3MoeConfig, {"num_experts": 4, "num_experts_per_tok": 2, "head_dim": 24,
                                                    "moe_intermediate_size": 48, "norm_topk_prob": False}),
        # a shared expert of its own width beside the routed ones, its sigmoid gate
        "qwen2_moe": (transformers.Qwen2MoeConfig, {"num_experts": 4, "num_experts_per_tok": 2,
                                                    "moe_intermediate_size": 48,
                                                    "shared_expert_intermediate_size": 72}),
    }
    if arch not in per_arch:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {', '.join(per_arch)}")
    cls, extra = per_arch[arch]
    return cls(**{**common, **extra, **overrides})


def make_tiny_checkpoint(dst_dir, arch: str = "llama", tied: bool = True, dtype: str = "float32",
                         sharded: bool = False, tokenizer: str = "hf-json", seed: int = 0,
                         config_overrides: dict | None = None) -> Path:
    """Save a tiny random `arch` model (one of ARCHS) and a tokenizer into dst_dir.

    dtype: "float32", "bfloat16" or "float16". sharded: split the safetensors into several
    files with model.safetensors.index.json. tokenizer: "hf-json" or "sentencepiece".
    config_overrides: extra config keys (e.g. rope_scaling). Returns dst_dir as a Path.
    """
    import torch
    import transformers

    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    if tokenizer == "hf-json":
        vocab, ids = _hf_json_tokenizer(dst)
    elif tokenizer == "sentencepiece":
        vocab, ids = _sentencepiece_tokenizer(dst)
    else:
        raise ValueError(f"tokenizer must be 'hf-json' or 'sentencepiece', not {tokenizer!r}")
    vocab = -(-vocab // 16) * 16  # checkpoints usually pad the vocabulary
    config = _config(arch, vocab, tied, ids, config_overrides or {})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # default init gives zero-ish norms; make every tensor informative
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:  # q/k/v biases
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith(ROUTERS):  # routing clear of near-ties (the default init's logits are ~0.2)
                p.mul_(10.0)
    model = model.to(getattr(torch, dtype)).eval()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(dst, max_shard_size=max(total // 3, 1) if sharded else "50GB")
    return dst


def float_model_on(folder, qbin):
    """transformers' float32 model of the checkpoint `folder` with the qbin file's dequantized
    weights (what peft runs on when it is compared with a qbin model)."""
    import torch
    import transformers

    from qformat import QbinReader
    from qformat.tune.adapter import load_dequantized

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with QbinReader(qbin) as reader:
        load_dequantized(model, reader)
    return model.eval()
