"""Load generation: replay a workload against an OpenAI-compatible server over HTTP.

Uses the real `openai` AsyncOpenAI client on `/v1/completions` with streaming, greedy decoding,
`ignore_eos` (so each request produces exactly `max_tokens` tokens) and token-id prompts (so
each prompt has exactly `prompt_tokens` tokens). TTFT is the arrival of the first streamed chunk
that carries a choice; token counts come from the final usage chunk.
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from adaptivellm.benchmark.metrics import RequestResult
from adaptivellm.benchmark.workloads import BenchRequest, prompt_token_ids

#: Offset added to request indices of calibration and warm-up requests, so that their prompts
#: never equal a workload prompt (the prefix cache would serve them for free).
SOLO_INDEX_BASE = 1_000_000


@dataclass(frozen=True)
class Target:
    """A server to send requests to."""

    base_url: str
    """http://host:port (no /v1)."""
    model: str
    """Served model name."""
    vocab_size: int
    """Prompt token ids are drawn below this."""
    api_key: str | None = None
    """The server's --api-key, if it has one."""


def _client(target: Target) -> Any:
    from openai import AsyncOpenAI, Timeout

    # A saturated 2-core server can take seconds to accept a connection (its event loop
    # shares the cores with the engine): the openai default of 5 s to connect is too short.
    timeout = Timeout(900.0, connect=120.0)
    return AsyncOpenAI(
        base_url=f"{target.base_url}/v1",
        api_key=target.api_key or "none",
        max_retries=0,
        timeout=timeout,
    )


async def send(
    client: Any,
    target: Target,
    request: BenchRequest,
    t0: float,
    arrival_s: float,
    seed: int,
) -> RequestResult:
    """Send one streamed completion; times are seconds since t0 (perf_counter)."""
    extra: dict[str, object] = {"ignore_eos": True}
    if request.priority:
        extra["priority"] = request.priority
    first, times, tokens, error = math.nan, [], 0, ""
    try:
        stream = await client.completions.create(
            model=target.model,
            prompt=prompt_token_ids(request, target.vocab_size, seed),
            max_tokens=request.max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            user=request.tenant,
            extra_body=extra,
        )
        async for chunk in stream:
            now = time.perf_counter() - t0
            if chunk.choices:
                times.append(now)
                first = now if math.isnan(first) else first
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:  # a failed request is a result, not a crash of the benchmark
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter() - t0
    ok = not error and tokens > 0
    return RequestResult(
        request.index, request.tenant, request.prompt_tokens, tokens, arrival_s, first, end,
        ok, error or ("" if ok else "no tokens"), tuple(times),
    )  # fmt: skip


async def replay(
    target: Target,
    requests: Sequence[BenchRequest],
    closed_loop: int = 0,
    seed: int = 0,
    on_result: Callable[[RequestResult], None] | None = None,
) -> list[RequestResult]:
    """Replay a workload; return results in workload order.

    Open loop (closed_loop=0): each request is sent at its arrival offset, whatever is in
    flight; its turnaround counts from that offset. Closed loop (closed_loop=N): N clients each
    send the next request as soon as their previous one finishes.
    """
    client = _client(target)
    t0 = time.perf_counter()
    results: list[RequestResult] = []

    async def one(request: BenchRequest, arrival_s: float) -> None:
        result = await send(client, target, request, t0, arrival_s, seed)
        results.append(result)
        if on_result is not None:
            on_result(result)

    async def timed(request: BenchRequest) -> None:
        await asyncio.sleep(max(0.0, request.arrival_s - (time.perf_counter() - t0)))
        await one(request, request.arrival_s)

    queue = list(reversed(requests))

    async def worker() -> None:
        while queue:
            await one(queue.pop(), time.perf_counter() - t0)

    try:
        if closed_loop:
            await asyncio.gather(*(worker() for _ in range(closed_loop)))
        else:
            await asyncio.gather(*(timed(r) for r in requests))
    finally:
        await client.close()
    return sorted(results, key=lambda r: r.index)


def replay_sync(
    target: Target,
    requests: Sequence[BenchRequest],
    closed_loop: int = 0,
    seed: int = 0,
    on_result: Callable[[RequestResult], None] | None = None,
) -> list[RequestResult]:
    """`replay` from synchronous code."""
    return asyncio.run(replay(target, requests, closed_loop, seed, on_result))


def calibration_shapes(max_model_len: int) -> list[tuple[int, int]]:
    """(prompt, output) lengths of the solo calibration requests: short, medium and long
    prompts, each with a short and a longer output, so that a, b and c are all determined."""
    long = max(32, min(int(0.75 * max_model_len), max_model_len - 64))
    prompts = sorted({16, max(24, max_model_len // 8), long})
    return [(p, o) for p in prompts for o in (8, 64) if p + o <= max_model_len]


async def solo_latencies(
    target: Target, shapes: Sequence[tuple[int, int]], repeats: int = 1, warmup: int = 2
) -> list[tuple[int, int, float]]:
    """Latency of each shape sent alone on the idle server (after `warmup` unrecorded ones).

    Raises RuntimeError if a calibration request fails: every later figure depends on it.
    """
    client = _client(target)
    samples = []
    try:
        for i in range(warmup + repeats * len(shapes)):
            p, o = shapes[(i - warmup) % len(shapes)] if i >= warmup else shapes[0]
            request = BenchRequest(SOLO_INDEX_BASE + i, 0.0, p, o, tenant="calibration")
            t0 = time.perf_counter()
            result = await send(client, target, request, t0, 0.0, seed=0)
            if not result.ok:
                raise RuntimeError(f"calibration request ({p}, {o}) failed: {result.error}")
            if i >= warmup:
                samples.append((p, result.output_tokens, result.latency_s))
    finally:
        await client.close()
    return samples


def scrape_metrics(base_url: str, timeout: float = 10.0) -> str:
    """The server's /metrics exposition text."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as response:
        return str(response.read().decode())
