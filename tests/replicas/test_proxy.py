"""The router's HTTP side (adaptivellm.replicas.proxy) over fake replicas: small aiohttp apps
that answer like vLLM (JSON, SSE streams, /health, /metrics) and can fail on demand. No Ray, no
engine: fast. The same paths against real replicas are in tests/e2e/test_replicas.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
from aiohttp import web

from adaptivellm.launch import free_port, metric_value
from adaptivellm.replicas.proxy import (
    REPLICA_HEADER,
    RouterOptions,
    RouterServer,
    StaticReplicas,
    parse_load,
)


@dataclass
class Fake:
    """A fake replica."""

    name: str
    healthy: bool = True
    #: "ok", "refuse" (drop the connection before answering), "cut" (stream 3 events, then drop)
    mode: str = "ok"
    delay_s: float = 0.0
    #: Seconds /health and /metrics take to answer (a busy API server).
    health_delay_s: float = 0.0
    metrics_delay_s: float = 0.0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def health(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.health_delay_s)
        return web.Response(status=200 if self.healthy else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.metrics_delay_s)
        text = (
            "# HELP vllm:num_requests_running running\n# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0"}} 0.0\n'
            "# HELP fake_served_total served\n# TYPE fake_served_total counter\n"
            f'fake_served_total{{name="{self.name}"}} {len(self.bodies)}.0\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.mode == "refuse":
            assert request.transport is not None
            request.transport.close()
            raise ConnectionResetError
        self.bodies.append(body)
        await asyncio.sleep(self.delay_s)
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        if not body.get("stream"):
            return web.json_response(
                {"choices": [{"text": self.name}], "usage": usage, "tenant": body.get("user")}
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(6):
            if self.mode == "cut" and i == 3:
                assert request.transport is not None
                request.transport.abort()
                return response
            chunk = {"choices": [{"text": f"{self.name}{i}"}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.01)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [self.name]})

    async def session(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(f"{self.name}:{msg.data}")
        return ws

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/split/session", self.session)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@contextlib.asynccontextmanager
async def routed(fakes: list[Fake], **options: Any) -> AsyncIterator[tuple[str, RouterServer]]:
    """The router over started fake replicas, once every healthy one is ready."""
    for fake in fakes:
        await fake.start()
    server = RouterServer(
        StaticReplicas([f.url for f in fakes]), RouterOptions(poll_s=0.05, **options)
    )
    runner = web.AppRunner(server.app(), handler_cancellation=True)  # as main.py runs it
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        for _ in range(200):
            if all(r.ready == f.healthy for r, f in zip(server.replicas, fakes, strict=True)):
                break
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}", server
    finally:
        await runner.cleanup()
        for fake in fakes:
            await fake.stop()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_requests_pass_through_byte_for_byte_and_the_ledger_is_corrected_by_usage() -> None:
    async def main() -> None:
        a, b = Fake("a"), Fake("b")
        async with routed([a, b]) as (url, server), httpx.AsyncClient() as client:
            body = {"prompt": "hello", "max_tokens": 40, "user": "acme", "extra": [1, 2]}
            r = await client.post(f"{url}/v1/completions", json=body)
            assert r.status_code == 200 and r.json()["tenant"] == "acme"
            assert (a.bodies + b.bodies) == [body]
            # Charged 40 predicted output tokens at dispatch, settled at the 3 actually served.
            assert server.ledger.served["acme"] == 5 + 2 * 3
            # The answer names the replica that served it.
            assert r.headers[REPLICA_HEADER] == ("0" if a.bodies else "1")
            models = await client.get(f"{url}/v1/models")
            assert models.status_code == 200 and models.json()["data"][0] in ("a", "b")
            assert models.headers[REPLICA_HEADER] == str("ab".index(models.json()["data"][0]))
            assert (await client.get(f"{url}/health")).status_code == 200

    run(main())


def test_a_replica_that_fails_before_answering_is_retried_elsewhere() -> None:
    async def main() -> None:
        bad, good = Fake("bad", mode="refuse"), Fake("good")
        async with routed([bad, good], routing="round-robin") as (url, server):
            async with httpx.AsyncClient() as client:
                replies = [
                    await client.post(f"{url}/v1/completions", json={"prompt": "x"})
                    for _ in range(3)
                ]
            assert all(r.status_code == 200 for r in replies)
            assert {r.json()["choices"][0]["text"] for r in replies} == {"good"}
            assert not server.replicas[0].ready  # no traffic until its /health says so again
            text = await metrics_text(url)
            assert (metric_value(text, "adaptivellm_router_retries_total") or 0) >= 1

    run(main())


async def metrics_text(url: str) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{url}/metrics")).text


def test_a_stream_cut_by_its_replica_ends_with_an_error_event_not_a_hang() -> None:
    async def main() -> None:
        fake = Fake("a", mode="cut")
        async with routed([fake]) as (url, _), httpx.AsyncClient(timeout=10) as client:
            body = {"prompt": "x", "stream": True}
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                assert r.headers[REPLICA_HEADER] == "0"  # known before the first byte
                text = (await r.aread()).decode()
            events = [e for e in text.split("\n\n") if e]
            assert events[:3] == [f'data: {{"choices": [{{"text": "a{i}"}}]}}' for i in range(3)]
            error = json.loads(events[3].removeprefix("data: "))
            assert error["error"]["type"] == "ReplicaFailure" and error["error"]["code"] == 502
            assert events[4] == "data: [DONE]"
            text = await metrics_text(url)
            assert metric_value(text, "adaptivellm_router_stream_errors_total") == 1

    run(main())


def test_all_busy_queue_full_answers_429_and_no_replica_503() -> None:
    async def main() -> None:
        fake = Fake("a", delay_s=0.5)
        async with routed([fake], target_backlog=1, queue_limit=1) as (url, server):
            async with httpx.AsyncClient(timeout=10) as client:
                first = asyncio.create_task(client.post(f"{url}/v1/completions", json={}))
                await asyncio.sleep(0.1)
                queued = asyncio.create_task(client.post(f"{url}/v1/completions", json={}))
                await asyncio.sleep(0.1)
                assert len(server.queue) == 1 and server.queue_peak == 1
                rejected = await client.post(f"{url}/v1/completions", json={})
                assert rejected.status_code == 429
                assert int(rejected.headers["Retry-After"]) >= 1
                assert rejected.json()["error"]["code"] == 429
                assert (await first).status_code == 200 and (await queued).status_code == 200
            fake.healthy = False
            for _ in range(100):
                if not server.replicas[0].ready:
                    break
                await asyncio.sleep(0.02)
            async with httpx.AsyncClient(timeout=10) as client:
                down = await client.post(f"{url}/v1/completions", json={})
                assert down.status_code == 503
                assert (await client.get(f"{url}/health")).status_code == 503
            text = await metrics_text(url)
            assert metric_value(text, "adaptivellm_router_rejected_total", 'code="429"') == 1
            assert metric_value(text, "adaptivellm_router_rejected_total", 'code="503"') == 1

    run(main())


def test_a_slow_health_poll_is_not_a_failure_until_it_repeats() -> None:
    """A busy replica's API server may answer /health or /metrics late: it stays in routing
    until `unhealthy_after` polls in a row time out; a slow /metrics never takes it out."""

    async def main() -> None:
        fake = Fake("a", metrics_delay_s=1.0)
        opts = {"poll_timeout_s": 0.2, "unhealthy_after": 4}
        async with routed([fake], **opts) as (url, server):
            replica = server.replicas[0]
            assert replica.ready
            await asyncio.sleep(0.6)  # several polls whose /metrics timed out
            assert replica.ready
            async with httpx.AsyncClient(timeout=10) as client:
                assert (await client.post(f"{url}/v1/completions", json={})).status_code == 200
            fake.health_delay_s = 1.0
            while replica.health_timeouts == 0:
                await asyncio.sleep(0.02)
            assert replica.ready  # one late answer is not a failure
            while replica.ready:
                await asyncio.sleep(0.02)
            assert replica.health_timeouts == 4  # out after the 4th in a row
            fake.health_delay_s = 0.0
            while not replica.ready:
                await asyncio.sleep(0.02)
            assert replica.health_timeouts == 0
            fake.healthy = False  # an error answer takes it out at once, no timeouts counted
            while replica.ready:
                await asyncio.sleep(0.02)
            assert replica.health_timeouts == 0

    run(main())


def test_a_client_that_goes_away_frees_its_queue_place_and_its_replica() -> None:
    async def main() -> None:
        fake = Fake("a", delay_s=30)
        async with routed([fake], target_backlog=1) as (url, server):
            async with httpx.AsyncClient(timeout=10) as client:
                held = [
                    asyncio.create_task(client.post(f"{url}/v1/completions", json={}))
                    for _ in range(3)
                ]
                while len(server.queue) < 2:
                    await asyncio.sleep(0.02)
                for task in held:
                    task.cancel()
                await asyncio.gather(*held, return_exceptions=True)
            for _ in range(200):
                if not len(server.queue) and not server.replicas[0].inflight:
                    break
                await asyncio.sleep(0.02)
            assert len(server.queue) == 0 and server.replicas[0].inflight == 0
            assert server.ledger.active == {}

    run(main())


async def release_order(global_fairness: bool) -> list[str]:
    """One slot; tenant heavy queues four requests, then light queues two: who is served when."""
    fake = Fake("a", delay_s=0.1)
    options = {"target_backlog": 1, "global_fairness": global_fairness}
    async with routed([fake], **options) as (url, _), httpx.AsyncClient(timeout=30) as client:

        async def send(tenant: str) -> None:
            await client.post(f"{url}/v1/completions", json={"user": tenant, "max_tokens": 8})

        tasks = [asyncio.create_task(send("heavy")) for _ in range(5)]
        await asyncio.sleep(0.25)  # all of heavy's queued behind its first
        tasks += [asyncio.create_task(send("light")) for _ in range(2)]
        await asyncio.gather(*tasks)
    return [b["user"] for b in fake.bodies]


def test_queued_requests_are_released_least_served_tenant_first() -> None:
    fair = run(release_order(True))
    # light joins at what heavy was actually served (VTC's lift: no credit for having been
    # idle), and the two alternate: light's requests go ahead of heavy's last one although
    # they queued later.
    assert fair[-1] == "heavy", fair
    fifo = run(release_order(False))
    assert fifo[-2:] == ["light", "light"], fifo  # arrival order: light waits behind heavy


def test_split_websocket_is_proxied_to_one_replica() -> None:
    async def main() -> None:
        a, b = Fake("a"), Fake("b")
        async with routed([a, b]) as (url, server), aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{url}/v1/split/session".replace("http", "ws")) as ws:
                replies = []
                for i in range(3):
                    await ws.send_str(str(i))
                    replies.append((await ws.receive()).data)
                name = replies[0].split(":")[0]
                assert replies == [f"{name}:{i}" for i in range(3)]  # one replica throughout
                assert sum(r.inflight for r in server.replicas) == 1  # counts as its load
            for _ in range(100):
                if sum(r.inflight for r in server.replicas) == 0:
                    break
                await asyncio.sleep(0.02)
            assert sum(r.inflight for r in server.replicas) == 0

    run(main())


def test_metrics_carry_router_series_and_each_replicas_under_a_replica_label() -> None:
    async def main() -> None:
        a, b = Fake("a"), Fake("b")
        async with routed([a, b], routing="round-robin") as (url, _):
            async with httpx.AsyncClient() as client:
                for tenant in ("x", "y"):
                    await client.post(f"{url}/v1/completions", json={"user": tenant})
            text = await metrics_text(url)
        for replica in ("0", "1"):
            assert metric_value(text, "fake_served_total", f'replica="{replica}"') == 1
            assert metric_value(text, "adaptivellm_router_replica_ready", f'replica="{replica}"')
            assert text.count("# TYPE fake_served_total counter") == 1  # one family, merged
        decisions = metric_value(text, "adaptivellm_router_decisions_total", 'reason="round_robin"')
        assert decisions == 2
        assert metric_value(text, "adaptivellm_router_tenant_service_total", 'tenant="x"') == 11
        assert metric_value(text, "adaptivellm_router_tenant_jain_index") == 1.0
        assert "_created" not in text

    run(main())


def test_parse_load_reads_a_replicas_published_load_and_service_model() -> None:
    text = (
        '# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine="0"} 3.0\n'
        'vllm:num_requests_running{engine="1"} 1.0\nvllm:num_requests_waiting{engine="0"} 2.0\n'
        'adaptivellm_service_model_seconds_per_token{rank="0",term="prefill"} 0.001\n'
        'adaptivellm_service_model_seconds_per_token{rank="0",term="decode"} 0.01\n'
        'adaptivellm_service_model_seconds_per_token{rank="1",term="decode"} 0.03\n'
    )
    load = parse_load(text)
    assert (load.running, load.waiting) == (4.0, 2.0)
    assert load.prefill_s_per_token == 0.001 and load.decode_s_per_token == 0.02
    assert parse_load("").decode_s_per_token is None
