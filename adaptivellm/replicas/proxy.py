"""The router: an asyncio HTTP server (aiohttp) in the `adaptivellm serve --replicas N` process.

It serves one OpenAI-compatible endpoint over the replicas:

- generation routes (`POST /v1/completions`, `/v1/chat/completions`, and any other POST under
  `/v1/`): the tenant is read (as the replicas' tenancy middleware reads it), the global ledger
  charged, a replica chosen (router.Router) or the request queued (ledger.FairQueue) while
  every replica is at the target backlog; the body is forwarded byte for byte, the answer
  streamed back, the ledger corrected with the usage the replica reported;
- `GET /v1/split/session` (WebSocket): proxied whole to the replica chosen when it opened, so
  a split session stays on its replica;
- `GET /health`: 200 while at least one replica is ready, else 503; `GET /metrics`: the
  router's own series and every replica's under a `replica` label; `GET /router/replicas`:
  each replica's state (JSON);
- anything else (`/v1/models`, `/v1/split/info`, `/tokenize`, ...): passed to a ready replica.

Failures: a replica that is not ready (its `/health` is not 200) gets no traffic; a request
whose replica fails before anything reached the client (connection refused or reset, or the
stream ended before its first byte) is retried on another replica; a stream under way whose
replica dies ends with an OpenAI-style error event (`data: {"error": ...}`) and `data: [DONE]`;
with every replica at the target backlog and the queue full the answer is 429 with
Retry-After; with no replica ready, 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from adaptivellm.replicas.ledger import Charge, FairQueue, JainWindow, Ledger, Waiting
from adaptivellm.replicas.router import Decision, Job, Published, ReplicaState, Router, outstanding

logger = logging.getLogger("adaptivellm.replicas")

TENANT_HEADER = "X-AdaptiveLLM-Tenant"
#: Set on every answer the router relays: the index of the replica that served it.
REPLICA_HEADER = "X-AdaptiveLLM-Replica"
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
        "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
        "Sec-WebSocket-Accept", "Sec-WebSocket-Protocol",
    )
)  # fmt: skip
MAX_TRACKED_TENANTS = 1000
#: A stream's service is credited to its tenant every this many events (and at its end).
CREDIT_EVERY = 32
_PROMPT_RE = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_RE = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


class Backends(Protocol):
    """Where the replicas are: Ray actors (actors.RayReplicas) or fixed URLs (StaticReplicas)."""

    def __len__(self) -> int: ...

    def start(self) -> None: ...

    async def endpoint(self, index: int, timeout: float = 5.0) -> dict[str, Any] | None: ...

    def stop(self, grace: float = 20.0) -> None: ...


class StaticReplicas:
    """Replicas someone else runs, at fixed URLs (`--replica-urls`): no Ray."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = [u.rstrip("/") for u in urls]

    def __len__(self) -> int:
        return len(self.urls)

    def start(self) -> None:
        pass

    async def endpoint(self, index: int, timeout: float = 5.0) -> dict[str, Any] | None:
        return {"index": index, "url": self.urls[index]}

    def stop(self, grace: float = 20.0) -> None:
        pass


@dataclass
class RouterOptions:
    """The router's flags (main.py)."""

    routing: str = "predicted"
    #: Router requests in flight per replica before the router queues; None: each replica's
    #: batch size (slots), so that requests wait at the router, in tenant order, rather than in
    #: an engine's queue.
    target_backlog: int | None = None
    queue_limit: int = 1024
    global_fairness: bool = True
    poll_s: float = 1.0
    #: Consecutive /health polls that time out before a replica is taken out of routing. A
    #: refused connection or a non-200 answer takes it out at once; a slow answer (a busy API
    #: server on shared cores) is not a failure until it repeats.
    unhealthy_after: int = 3
    #: Seconds a /health or /metrics poll may take (None: 3 poll periods, at least 3 s).
    poll_timeout_s: float | None = None
    session_header: str = "X-Session-Id"
    session_imbalance: float = 3.0
    max_retries: int = 2
    slots: list[int] = field(default_factory=list)
    default_max_tokens: int = 256
    tenant_weights: dict[str, float] = field(default_factory=dict)
    tenant_of_key: dict[str, str] | None = None


class Busy(Exception):
    """Every replica is at the target backlog and the queue is full (429)."""


class NoReplica(Exception):
    """No replica is ready (503)."""


class NotStarted(Exception):
    """The replica failed before anything of the answer reached the client: retry elsewhere."""


@dataclass
class Pending:
    """A request waiting at the router."""

    job: Job
    future: asyncio.Future[Decision]
    exclude: frozenset[int]
    decision: Decision | None = None


class RouterMetrics:
    """The router's own Prometheus series (a registry of its own)."""

    def __init__(self, replicas: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

        disable_created_metrics()  # counters' _created series: noise on a router's /metrics
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "adaptivellm_router_decisions",
            "Requests routed to a replica, by routing policy, reason and replica",
            ["policy", "reason", "replica"],
            registry=r,
        )
        self.retries = Counter(
            "adaptivellm_router_retries",
            "Requests sent again to another replica because theirs failed before answering",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "adaptivellm_router_rejected",
            "Requests answered by the router itself with an error, by status code",
            ["code"],
            registry=r,
        )
        self.stream_errors = Counter(
            "adaptivellm_router_stream_errors",
            "Streams under way ended with an error event because their replica failed",
            registry=r,
        )
        self.queue_depth = Gauge(
            "adaptivellm_router_queue_depth",
            "Requests waiting at the router for a replica below the target backlog",
            registry=r,
        )
        self.queued = Counter(
            "adaptivellm_router_queued",
            "Requests that waited at the router (every replica at the target backlog)",
            registry=r,
        )
        self._tenant_series()
        self._replica_series(replicas)

    def _tenant_series(self) -> None:
        from prometheus_client import Counter, Gauge

        r = self.registry
        self.tenant_service = Counter(
            "adaptivellm_router_tenant_service",
            "Weight-normalised service given to each tenant over all replicas (VTC counter "
            "units: input tokens + 2 x output tokens, over the tenant's weight)",
            ["tenant"],
            registry=r,
        )
        self.tenant_counter = Gauge(
            "adaptivellm_router_tenant_counter",
            "The global ledger's virtual token counter of each active tenant",
            ["tenant"],
            registry=r,
        )
        self.jain = Gauge(
            "adaptivellm_router_tenant_jain_index",
            "Jain's index over the weight-normalised service given across all replicas, in the "
            "last complete window, to the tenants with requests queued or in flight all through "
            "it (1 until a window had two such tenants)",
            registry=r,
        )
        self.jain.set(1.0)

    def _replica_series(self, replicas: int) -> None:
        from prometheus_client import Counter, Gauge

        r = self.registry
        self.ready = Gauge(
            "adaptivellm_router_replica_ready",
            "1 while the replica answers /health, else 0",
            ["replica"],
            registry=r,
        )
        self.inflight = Gauge(
            "adaptivellm_router_replica_inflight",
            "Router requests in flight on each replica",
            ["replica"],
            registry=r,
        )
        self.restarts = Counter(
            "adaptivellm_router_replica_restarts",
            "New incarnations of a replica seen by the router (Ray restarted it)",
            ["replica"],
            registry=r,
        )
        for i in range(replicas):
            self.ready.labels(str(i)).set(0)
            self.inflight.labels(str(i)).set(0)


class StreamUsage:
    """What a proxied SSE stream carried: events (about one output token each) and the usage
    block when the client asked for one."""

    def __init__(self) -> None:
        self.events = 0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.tail = b""

    def feed(self, chunk: bytes) -> int:
        """Count the events in a chunk; returns how many new content events it held."""
        new = chunk.count(b"data: ") - chunk.count(b"data: [DONE]")
        self.events += new
        if b'"usage":{' in chunk or b'"usage": {' in chunk:
            if m := _PROMPT_RE.findall(chunk):
                self.prompt_tokens = int(m[-1])
            if m := _COMPLETION_RE.findall(chunk):
                self.completion_tokens = int(m[-1])
        self.tail = (self.tail + chunk)[-2:]
        return new

    @property
    def at_boundary(self) -> bool:
        return self.tail in (b"", b"\n\n") or self.tail.endswith(b"\n\n")


def keepalive_s() -> float:
    """Seconds the router keeps an idle connection to a replica: half the replica's own
    keep-alive (vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE, default 5), at most 2."""
    try:
        replica_s = float(os.environ.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "5"))
    except ValueError:
        replica_s = 5.0
    if not math.isfinite(replica_s) or replica_s <= 0:
        replica_s = 5.0
    return max(0.1, min(2.0, replica_s / 2))


def error_body(message: str, kind: str, code: int) -> dict[str, Any]:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def forward_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {k: v for k, v in headers if k.lower() not in HOP_BY_HOP}


def answer_headers(headers: Iterable[tuple[str, str]], replica: int) -> dict[str, str]:
    """A replica's answer headers as the router passes them on: naming that replica."""
    return {**forward_headers(headers), REPLICA_HEADER: str(replica)}


class RouterServer:
    """The router (see module docstring)."""

    def __init__(self, backends: Backends, options: RouterOptions) -> None:
        self.backends = backends
        self.options = options
        n = len(backends)
        slots = options.slots or [options.target_backlog or 128] * n
        self.replicas = [
            ReplicaState(index=i, slots=slots[i], backlog=options.target_backlog or slots[i])
            for i in range(n)
        ]
        self.infos: list[dict[str, Any] | None] = [None] * n
        self.router = Router(options.routing, options.session_imbalance)
        self.ledger = Ledger(weights=dict(options.tenant_weights))
        self.queue: FairQueue[Pending] = FairQueue(options.queue_limit)
        #: The most requests that ever waited at once (the status endpoint's queue_peak).
        self.queue_peak = 0
        self.jain = JainWindow()
        self.metrics = RouterMetrics(n)
        self.typical = Job(prompt_tokens=64, max_tokens=options.default_max_tokens)
        self.chars_per_token = 4.0
        self.session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._passthrough_turn = 0
        #: Requests dispatched per tenant and replica (for /router/replicas; not a metric, so
        #: tenants x replicas series do not pile up in Prometheus).
        self.tenant_dispatches: dict[str, list[int]] = {}

    # --- app -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 << 20)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_get("/router/replicas", self.replicas_endpoint)
        app.router.add_get("/v1/split/session", self.websocket)
        app.router.add_post("/v1/{tail:.*}", self.generate)
        app.router.add_route("*", "/{tail:.*}", self.passthrough)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            # Idle connections are dropped before the replica's own keep-alive closes them
            # (vLLM: VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s): a POST sent on a connection the
            # replica is closing fails, and would read as a replica failure.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=keepalive_s()),
            auto_decompress=False,
        )
        self.jain.begin(time.monotonic(), set())
        self._tasks = [asyncio.create_task(self._poll(i)) for i in range(len(self.replicas))]

    async def _cleanup(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.session is not None:
            await self.session.close()

    # --- replica state ---------------------------------------------------------------------

    async def _poll(self, index: int) -> None:
        """Keep one replica's endpoint, readiness and published load fresh."""
        replica = self.replicas[index]
        while True:
            try:
                await self._poll_once(replica)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("polling replica %d", index)
            self._kick()
            await asyncio.sleep(self.options.poll_s)

    async def _poll_once(self, replica: ReplicaState) -> None:
        index = replica.index
        if replica.url is None or not replica.ready:
            info = await self.backends.endpoint(index)
            if info is not None and info.get("url") != replica.url:
                if self.infos[index] is not None:
                    self.metrics.restarts.labels(str(index)).inc()
                    logger.info("replica %d: new incarnation at %s", index, info["url"])
                self.infos[index] = info
                replica.url = info["url"]
                replica.ready = False
        if replica.url is None:
            return
        assert self.session is not None
        seconds = self.options.poll_timeout_s or max(3.0, 3 * self.options.poll_s)
        timeout = aiohttp.ClientTimeout(total=seconds)
        try:
            async with self.session.get(f"{replica.url}/health", timeout=timeout) as r:
                ready = r.status == 200
            replica.health_timeouts = 0
        except asyncio.TimeoutError:
            replica.health_timeouts += 1
            ready = replica.ready and replica.health_timeouts < self.options.unhealthy_after
            if ready:
                logger.info("replica %d: /health timed out (%d in a row)", index,
                            replica.health_timeouts)  # fmt: skip
        except (aiohttp.ClientError, OSError):
            ready = False
        if ready != replica.ready:
            logger.info("replica %d %s (%s)", index, "ready" if ready else "not ready", replica.url)
        self._set_ready(replica, ready)
        if not ready:
            return
        try:  # its load: a slow or failed scrape leaves the last one, and the replica ready
            async with self.session.get(f"{replica.url}/metrics", timeout=timeout) as r:
                if r.status == 200:
                    replica.polled(parse_load(await r.text()))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            logger.debug("replica %d: /metrics not read: %r", index, exc)

    def _set_ready(self, replica: ReplicaState, ready: bool) -> None:
        replica.ready = ready
        self.metrics.ready.labels(str(replica.index)).set(1 if ready else 0)
        if not any(r.ready for r in self.replicas):
            self._fail_queued(NoReplica())

    def _fail_queued(self, error: Exception) -> None:
        for entry in list(self.queue.entries()):
            self.queue.remove(entry)
            if not entry.item.future.done():
                entry.item.future.set_exception(error)
        self.metrics.queue_depth.set(len(self.queue))

    # --- dispatch --------------------------------------------------------------------------

    def _decide(self, job: Job, exclude: frozenset[int]) -> Decision | None:
        return self.router.choose(
            self.replicas,
            job,
            self.ledger.out,
            self.typical,
            None,  # each replica's own backlog
            exclude,
        )

    def _dispatched(self, decision: Decision, tenant: str) -> None:
        r = self.replicas[decision.replica]
        per_tenant = self.tenant_dispatches.get(tenant)
        if per_tenant is None and len(self.tenant_dispatches) < MAX_TRACKED_TENANTS:
            per_tenant = self.tenant_dispatches[tenant] = [0] * len(self.replicas)
        if per_tenant is not None:
            per_tenant[r.index] += 1
        r.inflight += 1
        r.dispatched_since_poll += 1
        self.metrics.inflight.labels(str(r.index)).set(r.inflight)
        self.metrics.decisions.labels(self.options.routing, decision.reason, str(r.index)).inc()

    def _finished(self, index: int) -> None:
        r = self.replicas[index]
        r.inflight = max(0, r.inflight - 1)
        r.finished_since_poll += 1
        self.metrics.inflight.labels(str(index)).set(r.inflight)
        self._kick()

    def _kick(self) -> None:
        """Release queued requests while a replica has room for one."""
        counters = self.ledger.counters if self.options.global_fairness else None

        def eligible(entry: Waiting[Pending]) -> bool:
            if entry.item.future.done():
                return True  # cancelled: drop it
            entry.item.decision = self._decide(entry.item.job, entry.item.exclude)
            return entry.item.decision is not None

        while len(self.queue):
            entry = self.queue.release(eligible, counters)
            if entry is None:
                break
            pending = entry.item
            if pending.future.done() or pending.decision is None:
                continue
            self._dispatched(pending.decision, pending.job.tenant)
            pending.future.set_result(pending.decision)
        self.metrics.queue_depth.set(len(self.queue))

    async def acquire(self, job: Job, exclude: frozenset[int]) -> Decision:
        """A replica for `job` now, or after waiting in the queue; Busy or NoReplica."""
        if not len(self.queue):
            decision = self._decide(job, exclude)
            if decision is not None:
                self._dispatched(decision, job.tenant)
                return decision
        if not any(r.ready and r.index not in exclude for r in self.replicas):
            raise NoReplica()
        if self.queue.full():
            raise Busy()
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        entry = self.queue.push(job.tenant, Pending(job, future, exclude))
        self.queue_peak = max(self.queue_peak, len(self.queue))
        self.metrics.queued.inc()
        self.metrics.queue_depth.set(len(self.queue))
        self._kick()
        try:
            return await future
        except asyncio.CancelledError:
            if not self.queue.remove(entry) and future.done() and not future.cancelled():
                with contextlib.suppress(Exception):
                    self._finished(future.result().replica)
            self.metrics.queue_depth.set(len(self.queue))
            raise

    def retry_after(self) -> int:
        """Seconds a rejected client should wait: the queue drained at the replicas' pace."""
        ready = [r for r in self.replicas if r.ready] or self.replicas
        slots = sum(max(1, r.slots) for r in ready)
        typical_s = 0.02 + 0.008 * self.ledger.out.predict(self.typical.max_tokens)
        seconds = (len(self.queue) + slots) * typical_s / slots
        return int(min(60, max(1, math.ceil(seconds))))

    # --- requests --------------------------------------------------------------------------

    def tenant_of(self, request: web.Request, body: dict[str, Any] | None) -> str:
        """The request's tenant, as the replicas' tenancy middleware reads it."""
        keys = self.options.tenant_of_key
        if keys:
            auth = request.headers.get("Authorization", "")
            key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if key in keys:
                return keys[key]
        header = request.headers.get(TENANT_HEADER)
        if header:
            return header
        if body is not None:
            xargs = body.get("vllm_xargs")
            if isinstance(xargs, dict) and isinstance(xargs.get("tenant"), str):
                return str(xargs["tenant"])
            if isinstance(body.get("user"), str) and body["user"]:
                return str(body["user"])
        return "default"

    def estimate_prompt(self, body: dict[str, Any] | None) -> tuple[int, int]:
        """(estimated prompt tokens, characters of text it came from: 0 when exact)."""
        if body is None:
            return self.typical.prompt_tokens, 0
        chars = 0
        tokens = 0
        prompt = body.get("prompt")
        items = prompt if isinstance(prompt, list) else [prompt] if prompt is not None else []
        if items and all(isinstance(x, int) for x in items):
            tokens = len(items)
        else:
            for item in items:
                if isinstance(item, str):
                    chars += len(item)
                elif isinstance(item, list):
                    tokens += len(item)
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                chars += sum(len(str(p.get("text", ""))) for p in content if isinstance(p, dict))
            tokens += 4
        if chars == 0 and tokens == 0:
            return self.typical.prompt_tokens, 0
        return max(1, tokens + round(chars / self.chars_per_token)), chars

    def max_tokens(self, body: dict[str, Any] | None) -> int:
        if body is not None:
            for key in ("max_tokens", "max_completion_tokens"):
                value = body.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        return self.options.default_max_tokens

    def _learn(self, job: Job, chars: int, prompt_tokens: int | None) -> None:
        a = 0.05
        self.typical = Job(
            prompt_tokens=max(
                1, round(self.typical.prompt_tokens * (1 - a) + job.prompt_tokens * a)
            ),
            max_tokens=max(1, round(self.typical.max_tokens * (1 - a) + job.max_tokens * a)),
        )
        if chars and prompt_tokens:
            observed = chars / max(1, prompt_tokens)
            self.chars_per_token = min(
                16.0, max(0.5, self.chars_per_token * (1 - a) + observed * a)
            )

    def _serve(self, tenant: str, units: float) -> None:
        if units <= 0:
            return
        self.ledger.record_served(tenant, units)
        self.jain.add(tenant, units)
        self.metrics.tenant_service.labels(tenant).inc(units)

    def _leave(self, tenant: str) -> None:
        self.ledger.leave(tenant)
        if tenant not in self.ledger.active:
            self.jain.idle(tenant)
            with contextlib.suppress(KeyError):
                self.metrics.tenant_counter.remove(tenant)
        value = self.jain.tick(time.monotonic(), self.ledger.active_tenants())
        if value is not None:
            self.metrics.jain.set(value)

    def _reject(
        self, status: int, message: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        self.metrics.rejected.labels(str(status)).inc()
        kind = "TooManyRequests" if status == 429 else "ServiceUnavailable"
        return web.json_response(error_body(message, kind, status), status=status, headers=headers)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            parsed = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            parsed = None
        body = parsed if isinstance(parsed, dict) else None
        tenant = self.tenant_of(request, body)
        prompt_tokens, chars = self.estimate_prompt(body)
        job = Job(
            prompt_tokens=prompt_tokens,
            max_tokens=self.max_tokens(body),
            tenant=tenant,
            session=request.headers.get(self.options.session_header),
        )
        stream = bool(body and body.get("stream"))
        self.ledger.arrive(tenant)
        charge: Charge | None = None
        exclude: set[int] = set()
        usage: tuple[int | None, int | None] = (None, None)
        credited = 0.0
        try:
            while True:
                try:
                    decision = await self.acquire(job, frozenset(exclude))
                except Busy:
                    return self._reject(
                        429,
                        "every replica is at its target backlog and the router's queue is full; "
                        "retry later",
                        {"Retry-After": str(self.retry_after())},
                    )
                except NoReplica:
                    return self._reject(503, "no replica is ready", {"Retry-After": "5"})
                if charge is None:
                    charge = self.ledger.charge(tenant, job.prompt_tokens, job.max_tokens)
                    self.metrics.tenant_counter.labels(tenant).set(self.ledger.counters[tenant])
                index = decision.replica
                try:
                    response, usage, credited = await self._forward(
                        request, raw, self.replicas[index], stream, tenant
                    )
                    return response
                except NotStarted as exc:
                    self._mark_failed(index, str(exc))
                    exclude.add(index)
                    if len(exclude) > self.options.max_retries:
                        return self._reject(503, f"replicas failed: {exc}", {"Retry-After": "5"})
                    self.metrics.retries.labels("replica_failed").inc()
                    logger.info("retrying a request that replica %d did not start: %s", index, exc)
                finally:
                    self._finished(index)
        finally:
            if charge is not None:
                actual = self.ledger.settle(tenant, charge, job.max_tokens, *usage)
                self._serve(tenant, actual - credited)
                self._learn(job, chars, usage[0])
                if tenant in self.ledger.counters:
                    self.metrics.tenant_counter.labels(tenant).set(self.ledger.counters[tenant])
            self._leave(tenant)

    def _mark_failed(self, index: int, why: str) -> None:
        replica = self.replicas[index]
        if replica.ready:
            logger.warning("replica %d failed (%s): no traffic until it is ready again", index, why)
        self._set_ready(replica, False)

    async def _forward(
        self,
        request: web.Request,
        raw: bytes,
        replica: ReplicaState,
        stream: bool,
        tenant: str,
    ) -> tuple[web.StreamResponse, tuple[int | None, int | None], float]:
        """Send the request to `replica` and answer the client; NotStarted when the replica
        failed before anything was sent to the client. Returns the response, the usage (prompt,
        completion tokens; None where unknown) and the service credited while streaming."""
        assert self.session is not None and replica.url is not None
        url = f"{replica.url}{request.path_qs}"
        try:
            upstream = await self.session.request(
                request.method, url, data=raw, headers=forward_headers(request.headers.items())
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise NotStarted(f"{type(exc).__name__}: {exc}") from exc
        async with upstream:
            if upstream.status == 503:
                raise NotStarted(f"replica answered 503: {(await upstream.text())[:200]}")
            headers = answer_headers(upstream.headers.items(), replica.index)
            if not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                try:
                    data = await upstream.read()
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    raise NotStarted(f"{type(exc).__name__}: {exc}") from exc
                # An error answer served nothing: the dispatch charge is taken back.
                usage: tuple[int | None, int | None] = (0, 0)
                if upstream.status == 200:
                    usage = _usage(data)
                return web.Response(body=data, status=upstream.status, headers=headers), usage, 0.0
            try:
                first = await upstream.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise NotStarted(f"{type(exc).__name__}: {exc}") from exc
            if not first:
                raise NotStarted("the stream ended before its first byte")
            return await self._relay_stream(request, upstream, first, headers, replica, tenant)

    async def _relay_stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        first: bytes,
        headers: dict[str, str],
        replica: ReplicaState,
        tenant: str,
    ) -> tuple[web.StreamResponse, tuple[int | None, int | None], float]:
        """Relay an SSE stream whose first bytes are `first`, crediting the tenant's service as
        it goes. A replica that fails mid-stream ends it with an error event."""
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        seen = StreamUsage()
        credited = 0.0
        chunk = first
        uncredited = 0
        try:
            while chunk:
                uncredited += seen.feed(chunk)
                if uncredited >= CREDIT_EVERY:  # service shows in the Jain window as it goes
                    units = self.ledger.cost(tenant, 0, uncredited)
                    self._serve(tenant, units)
                    credited += units
                    uncredited = 0
                try:
                    await response.write(chunk)
                except (ConnectionError, RuntimeError):
                    # The client went away: closing the upstream aborts the replica's request.
                    return response, (seen.prompt_tokens, seen.events), credited
                chunk = await upstream.content.readany()
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError, asyncio.TimeoutError) as exc:  # fmt: skip
            self.metrics.stream_errors.inc()
            self._mark_failed(replica.index, f"stream cut: {exc}")
            message = (
                f"replica {replica.index} failed while streaming this response "
                f"({type(exc).__name__}); the output is incomplete"
            )
            event = json.dumps(error_body(message, "ReplicaFailure", 502))
            prefix = b"" if seen.at_boundary else b"\n\n"
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write(prefix + f"data: {event}\n\ndata: [DONE]\n\n".encode())
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
        return response, (seen.prompt_tokens, seen.completion_tokens or seen.events), credited

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        """Any other route: to a ready replica (rotating), retried on another if it fails."""
        ready = [r for r in self.replicas if r.ready and r.url is not None]
        if not ready:
            return self._reject(503, "no replica is ready", {"Retry-After": "5"})
        raw = await request.read()
        self._passthrough_turn += 1
        assert self.session is not None
        for attempt in range(len(ready)):
            replica = ready[(self._passthrough_turn + attempt) % len(ready)]
            try:
                async with self.session.request(
                    request.method,
                    f"{replica.url}{request.path_qs}",
                    data=raw,
                    headers=forward_headers(request.headers.items()),
                ) as upstream:
                    data = await upstream.read()
                    headers = answer_headers(upstream.headers.items(), replica.index)
                    return web.Response(body=data, status=upstream.status, headers=headers)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                self._mark_failed(replica.index, str(exc))
        return self._reject(503, "no replica answered", {"Retry-After": "5"})

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """A split-execution session: one WebSocket, proxied whole to one replica."""
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return await self.passthrough(request)
        job = Job(
            prompt_tokens=self.typical.prompt_tokens,
            max_tokens=self.typical.max_tokens,
            tenant=self.tenant_of(request, None),
            session=request.headers.get(self.options.session_header),
        )
        exclude: set[int] = set()
        assert self.session is not None
        while True:
            try:
                decision = await self.acquire(job, frozenset(exclude))
            except Busy:
                return self._reject(429, "every replica is busy", {"Retry-After": "1"})
            except NoReplica:
                return self._reject(503, "no replica is ready", {"Retry-After": "5"})
            replica = self.replicas[decision.replica]
            url = f"{replica.url}{request.path_qs}".replace("http", "ws", 1)
            try:
                upstream = await self.session.ws_connect(
                    url,
                    headers=forward_headers(request.headers.items()),
                    max_msg_size=0,
                    autoping=True,
                )
            except aiohttp.WSServerHandshakeError as exc:
                self._finished(replica.index)
                return web.Response(status=exc.status, text=exc.message)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                self._finished(replica.index)
                self._mark_failed(replica.index, str(exc))
                exclude.add(replica.index)
                if len(exclude) > self.options.max_retries:
                    return self._reject(503, "replicas failed", {"Retry-After": "5"})
                self.metrics.retries.labels("replica_failed").inc()
                continue
            try:
                return await self._pipe(request, upstream, replica)
            finally:
                self._finished(replica.index)

    async def _pipe(
        self, request: web.Request, upstream: aiohttp.ClientWebSocketResponse, replica: ReplicaState
    ) -> web.WebSocketResponse:
        client = web.WebSocketResponse(max_msg_size=0, autoping=True)
        client.headers[REPLICA_HEADER] = str(replica.index)
        await client.prepare(request)

        client_closed = False

        async def to_upstream() -> None:
            nonlocal client_closed
            async for msg in client:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await upstream.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await upstream.send_bytes(msg.data)
                else:
                    break
            client_closed = True  # whatever the replica's close looks like now, it did not fail
            await upstream.close()

        async def to_client() -> None:
            async for msg in upstream:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await client.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await client.send_bytes(msg.data)
                else:
                    break
            code = upstream.close_code
            if not client_closed and (code is None or code == 1006):
                # the replica went away without closing
                self._mark_failed(replica.index, "split session's replica went away")
                with contextlib.suppress(Exception):
                    from adaptivellm.split_client.protocol import Error, encode_message

                    await client.send_str(
                        encode_message(
                            Error(code="engine_error", message=f"replica {replica.index} failed")
                        )
                    )
                await client.close(code=1011, message=b"engine_error")
            else:
                await client.close(code=code if code is not None else 1000)

        tasks = [asyncio.create_task(to_upstream()), asyncio.create_task(to_client())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[0] in done:
                # The client closed: let the replica's close and last messages through briefly.
                with contextlib.suppress(asyncio.TimeoutError, Exception):
                    await asyncio.wait_for(tasks[1], 5)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await upstream.close()
            await client.close()
        return client

    # --- introspection ---------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if any(r.ready for r in self.replicas):
            return web.Response(status=200)
        return web.Response(status=503, text="no replica is ready")

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "index": r.index,
                "url": r.url,
                "ready": r.ready,
                "inflight": r.inflight,
                "outstanding": outstanding(r),
                "slots": r.slots,
                "published": vars(r.published),
                "endpoint": self.infos[r.index],
            }
            for r in self.replicas
        ]

    async def replicas_endpoint(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "routing": self.options.routing,
                "global_fairness": self.options.global_fairness,
                "queue_depth": len(self.queue),
                "queue_peak": self.queue_peak,
                "counters": self.ledger.counters,
                "served": self.ledger.served,
                "tenant_dispatches": self.tenant_dispatches,
                "replicas": self.status(),
            }
        )

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        assert self.session is not None
        self.metrics.queue_depth.set(len(self.queue))
        texts: dict[int, str] = {}

        async def scrape(r: ReplicaState) -> None:
            try:
                timeout = aiohttp.ClientTimeout(total=10)
                async with self.session.get(f"{r.url}/metrics", timeout=timeout) as resp:  # type: ignore[union-attr]
                    if resp.status == 200:
                        texts[r.index] = await resp.text()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass

        await asyncio.gather(*(scrape(r) for r in self.replicas if r.ready and r.url))
        own = generate_latest(self.metrics.registry)  # type: ignore[arg-type]
        merged = generate_latest(relabelled(texts))  # type: ignore[arg-type]
        return web.Response(body=own + merged, headers={"Content-Type": CONTENT_TYPE_LATEST})


class relabelled:  # a collector, used like a registry
    """Every replica's families, merged by name, each sample with a `replica` label."""

    def __init__(self, texts: dict[int, str]) -> None:
        self.texts = texts

    def collect(self) -> Iterable[Any]:
        from prometheus_client.parser import text_string_to_metric_families

        families: dict[str, Any] = {}
        for index, text in sorted(self.texts.items()):
            try:
                parsed = list(text_string_to_metric_families(text))
            except Exception:
                logger.warning("replica %d: unparsable /metrics", index)
                continue
            for family in parsed:
                samples = family.samples
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = family
                    merged.samples = []
                elif merged.type != family.type:
                    continue
                for s in samples:
                    labels = {"replica": str(index), **s.labels}
                    merged.samples.append(s._replace(labels=labels))
        yield from families.values()


def _usage(data: bytes) -> tuple[int | None, int | None]:
    """(prompt, completion tokens) of a non-streamed answer's usage."""
    prompt = _PROMPT_RE.findall(data)
    completion = _COMPLETION_RE.findall(data)
    return (
        int(prompt[-1]) if prompt else None,
        int(completion[-1]) if completion else None,
    )


def parse_load(exposition: str) -> Published:
    """A replica's load and service model from its /metrics text (sums over label sets; the
    service model's terms averaged over data-parallel ranks)."""
    running = waiting = 0.0
    prefill: list[float] = []
    decode: list[float] = []
    for line in exposition.splitlines():
        if not line or line[0] == "#":
            continue
        if line.startswith("vllm:num_requests_running"):
            running += _value(line)
        elif line.startswith("vllm:num_requests_waiting"):
            waiting += _value(line)
        elif line.startswith("adaptivellm_service_model_seconds_per_token"):
            (prefill if 'term="prefill"' in line else decode).append(_value(line))
    return Published(
        running=running,
        waiting=waiting,
        prefill_s_per_token=sum(prefill) / len(prefill) if prefill else None,
        decode_s_per_token=sum(decode) / len(decode) if decode else None,
    )


def _value(line: str) -> float:
    try:
        value = float(line.rsplit(" ", 1)[1])
    except (IndexError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0
