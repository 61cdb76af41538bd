"""The fuzzers' seed corpus: small valid inputs of every kind the parsers meet.

reader: the sample model of qbin_testutil (every kind, dtype and sidecar the writer accepts) and a
second one with the remaining encodings (offsets, log-coded scales, 5- and 6-bit groups, W8A8 with
static and input scales, an xz tokenizer), plus the runnable files below.
decode: tiny random models converted the ways users convert them (act-order permutations,
outliers, 2:4 sparsity, NF4, W8A8, log-coded scales, a mixture of experts), small enough that a
mutated copy loads and decodes a token in milliseconds.
tokenizer: the tiny models' tokenizer.json and SentencePiece model.
template: chat templates people ship (transformers' ChatML and Llama-2 style, the tiny models').
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from qbin_testutil import TOKENIZER_BYTES, add_fp_cols, add_offsets, add_perm, metadata, write_sample  # noqa: E402
from qformat import QbinWriter, parse_scheme  # noqa: E402
from qformat.schemes import xz_tensor  # noqa: E402

TARGETS = ("reader", "decode", "tokenizer", "template", "gguf")
# decode seeds exported as GGUF files (the gguf target), with the GGUF type to requantize to
GGUF_SEEDS = {"llama-f16.qbin": None}  # the tiny models' rows (80) are no multiple of GGUF's blocks of 32
TOKENIZER_KINDS = ("hf-json", "sentencepiece")

# (arch, scheme, convert() options)
RUNNABLE = [
    ("llama", "int4-g64", {}),
    ("llama", "int3-g64", dict(method="gptq", outliers=0.01)),  # act-order permutation + CSR outliers
    ("llama", "nf4-g64", {}),
    ("llama", "int4-g64", dict(prune="2:4")),
    ("llama", "w8a8", dict(smooth=0.5, act_static=True)),
    ("llama", "int4-g64-dq", {}),
    ("llama", "f16", {}),
    ("qwen3_moe", "int4-g64", {}),
]
CALIB = dict(calib="pydoc", calib_samples=8, calib_seqlen=32, progress=False, force=True)

TEMPLATES = [
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}",
    "{%- set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' -%}{{ sys | upper }}"
    "{%- for m in messages | selectattr('role', 'equalto', 'user') | list -%}{{ loop.index }}:{{ m.content[:40] }}"
    "{%- endfor -%}{{ messages | length }}{{ range(3) | join(',') }}{{ '%d' % 7 }}",
]


def _other_kinds() -> list:
    """Tensors of the encodings sample_tensors leaves out."""
    rng = np.random.default_rng(1)
    w = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    static = parse_scheme("w8a8").quantize("layers.0.attn.wk", w(16, 48))
    static.activation = {"bits": 8, "mode": "static"}
    static.arrays["act_scale"] = np.array([0.05], np.float32)
    static.arrays["input_scale"] = rng.uniform(0.5, 2.0, 48).astype(np.float32)
    dynamic = add_fp_cols(parse_scheme("w8a8").quantize("layers.0.attn.wv", w(16, 48)), rng)
    dynamic.activation = {"bits": 8, "mode": "dynamic"}
    return [
        add_offsets(parse_scheme("int4-g16").quantize("layers.0.attn.wq", w(16, 40)), rng),
        static, dynamic,
        parse_scheme("int4-g64-dq").quantize("layers.0.attn.wo", w(24, 130)),
        add_perm(parse_scheme("int5-g32").quantize("layers.0.ffn.w1", w(8, 70)), rng),
        parse_scheme("int6-g32-sym").quantize("layers.0.ffn.w3", w(8, 64)),
    ]


def _write_other(path: Path) -> None:
    with QbinWriter(path, overwrite=True) as wr:
        for t in _other_kinds():
            wr.add_tensor(t)
        wr.add_tensor(parse_scheme("f16").quantize("norm", np.ones(16, np.float32)))
        wr.add_tensor(xz_tensor("tokenizer", TOKENIZER_BYTES * 4))
        wr.finish(**metadata())


def build(dst: Path) -> dict[str, list[Path]]:
    """Write every target's seeds under dst/<target>/ (kept if already there); returns their paths."""
    from tiny_models import make_tiny_checkpoint

    from qformat.convert import convert

    dirs = {t: dst / t for t in TARGETS}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    if not any(dirs["reader"].iterdir()):
        write_sample(dirs["reader"] / "sample.qbin", overwrite=True)
        _write_other(dirs["reader"] / "other-kinds.qbin")
    if not any(dirs["decode"].iterdir()):
        with tempfile.TemporaryDirectory() as tmp:
            checkpoints = {}
            for arch, scheme, options in RUNNABLE:
                if arch not in checkpoints:
                    checkpoints[arch] = make_tiny_checkpoint(Path(tmp) / arch, arch)
                name = "-".join([arch, scheme, *(f"{k}={v}" for k, v in options.items())]) + ".qbin"
                convert(checkpoints[arch], dirs["decode"] / name, scheme, **CALIB, **options)
            for kind in TOKENIZER_KINDS:
                ckpt = make_tiny_checkpoint(Path(tmp) / kind, "llama", tokenizer=kind)
                source = "tokenizer.json" if kind == "hf-json" else "tokenizer.model"
                # the first byte chooses the kind (fuzz.py's tokenizer target)
                (dirs["tokenizer"] / f"{kind}.bin").write_bytes(bytes([TOKENIZER_KINDS.index(kind)])
                                                                + (ckpt / source).read_bytes())
    if not any(dirs["gguf"].iterdir()):
        from qformat.convert import export_gguf

        for name, requantize in GGUF_SEEDS.items():
            export_gguf(dirs["decode"] / name, dirs["gguf"] / name.replace(".qbin", ".gguf"), requantize)
    for path in dirs["decode"].iterdir():  # the runnable files are reader seeds too
        link = dirs["reader"] / path.name
        if not link.exists():
            link.write_bytes(path.read_bytes())
    for i, template in enumerate(TEMPLATES):
        (dirs["template"] / f"template-{i}.jinja").write_text(template)
    return {t: sorted(d.iterdir()) for t, d in dirs.items()}
