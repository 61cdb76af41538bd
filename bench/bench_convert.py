"""Benchmark qconvert on a real checkpoint: one line per scheme.

    python bench/bench_convert.py MODEL_DIR [--schemes int4-g64,int8] [--head auto] [--embed auto]

MODEL_DIR defaults to $QFORMAT_SMOLLM2. Each conversion runs in a fresh subprocess so that its
peak resident memory (ru_maxrss) is its own; the import-only baseline of such a process and the
largest tensor are printed next to it. Quality: weight rel-MSE (error energy / weight energy of
the block projections) with plain min/max and with the clip search, and perplexity on the
EVAL.md protocol (pydoc topics corpus, first 40 windows of 512 tokens, mean NLL of the 511
predicted tokens), computed by loading the dequantized qbin weights into the transformers model
in float32 — the quantization's effect alone, independent of qformat's runtime. With --kl,
also KL(reference || quantized) of next-token distributions and top-1 agreement.
"""
from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ALL_SCHEMES = ("f16", "bf16", "int8", "int8-g128", "int4-g128", "int4-g64", "int4-g32", "int3-g128",
               "int2-g64", "nf4-g64")
REFERENCE_PPL = 14.00  # EVAL.md: transformers, float32 compute on the bf16 checkpoint


# ---------------------------------------------------------------------------- worker (subprocess)

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def worker(args: list[str]) -> None:
    """Run in a fresh process: 'baseline' (imports only) or 'convert SRC DST SCHEME HEAD EMBED CLIP'."""
    from qformat.convert import convert  # the imports a conversion needs, torch included
    import torch  # noqa: F401  (safetensors' "pt" framework)

    if args[0] == "baseline":
        peak = _peak_rss_mb()
        from qformat.convert.checkpoint import Checkpoint

        ckpt = Checkpoint(Path(args[1]))
        largest = max(int(math.prod(ckpt.shape(n))) for n in ckpt.names())
        size = sum(p.stat().st_size for p in ckpt.weight_files)
        print(json.dumps({"peak_rss_mb": peak, "largest": largest, "bytes": size}))
        return
    src, dst, scheme, head, embed, clip = args[1:7]
    t0 = time.perf_counter()
    report = convert(src, dst, scheme, head=head, embed=embed, clip_search=clip == "1", force=True, progress=False)
    print(json.dumps({
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": _peak_rss_mb(),
        "file_mb": report.file_size / 1e6,
        "bpw": report.bpw,
        "linear_bpw": report.linear_bpw,
        "mse_minmax": report.rel_mse(minmax=True),
        "mse_clip": report.rel_mse(),
        "mse_head_minmax": report.rel_mse(("embed", "head"), minmax=True),
        "mse_head_clip": report.rel_mse(("embed", "head")),
        "head": report.head, "embed": report.embed,
    }))


def run_worker(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"worker {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- perplexity

def eval_token_ids(model_dir: Path) -> list[int]:
    """EVAL.md corpus: pydoc topics in sorted key order, blank line between, no special tokens."""
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return AutoTokenizer.from_pretrained(model_dir).encode(text, add_special_tokens=False)


class Evaluator:
    """Perplexity (and optionally KL / top-1 vs the reference) of dequantized qbin weights."""

    def __init__(self, model_dir: Path, windows: int, seq: int, kl: bool):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        self.model_dir, self.windows, self.seq, self.kl = model_dir, windows, seq, kl
        ids = eval_token_ids(model_dir)
        if len(ids) < windows * seq:
            raise click.ClickException(f"corpus has {len(ids)} tokens, fewer than {windows} x {seq}")
        self.batches = [torch.tensor(ids[w * seq:(w + 1) * seq])[None] for w in range(windows)]
        self.reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.pristine = {k: v.clone() for k, v in self.model.state_dict().items()}

    def _load_qbin(self, path: Path) -> None:
        import torch

        from qformat import QbinReader
        from qformat.convert.architectures import lookup, tensor_rules

        r = QbinReader(path)
        arch = lookup(self.model.config.architectures[0])
        self.model.load_state_dict(self.pristine)
        state = {}
        for hf, name, _ in tensor_rules(arch, self.model.config.num_hidden_layers):
            if name in r:
                state[hf] = torch.from_numpy(r[name].dequantize().copy())
        head = state.pop("lm_head.weight", None)
        self.model.load_state_dict(state, strict=False)
        if head is not None:  # a separately stored head unties it
            self.model.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
        elif self.model.config.tie_word_embeddings:
            self.model.lm_head.weight = self.model.model.embed_tokens.weight

    def evaluate(self, path: Path | None) -> dict:
        """ppl of the reference (path None) or of the qbin's dequantized weights."""
        import torch
        import torch.nn.functional as F

        model = self.reference
        if path is not None:
            self._load_qbin(path)
            model = self.model
        nll = kl = agree = 0.0
        n = 0
        with torch.inference_mode():
            for x in self.batches:
                logits = model(x).logits[0, :-1].float()
                nll += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
                n += logits.shape[0]
                if self.kl and path is not None:
                    ref = self.reference(x).logits[0, :-1].float()
                    ref_lp, lp = F.log_softmax(ref, -1), F.log_softmax(logits, -1)
                    kl += float((ref_lp.exp() * (ref_lp - lp)).sum())
                    agree += float((ref.argmax(-1) == logits.argmax(-1)).sum())
        out = {"ppl": math.exp(nll / n)}
        if self.kl and path is not None:
            out.update(kl=kl / n, top1=agree / n)
        return out


def runtime_perplexity(path: Path, windows: int) -> float | None:
    """ppl through qformat's own runtime (qformat.runtime.load + runtime.evaluate), or None when
    that runtime is missing or fails on this file (the column then reads n/a)."""
    try:
        from pydoc_data.topics import topics

        from qformat.runtime import load
        from qformat.runtime.evaluate import perplexity
    except ImportError:
        return None
    text = "\n\n".join(topics[k] for k in sorted(topics))
    try:
        return perplexity(load(path, threads=2, context=512), text, n_windows=windows).ppl
    except Exception as e:  # report, don't abort the table: the runtime is developed separately
        click.echo(f"# runtime ppl failed on {path.name}: {type(e).__name__}: {e}", err=True)
        return None


# ---------------------------------------------------------------------------- main

@click.command()
@click.argument("model_dir", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--schemes", default=",".join(ALL_SCHEMES), show_default=True,
              help="Comma-separated schemes; an entry may override the head/embeddings, "
                   "e.g. int4-g64+head=f16+embed=f16.")
@click.option("--head", default="auto", show_default=True, help="--head of qconvert.")
@click.option("--embed", default="auto", show_default=True, help="--embed of qconvert.")
@click.option("--clip-search/--no-clip-search", default=True, show_default=True)
@click.option("--ppl/--no-ppl", default=True, show_default=True, help="Measure perplexity (EVAL.md).")
@click.option("--runtime-ppl", is_flag=True,
              help="Also perplexity through qformat.runtime (n/a when it is not usable).")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Also evaluate the unquantized checkpoint (one more perplexity run).")
@click.option("--kl", is_flag=True, help="Also KL divergence and top-1 agreement vs the reference (2x time).")
@click.option("--windows", default=40, show_default=True, help="Perplexity windows of 512 tokens.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the .qbin files here (default: a temporary folder).")
def main(model_dir, schemes, head, embed, clip_search, ppl, runtime_ppl, reference, kl, windows, out_dir):
    """Convert MODEL_DIR at each scheme and print seconds, peak RSS, size, bpw, errors, perplexity."""
    if model_dir is None:
        env = os.environ.get("QFORMAT_SMOLLM2")
        if not env:
            raise click.UsageError("give MODEL_DIR or set QFORMAT_SMOLLM2")
        model_dir = Path(env)
    names = [s.strip() for s in schemes.split(",") if s.strip()]
    # Conversions first, from a parent that has imported nothing heavy: a child's ru_maxrss
    # starts from its parent's resident size at fork, so a parent holding models would inflate it.
    base = run_worker("baseline", str(model_dir))
    click.echo(f"# {model_dir}: weights {base['bytes'] / 1e6:.0f} MB on disk; largest tensor "
               f"{base['largest'] / 1e6:.1f} M weights = {4 * base['largest'] / 1e6:.0f} MB as float32; "
               f"import-only process peak RSS {base['peak_rss_mb']:.0f} MB")
    click.echo(f"# head={head} embed={embed} clip_search={clip_search}; ppl: dequantized weights in "
               f"transformers fp32, EVAL.md protocol ({windows} x 512 tokens); bf16 reference {REFERENCE_PPL:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = out_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        results = []
        for entry in names:
            scheme, *overrides = entry.split("+")
            opts = {"head": head, "embed": embed, **dict(o.split("=", 1) for o in overrides)}
            dst = folder / f"{model_dir.name}-{entry}.qbin"
            m = run_worker("convert", str(model_dir), str(dst), scheme, opts["head"], opts["embed"],
                           "1" if clip_search else "0")
            results.append((scheme, dst, m))
            click.echo(f"# converted {scheme} in {m['seconds']:.1f} s", err=True)
        evaluator = Evaluator(model_dir, windows, 512, kl) if ppl else None
        if evaluator is not None and reference:
            click.echo(f"# reference (this run): ppl {evaluator.evaluate(None)['ppl']:.3f}")
        click.echo(f"{'scheme':10s} {'emb/head':>9s} {'sec':>6s} {'peakMB':>7s} {'+base':>6s} {'fileMB':>7s} "
                   f"{'bpw':>6s} {'projbpw':>7s} {'relMSE minmax':>13s} {'relMSE clip':>11s} {'ppl':>7s}"
                   + ("  KL      top1" if kl else "") + ("  rt-ppl" if runtime_ppl else ""))
        fmt = lambda v, spec: format(v, spec) if v is not None else "n/a"  # noqa: E731
        for scheme, dst, m in results:
            q = evaluator.evaluate(dst) if evaluator is not None else {}
            special = m["embed"] if m["embed"] == m["head"] else f"{m['embed']}/{m['head']}"
            line = (f"{scheme:10s} {special:>9s} {m['seconds']:6.1f} {m['peak_rss_mb']:7.0f} "
                    f"{m['peak_rss_mb'] - base['peak_rss_mb']:6.0f} {m['file_mb']:7.1f} {m['bpw']:6.3f} "
                    f"{m['linear_bpw']:7.3f} {fmt(m['mse_minmax'], '13.3e')} {fmt(m['mse_clip'], '11.3e')} "
                    f"{fmt(q.get('ppl'), '7.3f')}")
            if kl:
                line += f"  {fmt(q.get('kl'), '.4f')}  {fmt(q.get('top1'), '.3f')}"
            if runtime_ppl:
                line += f"  {fmt(runtime_perplexity(dst, windows), '7.3f')}"
            click.echo(line)

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        main()
