"""The decoder over the tensors of a qbin file, read in place from the memory map.

What the model computes is qformat.block's description (the steps of every block, in order);
this module runs it one operation at a time, over (tokens, width) arrays: one step of many
sequences at once (each projection one product over all their new tokens, attention per
sequence over its own blocks of the paged KV pool, runtime/kvcache.py), for prefill, batched
decode, and devices or files without a one-call decode step. Each step kind has a small class here, and
architecture differences arrive as the steps' fields, never as branches on the architecture.
Every weight goes through the (device, kind, form) kernel table, so the model never looks at a
quantization scheme; every array operation goes through the device's ops, so it never branches
on the device either.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from qformat import block as B
from qformat.kernels import device_ops, fused_decoder, linear_op, lora_op, reference
from qformat.reader import QbinReader
from qformat.rope import model_rope_tables
from qformat.tensors import TOK_EMBEDDINGS

from .kvcache import BLOCK_SIZE, BlockPool, SequenceKV
from .lora import LoraPair

# Prompts shorter than this run through the fused decode step (when there is one).
FUSED_PROMPT_TOKENS = 8
# Steps of at most this many one-token sequences run them through the fused decode step one
# after another: on 2 cores (SmolLM2 int4-g64, the engine's decode tokens/s) the batched per-op
# step ties with it at 2 sequences and wins from 3 on (its Python overhead per layer is paid
# once per step; the VNNI kernel's tiles of two rows and four tokens share the weights' work).
FUSED_BATCH_MAX = 2


class Model:
    """What a step needs from the model being built: the file, the device's ops, the weights'
    ops by tensor name (each built once, so a tied head shares the embeddings' op), the RoPE
    tables (one per qformat.rope.rope_variants entry) and the KV pool."""

    def __init__(self, reader: QbinReader, device: str, context: int, pool: BlockPool,
                 lora: dict[str, LoraPair] | None = None):
        self.reader = reader
        self.lora = lora or {}
        self.args = reader.model
        self.device = device
        self.ops = device_ops(device)
        self.linears: dict[str, object] = {}
        self.cos, self.sin = model_rope_tables(self.args, context)  # (variants, context, head_dim/2)
        self.cache = pool

    def linear(self, name: str):
        """The op of a tensor, or of one expert's rows of a stacked tensor (block.expert_name)."""
        if name not in self.linears:
            expert = B.parse_expert(name)
            if expert is None:
                tensor = self.reader[name]
            else:  # its rows of the stack, views of the file (spec §3.1)
                stacked, e = expert
                whole = self.reader[stacked]
                rows = whole.shape[0] // self.args.n_experts
                tensor = whole.row_range(e * rows, (e + 1) * rows, name)
            op = linear_op(self.device, tensor)
            if name in self.lora:
                op = lora_op(self.device, op, self.lora[name].a, self.lora[name].b)
            self.linears[name] = op
        return self.linears[name]

    def vector(self, name: str):
        """A norm weight or bias (float32) on the device (on the CPU: a view of the file)."""
        return self.ops.asarray(self.reader[name].arrays["data"])


@dataclass
class Batch:
    """The rows of one step: sequence i's new tokens are rows offsets[i]..offsets[i+1]-1, at its
    positions starts[i].., their keys and values going to pool slots row_slots; cos and sin are
    the RoPE tables' rows of every row's position, (variants, N, head_dim/2)."""

    seqs: list[SequenceKV]
    starts: np.ndarray  # (B,) int64
    offsets: np.ndarray  # (B + 1,) int64
    cos: object  # (variants, N, head_dim/2) on the device
    sin: object
    row_slots: object  # (N,) int64 on the device
    decode: np.ndarray  # indices of the sequences with one new row
    decode_slots: object  # (len(decode), L) int32 on the device: their slot maps up to the longest
    spans: list  # (sequence index, its slots up to its last new position, on the device) of the others

    def last_rows(self) -> "Batch":
        """The layout of each sequence's last row alone (what the output block runs on)."""
        n = len(self.seqs)
        return replace(self, offsets=np.arange(n + 1), decode=np.arange(n), spans=[])


def make_batch(work: list[tuple[SequenceKV, np.ndarray]], cos: np.ndarray, sin: np.ndarray, ops) -> Batch:
    """The Batch of `work` (each sequence with the tokens it appends), its blocks reserved."""
    seqs = [seq for seq, _ in work]
    counts = np.array([len(ids) for _, ids in work], np.int64)
    starts = np.array([seq.length for seq in seqs], np.int64)
    for seq, n, start in zip(seqs, counts, starts):
        seq.reserve(int(start + n))
    positions = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, counts)])
    row_slots = np.concatenate([seq.slots[s:s + n] for seq, s, n in zip(seqs, starts, counts)]).astype(np.int64)
    decode = np.flatnonzero(counts == 1)
    longest = int(starts[decode].max()) + 1 if decode.size else 0
    decode_slots = np.stack([seqs[i].slots[:longest] for i in decode]) if decode.size else np.zeros((0, 0), np.int32)
    spans = [(i, ops.asarray(seqs[i].slots[:starts[i] + counts[i]].astype(np.int64)))
             for i in np.flatnonzero(counts != 1)]
    return Batch(seqs, starts, np.concatenate([[0], np.cumsum(counts)]), ops.asarray(cos[:, positions]),
                 ops.asarray(sin[:, positions]), ops.asarray(row_slots), decode, ops.asarray(decode_slots), spans)


# ---------------------------------------------------------------------------- the steps
# Each runs one qformat.block step over `bufs` (buffer name -> (N, width) array) for the N rows
# of a Batch.

class RMSNorm:
    """Norm: dst = RMSNorm(src) · weight (dst += that, with residual); HeadNorm: the same over
    every `width` slice, in place."""

    def __init__(self, step: B.Norm | B.HeadNorm, model: Model, layer: int):
        self.weight = model.vector(step.weight)  # (d,)
        self.src = step.src if isinstance(step, B.Norm) else step.buf
        self.dst = step.dst if isinstance(step, B.Norm) else step.buf
        self.width = step.width if isinstance(step, B.HeadNorm) else None
        self.residual = isinstance(step, B.Norm) and step.residual
        self.eps = model.args.norm_eps
        self.ops = model.ops

    def __call__(self, bufs: dict, batch: Batch) -> None:
        x = bufs[self.src]
        if self.width is not None:
            x = x.reshape(x.shape[0], -1, self.width)
        y = self.ops.rmsnorm(x, self.weight, self.eps).reshape(x.shape[0], -1)
        bufs[self.dst] = bufs[self.dst] + y if self.residual else y


class Linear:
    """dst = W src (+ b), or dst += W src for a residual, through the op of W's layout."""

    def __init__(self, step: B.Linear, model: Model, layer: int):
        self.op = model.linear(step.weight)
        self.bias = model.vector(step.bias) if step.bias is not None else None
        self.step = step
        self.ops = model.ops

    def __call__(self, bufs: dict, batch: Batch) -> None:
        x = bufs[self.step.src]  # (N, in)
        if x.shape[0] == 1:
            y = self.ops.empty((1, self.op.out_features))
            self.op.gemv(x[0], y[0])
        elif batch.decode.size == len(batch.seqs):
            y = self.op.gemv_many(x)
        else:
            # decode rows as GEMVs, each prompt chunk as its own product: every row's numbers
            # are what they would be with its sequence alone in the step
            y = self.ops.empty((x.shape[0], self.op.out_features))
            if batch.decode.size:
                rows = batch.offsets[batch.decode]
                y[rows] = self.op.gemv_many(x[rows])
            for i, _ in batch.spans:
                rows = slice(int(batch.offsets[i]), int(batch.offsets[i + 1]))
                y[rows] = self.op.gemm(x[rows])
        if self.bias is not None:
            y += self.bias
        bufs[self.step.dst] = bufs[self.step.dst] + y if self.step.residual else y


class Attention:
    """RoPE on q and k, k and v stored in the rows' pool slots, causal attention of each
    sequence over its own positions: the one-row sequences in one call, the others each."""

    def __init__(self, step: B.Attention, model: Model, layer: int):
        a = model.args
        self.step = step
        self.layer = layer
        self.cache = model.cache
        self.ops = model.ops
        self.n_heads, self.n_kv, self.hd = a.n_heads, a.n_kv_heads, a.head_dim

    def __call__(self, bufs: dict, batch: Batch) -> None:
        s = self.step
        n = bufs[s.q].shape[0]
        q = bufs[s.q].reshape(n, self.n_heads, self.hd)
        k = bufs[s.k].reshape(n, self.n_kv, self.hd)
        v = bufs[s.v].reshape(n, self.n_kv, self.hd)
        cos, sin = batch.cos[s.rope], batch.sin[s.rope]
        self.ops.rope(q, cos, sin)
        self.ops.rope(k, cos, sin)
        kc, vc = self.cache.k[self.layer], self.cache.v[self.layer]  # (n_slots, n_kv_heads, head_dim)
        kc[batch.row_slots] = k
        vc[batch.row_slots] = v
        if batch.decode.size == len(batch.seqs):
            out = self._decode(q, kc, vc, batch)
        else:
            out = self.ops.empty(q.shape)
            if batch.decode.size:
                out[batch.offsets[batch.decode]] = self._decode(q[batch.offsets[batch.decode]], kc, vc, batch)
            for i, slots in batch.spans:
                rows = slice(int(batch.offsets[i]), int(batch.offsets[i + 1]))
                out[rows] = self.ops.attention_prefill(q[rows], kc[slots], vc[slots], int(batch.starts[i]),
                                                       s.window, s.scale, s.softcap)
        bufs[s.dst] = out.reshape(n, self.n_heads * self.hd)

    def _decode(self, q, kc, vc, batch: Batch):
        stops = batch.starts[batch.decode] + 1
        starts = np.zeros_like(stops) if self.step.window is None else np.maximum(0, stops - self.step.window)
        return self.ops.attention_decode(q, kc, vc, batch.decode_slots, starts, stops, self.step.scale,
                                         self.step.softcap)


class Glu:
    """gate = act(gate) · up, in place."""

    def __init__(self, step: B.Glu, model: Model, layer: int):
        self.step = step
        self.ops = model.ops

    def __call__(self, bufs: dict, batch: Batch) -> None:
        self.ops.glu(self.step.activation, bufs[self.step.gate], bufs[self.step.up])


class Softcap:
    """buf = cap · tanh(buf / cap), in place."""

    def __init__(self, step: B.Softcap, model: Model, layer: int):
        self.step = step
        self.ops = model.ops

    def __call__(self, bufs: dict, batch: Batch) -> None:
        self.ops.softcap(bufs[self.step.buf], self.step.cap)


def row_kinds(batch: Batch) -> np.ndarray:
    """Per row of the step: -1 for a one-row (decode) sequence's row, else its sequence's index."""
    counts = np.diff(batch.offsets)
    kinds = np.repeat(np.arange(counts.size), counts)
    kinds[np.isin(kinds, batch.decode)] = -1
    return kinds


def project(op, xs, kinds: np.ndarray, ops):
    """op over the rows xs (m, in), each computed as the Linear step computes it: decode rows
    (kind -1) by gemv_many (one alone by gemv), the rows of each prompt (kind i) by one gemm."""
    out = ops.empty((xs.shape[0], op.out_features))
    for kind in np.unique(kinds):
        where = np.flatnonzero(kinds == kind)
        if kind >= 0:
            out[where] = op.gemm(xs[where])
        elif where.size > 1:
            out[where] = op.gemv_many(xs[where])
        else:
            op.gemv(xs[where[0]], out[where[0]])
    return out


class MoeStep:
    """A mixture of experts: the router's logits (one GEMV per token), routed on the host
    (kernels/reference.route), each chosen expert run over the rows routed to it, the experts'
    outputs weighted and added in ascending expert order (as transformers adds them)."""

    def __init__(self, step: B.Moe, model: Model, layer: int):
        self.step = step
        self.router = model.linear(step.router)
        self.experts = [tuple(model.linear(B.expert_name(t, e)) for t in (step.gate, step.up, step.down))
                        for e in range(step.n_experts)]
        self.ops = model.ops

    def __call__(self, bufs: dict, batch: Batch) -> None:
        s = self.step
        x = bufs[s.src]
        n = x.shape[0]
        logits = self.ops.empty((n, s.n_experts))
        for i in range(n):
            self.router.gemv(x[i], logits[i])
        experts, weights = reference.route(self.ops.to_numpy(logits), s.top_k, s.norm_topk)
        kinds = row_kinds(batch)
        total = self.ops.zeros((n, x.shape[1]))
        for e in np.unique(experts):
            rows, slot = np.nonzero(experts == e)
            gate_op, up_op, down_op = self.experts[int(e)]
            xs = x[rows]
            gate, up = project(gate_op, xs, kinds[rows], self.ops), project(up_op, xs, kinds[rows], self.ops)
            self.ops.glu(s.activation, gate, up)
            y = project(down_op, gate, kinds[rows], self.ops)
            total[rows] += self.ops.asarray(weights[rows, slot][:, None]) * y
        bufs[s.dst] = bufs[s.dst] + total if s.residual else total


class SigmoidGate:
    """dst += sigmoid(gate) · src (a shared expert's gated output)."""

    def __init__(self, step: B.SigmoidGate, model: Model, layer: int):
        self.step = step
        self.ops = model.ops

    def __call__(self, bufs: dict, batch: Batch) -> None:
        s = self.step
        out = bufs[s.dst].copy()  # the stream may still be a view of the embeddings
        self.ops.sigmoid_gate_add(out, bufs[s.src], bufs[s.gate])
        bufs[s.dst] = out


# Which class runs which kind of step.
STEPS = {B.Norm: RMSNorm, B.HeadNorm: RMSNorm, B.Linear: Linear, B.Attention: Attention, B.Glu: Glu,
         B.Softcap: Softcap, B.Moe: MoeStep, B.SigmoidGate: SigmoidGate}


class Block:
    """One block of the description, its steps prepared for the device."""

    def __init__(self, spec: B.Block, model: Model, layer: int):
        self.spec = spec
        self.steps = [STEPS[type(step)](step, model, layer) for step in spec.steps]

    def __call__(self, bufs: dict, batch: Batch) -> None:
        for step in self.steps:
            step(bufs, batch)


class Transformer:
    """The whole decoder over a paged KV pool. run([(sequence, tokens), ...]) is one step of many
    sequences; forward(tokens, pos) runs its own default sequence (one at a time)."""

    def __init__(self, reader: QbinReader, device: str = "cpu", context: int | None = None, fused: bool = True,
                 kv_blocks: int | None = None, lora: dict[str, LoraPair] | None = None):
        """context: positions per sequence (default the model's max_seq_len); kv_blocks: the
        pool's blocks (default: one sequence of the whole context); lora: an adapter beside the
        projections it names (runtime/lora.py read_adapter)."""
        args = reader.model
        self.args = args
        self.context = min(args.max_seq_len, context or args.max_seq_len)
        self.ops = device_ops(device)
        per_sequence = -(-self.context // BLOCK_SIZE)
        self.pool = BlockPool(args, kv_blocks or per_sequence, self.context, device)
        model = Model(reader, device, self.context, self.pool, lora)
        self.description = B.decoder(args)  # every layer's block, then the output block
        with self.ops.loading(reader):  # a GPU copies the weights up here, layer by layer
            self.tok_embeddings = model.linear(TOK_EMBEDDINGS.name())  # (vocab, dim)
            blocks = [Block(spec, model, i) for i, spec in enumerate(self.description)]
        self.layers, self.output = blocks[:-1], blocks[-1]
        self.cos, self.sin = model.cos, model.sin  # host tables; a Batch takes its rows to the device
        # one call per decode step when the device offers it (kernels/cpu/fused.py: one compiled
        # function; kernels/cuda/decoder.py: one CUDA graph), running the same description
        self.fused = (fused_decoder(device, self.description, reader, args, self.pool, model.cos, model.sin,
                                    model.linears) if fused else None)
        self.sequence = SequenceKV(self.pool)  # forward()'s
        self.embed_scale = None if args.embed_scale is None else np.float32(args.embed_scale)

    def embed(self, ids: np.ndarray):
        """The residual stream's first rows: the tokens' embeddings (times embed_scale, Gemma)."""
        x = self.tok_embeddings.rows(ids)
        return x if self.embed_scale is None else x * self.embed_scale

    def new_sequence(self) -> SequenceKV:
        """An empty sequence in this model's pool (free() it when done)."""
        return SequenceKV(self.pool)

    def run(self, work: list[tuple[SequenceKV, list[int]]], all_logits: bool = False) -> list[np.ndarray]:
        """One step: each sequence's tokens appended at its next positions, all in one pass over
        the weights. Returns each sequence's logits (vocab,) after its last token, or (n, vocab)
        for all its new tokens with all_logits. PoolExhausted if the blocks do not suffice."""
        work = [(seq, np.asarray(ids, np.int64)) for seq, ids in work]
        for seq, ids in work:
            if ids.size == 0:
                raise ValueError("a sequence in the step has no tokens to run")
            if seq.length + ids.size > self.context:
                raise ValueError(f"{seq.length + ids.size} tokens exceed the context of {self.context}")
        if self.fused is not None and not all_logits:
            decodes = all(ids.size == 1 for _, ids in work) and len(work) <= FUSED_BATCH_MAX
            if decodes or (len(work) == 1 and work[0][1].size < FUSED_PROMPT_TOKENS):
                return [self._run_fused(seq, ids) for seq, ids in work]
        elif self.fused is not None and len(work) == 1 and work[0][1].size == 1:
            return [self._run_fused(*work[0])[None]]
        batch = make_batch(work, self.cos, self.sin, self.ops)
        bufs = {B.X: self.embed(np.concatenate([ids for _, ids in work]))}  # (N, dim)
        for layer in self.layers:
            layer(bufs, batch)
        if not all_logits:
            last = batch.offsets[1:] - 1
            bufs[B.X] = bufs[B.X][last]
        self.output(bufs, batch if all_logits else batch.last_rows())
        logits = self.ops.to_numpy(bufs[B.LOGITS])
        for seq, ids in work:
            seq.written(ids.tolist())
        if all_logits:
            return [logits[a:b] for a, b in zip(batch.offsets[:-1], batch.offsets[1:])]
        return list(logits)  # one row per sequence

    def hidden(self, ids: list[int]) -> np.ndarray:
        """The final normalized hidden states (n, dim) of ids run from an empty sequence of
        their own (what an embedding pools); its blocks go back to the pool."""
        seq = self.new_sequence()
        try:
            work = [(seq, np.asarray(ids, np.int64))]
            batch = make_batch(work, self.cos, self.sin, self.ops)
            bufs = {B.X: self.embed(work[0][1])}
            for layer in self.layers:
                layer(bufs, batch)
            for step in self.output.steps:
                if isinstance(step, RMSNorm):  # the final norm; the head's logits are not needed
                    step(bufs, batch)
                    return self.ops.to_numpy(bufs[step.dst])
            raise AssertionError("the output block has no final norm")
        finally:
            seq.free()

    def _run_fused(self, seq: SequenceKV, ids: np.ndarray) -> np.ndarray:
        """ids through the one-call decode step token by token (a short prompt goes so too: as
        fast as the per-op path there, and a cold start loads one compiled function, not ten)."""
        seq.reserve(seq.length + ids.size)
        x = self.embed(ids)
        for i, token in enumerate(ids.tolist()):
            logits = self.fused(x[i], seq.length, seq.slots)
            seq.written([token])
        return logits

    def forward(self, tokens, pos: int, all_logits: bool = False) -> np.ndarray:
        """Run tokens (n,) at positions pos..pos+n-1 of the default sequence (which keeps its
        first pos positions). Returns the logits (vocab,) after the last token, or (n, vocab)
        with all_logits."""
        if pos > self.sequence.length:
            raise ValueError(f"position {pos} is past the {self.sequence.length} positions the cache holds")
        self.sequence.truncate(pos)
        return self.run([(self.sequence, tokens)], all_logits)[0]
