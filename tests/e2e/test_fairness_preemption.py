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
    Step,
    lower_engine_priority,
    metric_delta,
    overlapping_attempts,
    read_live_after,
    texts_alone,
    trace_env,
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
#: The attempt counts when the short request reached the engine while both long ones decoded
#: with at least this many tokens each still to go (read from the server's step trace): then a
#: slot frees only hundreds of milliseconds later, while the short one, taking a long one's
#: slot, is done in 25-75 ms (prefill of 3 tokens, 4 decode steps, the victim's swap).
MIN_LEFT = 150


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
    port, trace = free_port(), tmp_path / "trace"
    command = adaptivellm_command(None, port, [*FLAGS, "--preemption-mode", mode])
    with running_server(command, port, tmp_path / "log", trace_env(trace)) as s:
        assert lower_engine_priority(s) > 0
        finished, before, after, _ = overlapping_attempts(
            s.base_url,
            lambda: asyncio.run(contended(s.base_url, "adaptivellm-tiny-llama")),
            arrived_while_both_decoded,
            reference,
            trace,
        )
    assert short_went_first(finished), finished
    assert metric_delta(before, after, "adaptivellm_turnaround_preemptions_total") >= 1
    if mode == "swap":
        assert metric_delta(before, after, "adaptivellm_preemptions_total", 'mode="swap"') >= 1
        # The victim's whole blocks come back from the prefix cache; its last, partly filled
        # block (it was preempted mid-decode) is copied back from host, not recomputed.
        swap_in = metric_delta(before, after, "adaptivellm_swap_blocks_total", 'direction="in"')
        assert swap_in >= 1


def arrived_while_both_decoded(times: dict[str, float], steps: list[Step]) -> bool:
    """The precondition, from the server's step trace: the first step that left a request
    waiting (the short one, or the long one it preempted) came right after a step in which
    both long ones decoded, and the steps from then on decoded at least 2 * MIN_LEFT tokens
    (the long ones, started together with the same length, each had about half of them left).
    A scheduler that did not preempt meets this too: the short one then waits."""
    for i, step in enumerate(steps):
        if step["waiting"] >= 1:
            both_decoding = i > 0 and steps[i - 1]["decode"] == steps[i - 1]["running"] == 2
            return both_decoding and sum(s["decode"] for s in steps[i:]) >= 2 * MIN_LEFT
    return False


def short_went_first(finished: dict[str, float]) -> bool:
    """The short request finished before either long one: it took a long one's slot (both were
    running when it arrived, with hundreds of tokens to go)."""
    return finished["short"] < min(finished["long0"], finished["long1"])
