"""The fine-tuning loop: LoRA adapters on a qbin base trained with AdamW on a cosine schedule,
evaluated on held-out data, checkpointed for --resume, written in peft's layout."""
from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qformat.reader import QbinReader

from .adapter import save_adapter
from .data import DataError, Renderer, pack, read_examples
from .distributed import data_parallel, world
from .model import TARGETS, QuantDecoder

CHECKPOINT = "checkpoint.pt"  # beside the adapter: what --resume reads


@dataclass(frozen=True)
class TuneOptions:
    """What a fine-tuning run is: the adapters, the schedule, the data's shape."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = tuple(TARGETS)
    steps: int | None = None  # None: `epochs` passes over the training rows
    epochs: float = 1.0
    lr: float = 2e-4
    warmup: float = 0.05  # of the steps, linear from zero
    batch_tokens: int = 4096
    context: int = 512
    eval_fraction: float = 0.1  # of the examples, when no eval file is given
    eval_every: int = 0  # steps between evaluations (0: at the start and the end only)
    checkpoint_every: int = 0  # steps between checkpoints (0: at the end only)
    grad_compression: str = "qsgd:4"  # across processes (torchrun): qsgd:BITS, fp16 or none
    error_feedback: bool = False  # QSGD: each bucket's rounding residual goes into its next gradient
    qsgd_chunk: int = 128  # QSGD: values per norm (128: 7.5x fewer bytes than float32 in 4 bits)
    seed: int = 0


@dataclass
class TuneReport:
    """What a run did: rows, steps, tokens, and the loss curve ((step, train loss, eval loss))."""

    adapter: Path
    train_rows: int
    eval_rows: int
    steps: int
    tokens: int = 0
    seconds: float = 0.0
    processes: int = 1
    bytes_sent: int = 0  # gradient bytes this process sent (all processes send alike)
    bytes_uncompressed: int = 0  # what float32 gradients would have been
    curve: list[tuple[int, float | None, float | None]] = field(default_factory=list)

    @property
    def eval_losses(self) -> list[float]:
        return [e for _, _, e in self.curve if e is not None]


def cosine_schedule(opt: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate rising linearly over the first `warmup` of the steps, then a cosine to zero."""
    warm = max(1, round(warmup * steps))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def masked_loss(model: QuantDecoder, rows: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, int]:
    """Mean next-token cross entropy over the masked targets of `rows`, and their count."""
    logits = model(torch.from_numpy(rows[:, :-1]))
    targets = torch.from_numpy(rows[:, 1:])
    m = torch.from_numpy(mask)
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    n = int(m.sum())
    return (losses * m.reshape(-1)).sum() / max(n, 1), n


def evaluate(model: QuantDecoder, rows: np.ndarray, mask: np.ndarray, batch: int) -> float:
    """Mean loss per masked target over all of `rows`."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            loss, n = masked_loss(model, rows[i:i + batch], mask[i:i + batch])
            total, count = total + float(loss) * n, count + n
    return total / max(count, 1)


def tune(base: str | Path, data: str | Path, out: str | Path, options: TuneOptions = TuneOptions(),
         eval_data: str | Path | None = None, resume: bool = False, force: bool = False,
         progress: bool = True) -> TuneReport:
    """Fine-tune adapters for the qbin `base` on `data`; the adapter is written to `out` (peft's
    layout), its checkpoint beside it in out/checkpoint.pt."""
    out = Path(out)
    if out.exists() and not (force or resume):
        raise FileExistsError(f"{out}: already exists; pass --force to replace it or --resume to continue it")
    if not out.parent.is_dir():
        raise DataError(f"{out}: folder {out.parent} does not exist")
    started = time.perf_counter()
    torch.manual_seed(options.seed)
    with QbinReader(base) as reader:
        renderer = Renderer(reader)
        examples = read_examples(data, renderer)
        if eval_data is not None:
            held = read_examples(eval_data, renderer)
        else:
            order = list(range(len(examples)))
            random.Random(options.seed).shuffle(order)
            n_eval = max(1, round(len(examples) * options.eval_fraction)) if len(examples) > 1 else 0
            if n_eval == 0:
                raise DataError(f"{data}: one example cannot be split into training and held-out data; give --eval")
            held = [examples[i] for i in order[:n_eval]]
            examples = [examples[i] for i in sorted(order[n_eval:])]
        rows, mask = pack(examples, options.context)
        eval_rows, eval_mask = pack(held, options.context)
        batch = max(1, options.batch_tokens // options.context)
        steps = options.steps or max(1, math.ceil(options.epochs * len(rows) / batch))
        model = QuantDecoder(reader, options.targets, options.rank, options.alpha, options.dropout)
        rank, processes = world()
        net, comm = data_parallel(model, options.grad_compression, options.seed, rank, options.error_feedback,
                                   options.qsgd_chunk) if processes > 1 else (model, None)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
        sched = cosine_schedule(opt, steps, options.warmup)
        report = TuneReport(out, len(rows), len(eval_rows), steps, processes=processes)
        gen = np.random.default_rng(options.seed)
        step = 0
        ckpt = out / CHECKPOINT
        if resume:
            if not ckpt.is_file():
                raise DataError(f"{ckpt}: no checkpoint to resume; start without --resume")
            state = torch.load(ckpt, weights_only=True)  # plain data and tensors: nothing a pickle could run
            if state["options"] != dataclasses.asdict(options):
                raise DataError(f"{ckpt}: was written with other options ({state['options']}); resume with the same")
            model.load_state_dict(state["adapters"], strict=False)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            gen.bit_generator.state = state["data_rng"]
            torch.set_rng_state(state["torch_rng"])
            step, report.curve, report.tokens = state["step"], [tuple(c) for c in state["curve"]], state["tokens"]
        else:
            report.curve.append((0, None, evaluate(model, eval_rows, eval_mask, batch)))
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=step, unit="step", file=sys.stderr, dynamic_ncols=True, desc="qtune")
        tick = time.perf_counter()
        while step < steps:
            # one draw for all processes (so the stream resumes alike), each taking its share
            pick = gen.choice(len(rows), size=min(batch * processes, len(rows)), replace=False)[rank::processes]
            model.train()
            loss, n = masked_loss(net, rows[pick], mask[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            model.eval()
            step += 1
            report.tokens += int(rows[pick].shape[0] * options.context) * processes
            if comm is not None:
                report.bytes_sent, report.bytes_uncompressed = comm.bytes_sent, comm.bytes_uncompressed
            last = step == steps
            e = (evaluate(model, eval_rows, eval_mask, batch)
                 if last or (options.eval_every and step % options.eval_every == 0) else None)
            report.curve.append((step, loss.item(), e))
            if bar is not None:
                rate = report.tokens / max(time.perf_counter() - tick, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.3f}", eval=f"{report.eval_losses[-1]:.3f}", tok_s=f"{rate:.0f}")
                bar.update(1)
            if rank == 0 and (last or (options.checkpoint_every and step % options.checkpoint_every == 0)):
                save_adapter(model, out, base_model=Path(base).name, force=True)
                state = {"options": dataclasses.asdict(options), "step": step, "curve": report.curve,
                         "tokens": report.tokens, "adapters": {k: v for k, v in model.state_dict().items() if "lora_" in k},
                         "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "data_rng": gen.bit_generator.state, "torch_rng": torch.get_rng_state()}
                scratch = ckpt.with_name(f".{CHECKPOINT}.tmp")
                torch.save(state, scratch)
                scratch.replace(ckpt)
        if bar is not None:
            bar.close()
        if processes > 1:  # the others wait for rank 0's adapter
            import torch.distributed as dist

            dist.barrier()
    report.seconds = time.perf_counter() - started
    return report
