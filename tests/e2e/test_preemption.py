"""Preemption through real servers: under heavy KV pressure greedy outputs are identical token
for token with swap, recompute and adaptive, and equal to the outputs without pressure."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from adaptivellm.launch import adaptivellm_command, free_port, metric_value, running_server
from tests.support import Server

NUM_REQUESTS = 12
PROMPT_TOKENS = 200
OUTPUT_TOKENS = 100
# 12 MiB of KV holds ~2000 tokens of the tiny model (6 KiB per token); 12 requests in flight
# need 12 x 300: vLLM must preempt.
PRESSURE = ["--enforce-eager", "--max-model-len", "1024", "--kv-cache-memory-bytes",
            str(12 << 20), "--max-num-seqs", "16"]  # fmt: skip


def prompts() -> list[list[int]]:
    return [[10 + (i * 131 + j * 7) % 3000 for j in range(PROMPT_TOKENS)]
            for i in range(NUM_REQUESTS)]  # fmt: skip


async def complete(base_url: str, model: str, prompt: list[int], client: httpx.AsyncClient):
    body = {"model": model, "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    r = await client.post(f"{base_url}/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice.get("token_ids") or choice["text"]


async def all_at_once(base_url: str, model: str) -> list:
    async with httpx.AsyncClient() as client:
        return list(await asyncio.gather(*(complete(base_url, model, p, client)
                                           for p in prompts())))  # fmt: skip


async def one_by_one(base_url: str, model: str, headers: dict[str, str]) -> list:
    async with httpx.AsyncClient(headers=headers) as client:
        return [await complete(base_url, model, p, client) for p in prompts()]


@pytest.fixture(scope="module")
def unpressured(server: Server) -> list:
    """The reference: each request alone on the session server (ample KV cache)."""
    return asyncio.run(one_by_one(server.base_url, server.model, server.headers))


@pytest.mark.parametrize("mode", ["recompute", "swap", "adaptive"])
def test_outputs_identical_under_pressure(mode: str, unpressured: list, tmp_path: Path) -> None:
    port = free_port()
    flags = [*PRESSURE, "--preemption-mode", mode, "--swap-space", "0.25"]
    with running_server(adaptivellm_command(None, port, flags), port, tmp_path / "log") as s:
        outputs = asyncio.run(all_at_once(s.base_url, "adaptivellm-tiny-llama"))
        metrics = httpx.get(f"{s.base_url}/metrics").text
    preempted = metric_value(metrics, "vllm:num_preemptions_total") or 0
    assert preempted > 0, "the workload must cause preemption"
    by_mode = {m: metric_value(metrics, "adaptivellm_preemptions_total", f'mode="{m}"') or 0
               for m in ("swap", "recompute")}  # fmt: skip
    assert sum(by_mode.values()) == preempted
    if mode == "recompute":
        assert by_mode["swap"] == 0
    else:  # swapping is far cheaper than recomputing on CPU, and the swap space is ample
        assert by_mode["swap"] > 0
        assert (metric_value(metrics, "adaptivellm_swap_blocks_total", 'direction="in"') or 0) > 0
    assert metric_value(metrics, "adaptivellm_swap_space_used_bytes") in (None, 0.0)
    mismatched = [i for i, (a, b) in enumerate(zip(outputs, unpressured, strict=True)) if a != b]
    assert not mismatched, f"{mode}: requests {mismatched} differ from the unpressured run"
