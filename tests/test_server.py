"""qserve (runtime/server.py) on a tiny model, through the official openai client and raw HTTP."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from tiny_models import make_tiny_checkpoint  # noqa: E402

from qformat.convert import convert  # noqa: E402
from qformat.runtime.engine import Engine, Request  # noqa: E402
from qformat.runtime.server import Limits, build_server  # noqa: E402

KEY = "sk-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def qbin(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("serve"), arch="llama", tied=True, seed=4)
    path = folder.parent / "tiny.qbin"
    convert(folder, path, "int8", progress=False, clip_search=False)
    return path


@pytest.fixture(scope="module")
def served(qbin):
    """A server on 127.0.0.1 in a thread: (server, base url)."""
    server = build_server(qbin, parallel=4, context=128, threads=1, api_key=KEY,
                          limits=Limits(parallel=4, max_queue=2, timeout_s=60, max_body=20000))
    port = free_port()
    config = uvicorn.Config(server.app(), host="127.0.0.1", port=port, log_level="warning")
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    for _ in range(200):
        if http.started:
            break
        time.sleep(0.05)
    yield server, f"http://127.0.0.1:{port}"
    http.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key=KEY, max_retries=0)


def test_chat_and_completion_streaming_and_not(served, client):
    server, _ = served
    messages = [{"role": "user", "content": "Hello there"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    assert full.usage.completion_tokens > 0 and full.usage.prompt_tokens > 0
    assert full.choices[0].finish_reason in ("stop", "length")
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                             stream=True)]
    assert "".join(pieces) == text
    comp = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert streamed == comp.choices[0].text
    # the engine's own answer for the same prompt, alone
    ids = server.model.tokenizer.encode("The capital of France is")
    engine = Engine(server.model.transformer, server.model.tokenizer)
    seq = engine.submit(Request(ids, comp.usage.completion_tokens, eos_ids=frozenset(server.model.eos_ids)))
    engine.run_all()
    assert seq.take() == comp.choices[0].text
    assert server.model.transformer.pool.blocks_in_use == 0


def test_seed_stop_logprobs(client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    greedy = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0)
    text = greedy.choices[0].text
    stop = text[3:5]
    if stop.strip():
        cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0,
                                        stop=[stop])
        assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
        assert text.startswith(cut.choices[0].text)
    lp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                        temperature=0, logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.logprob - 1e-6
        assert entry.logprob <= 0


def test_json_schema_and_json_object(client):
    """Sampled answers in response_format's JSON: they parse and validate against the schema,
    streamed or not; the stream's text is the whole answer's."""
    llguidance = pytest.importorskip("llguidance")  # noqa: F841
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "population": {"type": "integer", "minimum": 0}},
              "required": ["city", "population"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": "Name a city as JSON."}]
    for seed in range(3):
        kw = dict(model="tiny", messages=messages, max_tokens=60, temperature=1.0, seed=seed, response_format=fmt)
        full = client.chat.completions.create(**kw)
        assert full.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(full.choices[0].message.content), schema)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True))
        assert streamed == full.choices[0].message.content
    any_object = client.completions.create(model="tiny", prompt="{", max_tokens=40, temperature=0,
                                           extra_body={"response_format": {"type": "json_object"}})
    if any_object.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(any_object.choices[0].text), dict)
    else:
        assert any_object.choices[0].text.startswith("{")


def test_embeddings_and_models(client):
    out = client.embeddings.create(model="tiny", input=["first text", "another, longer text"])
    vecs = np.array([d.embedding for d in out.data])
    assert vecs.shape[0] == 2 and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    again = client.embeddings.create(model="tiny", input="first text")
    assert np.allclose(again.data[0].embedding, vecs[0], atol=1e-6)
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_bad_requests(served):
    server, url = served
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, timeout=30) as h:
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = h.post("/v1/completions", content=b"{not json", headers=auth)
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": 9}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        r = h.post("/v1/completions", json={"model": "other", "prompt": "x"}, headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 30000}, headers=auth)
        assert r.status_code == 413
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": list(range(200))}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = h.post("/v1/chat/completions", json={"model": "tiny", "messages": []}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "response_format": bad}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
        assert "nonsense" in r.json()["error"]["message"]
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "response_format": {"type": "yaml"}},
                   headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
        assert h.get("/health").json()["status"] == "ok"
        assert "qserve_kv_blocks_in_use 0" in h.get("/metrics").text


def test_concurrency_limit_cancellation_and_blocks(served):
    """8 streams against 4 slots + 2 queued: two get 429; streams closed early are cancelled and
    every KV block comes back."""
    server, url = served
    auth = {"Authorization": f"Bearer {KEY}"}

    async def one(h, i):
        body = {"model": "tiny", "prompt": f"request {i}", "max_tokens": 60, "temperature": 0, "stream": True}
        async with h.stream("POST", "/v1/completions", json=body, headers=auth) as r:
            if r.status_code != 200:
                return r.status_code
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    n += 1
                    if i % 2 and n == 3:
                        return "cancelled"  # leaves the stream: the server cancels the sequence
            return 200

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60) as h:
            return await asyncio.gather(*(one(h, i) for i in range(8)))

    results = asyncio.run(run())
    assert results.count(429) == 2 and all(r in (200, 429, "cancelled") for r in results)
    for _ in range(100):
        if server.model.transformer.pool.blocks_in_use == 0 and not server.engine.busy:
            break
        time.sleep(0.05)
    assert server.model.transformer.pool.blocks_in_use == 0 and server.loop.pending == 0
