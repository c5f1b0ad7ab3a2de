"""`adaptivellm serve --data-parallel-size 2` on CPU (vLLM's mp backend): two engine ranks,
each with its own AdaptiveLLM scheduler, behind one endpoint. Fairness state is per rank
(docs/architecture.md), so the engine gauges carry a `rank` label."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adaptivellm.launch import ServerProcess, adaptivellm_command, free_port, metric_value


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    flags = ["--enforce-eager", "--max-model-len", "512", "--served-model-name", "tiny",
             "--kv-cache-memory-bytes", str(128 << 20), "--data-parallel-size", "2"]  # fmt: skip
    log = Path(tmp_path_factory.mktemp("dp")) / "server.log"
    process = ServerProcess(adaptivellm_command(None, port, flags), port, log)
    process.start()
    try:
        process.wait_ready(timeout=900)
        yield process.base_url
    finally:
        process.stop()


def test_two_ranks_serve_with_their_own_schedulers(dp_server: str) -> None:
    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(
                client.post(f"{dp_server}/v1/completions", json={
                    "model": "tiny", "prompt": f"request {i}", "max_tokens": 4,
                    "ignore_eos": True, "user": f"tenant{i % 2}"})
                for i in range(12)
            ))  # fmt: skip

    replies = asyncio.run(send())
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    text = httpx.get(f"{dp_server}/metrics", timeout=30).text
    for rank in ("0", "1"):
        done = metric_value(text, "vllm:request_success_total", f'engine="{rank}"')
        assert done is not None and done > 0, f"rank {rank} served nothing"
        jain = metric_value(text, "adaptivellm_tenant_jain_index", f'rank="{rank}"')
        assert jain is not None and 0 < jain <= 1
        decode = metric_value(text, "adaptivellm_service_model_seconds_per_token",
                              f'rank="{rank}",term="decode"')  # fmt: skip
        assert decode is not None and decode > 0
    for tenant in ("tenant0", "tenant1"):  # counters sum over the ranks' processes
        served = metric_value(text, "adaptivellm_tenant_served_tokens_total", f'tenant="{tenant}"')
        assert served is not None and served >= 6 * 4
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2, "priority": -1100}
    bad = httpx.post(f"{dp_server}/v1/completions", json=body, timeout=60)
    assert bad.status_code == 400  # every API-server process validates
