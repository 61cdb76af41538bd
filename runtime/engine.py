"""Continuous batching: many generation requests decoded together, one model step at a time.

Every step runs each active sequence's next token, and chunks of pending prompts within the
step's token budget, as one Transformer.run: each projection is one product
over all of them (a decode step reads every weight once for B tokens instead of once per token),
attention per sequence over its own blocks of the paged KV pool. New requests join between
steps; a long prompt is prefilled in chunks interleaved with the others' decode steps, so it
does not stall them; a prompt that begins with a published prefix (a system prompt, a chat's
earlier turns) takes those KV blocks instead of recomputing them. When the pool runs short, the
most recently admitted sequence is preempted: its blocks are freed and it is recomputed later
from its prompt and the tokens it already produced (as vLLM's recompute preemption).

qformat.load(...).generate is this engine with one request, so there is one decode path.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from itertools import count
from typing import Iterable

import numpy as np

from .grammar import Constraint, TokenGrammar
from .kvcache import PoolExhausted, SequenceKV
from .model import Transformer
from .sampling import SamplingParams, sample
from .tokenizer import Tokenizer

# Prompt tokens per prefill chunk: bounded activation memory, full GEMM blocks. A prompt is cut
# into chunks at the same places whatever else runs in its steps, so its numbers are too.
PREFILL_CHUNK = 512


@dataclass
class Request:
    """What to generate: prompt token ids, at most max_tokens new ones, sampled with params from
    a generator seeded with seed, until an EOS id, a stop string, the end of its grammar or the
    context."""

    prompt_ids: list[int]
    max_tokens: int = 256
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: none; k: each token's log-probability and the top k
    grammar: str | None = None  # llguidance grammar the text must follow (grammar.json_schema_grammar)


def held_suffix(text: str, stops: Iterable[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextOut:
    """Token ids to text pieces, holding back what may be the start of a stop string."""

    def __init__(self, tokenizer: Tokenizer, stops: Iterable[str]):
        self.stream = tokenizer.stream()
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, token: int) -> tuple[str, bool]:
        """(text to emit now, whether a stop string was hit: then the text ends before it)."""
        self.pending += self.stream.push(token)
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hit = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            out, self.pending = self.pending[:hit], ""
            return out, True
        keep = held_suffix(self.pending, self.stops)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending + self.stream.flush(), ""
        return out


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model, and the top alternatives'."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    z = logits.astype(np.float64)
    z = z - z.max()
    logp = z - np.log(np.exp(z).sum())
    top = np.argsort(-logp, kind="stable")[:k]
    return TokenLogprob(token, float(logp[token]), tuple((int(t), float(logp[t])) for t in top))


class Sequence:
    """One request in the engine: its KV blocks, sampler, text so far and timings. `pieces`
    collects the text produced since the caller last took it; finish_reason is set at the end
    ("eos", "stop": a stop string, "grammar": its grammar is complete, "length": max_tokens,
    "context", "cancelled")."""

    def __init__(self, request: Request, kv: SequenceKV, tokenizer: Tokenizer, sid: int):
        self.id = sid
        self.request = request
        self.kv = kv
        self.rng = np.random.default_rng(request.seed)
        self.text = TextOut(tokenizer, request.stop)
        self.generated: list[int] = []
        self.pieces: list[str] = []
        self.logprobs: list[TokenLogprob] = []  # when the request asks for them, one per token
        self.finish_reason: str | None = None
        self.next_token: int | None = None  # sampled, not yet run through the model
        self.constraint: Constraint | None = None
        self.prefill_tokens = 0  # prompt tokens this sequence actually ran (not found cached)
        self.cached_tokens = 0
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    @property
    def tokens(self) -> list[int]:
        """Prompt and generated tokens: what the KV cache must hold before the next token."""
        return self.request.prompt_ids + self.generated

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def take(self) -> str:
        """The text produced since the last take()."""
        out = "".join(self.pieces)
        self.pieces.clear()
        return out


class Engine:
    """Runs submitted requests to completion, at most max_batch at once, over one Transformer's
    KV pool. Single-threaded: call step() from one thread (the server runs it in its own)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch: int = 8,
                 prefill_chunk: int = PREFILL_CHUNK, step_tokens: int | None = None):
        """max_batch: most sequences running at once; prefill_chunk: prompt tokens per chunk;
        step_tokens: most tokens per step (default: one chunk beside every sequence's decode)."""
        step_tokens = step_tokens or prefill_chunk + max_batch
        if max_batch < 1 or prefill_chunk < 1 or step_tokens < max_batch + 1:
            raise ValueError(f"need max_batch >= 1, prefill_chunk >= 1 and step_tokens > max_batch, got "
                             f"{max_batch}, {prefill_chunk}, {step_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_chunk, self.step_tokens = max_batch, prefill_chunk, step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.ids = count()
        self.tokens_out = 0  # tokens generated
        self.grammar: TokenGrammar | None = None  # built at the first constrained request

    def token_grammar(self) -> TokenGrammar:
        """The vocabulary compiled for constrained decoding (once, on first use)."""
        if self.grammar is None:
            args = self.model.args
            self.grammar = TokenGrammar(self.tokenizer, args.vocab_size, list(args.eos_token_ids))
        return self.grammar

    def submit(self, request: Request) -> Sequence:
        """Queue a request; it joins the running ones at a coming step."""
        ids = request.prompt_ids
        if not ids:
            raise ValueError("empty prompt: give some text to continue")
        if len(ids) >= self.model.context:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the context of {self.model.context} "
                             "tokens (one position is needed for the answer); shorten it or raise --context")
        if request.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {request.max_tokens}")
        pool = self.model.pool
        if -(-(len(ids) + 1) // pool.block_size) > pool.n_blocks:  # the prompt and one answer, as admission counts
            raise ValueError(f"prompt of {len(ids)} tokens needs more KV blocks than the pool's {pool.n_blocks}")
        constraint = self.token_grammar().constraint(request.grammar) if request.grammar else None
        seq = Sequence(request, self.model.new_sequence(), self.tokenizer, next(self.ids))
        seq.constraint = constraint
        if request.max_tokens == 0:
            self._finish(seq, "length")
        else:
            self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence now and give its KV blocks back (a client went away)."""
        if seq.done:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self._finish(seq, "cancelled")

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if reason not in ("stop", "cancelled"):  # a stop string's text is cut before it
            tail = seq.text.flush()
            if tail:
                seq.pieces.append(tail)
        seq.finish_reason = reason
        seq.finished_at = time.perf_counter()
        seq.kv.free()

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            pool = self.model.pool
            if seq.kv.blocks_needed(len(seq.tokens) + 1) > pool.blocks_free - self._decode_reserve():
                if not self.running:  # nothing will give blocks back
                    raise PoolExhausted(f"request {seq.id} needs more KV blocks than the pool has free "
                                        f"({pool.blocks_free} of {pool.n_blocks}); give it more blocks")
                break  # wait for blocks to come back
            self.waiting.popleft()
            cached = seq.kv.match(seq.tokens)
            if not seq.generated:
                seq.cached_tokens = cached
            self.running.append(seq)

    def _decode_reserve(self) -> int:
        """Blocks the running sequences need for their next token."""
        return sum(s.kv.blocks_needed(s.kv.length + 1) for s in self.running)

    def _plan(self) -> list[tuple[Sequence, list[int]]]:
        """This step's work: every decoding sequence's next token, then whole prompt chunks in
        admission order while they fit the token budget (the first one always)."""
        work = [(s, [s.next_token]) for s in self.running if s.next_token is not None]
        budget = self.step_tokens - len(work)
        first = True
        for s in self.running:
            if s.next_token is None:
                chunk = s.tokens[s.kv.length:s.kv.length + self.prefill_chunk]
                if len(chunk) > budget and not first:
                    break
                work.append((s, chunk))
                budget -= len(chunk)
                first = False
        return work

    def _fit(self, work: list[tuple[Sequence, list[int]]]) -> list[tuple[Sequence, list[int]]]:
        """Preempt the newest sequences until the step's blocks fit the pool."""
        pool = self.model.pool
        while sum(s.kv.blocks_needed(s.kv.length + len(ids)) for s, ids in work) > pool.blocks_free:
            victim = self.running.pop()
            victim.kv.free()
            if victim.next_token is not None:  # already emitted: recomputed with the rest when readmitted
                victim.generated.append(victim.next_token)
                victim.next_token = None
            self.waiting.appendleft(victim)
            work = [(s, ids) for s, ids in work if s is not victim]
        return work

    def step(self) -> list[Sequence]:
        """Admit, run one model step over the running sequences, sample their next tokens.
        Returns the sequences that produced text or finished in this step."""
        self._admit()
        work = self._fit(self._plan())
        if not work:
            return []
        logits = self.model.run([(s.kv, ids) for s, ids in work])
        touched = []
        for (seq, ids), row in zip(work, logits):
            if seq.next_token is not None:
                seq.generated.append(seq.next_token)
                seq.next_token = None
            else:
                seq.prefill_tokens += len(ids)
            if seq.kv.length < len(seq.tokens):
                continue  # prompt not complete yet: no token to sample
            touched.append(seq)
            self._sample(seq, row)
        self.running = [s for s in self.running if not s.done]
        return touched

    def _sample(self, seq: Sequence, logits: np.ndarray) -> None:
        req = seq.request
        p = req.params
        previous = np.asarray(seq.tokens, np.int64) if p.repetition_penalty != 1.0 else None
        penalized = p.presence_penalty != 0 or p.frequency_penalty != 0
        allowed = seq.constraint.mask(logits) if seq.constraint is not None else logits
        token = sample(allowed, p, seq.rng, previous, np.asarray(seq.generated, np.int64) if penalized else None)
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        if token in req.eos_ids:
            self._finish(seq, "eos")
            return
        if req.logprobs is not None:
            seq.logprobs.append(token_logprob(logits, token, req.logprobs))
        self.tokens_out += 1
        complete = seq.constraint is not None and seq.constraint.advance(token)
        piece, stopped = seq.text.push(token)
        if piece:
            seq.pieces.append(piece)
        if stopped or complete:
            seq.generated.append(token)
            self._finish(seq, "stop" if stopped else "grammar")
        elif len(seq.generated) + 1 >= req.max_tokens:
            seq.generated.append(token)
            self._finish(seq, "length")
        elif len(seq.tokens) + 1 > self.model.context:  # no position left to run it at
            seq.generated.append(token)
            self._finish(seq, "context")
        else:
            seq.next_token = token

    def run_all(self) -> None:
        """Step until every submitted request is done."""
        while self.busy:
            self.step()
