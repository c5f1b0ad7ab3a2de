"""Scale-out benchmark (issue #38): AdaptiveLLM's router over replicas, side by side, one run.

Stages (each writes bench/results/scaleout.json as soon as it is done):

- **overhead**: one replica (an `adaptivellm serve` of the embedded model) driven directly and
  through the router (`--replica-urls`, no Ray), in alternating rounds: closed loop of streamed
  completions; `router_overhead_ratio` = median over rounds of router throughput / direct
  throughput (tokens per second).
- **scale**: two replicas behind the router against one direct (`scale_2_vs_1`), and vLLM's
  own `--data-parallel-size 2` on the same machine: on 2 shared cores little scaling is
  expected.
- **routing**: two mismatched replicas (one with `--max-num-seqs 8`, one with `--max-num-seqs
  1`, each bound to its own core) behind routers with `predicted`, `round-robin` and
  `least-loaded`, one after the other on the same seeded open-loop (Poisson) arrivals at about
  70% of the pair's measured capacity (both driven at once), with the router's admission gate
  off (`--router-target-backlog 1000`: the routing decision alone is compared); p99 latency
  and mean weighted turnaround (latency over the same size's latency alone on an idle
  replica). `routing_p99_ratio` = predicted's p99 /
  round-robin's (median over rounds).
- **fairness**: two equal replicas; tenant `heavy` pins its requests to one replica (session
  header, `--session-imbalance inf`), tenant `light` goes anywhere; both keep 16 requests
  outstanding, replicas `--max-num-seqs 4`. Ledger on: `--router-target-backlog 4` (requests
  beyond it wait at the router and are released least-served tenant first). Off:
  `--no-global-fairness --router-target-backlog 1000`, a plain balancer that dispatches at
  once and leaves fairness to each replica's own scheduler. `global_jain` = Jain's index of
  the tokens each tenant received after a warm-up.
- **recovery**: `adaptivellm serve --replicas 2` on a local Ray instance; a closed loop of
  streamed and non-streamed requests; one replica's actor is SIGKILLed mid-run.
  `kill_lost_not_started` = requests that failed without any output reaching the client (they
  should all have been retried elsewhere); `kill_streams_cut` = streams under way that ended
  with an error event; the time until Ray's restarted replica rejoined.

    python bench/scaleout.py                 # all stages, about 10 minutes on 2 cores
    python bench/scaleout.py --stages overhead,routing --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from adaptivellm import __version__
from adaptivellm.launch import ServerProcess, adaptivellm_command, free_port

RESULTS = Path(__file__).resolve().parent / "results"
LOGS = RESULTS / "logs"
MODEL = "tiny"
BASE = [
    "--enforce-eager",
    "--max-model-len",
    "512",
    "--served-model-name",
    MODEL,
    "--kv-cache-memory-bytes",
    str(96 << 20),
]
SIZES = (8, 16, 32, 64)
#: Fairness stage: each replica's batch size, and each tenant's outstanding requests (more
#: than a replica holds, so that the free tenant overflows onto the pinned one's replica).
FAIRNESS_SLOTS = 4
FAIRNESS_OUTSTANDING = 16
#: Server (or router) process of each URL started by `server`.
PIDS: dict[str, int] = {}
#: Tokens and seconds of the last closed loop.
LAST: dict[str, float] = {}


def jain(values: list[float]) -> float:
    squares = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * squares) if squares else 1.0


@contextmanager
def server(name: str, flags: list[str], env: dict[str, str] | None = None) -> Iterator[str]:
    """An `adaptivellm serve` (or router) for the duration of the block; yields its URL."""
    port = free_port()
    process = ServerProcess(
        adaptivellm_command(None, port, flags), port, LOGS / f"scaleout-{name}.log", env or {}
    )
    process.start()
    try:
        process.wait_ready(timeout=600)
        assert process.proc is not None
        PIDS[process.base_url] = process.proc.pid
        yield process.base_url
    finally:
        process.stop(grace=60)


def core_env(core: int) -> dict[str, str]:
    return {"VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def wait_replicas(router: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with_status = httpx.get(f"{router}/router/replicas", timeout=30).json()
        if all(r["ready"] for r in with_status["replicas"]):
            return
        time.sleep(0.5)
    raise TimeoutError("replicas not ready")


async def one(
    client: httpx.AsyncClient,
    url: str,
    max_tokens: int,
    stream: bool = True,
    headers: dict[str, str] | None = None,
    user: str | None = None,
) -> tuple[int, float, str]:
    """(completion tokens, seconds, outcome): outcome ok | lost (failed before any output) |
    cut (a stream that ended with an error after some output)."""
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": "the quick brown fox",
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    if user:
        body["user"] = user
    start = time.perf_counter()
    if not stream:
        try:
            r = await client.post(f"{url}/v1/completions", json=body, headers=headers)
        except httpx.HTTPError:
            return 0, time.perf_counter() - start, "lost"
        if r.status_code != 200:
            return 0, time.perf_counter() - start, "lost"
        return r.json()["usage"]["completion_tokens"], time.perf_counter() - start, "ok"
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                return 0, time.perf_counter() - start, "lost"
            async for line in r.aiter_lines():
                if line.startswith('data: {"error"'):
                    return tokens, time.perf_counter() - start, "cut" if tokens else "lost"
                if line.startswith("data: {"):
                    tokens += 1
    except httpx.HTTPError:
        return tokens, time.perf_counter() - start, "cut" if tokens else "lost"
    return tokens, time.perf_counter() - start, "ok"


async def closed_loop(url: str, concurrency: int, seconds: float, max_tokens: int = 64) -> float:
    """Tokens per second of `concurrency` clients sending streamed requests back to back."""
    deadline = time.monotonic() + seconds
    total = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal total
        while time.monotonic() < deadline:
            tokens, _, _ = await one(client, url, max_tokens)
            total += tokens

    start = time.monotonic()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    LAST.update(tokens=total, seconds=time.monotonic() - start)
    return total / (time.monotonic() - start)


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def sequential_latency(url: str, n: int = 12) -> float:
    """Median latency of `n` non-streamed 16-token completions sent one at a time."""
    async with httpx.AsyncClient(timeout=600) as client:
        times = [(await one(client, url, 16, stream=False))[1] for _ in range(n)]
    return statistics.median(times)


def stage_overhead(args: argparse.Namespace, out: dict[str, Any]) -> None:
    with server("direct", [*BASE, "--max-num-seqs", "16"], core_env(0)) as direct:
        asyncio.run(closed_loop(direct, 8, 3))  # warm-up
        router_flags = ["--replica-urls", direct, "--replica-poll-s", "1"]
        with server("router-1", router_flags) as routed:
            wait_replicas(routed)
            rounds = []
            router_cpu = router_tokens = 0.0
            for i in range(args.rounds * 2):
                order = [("direct", direct), ("router", routed)]
                if i % 2:
                    order.reverse()
                tps = {}
                for name, url in order:
                    cpu = cpu_seconds(PIDS[routed])
                    tps[name] = asyncio.run(closed_loop(url, 16, args.window_s))
                    if name == "router":
                        router_cpu += cpu_seconds(PIDS[routed]) - cpu
                        router_tokens += LAST["tokens"]
                rounds.append(tps)
                print(f"overhead round {i}: {tps}", flush=True)
            latency = {
                name: asyncio.run(sequential_latency(url))
                for name, url in (("direct", direct), ("router", routed), ("direct2", direct))
            }
        ratios = [r["router"] / r["direct"] for r in rounds]
        out["router_overhead_ratio"] = statistics.median(ratios)
        out["overhead"] = {
            "rounds": rounds,
            "ratios": ratios,
            "what": "router throughput / direct throughput, same one replica, "
            "closed loop of 16 streamed 64-token completions",
            "router_cpu_ms_per_token": 1000 * router_cpu / max(1.0, router_tokens),
            "sequential_latency_s": latency,
            "router_added_latency_ms": 1000
            * (latency["router"] - (latency["direct"] + latency["direct2"]) / 2),
        }


def stage_scale(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """One replica direct, two behind the router (each bound to its own core), and vLLM's own
    `--data-parallel-size 2` (one `adaptivellm serve`, two engine ranks), each driven by the
    same closed loop in rotated order, `args.rounds` rounds; ratios to the one replica."""
    flags = [*BASE, "--max-num-seqs", "16"]
    rounds: list[dict[str, float]] = []
    with (
        server("one", flags, core_env(0)) as one_url,
        server("second", flags, core_env(1)) as second,
        server("router-2", ["--replica-urls", f"{one_url},{second}"]) as routed2,
    ):
        wait_replicas(routed2)
        systems = [("one", one_url), ("two_routed", routed2)]
        for i in range(args.rounds):
            order = systems[i % 2 :] + systems[: i % 2]
            rounds.append(
                {name: asyncio.run(closed_loop(url, 16, args.window_s)) for name, url in order}
            )
            print(f"scale round {i}: {rounds[-1]}", flush=True)
    with server("dp2", [*flags, "--data-parallel-size", "2"]) as dp2:
        asyncio.run(closed_loop(dp2, 8, 3))  # warm-up
        dp_tps = [asyncio.run(closed_loop(dp2, 16, args.window_s)) for _ in range(args.rounds)]
    for r, tps in zip(rounds, dp_tps, strict=True):
        r["data_parallel_2"] = tps
    two = [r["two_routed"] / r["one"] for r in rounds]
    dp = [r["data_parallel_2"] / r["one"] for r in rounds]
    out["scale_2_vs_1"] = statistics.median(two)
    out["scale"] = {
        "rounds": rounds,
        "two_routed_vs_one": two,
        "data_parallel_2_vs_one": dp,
        "two_routed_vs_data_parallel_2": statistics.median(
            r["two_routed"] / r["data_parallel_2"] for r in rounds
        ),
        "what": "tokens per second of a closed loop of 16 streamed 64-token completions; "
        "the one replica and the router's two ran together in rotated rounds, "
        "--data-parallel-size 2 after them (it needs both cores)",
        "note": "2 replicas on 2 shared cores (each bound to one): the single replica "
        "already uses both cores (engine core + worker), so little scaling is possible "
        "here. On a GPU cluster each replica owns its GPUs and throughput adds up until "
        "the router's CPU (0.06 ms per token here) or the network binds.",
    }


async def open_loop(
    url: str, arrivals: list[tuple[float, int]], headers: dict[str, str] | None = None
) -> list[tuple[int, float]]:
    """Send each (time, max_tokens) at its time; (size, latency) of each."""
    results: list[tuple[int, float]] = []
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as c:

        async def send(at: float, size: int) -> None:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            _, seconds, outcome = await one(c, url, size, stream=False)
            if outcome == "ok":
                results.append((size, seconds))

        await asyncio.gather(*(send(at, size) for at, size in arrivals))
    return results


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def stage_routing(args: argparse.Namespace, out: dict[str, Any]) -> None:
    fast_flags = [*BASE, "--max-num-seqs", "8"]
    slow_flags = [*BASE, "--max-num-seqs", "1"]
    with (
        server("fast", fast_flags, core_env(0)) as fast,
        server("slow", slow_flags, core_env(1)) as slow,
    ):
        # Latency of each size alone on an idle replica (the weighted turnaround's denominator).
        alone = {}
        for size in SIZES:
            times = [asyncio.run(open_loop(fast, [(0.0, size)]))[0][1] for _ in range(3)]
            alone[size] = statistics.median(times)
        # Capacity: the pair's requests per second, both driven at once (they share the cores).
        mean_size = sum(SIZES) / len(SIZES)

        async def both() -> list[float]:
            return list(
                await asyncio.gather(
                    closed_loop(fast, 8, 6, int(mean_size)), closed_loop(slow, 1, 6, int(mean_size))
                )
            )

        capacity = sum(asyncio.run(both())) / mean_size
        rate = args.load * capacity
        rng = random.Random(38)
        arrivals, t = [], 0.0
        while t < args.routing_s:
            t += rng.expovariate(rate)
            arrivals.append((t, rng.choice(SIZES)))
        policies = ("round-robin", "least-loaded", "predicted")
        rounds = []
        for i in range(args.rounds):
            row = {}
            for policy in policies if i % 2 == 0 else reversed(policies):
                flags = [
                    "--replica-urls",
                    f"{fast},{slow}",
                    "--routing",
                    policy,
                    "--replica-poll-s",
                    "0.25",
                    "--replica-extra",
                    "1=--max-num-seqs 1",
                    "--max-num-seqs",
                    "8",
                    "--router-target-backlog",
                    "1000",
                ]
                with server(f"router-{policy}", flags) as routed:
                    wait_replicas(routed)
                    done = asyncio.run(open_loop(routed, arrivals))
                latencies = [s for _, s in done]
                row[policy] = {
                    "p99_s": p99(latencies),
                    "completed": len(done),
                    "sent": len(arrivals),
                    "mean_weighted_turnaround": statistics.fmean(
                        s / alone[size] for size, s in done
                    ),
                }
                print(f"routing round {i} {policy}: {row[policy]}", flush=True)
            rounds.append(row)
    ratios = [r["predicted"]["p99_s"] / r["round-robin"]["p99_s"] for r in rounds]
    out["routing_p99_ratio"] = statistics.median(ratios)
    out["routing_p99_ratio_vs_least_loaded"] = statistics.median(
        r["predicted"]["p99_s"] / r["least-loaded"]["p99_s"] for r in rounds
    )
    out["routing"] = {
        "rounds": rounds,
        "alone_s": alone,
        "capacity_rps": capacity,
        "rate_rps": rate,
        "requests": len(arrivals),
        "replicas": "fast: --max-num-seqs 8 on core 0; slow: --max-num-seqs 1 on core 1",
    }


async def two_tenants(url: str, seconds: float, warmup: float) -> dict[str, int]:
    tokens = {"heavy": 0, "light": 0}
    start = time.monotonic()

    async def worker(client: httpx.AsyncClient, tenant: str) -> None:
        headers = {"X-Session-Id": "heavy"} if tenant == "heavy" else None
        while time.monotonic() - start < seconds:
            got, _, outcome = await one(client, url, 16, False, headers, tenant)
            if outcome == "ok" and time.monotonic() - start > warmup:
                tokens[tenant] += got

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(
            *(worker(client, t) for t in ("heavy", "light") for _ in range(FAIRNESS_OUTSTANDING))
        )
    return tokens


def stage_fairness(args: argparse.Namespace, out: dict[str, Any]) -> None:
    flags = [*BASE, "--max-num-seqs", str(FAIRNESS_SLOTS)]
    result: dict[str, Any] = {}
    with server("a", flags, core_env(0)) as a, server("b", flags, core_env(1)) as b:
        for ledger in ("on", "off") * args.rounds:
            router_flags = [
                "--replica-urls",
                f"{a},{b}",
                "--routing",
                "session",
                "--session-imbalance",
                "inf",
                "--router-target-backlog",
                str(FAIRNESS_SLOTS) if ledger == "on" else "1000",
                "--global-fairness" if ledger == "on" else "--no-global-fairness",
            ]
            with server(f"router-ledger-{ledger}", router_flags) as routed:
                wait_replicas(routed)
                tokens = asyncio.run(two_tenants(routed, args.fairness_s, 3.0))
                status = httpx.get(f"{routed}/router/replicas", timeout=30).json()
            value = jain(list(tokens.values()))
            result.setdefault(ledger, []).append(
                {"tokens": tokens, "jain": value, "dispatches": status["tenant_dispatches"]}
            )
            print(f"fairness ledger {ledger}: {tokens} jain {value:.3f}", flush=True)
    out["global_jain"] = {
        f"ledger_{k}": statistics.median(r["jain"] for r in v) for k, v in result.items()
    }
    out["fairness"] = {
        "runs": result,
        "setup": "heavy pinned to one replica by session header, light free; "
        "16 outstanding requests each, --max-num-seqs 4; ledger on: target backlog 4, least-served "
        "first; off: no router queue (target 1000), arrival order, per-replica fairness only",
    }


def stage_recovery(args: argparse.Namespace, out: dict[str, Any]) -> None:
    flags = [
        "--replicas",
        "2",
        "--replica-cpus",
        "1",
        "--routing",
        "predicted",
        "--replica-log-dir",
        str(LOGS / "scaleout-ray"),
        *BASE,
        "--max-num-seqs",
        "8",
    ]
    with server("ray-router", flags) as routed:
        wait_replicas(routed)
        outcomes: list[str] = []
        killed: dict[str, Any] = {}

        async def drive() -> None:
            start = time.monotonic()

            async def worker(client: httpx.AsyncClient, stream: bool) -> None:
                while time.monotonic() - start < args.recovery_s:
                    _, _, outcome = await one(client, routed, 48, stream)
                    outcomes.append(outcome)

            async def killer() -> None:
                await asyncio.sleep(args.recovery_s / 3)
                async with httpx.AsyncClient(timeout=30) as c:
                    status = (await c.get(f"{routed}/router/replicas")).json()
                victim = max(status["replicas"], key=lambda r: r["inflight"])
                os.kill(victim["endpoint"]["actor_pid"], signal.SIGKILL)
                killed.update(
                    index=victim["index"],
                    at=time.monotonic(),
                    inflight=victim["inflight"],
                    pid=victim["endpoint"]["actor_pid"],
                )

            async with httpx.AsyncClient(timeout=600) as client:
                await asyncio.gather(killer(), *(worker(client, i % 2 == 0) for i in range(8)))

        asyncio.run(drive())
        rejoined = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = httpx.get(f"{routed}/router/replicas", timeout=30).json()
            r = status["replicas"][killed["index"]]
            if r["ready"] and r["endpoint"]["actor_pid"] != killed["pid"]:
                rejoined = time.monotonic() - killed["at"]
                break
            time.sleep(1)
    out["kill_lost_not_started"] = outcomes.count("lost")
    out["kill_streams_cut"] = outcomes.count("cut")
    out["recovery"] = {
        "requests": len(outcomes),
        "ok": outcomes.count("ok"),
        "victim_inflight": killed.get("inflight"),
        "rejoined_after_s": rejoined,
        "setup": "2 Ray replicas, 8 clients (half streaming) of 48-token "
        "completions; one actor SIGKILLed a third into the run",
    }


STAGES: dict[str, Callable[[argparse.Namespace, dict[str, Any]], None]] = {
    "overhead": stage_overhead,
    "scale": stage_scale,
    "routing": stage_routing,
    "fairness": stage_fairness,
    "recovery": stage_recovery,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window-s", type=float, default=8.0)
    parser.add_argument("--routing-s", type=float, default=25.0)
    parser.add_argument("--load", type=float, default=0.7)
    parser.add_argument("--fairness-s", type=float, default=20.0)
    parser.add_argument("--recovery-s", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "scaleout.json")
    args = parser.parse_args()
    out: dict[str, Any] = {}
    if args.out.exists():
        out = json.loads(args.out.read_text())
    command = shlex.join(["python", "bench/scaleout.py", *sys.argv[1:]])
    # A run of some stages updates the file: every command that wrote into it is kept.
    out.setdefault("commands", []).append(
        {"command": command, "stages": args.stages.split(","), "at": time.time()}
    )
    out.update(
        command=command,
        adaptivellm_version=__version__,
        machine={"cpus": os.cpu_count(), "platform": platform.platform()},
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    LOGS.mkdir(parents=True, exist_ok=True)
    for name in args.stages.split(","):
        t = time.monotonic()
        STAGES[name](args, out)
        out.setdefault("stage_seconds", {})[name] = round(time.monotonic() - t, 1)
        args.out.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        print(f"stage {name} done in {time.monotonic() - t:.0f} s -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
