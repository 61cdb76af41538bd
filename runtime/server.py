"""qserve: an OpenAI-compatible HTTP server over one .qbin model, many clients decoded together.

    qserve model.qbin --port 8080 --parallel 8
    python -m qformat.runtime.server model.qbin

Endpoints: /v1/chat/completions and /v1/completions (streaming as server-sent events ending in
`data: [DONE]`, or one JSON answer), /v1/embeddings (mean of the final normalized hidden
states), /v1/models, /health, /metrics (Prometheus text). The engine (runtime/engine.py) runs on
a thread of its own; handlers submit requests to it and read their text back through asyncio
queues, so every active request shares each model step. A client that disconnects cancels its
sequence, whose KV blocks go back at the next step.

Needs the `serve` extra (Starlette, uvicorn, pydantic); the runtime itself has no web dependency.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import queue
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import click
import numpy as np
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from qformat.reader import QbinReader

from .api import Model, load
from .engine import Engine, Request, Sequence, TokenLogprob
from .grammar import json_schema_grammar
from .kvcache import BLOCK_SIZE
from .protocol import APIError, ChatRequest, CompletionRequest, EmbeddingRequest, Sampling, validation_error
from .sampling import SamplingParams

log = logging.getLogger("qformat.serve")

# OpenAI's finish reasons for the engine's.
FINISH = {"eos": "stop", "stop": "stop", "grammar": "stop", "length": "length", "context": "length",
          "cancelled": "length"}


@dataclass
class Limits:
    """What one server accepts: sequences decoded at once, requests waiting beyond them (429
    past both), seconds a request may run, bytes of a request body."""

    parallel: int = 8
    max_queue: int = 64
    timeout_s: float = 600.0
    max_body: int = 4 << 20


@dataclass
class Event:
    """What a request's handler receives: new text (and its tokens' logprobs), then the end."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: APIError | None = None


class Handle:
    """One submitted request as its handler sees it; the engine thread fills `events`."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.seq: Sequence | None = None
        self.sent_logprobs = 0

    def post(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class EngineLoop:
    """The engine on a thread of its own. Handlers call submit / cancel / call from the event
    loop; those become commands that the thread applies between steps."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.handles: dict[int, Handle] = {}
        self.pending = 0  # submitted, not yet finished (read by the event loop for 429s)
        self.tokens_window: list[tuple[float, int]] = []  # (time, tokens) of recent steps
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="qserve-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout=10)

    def submit(self, request: Request) -> Handle:
        handle = Handle(request, asyncio.get_running_loop())
        self.pending += 1
        self._command(("submit", handle))
        return handle

    def cancel(self, handle: Handle) -> None:
        self._command(("cancel", handle))

    async def call(self, fn):
        """Run fn() on the engine thread between steps (it owns the model); its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._command(("call", (fn, future, loop)))
        return await future

    def _command(self, command) -> None:
        self.commands.put(command)
        self.wake.set()

    def _apply(self, kind: str, arg) -> None:
        if kind == "submit":
            try:
                arg.seq = self.engine.submit(arg.request)
            except ValueError as e:
                self._end(arg, error=APIError(400, str(e), "messages"))
                return
            self.handles[arg.seq.id] = arg
            if arg.seq.done:  # max_tokens 0
                self._deliver(arg)
        elif kind == "cancel":
            if arg.seq is not None and not arg.seq.done:
                self.engine.cancel(arg.seq)
                self._deliver(arg)
        else:
            fn, future, loop = arg
            try:
                result = fn()
                loop.call_soon_threadsafe(lambda: future.done() or future.set_result(result))
            except Exception as e:  # handed to the awaiting handler, which answers it
                loop.call_soon_threadsafe(lambda e=e: future.done() or future.set_exception(e))

    def _end(self, handle: Handle, **event) -> None:
        self.pending -= 1
        handle.post(Event(**event))

    def _deliver(self, handle: Handle) -> None:
        seq = handle.seq
        new = seq.logprobs[handle.sent_logprobs:]
        handle.sent_logprobs = len(seq.logprobs)
        text = seq.take()
        if not seq.done:
            if text or new:
                handle.post(Event(text, list(new)))
            return
        del self.handles[seq.id]
        self._end(handle, text=text, logprobs=list(new), finish_reason=FINISH[seq.finish_reason],
                  prompt_tokens=len(seq.request.prompt_ids), completion_tokens=len(seq.generated))
        ttft = (seq.first_token_at or seq.finished_at) - seq.submitted
        decode = seq.finished_at - (seq.first_token_at or seq.finished_at)
        tps = (len(seq.generated) - 1) / decode if decode > 0 else float("nan")
        log.info("request %s: %d tokens in (%d cached), %d out, first token %.3f s, %.1f tokens/s, %s",
                 seq.id, len(seq.request.prompt_ids), seq.cached_tokens, len(seq.generated), ttft, tps,
                 seq.finish_reason)

    def _run(self) -> None:
        while not self.stopped:
            while True:
                try:
                    self._apply(*self.commands.get_nowait())
                except queue.Empty:
                    break
            if not self.engine.busy:
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            before = self.engine.tokens_out
            try:
                touched = self.engine.step()
            except Exception as e:  # a failed step fails its sequences, not the server
                log.exception("engine step failed")
                for handle in list(self.handles.values()):
                    self.engine.cancel(handle.seq)
                    del self.handles[handle.seq.id]
                    self._end(handle, error=APIError(500, f"the model step failed: {e}", kind="server_error"))
                continue
            now = time.perf_counter()
            self.tokens_window = [(t, n) for t, n in self.tokens_window if now - t < 10.0]
            self.tokens_window.append((now, self.engine.tokens_out - before))
            for seq in touched:
                if seq.id in self.handles:
                    self._deliver(self.handles[seq.id])

    def tokens_per_s(self) -> float:
        window = list(self.tokens_window)
        if len(window) < 2:
            return 0.0
        span = window[-1][0] - window[0][0]
        return sum(n for _, n in window[1:]) / span if span > 0 else 0.0


class Server:
    """The HTTP side: validation, limits, prompts, and the answers' JSON."""

    def __init__(self, model: Model, name: str, limits: Limits, api_key: str | None = None):
        self.model, self.name, self.limits, self.api_key = model, name, limits, api_key
        self.engine = Engine(model.transformer, model.tokenizer, max_batch=limits.parallel)
        self.loop = EngineLoop(self.engine)
        self.created = int(time.time())
        self.counts = {"requests": 0, "rejected": 0, "prompt_tokens": 0, "completion_tokens": 0}

    # ------------------------------------------------------------------ plumbing
    def app(self) -> Starlette:
        routes = [Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.metrics, methods=["GET"])]
        return Starlette(routes=routes, lifespan=self._lifespan,
                         exception_handlers={APIError: self._error, 404: self._not_found, 405: self._not_allowed})

    @asynccontextmanager
    async def _lifespan(self, app):
        self.loop.start()
        try:
            yield
        finally:
            self.loop.stop()

    async def _error(self, request, exc: APIError) -> JSONResponse:
        if exc.status in (429,):
            self.counts["rejected"] += 1
        return JSONResponse(exc.body(), status_code=exc.status)

    async def _not_found(self, request, exc) -> JSONResponse:
        return JSONResponse(APIError(404, f"no route {request.url.path}", kind="not_found_error").body(), 404)

    async def _not_allowed(self, request, exc) -> JSONResponse:
        return JSONResponse(APIError(405, f"{request.method} is not allowed on {request.url.path}").body(), 405)

    def _authorize(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.api_key}":
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           kind="authentication_error", code="invalid_api_key")

    async def _body(self, request: HTTPRequest, model_cls):
        self._authorize(request)
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.limits.max_body:
            raise APIError(413, f"request body of {size} bytes exceeds the limit of {self.limits.max_body}")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.limits.max_body:
                raise APIError(413, f"request body exceeds the limit of {self.limits.max_body} bytes")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            body = model_cls.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        if body.model != self.name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {self.name!r}",
                           "model", kind="not_found_error", code="model_not_found")
        return body

    def _request(self, body: Sampling, ids: list[int], logprobs: int | None) -> Request:
        context = self.model.context
        if len(ids) >= context:
            raise APIError(400, f"the prompt is {len(ids)} tokens; the context is {context} (one position is "
                                "needed for the answer): shorten it", "messages", code="context_length_exceeded")
        room = context - len(ids)
        limit = body.token_limit
        max_tokens = room if limit is None else min(limit, room)  # capped by the context
        params = SamplingParams(temperature=body.temperature, top_p=body.top_p,
                                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
        return Request(ids, max_tokens, params, body.seed, body.stops, frozenset(self.model.eos_ids), logprobs,
                       self._grammar(body))

    def _grammar(self, body: Sampling) -> str | None:
        """The llguidance grammar response_format asks for, checked against the vocabulary."""
        wanted, schema = body.json_schema
        if not wanted:
            return None
        try:
            grammar = json_schema_grammar(schema)
            self.engine.token_grammar().check(grammar)
        except ValueError as e:
            raise APIError(400, f"response_format: {e}", "response_format") from None
        return grammar

    def _admit(self) -> None:
        if self.loop.pending >= self.limits.parallel + self.limits.max_queue:
            raise APIError(429, f"the server is at its limit of {self.limits.parallel} running and "
                                f"{self.limits.max_queue} waiting requests; retry later",
                           kind="rate_limit_error", code="server_busy")

    async def _events(self, handle: Handle) -> AsyncIterator[Event]:
        """The request's events until its end; the sequence is cancelled if the handler leaves
        early (a client that disconnected) or the request runs past the timeout."""
        deadline = time.monotonic() + self.limits.timeout_s
        done = False
        try:
            while True:
                left = deadline - time.monotonic()
                try:
                    event = await asyncio.wait_for(handle.events.get(), timeout=max(left, 0.001))
                except asyncio.TimeoutError:
                    self.loop.cancel(handle)  # its end arrives as the next event
                    deadline = float("inf")
                    continue
                if event.error is not None:
                    done = True
                    raise event.error
                if event.finish_reason is not None:
                    done = True
                    self.counts["prompt_tokens"] += event.prompt_tokens
                    self.counts["completion_tokens"] += event.completion_tokens
                yield event
                if done:
                    return
        finally:
            if not done:
                self.loop.cancel(handle)

    # ------------------------------------------------------------------ endpoints
    async def chat(self, request: HTTPRequest) -> Response:
        body = await self._body(request, ChatRequest)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        try:
            text = self.model.render_messages(messages)
        except Exception as e:  # no template, or jinja2 failed: never a silent fallback
            raise APIError(400, f"the model's chat template failed on these messages: {e}", "messages") from None
        ids = self.model.tokenizer.encode(text, add_bos=False)
        k = body.top_logprobs if body.top_logprobs is not None else 0
        return await self._generate(body, ids, k if body.logprobs else None, chat=True)

    async def completions(self, request: HTTPRequest) -> Response:
        body = await self._body(request, CompletionRequest)
        if isinstance(body.prompt, str):
            ids = self.model.tokenizer.encode(body.prompt)
        else:
            vocab = self.model.args.vocab_size
            if any(not 0 <= t < vocab for t in body.prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
            ids = list(body.prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        return await self._generate(body, ids, body.logprobs, chat=False)

    async def _generate(self, body: Sampling, ids: list[int], logprobs: int | None, chat: bool) -> Response:
        req = self._request(body, ids, logprobs)
        self._admit()
        self.counts["requests"] += 1
        handle = self.loop.submit(req)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            return StreamingResponse(self._stream(handle, rid, chat, logprobs), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, lps, end = [], [], None
        async for event in self._events(handle):
            text.append(event.text)
            lps += event.logprobs
            end = event
        usage = self._usage(end)
        content = "".join(text)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": content},
                      "logprobs": self._chat_logprobs(lps) if logprobs is not None else None,
                      "finish_reason": end.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": content, "logprobs": self._text_logprobs(lps) if logprobs is not None else None,
                      "finish_reason": end.finish_reason}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": self.name,
                             "choices": [choice], "usage": usage})

    async def _stream(self, handle: Handle, rid: str, chat: bool, logprobs: int | None) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, lps, finish: str | None, usage: dict | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish,
                          "logprobs": self._chat_logprobs(lps) if logprobs is not None and lps else None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish,
                          "logprobs": self._text_logprobs(lps) if logprobs is not None and lps else None}
            out = {"id": rid, "object": obj, "created": created, "model": self.name, "choices": [choice]}
            if usage is not None:
                out["usage"] = usage
            return f"data: {json.dumps(out)}\n\n"

        try:
            if chat:
                yield chunk(None, [], None, role=True)
            async for event in self._events(handle):
                if event.text or event.logprobs:
                    yield chunk(event.text, event.logprobs, None)
                if event.finish_reason is not None:
                    yield chunk(None, [], event.finish_reason, self._usage(event))
            yield "data: [DONE]\n\n"
        except APIError as e:  # headers are sent: the error goes in the stream
            yield f"data: {json.dumps(e.body())}\n\n"

    def _usage(self, end: Event) -> dict:
        return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
                "total_tokens": end.prompt_tokens + end.completion_tokens}

    def _piece(self, token: int) -> str:
        return self.model.tokenizer.decode([token], skip_special=False)

    def _chat_logprobs(self, lps: list[TokenLogprob]) -> dict:
        def entry(token: int, lp: float) -> dict:
            piece = self._piece(token)
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

        return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(a, b) for a, b in t.top]}
                            for t in lps]}

    def _text_logprobs(self, lps: list[TokenLogprob]) -> dict:
        return {"tokens": [self._piece(t.token) for t in lps], "token_logprobs": [t.logprob for t in lps],
                "top_logprobs": [{self._piece(a): b for a, b in t.top} for t in lps]}

    async def embeddings(self, request: HTTPRequest) -> Response:
        body = await self._body(request, EmbeddingRequest)
        tok = self.model.tokenizer
        inputs = [tok.encode(i) if isinstance(i, str) else list(i) for i in body.inputs()]
        if not inputs or any(not ids for ids in inputs):
            raise APIError(400, "every input must be non-empty", "input")
        if any(len(ids) > self.model.context for ids in inputs):
            raise APIError(400, f"an input is longer than the context of {self.model.context} tokens", "input",
                           code="context_length_exceeded")
        transformer = self.model.transformer

        def pooled() -> list[np.ndarray]:
            out = []
            for ids in inputs:
                v = transformer.hidden(ids).mean(axis=0)
                out.append((v / max(float(np.linalg.norm(v)), 1e-12)).astype("<f4"))
            return out

        arrays = await self.loop.call(pooled)
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(v.tobytes()).decode("ascii") for v in arrays]
        else:
            vectors = [v.tolist() for v in arrays]
        n = sum(len(ids) for ids in inputs)
        self.counts["prompt_tokens"] += n
        return JSONResponse({"object": "list", "model": self.name,
                             "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    async def models(self, request: HTTPRequest) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                                          "owned_by": "qformat"}]})

    async def health(self, request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok", "model": self.name})

    async def metrics(self, request: HTTPRequest) -> Response:
        pool = self.model.transformer.pool
        e = self.engine
        lines = []
        for name, kind, value, help_ in (
                ("qserve_requests_total", "counter", self.counts["requests"], "Generation requests accepted."),
                ("qserve_requests_rejected_total", "counter", self.counts["rejected"], "Requests refused with 429."),
                ("qserve_prompt_tokens_total", "counter", self.counts["prompt_tokens"], "Prompt tokens of finished requests."),
                ("qserve_completion_tokens_total", "counter", self.counts["completion_tokens"], "Tokens generated."),
                ("qserve_queue_length", "gauge", len(e.waiting), "Requests waiting for a slot."),
                ("qserve_active_sequences", "gauge", len(e.running), "Sequences being decoded."),
                ("qserve_kv_blocks_in_use", "gauge", pool.blocks_in_use, "KV pool blocks held by sequences."),
                ("qserve_kv_blocks_total", "gauge", pool.n_blocks, "KV pool blocks."),
                ("qserve_tokens_per_second", "gauge", round(self.loop.tokens_per_s(), 3),
                 "Tokens generated per second over the last 10 s.")):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def build_server(path: str | Path, parallel: int = 8, context: int | None = None, threads: int | None = None,
                 device: str = "cpu", api_key: str | None = None, name: str | None = None,
                 limits: Limits | None = None, lora: str | Path | None = None, lora_scale: float = 1.0) -> Server:
    """A Server for the .qbin at path: a KV pool of `parallel` sequences of `context` positions;
    lora: a LoRA adapter folder (peft's layout) every request runs with."""
    limits = limits or Limits(parallel=parallel)
    longest = QbinReader(path).model.max_seq_len
    context = min(longest, context or longest)
    model = load(path, device=device, threads=threads, context=context,
                 kv_blocks=-(-context // BLOCK_SIZE) * limits.parallel, lora=lora, lora_scale=lora_scale)
    return Server(model, name or Path(path).stem, limits, api_key)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--parallel", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences decoded at once (each gets a whole context of KV blocks).")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting beyond --parallel before new ones get HTTP 429.")
@click.option("--context", type=click.IntRange(min=2), default=None, help="Positions per sequence [model's maximum].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [all cores].")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True)
@click.option("--api-key", default=None, envvar="QSERVE_API_KEY", help="Require 'Authorization: Bearer KEY'.")
@click.option("--model-name", default=None, help="The model id clients send [the file's name without .qbin].")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="Seconds a request may run before it is cut.")
@click.option("--lora", type=click.Path(path_type=Path), default=None,
              help="A LoRA adapter folder in peft's layout (qtune -o) to serve the model with.")
@click.option("--lora-scale", type=float, default=1.0, show_default=True, help="With --lora: the adapter's weight.")
@click.option("--drain", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM: seconds running requests may finish in; no new ones are accepted.")
def main(file, host, port, parallel, max_queue, context, threads, device, api_key, model_name, timeout, lora,
         lora_scale, drain):
    """Serve FILE over the OpenAI API (chat, completions, embeddings, models)."""
    import uvicorn

    from qformat.errors import QbinError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        server = build_server(file, parallel, context, threads, device, api_key, model_name,
                              Limits(parallel=parallel, max_queue=max_queue, timeout_s=timeout), lora, lora_scale)
    except (QbinError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    log.info("serving %s as %r on http://%s:%d (%d sequences of %d positions, %d KV blocks)", file, server.name,
             host, port, parallel, server.model.context, server.model.transformer.pool.n_blocks)
    uvicorn.run(server.app(), host=host, port=port, log_level="warning", timeout_graceful_shutdown=drain)


if __name__ == "__main__":
    main()
