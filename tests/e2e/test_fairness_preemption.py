"""weighted-turnaround's preemption for a waiting request, through a real server: with every batch
slot taken by long requests, a short request preempts one of them, finishes first, and every
output is still identical token for token to the same request alone (greedy)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from adaptivellm.launch import adaptivellm_command, free_port, running_server
from tests.support import (
    Server,
    lower_engine_priority,
    metric_delta,
    overlapping_attempts,
    read_live_after,
    texts_alone,
)

LONG_TOKENS = 600
SHORT_TOKENS = 4
FLAGS = ["--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "2",
         "--kv-cache-memory-bytes", str(64 << 20), "--swap-space", "0.25"]  # fmt: skip
# Long prompts (about 300 tokens each): whichever is the victim holds whole KV blocks (128 tokens
# on CPU) to swap.
PROMPTS = {
    "long0": "the river runs past the old mill " * 20,
    "long1": "a letter from the city market garden " * 40,
    "short": "music at night",
}
#: The short request arrives once both long ones have streamed this many chunks: both are past
#: their prompts (preemptible) with hundreds of tokens to go. The tiny model decodes a token in
#: about 2 ms, and the streaming client may lag the engine on a busy machine, so the head start
#: is kept small.
HEAD_START = 3
#: How long the client must still read both long streams live after sending the short request
#: for the attempt to count: the short one, taking a long one's slot, is done in 25-75 ms
#: (prefill of 3 tokens, 4 decode steps, the victim's swap); waiting for a slot it would finish
#: only after one of the long ones.
LIVE_S = 0.5


def body(model: str, name: str, stream: bool) -> dict:
    tokens = SHORT_TOKENS if name == "short" else LONG_TOKENS
    return {"model": model, "prompt": PROMPTS[name], "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}  # fmt: skip


async def contended(base_url: str, model: str) -> tuple[dict[str, str], dict[str, float]]:
    """Two long requests take both slots; once both have streamed HEAD_START chunks, the short
    one arrives. Returns the texts, when each request finished (and the short one was sent), and
    for how long after that each long stream was read live (`long0_live`, `long1_live`)."""
    texts: dict[str, str] = {}
    finished: dict[str, float] = {}
    reads: dict[str, list[float]] = {"long0": [], "long1": []}
    started = {name: asyncio.Event() for name in ("long0", "long1")}
    async with httpx.AsyncClient(timeout=600) as client:

        async def long(name: str) -> None:
            parts = []
            url = f"{base_url}/v1/completions"
            async with client.stream("POST", url, json=body(model, name, True)) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        parts.append(_chunk_text(line))
                        reads[name].append(time.monotonic())
                        if len(parts) >= HEAD_START:
                            started[name].set()
            texts[name], finished[name] = "".join(parts), time.monotonic()

        async def short() -> None:
            await asyncio.gather(*(e.wait() for e in started.values()))
            finished["short_sent"] = time.monotonic()
            r = await client.post(f"{base_url}/v1/completions", json=body(model, "short", False))
            r.raise_for_status()
            texts["short"], finished["short"] = r.json()["choices"][0]["text"], time.monotonic()

        await asyncio.gather(long("long0"), long("long1"), short())
    for name, at in reads.items():
        finished[f"{name}_live"] = read_live_after(at, finished["short_sent"])
    return texts, finished


def _chunk_text(line: str) -> str:
    import json

    return str(json.loads(line.removeprefix("data: "))["choices"][0]["text"])


@pytest.fixture(scope="module")
def reference(server: Server) -> dict[str, str]:
    bodies = {name: body(server.model, name, False) for name in PROMPTS}
    return asyncio.run(texts_alone(server.base_url, bodies, server.headers))


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_short_request_preempts_a_long_one_outputs_unchanged(
    mode: str, reference: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    flags = [*FLAGS, "--preemption-mode", mode]
    with running_server(adaptivellm_command(None, port, flags), port, tmp_path / "log") as s:
        assert lower_engine_priority(s) > 0
        finished, before, after = overlapping_attempts(
            s.base_url,
            lambda: asyncio.run(contended(s.base_url, "adaptivellm-tiny-llama")),
            sent_on_time,
            reference,
        )
    assert short_went_first(finished), finished
    assert metric_delta(before, after, "adaptivellm_turnaround_preemptions_total") >= 1
    if mode == "swap":
        assert metric_delta(before, after, "adaptivellm_preemptions_total", 'mode="swap"') >= 1
        # The victim's whole blocks come back from the prefix cache; its last, partly filled
        # block (it was preempted mid-decode) is copied back from host, not recomputed.
        swap_in = metric_delta(before, after, "adaptivellm_swap_blocks_total", 'direction="in"')
        assert swap_in >= 1


def sent_on_time(times: dict[str, float]) -> bool:
    """The client read both long streams live for LIVE_S after the short one was sent."""
    return min(times["long0_live"], times["long1_live"]) > LIVE_S


def short_went_first(finished: dict[str, float]) -> bool:
    """The short request finished before either long one: it took a long one's slot (both were
    running when it arrived, with hundreds of tokens to go)."""
    return finished["short"] < min(finished["long0"], finished["long1"])
