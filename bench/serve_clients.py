"""The clients of bench_serve.py, in a process of their own (so their Python does not share
the server's GIL). Reads one JSON job on stdin {url, prompts, max_tokens, concurrency, ramp},
and optionally "stream" (default true), "cpus" (CPU ids to run on) and "client" ("openai", the
official client, default; or "httpx": plain requests and SSE lines, the lightest client), writes
{rate, ttfts, latencies, cpu_s, wall_s} on stdout (cpu_s: this process's CPU seconds while the
clients ran)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import httpx
import openai


async def _plain(http, p, max_tokens, stream):
    """One completion through plain httpx: (seconds to the first text, tokens)."""
    body = {"model": "bench", "prompt": p, "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}  # fmt: skip
    t = time.perf_counter()
    if not stream:
        r = await http.post("/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]
    first, n = None, 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["text"]:
                first = first or time.perf_counter() - t
                n += choices[0]["text"].count(" t")
    return first, n


async def _clients(url, prompts, max_tokens, concurrency, ramp, stream=True, kind="openai"):
    """(tokens/s, TTFTs [R], latencies [R]) of `prompts` sent by `concurrency` clients
    (streaming, or not: then TTFT = latency)."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    http = httpx.AsyncClient(base_url=url, timeout=600)
    todo = list(reversed(prompts))
    ttfts, latencies, counts = [], [], []

    async def worker(i):
        await asyncio.sleep(ramp * i / concurrency)
        while todo:
            p = todo.pop()
            t = time.perf_counter()
            first, n = None, 0
            if kind == "httpx":
                first, n = await _plain(http, p, max_tokens, stream)
            elif not stream:
                got = await client.completions.create(
                    model="bench", prompt=p, max_tokens=max_tokens, temperature=0
                )
                first, n = time.perf_counter() - t, got.usage.completion_tokens
            else:
                chunks = await client.completions.create(
                    model="bench", prompt=p, max_tokens=max_tokens, temperature=0, stream=True
                )
                async for chunk in chunks:
                    if chunk.choices and chunk.choices[0].text:
                        first = first or time.perf_counter() - t
                        n += chunk.choices[0].text.count(" t")
            ttfts.append(first)
            latencies.append(time.perf_counter() - t)
            counts.append(n)

    t, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    await client.close()
    await http.aclose()
    assert sum(counts) == len(prompts) * max_tokens, "a request ended early"
    return {
        "rate": sum(counts) / wall,
        "ttfts": ttfts,
        "latencies": latencies,
        "cpu_s": cpu,
        "wall_s": wall,
    }


def main():
    job = json.load(sys.stdin)
    if job.get("cpus"):
        os.sched_setaffinity(0, job["cpus"])
    out = asyncio.run(
        _clients(
            job["url"],
            job["prompts"],
            job["max_tokens"],
            job["concurrency"],
            job["ramp"],
            job.get("stream", True),
            job.get("client", "openai"),
        )  # fmt: skip
    )
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
