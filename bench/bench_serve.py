"""qserve under concurrent load: aggregate decode tokens/s at 1, 2, 4, 8, 16 streams (as ratios to
1 stream in the same run), p50 / p99 time to first token and inter-token latency, and a bounded
load run, twice (many requests, 16 at once, 10% cancelled mid-stream) that must leave no error,
no KV block held, and resident memory flat from the first run to the second.

    python bench/bench_serve.py --qbin SMOLLM2_INT4.qbin [--threads 2] [--levels 1,2,4,8,16]
        [--tokens 64] [--load-run 200] [--other-url http://127.0.0.1:8081/v1 --other-model NAME]

Starts `qserve` as a subprocess on a free port; --other-url runs the same load against another
OpenAI-compatible server (llama.cpp's llama-server with -np, ollama, vLLM) started by hand.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = ["The history of the printing press", "A short guide to growing tomatoes", "How a steam engine works",
           "The rules of chess, explained", "Why the sky is blue", "A recipe for bread", "The life of bees",
           "How rivers shape valleys", "The first computers", "Notes on learning a language",
           "A walk through an old city", "The physics of a bicycle", "What makes a good story",
           "The migration of birds", "How glass is made", "A day at the harbour"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stream_one(h: httpx.AsyncClient, model: str, prompt: str, tokens: int, cancel_after: int | None = None):
    """One streaming completion: (completion tokens, ttft s, inter-token gaps, status)."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, last, gaps, chunks, usage = None, None, [], 0, None
    async with h.stream("POST", "/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return 0, None, [], r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                return 0, None, [], "stream-error"
            if data.get("usage"):
                usage = data["usage"]["completion_tokens"]
            if data.get("choices") and data["choices"][0].get("text"):
                now = time.perf_counter()
                if first is None:
                    first = now - t0
                else:
                    gaps.append(now - last)
                last = now
                chunks += 1
                if cancel_after is not None and chunks >= cancel_after:
                    return chunks, first, gaps, "cancelled"
    return (usage if usage is not None else chunks), first, gaps, 200


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# A fresh connection per request: llama-server closes kept-alive connections after a few
# requests, and a client that reuses one then sees a disconnect.
LIMITS = httpx.Limits(max_keepalive_connections=0)


async def level(url: str, model: str, c: int, tokens: int, rounds: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=LIMITS) as h:
        # warm up at this concurrency: a step shape seen first (batched kernels) may compile
        await asyncio.gather(*(stream_one(h, model, PROMPTS[i % len(PROMPTS)], 8) for i in range(c)))
        t0 = time.perf_counter()
        results = []
        for r in range(rounds):
            results += await asyncio.gather(*(stream_one(h, model, PROMPTS[(r * c + i) % len(PROMPTS)], tokens)
                                              for i in range(c)))
        wall = time.perf_counter() - t0
    errors = [s for *_, s in results if s != 200]
    out_tokens = sum(n for n, *_ in results)
    ttft = [f for _, f, _, _ in results if f is not None]
    itl = [g for _, _, gs, _ in results for g in gs]
    return {"streams": c, "requests": len(results), "errors": len(errors), "tokens": out_tokens,
            "tokens_per_s": out_tokens / wall, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99)}


async def load_run(url: str, model: str, n: int, c: int, tokens: int) -> dict:
    rng = random.Random(0)
    sem = asyncio.Semaphore(c)
    plan = [(PROMPTS[i % len(PROMPTS)] + f" (#{i})", rng.randint(1, 8) if rng.random() < 0.1 else None)
            for i in range(n)]

    async def one(h, prompt, cancel):
        async with sem:
            return await stream_one(h, model, prompt, tokens, cancel)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=LIMITS) as h:
        results = await asyncio.gather(*(one(h, p, k) for p, k in plan))
    statuses = [s for *_, s in results]
    return {"requests": n, "ok": statuses.count(200), "cancelled": statuses.count("cancelled"),
            "errors": len([s for s in statuses if s not in (200, "cancelled")])}


def metric(url: str, name: str) -> float:
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qbin", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of `streams` requests per level")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--load-run", type=int, default=0, help="requests of the bounded load run (0: none)")
    ap.add_argument("--other-url", help="another OpenAI-compatible server's /v1 URL, measured the same way")
    ap.add_argument("--other-model", default="model")
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    cmd = [sys.executable, "-m", "qformat.runtime.server", str(a.qbin), "--port", str(port), "--threads",
           str(a.threads), "--parallel", str(max(levels)), "--context", str(a.context), "--max-queue", "256"]
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL if not os.environ.get("QSERVE_LOG") else None)
    try:
        for _ in range(600):
            try:
                if httpx.get(url.removesuffix("/v1") + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        model = a.qbin.stem
        rows = []
        for name, u, m in [("qserve", url, model)] + ([("other", a.other_url, a.other_model)] if a.other_url else []):
            base = None
            for c in levels:
                row = asyncio.run(level(u, m, c, a.tokens, a.rounds))
                base = base or row["tokens_per_s"]
                row.update(server=name, ratio_to_1=row["tokens_per_s"] / base)
                rows.append(row)
                print(f"{name} {c:2d} streams: {row['tokens_per_s']:7.1f} tok/s ({row['ratio_to_1']:.2f}x 1 stream), "
                      f"ttft p50/p99 {row['ttft_p50']:.3f}/{row['ttft_p99']:.3f} s, itl p50/p99 "
                      f"{row['itl_p50'] * 1e3:.1f}/{row['itl_p99'] * 1e3:.1f} ms, errors {row['errors']}", flush=True)
        for i in range(2 if a.load_run else 0):  # twice: the second shows whether memory stays flat
            before = rss_mb(server.pid)
            row = asyncio.run(load_run(url, model, a.load_run, 16, a.tokens))
            time.sleep(1.0)
            row.update(kind=f"load-run-{i + 1}", rss_before_mb=before, rss_after_mb=rss_mb(server.pid),
                       kv_blocks_in_use=metric(url, "qserve_kv_blocks_in_use"))
            rows.append(row)
            print(f"load run {i + 1}: {row}", flush=True)
        if a.json_out:
            a.json_out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
