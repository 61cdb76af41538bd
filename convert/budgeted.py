"""A conversion at a size budget (`--target-bpw`, `--max-kl`): measure, score, allocate, size.

convert() calls `allocate_plan` after planning: it measures every tensor's sensitivity on the
calibration data (sensitivity.py), scores the candidate schemes (allocate.score), chooses one
per tensor for the budget with the exact size of the file each choice writes (the plan's array
sizes, the header as the writer will write it: writer.QbinSizer), and returns the plan with
those schemes. `head_store` quantizes the embedding and the head with GPTQ on the Gram matrix
of the final normed hidden states, the inputs the head sees, instead of round-to-nearest.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from qformat import tensors as T
from qformat.config import Provenance
from qformat.schemes import KINDS, Tensor
from qformat.writer import QbinSizer

from . import allocate, sensitivity
from .gptq import gptq_quantize
from .imatrix import imatrix_tensor
from .layerwise import weight_stats
from .plan import ConvertError, planned_arrays, planned_sidecars, skipped
from .report import ConvertReport
from .rtn import QuantStats


def _stub(p, scheme) -> Tensor:
    """A tensor with p's name and shape and scheme's layout fields (no arrays)."""
    if not scheme.quantized:
        return Tensor(p.name, scheme.kind, tuple(p.shape), {})
    k = p.shape[1]
    symmetric = scheme.symmetric or KINDS[scheme.kind].nf4
    return Tensor(p.name, scheme.kind, tuple(p.shape), {}, scheme.group_for(k), symmetric)


def allocate_plan(ckpt, args, planned: list, calibration, options, provenance: Provenance, finish: dict,
                  tokenizer: Tensor, report: ConvertReport):
    """(plan with the chosen schemes, provenance with the allocation record, the Sensitivity,
    the exact file size). ConvertError when the budget cannot be met."""
    candidates = allocate.parse_candidates(options.candidates)
    tokens = sensitivity.spread(np.asarray(calibration.tokens), options.sensitivity_samples)
    sens = sensitivity.measure(ckpt, args, planned, tokens, progress=options.progress)

    def sidecars(p, scheme):
        return planned_sidecars(dataclasses.replace(p, scheme=scheme), options, False)

    def nbytes(p, scheme) -> int:
        return dataclasses.replace(p, scheme=scheme).aligned_nbytes(sidecars(p, scheme))

    chosen = [p for p in planned
              if p.role in ("linear", "embed", "head") and not skipped((p.name, p.hf_name), options.skip)]
    choices = allocate.score(ckpt, chosen, sens, candidates, nbytes, options.score, options.progress)
    # what the quantization still needs: the head's Gram matrix (head_store); the rest is freed
    sens.stats = {n: dataclasses.replace(st, lookup=None) for n, st in sens.stats.items()
                  if n in (T.TOK_EMBEDDINGS.name(), T.OUTPUT.name()) and st.gram is not None}
    n_weights = sum(int(np.prod(p.shape)) for p in planned if not (p.role == "head" and args.tie_embeddings))
    target = int(options.target_bpw * n_weights / 8) if options.target_bpw is not None else None

    def record(pick) -> Provenance:
        alloc = {"target_bpw": options.target_bpw, "max_kl": options.max_kl, "budget_bytes": target,
                 "candidates": [c.name for c in candidates], "score": options.score,
                 "samples": int(tokens.shape[0]), "predicted_kl": sum(c.loss for c in pick.values())}
        return dataclasses.replace(provenance, allocation=alloc)

    def file_size(pick) -> int:
        sizer = QbinSizer()
        for p in planned:
            scheme = pick[p.name].scheme if p.name in pick else p.scheme
            side = sidecars(p, scheme) if p.name in pick else None
            sizer.add(_stub(p, scheme), planned_arrays(p.shape, scheme, side))
        sizer.add_stored(tokenizer)
        return sizer.file_size(**finish, provenance=record(pick))

    try:
        pick, size = allocate.allocate(choices, file_size, target_bytes=target, max_loss=options.max_kl)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    out = [dataclasses.replace(p, scheme=pick[p.name].scheme) if p.name in pick else p for p in planned]
    loss = sum(c.loss for c in pick.values())
    report.notes.append(
        f"allocation ({options.score}, {tokens.shape[0]} windows, calibration loss {sens.loss:.3f} nats): "
        f"{allocate.bits_per_weight(size, n_weights):.3f} bits/weight whole file ({size} bytes"
        + (f", budget {target}" if target is not None else "") + f"), predicted KL {loss:.4f} nats/token; "
        + ", ".join(f"{k} x{v}" for k, v in allocate.summary(pick).items()))
    return out, record(pick), sens, size


def head_store(sens: sensitivity.Sensitivity, options, store):
    """`store(name, w, scheme, clip_search=...)` with the embedding and the head quantized on the
    head's input Gram matrix: by importance-weighted rounding with --method imatrix, else by
    GPTQ (AWQ's scales cannot fold into a tied embedding; rtn keeps round-to-nearest). GPTQ's
    act-order (with --act-order) runs with static groups: a stored permutation would cost the
    lookup a gather per row, static groups store none."""

    def store_weight(name: str, w, scheme, *, clip_search: bool):
        st = sens.stats.get(name)
        if options.base_method == "rtn" or st is None or st.gram is None or not scheme.quantized or len(w.shape) != 2:
            return store(name, w, scheme, clip_search=clip_search)
        wt = torch.from_numpy(np.asarray(w[0:w.shape[0]], dtype=np.float32))
        gram = st.gram.cpu()
        if options.base_method == "imatrix":
            t, _ = imatrix_tensor(name, wt, torch.diagonal(gram), scheme)
        else:
            res = gptq_quantize(wt, gram, scheme, damp=options.damp, block=options.block,
                                act_order=options.act_order, clip_search=clip_search, static_groups=True)
            t = res.tensor(name, scheme)
        return t, weight_stats(t, wt.numpy(), scheme, QuantStats)

    return store_weight

