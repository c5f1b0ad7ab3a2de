"""Serving-path overhead of `adaptivellm serve` against stock vLLM on fast steps (issue #35).

The embedded tiny model (a decode step of a few ms on CPU, so every microsecond of Python per
step or per token shows), a KV cache of `--kv-tokens` tokens (3,072), and a closed-loop drive
of `--requests` streamed completions at `--concurrency` 24 with short outputs (8-128 tokens,
seeded), of which 10% are aborted by the client part-way. Every round drives two workloads on
the same servers: `light` (short prompts; the running set fits the KV cache, nothing is
preempted) and `pressure` (longer prompts and outputs; the running set overflows the cache, so
requests are preempted).

Servers: stock vLLM is up for the whole run; each configuration is started beside it in turn
(at most two servers at once on this 2-core machine), so that every paired round compares
stock and the configuration under the same machine conditions, seconds apart, with the order
rotated each round (odd rounds: configuration first). The configurations are an A/A control
(a second stock server), the default, `--fairness fcfs --preemption-mode recompute`,
`--fairness vtc` and `--preemption-mode swap`. A round's ratio is the configuration's
throughput (tokens streamed / wall seconds, both workloads) over stock's in that round; each
configuration reports the median, p10 and p90 of its round ratios. The A/A spread is the noise
floor: a ratio inside it is "met or unmeasurable". Each round also gives a CPU ratio (`cpu_ratios`):
stock's CPU milliseconds per output token (user + system time of its whole process group while
it was driven) over the configuration's. It counts the work each server does, which what else
the shared cores run disturbs less than it disturbs wall time.

The engine core's time per model-running step is measured inside the live engine cores of
stock and AdaptiveLLM: a `sitecustomize` on PYTHONPATH (written to a temp folder, active only
with ADAPTIVELLM_STEP_TIMER) wraps `EngineCore.step` with a perf_counter timer; it is no vLLM
plugin, so stock still runs with VLLM_PLUGINS="". Each round also records `uptime`'s load and
the steal / other-process CPU share from /proc/stat, since other agents share this machine.

`--profile SECONDS` instead runs py-spy (the dev extra) on the live API server and engine core
of stock and of the default AdaptiveLLM under the same drive, and writes flame graphs and top-N
tables to bench/results/overhead-profile/.

    python bench/overhead.py --rounds 10      # -> bench/results/overhead.json (rewritten per round)
    python bench/overhead.py --profile 20     # -> bench/results/overhead-profile/
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from adaptivellm import __version__
from adaptivellm.compat import installed_vllm
from adaptivellm.cpu import cpu_count
from adaptivellm.launch import (
    STOCK_ENV,
    ServerProcess,
    adaptivellm_command,
    free_port,
    running_server,
    stock_vllm_command,
)
from adaptivellm.model import DEFAULT_MODEL_NAME, ModelSpec, ensure_model

RESULTS = Path(__file__).parent / "results"
WORDS = "the river city market garden window letter story music paper light night".split()

#: AdaptiveLLM configurations (name -> extra serve flags); "aa" is a second stock server.
CONFIGS: dict[str, list[str] | None] = {
    "default": [],
    "fcfs-recompute": ["--fairness", "fcfs", "--preemption-mode", "recompute"],
    "aa": None,
    "vtc": ["--fairness", "vtc"],
    "swap": ["--preemption-mode", "swap"],
    # The default's fairness without the swap connector: against "default", what swapping's
    # KV connector costs vLLM's own scheduling and the worker each step.
    "recompute": ["--preemption-mode", "recompute"],
}


@dataclass(frozen=True)
class Req:
    prompt: str
    max_tokens: int
    abort_after: int | None
    """Close the stream after this many tokens (None: read it to the end)."""


def workload(
    n: int, seed: int, prompt_words: tuple[int, int], out: tuple[int, int], aborts: float
) -> list[Req]:
    """n distinct seeded requests (distinct prompts: no prefix-cache sharing)."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        words = rng.randint(*prompt_words)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words)) + f" {seed} {i}"
        max_tokens = rng.randint(*out)
        abort = rng.randint(1, max(1, max_tokens - 1)) if rng.random() < aborts else None
        reqs.append(Req(prompt, max_tokens, abort))
    return reqs


WORKLOADS = {
    # 24 x (~20 + <=128) tokens at most ~3,500 but ~1,800 on average: fits 3,072 tokens.
    "light": dict(prompt_words=(4, 16), out=(8, 128)),
    # 24 x (~200 + <=128): overflows 3,072 tokens, so the scheduler preempts.
    "pressure": dict(prompt_words=(120, 240), out=(32, 128)),
}


async def drive(base_url: str, served: str, reqs: list[Req], concurrency: int) -> dict:
    """Stream every request, `concurrency` at a time; return tokens, seconds, tokens/s."""
    queue = collections.deque(reqs)
    tokens = errors = 0
    ttfts: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:

        async def one(req: Req) -> int:
            body = {
                "model": served,
                "prompt": req.prompt,
                "max_tokens": req.max_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                # usage in every chunk: a chunk may carry several tokens when the client
                # lags, so tokens are counted (and aborts placed) by completion_tokens.
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            }
            nonlocal errors
            got = 0
            sent = time.perf_counter()
            first = True
            try:
                async with client.stream("POST", "/v1/completions", json=body) as resp:
                    resp.raise_for_status()
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        if first:
                            ttfts.append(time.perf_counter() - sent)
                            first = False
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            got = usage["completion_tokens"]
                        if req.abort_after is not None and got >= req.abort_after:
                            break  # leaving the block closes the connection: vLLM aborts it
            except httpx.TransportError:
                # Counted, not fatal: one connection error (seen once, on stock, under a load
                # average of 12) must not end a 25-minute run. The round keeps its tokens.
                errors += 1
            return got

        async def worker() -> None:
            nonlocal tokens
            while queue:
                got = await one(queue.popleft())
                tokens += got  # not `tokens += await ...`: that reads tokens before the await

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
            "errors": errors, "max_ttft_s": max(ttfts, default=None)}  # fmt: skip


def drive_all(server: ServerProcess, args: argparse.Namespace, seed: int) -> dict:
    """One round on one server: every workload in turn; throughput over both, and the CPU the
    server's processes (API server, engine core, worker) spent per output token meanwhile."""
    parts = {}
    assert server.proc is not None
    cpu_before = group_cpu_by_role(server.proc.pid)
    for name, shape in WORKLOADS.items():
        reqs = workload(args.requests, seed, aborts=args.aborts, **shape)  # type: ignore[arg-type]
        parts[name] = asyncio.run(drive(server.base_url, args.served, reqs, args.concurrency))
    cpu_after = group_cpu_by_role(server.proc.pid)
    by_role = {role: s - cpu_before.get(role, 0.0) for role, s in cpu_after.items()}
    cpu_s = sum(by_role.values())
    tokens = sum(p["tokens"] for p in parts.values())
    seconds = sum(p["seconds"] for p in parts.values())
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "errors": sum(p["errors"] for p in parts.values()),
            "cpu_s": cpu_s, "cpu_ms_per_token": 1e3 * cpu_s / max(1, tokens),
            "cpu_ms_per_token_by_role": {r: 1e3 * c / max(1, tokens) for r, c in by_role.items()},
            **parts}  # fmt: skip


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of the live processes of a process group (the server's)."""
    return sum(group_cpu_by_role(pgid).values())


def group_cpu_by_role(pgid: int) -> dict[str, float]:
    """group_cpu_s by role: `api` (the group's leader, the API server) and each other process
    by its name (vLLM's `VLLM::EngineCore`, `VLLM::Worker`...; the kernel keeps 15 characters),
    processes of one name summed."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for pid, name, fields in group_stats(pgid):
        role = "api" if pid == pgid else name
        ticks_used = int(fields[11]) + int(fields[12])  # utime, stime
        totals[role] = totals.get(role, 0.0) + ticks_used / ticks
    return totals


def group_stats(pgid: int) -> Iterator[tuple[int, str, list[str]]]:
    """(pid, name, the /proc/PID/stat fields after the name) of each live process of a process
    group; processes that end while being read are skipped."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid:
                yield int(d.name), stat[stat.index("(") + 1 : stat.rindex(")")], fields


def cpu_times() -> list[int]:
    """The `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal ..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def machine_sample(before: list[int], after: list[int]) -> dict:
    delta = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(delta[:8]) or 1
    return {
        "loadavg": os.getloadavg()[0],
        "steal_pct": 100.0 * delta[7] / total,
        "idle_pct": 100.0 * (delta[3] + delta[4]) / total,
    }


def step_totals(folder: Path) -> tuple[int, int, int]:
    """Model-running steps, their nanoseconds and the scheduler's nanoseconds, summed over every
    engine that wrote to `folder` so far (the timer rewrites its file every 256 steps)."""
    steps = ns = sched_ns = 0
    for f in folder.glob("*.json"):
        with contextlib.suppress(ValueError, OSError):
            d = json.loads(f.read_text())
            steps, ns = steps + d["steps"], ns + d["ns"]
            sched_ns += d.get("sched_ns", 0)
    return steps, ns, sched_ns


def step_us(folder: Path, since: tuple[int, int, int] = (0, 0, 0)) -> dict | None:
    """Mean engine-core step (microseconds) over every engine that wrote to `folder`, and the
    scheduler's share of it (`scheduler_us`: its `schedule` and `update_from_output` calls);
    with `since` (step_totals earlier), only of the steps after it."""
    steps, ns, sched_ns = (now - then for now, then in zip(step_totals(folder), since, strict=True))
    if steps <= 0:
        return None
    return {"steps": steps, "us": ns / steps / 1e3, "scheduler_us": sched_ns / steps / 1e3}


def paired_steps(times: dict[str, dict | None], cname: str) -> dict:
    """A configuration's and stock's step times over the same rounds (step_us of each since
    the warm-up), and the scheduler microseconds a step the configuration adds."""
    mine, stock = times[cname], times["stock"]
    added = mine["scheduler_us"] - stock["scheduler_us"] if mine and stock else None
    return {"config": mine, "stock": stock, "scheduler_us_added": added}


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(ratios: list[float]) -> dict:
    return {
        "median": statistics.median(ratios),
        "p10": quantile(ratios, 0.1),
        "p90": quantile(ratios, 0.9),
        "n": len(ratios),
        "rounds": ratios,
    }


class Setup:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        spec = ModelSpec()
        self.model = str(ensure_model(spec, DEFAULT_MODEL_NAME))
        args.served = DEFAULT_MODEL_NAME
        per_token = 2 * spec.num_layers * spec.num_kv_heads * (spec.hidden_size // spec.num_heads)
        kv_bytes = args.kv_tokens * per_token * 4  # float32
        self.common = [
            "--served-model-name", DEFAULT_MODEL_NAME,
            "--dtype", "float32",
            "--max-model-len", "1024",
            "--kv-cache-memory-bytes", str(kv_bytes),
            "--enforce-eager",
        ]  # fmt: skip
        self.tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
        site = self.tmp / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(STEP_TIMER)
        self.site = site

    def steps(self, name: str) -> Path:
        """The folder the step timer of server `name` writes to."""
        return self.tmp / "steps" / name

    def system(self, name: str, flags: list[str] | None) -> tuple[list[str], dict[str, str]]:
        """Command and env of a server; flags None: stock vLLM."""
        timer = self.steps(name)
        env = {
            "ADAPTIVELLM_STEP_TIMER": str(timer),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(self.site), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        if flags is None:
            return stock_vllm_command(self.model, free_port(), self.common), {**STOCK_ENV, **env}
        return adaptivellm_command(self.model, free_port(), [*self.common, *flags]), env

    def start(self, stack: contextlib.ExitStack, name: str, flags: list[str] | None):
        command, env = self.system(name, flags)
        port = int(command[command.index("--port") + 1])
        log = RESULTS / "logs" / f"overhead-{name}.log"
        return stack.enter_context(running_server(command, port, log, env=env)), command


def bench(args: argparse.Namespace) -> int:
    setup = Setup(args)
    configs = {k: v for k, v in CONFIGS.items() if k in args.configs}
    found = installed_vllm()
    report: dict = {
        "command": shlex.join(["python", *sys.argv]),
        "ratio": None,
        "ratios": {},
        "cpu_ratios": {},
        "cpu_ratios_by_role": {},
        "aa_ratio": None,
        "rounds": args.rounds,
        "engine_step_us": {"stock": None, "adaptivellm": None},
        "engine_step_us_by_config": {},
        # Per configuration: its engine core's and stock's over the same rounds (after the
        # warm-up), so that the machine's drift between configurations cancels.
        "engine_step_us_paired": {},
        "targets": {"default": 0.98, "fcfs-recompute": 0.99},
        "workload": {
            "requests_per_workload": args.requests,
            "concurrency": args.concurrency,
            "aborts": args.aborts,
            "kv_tokens": args.kv_tokens,
            "workloads": WORKLOADS,
        },
        "method": "stock up for the whole run; each configuration started beside it in turn "
        "(two servers at once); per round both drive the light and pressure workloads, order "
        "rotated each round; ratio = configuration tokens/s over stock tokens/s that round; "
        "cpu_ratio = stock's CPU ms per output token (its process group's user + system time "
        "while it was driven) over the configuration's, that round",
        "machine": {"platform": platform.platform(), "cpus": cpu_count()},
        "versions": {"adaptivellm": __version__, "vllm": found[1] if found else None},
        "per_round": {},
    }
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        out.write_text(json.dumps(report, indent=2) + "\n")

    total = len(configs) * (args.rounds + 1)
    with contextlib.ExitStack() as outer, tqdm(total=total, unit="round") as bar:
        bar.set_description("starting stock")
        stock, stock_cmd = setup.start(outer, "stock", None)
        report["stock_command"] = shlex.join(stock_cmd)
        for cname, flags in configs.items():
            with contextlib.ExitStack() as stack:
                bar.set_description(f"starting {cname}")
                other, cmd = setup.start(stack, cname, flags)
                report.setdefault("commands", {})[cname] = shlex.join(cmd)
                ratios: list[float] = []
                cpu_ratios: list[float] = []
                role_ratios: dict[str, list[float]] = {}
                rows = report["per_round"].setdefault(cname, [])
                for i in range(args.rounds + 1):
                    seed = args.seed + i
                    pair = [("stock", stock), (cname, other)]
                    if i % 2:
                        pair.reverse()
                    before = cpu_times()
                    res = {}
                    for who, server in pair:
                        bar.set_description(f"{cname}: {'warm-up' if i == 0 else f'round {i}'}")
                        res[who] = drive_all(server, args, seed)
                    mach = machine_sample(before, cpu_times())
                    bar.update(1)
                    if i == 0:  # warm-up; the paired step times count from here
                        warm = {who: step_totals(setup.steps(who)) for who in ("stock", cname)}
                        continue
                    ratio = res[cname]["tokens_per_s"] / res["stock"]["tokens_per_s"]
                    ratios.append(ratio)
                    # CPU efficiency: stock's CPU per token over the configuration's (1.0: the
                    # same work per token; 0.98: 2% more), less sensitive than wall time to
                    # what else the shared cores run.
                    cpu_ratio = res["stock"]["cpu_ms_per_token"] / res[cname]["cpu_ms_per_token"]
                    cpu_ratios.append(cpu_ratio)
                    mine = res[cname]["cpu_ms_per_token_by_role"]
                    for role, ms in res["stock"]["cpu_ms_per_token_by_role"].items():
                        if ms > 0 and mine.get(role, 0) > 0:
                            role_ratios.setdefault(role, []).append(ms / mine[role])
                    rows.append(
                        {
                            "round": i,
                            "first": pair[0][0],
                            "ratio": ratio,
                            "cpu_ratio": cpu_ratio,
                            "stock": res["stock"],
                            cname: res[cname],
                            **mach,
                        }
                    )
                    report["ratios"][cname] = summary(ratios)
                    report["cpu_ratios"][cname] = summary(cpu_ratios)
                    report["cpu_ratios_by_role"][cname] = {
                        role: summary(r) for role, r in role_ratios.items()
                    }
                    if cname == "aa":
                        report["aa_ratio"] = report["ratios"]["aa"]["median"]
                    if cname == "default":
                        report["ratio"] = report["ratios"]["default"]["median"]
                    steps = step_us(setup.steps(cname))
                    report["engine_step_us_by_config"][cname] = steps
                    stock_steps = step_us(setup.steps("stock"))
                    report["engine_step_us_by_config"]["stock"] = stock_steps
                    report["engine_step_us"]["stock"] = stock_steps and stock_steps["us"]
                    if cname == "default" and steps:
                        report["engine_step_us"]["adaptivellm"] = steps["us"]
                    report["engine_scheduler_us"] = {
                        name: s and s["scheduler_us"]
                        for name, s in report["engine_step_us_by_config"].items()
                    }
                    report["engine_step_us_paired"][cname] = paired_steps(
                        {who: step_us(setup.steps(who), warm[who]) for who in ("stock", cname)},
                        cname,
                    )
                    write()
    print(json.dumps({k: report[k] for k in ("ratio", "aa_ratio", "engine_step_us")}, indent=2))
    for cname, s in report["ratios"].items():
        c = report["cpu_ratios"][cname]
        print(
            f"{cname:16s} throughput median {s['median']:.3f} (p10 {s['p10']:.3f}, p90 "
            f"{s['p90']:.3f}); CPU per token {c['median']:.3f} ({c['p10']:.3f}-{c['p90']:.3f})"
        )
    return 0


def group_pids(pgid: int) -> dict[int, str]:
    """pid -> name of every process in a process group."""
    return {pid: name for pid, name, _ in group_stats(pgid)}


def top_table(raw: Path, n: int) -> str:
    """Top-n functions by self and by inclusive samples from py-spy's raw (collapsed) output."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        self_c[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    lines = [f"total samples: {total}", "", "self %   function (file:line)"]
    for f, c in self_c.most_common(n):
        lines.append(f"{100 * c / total:6.2f}  {f}")
    lines += ["", "inclusive %   function (file:line)"]
    for f, c in incl.most_common(n):
        lines.append(f"{100 * c / total:6.2f}  {f}")
    return "\n".join(lines) + "\n"


def profile(args: argparse.Namespace) -> int:
    """py-spy on the live API server and engine core of stock and the default configuration."""
    setup = Setup(args)
    outdir = RESULTS / "overhead-profile"
    outdir.mkdir(parents=True, exist_ok=True)
    pyspy = Path(sys.executable).parent / "py-spy"
    with contextlib.ExitStack() as stack:
        servers = {
            "stock": setup.start(stack, "stock", None)[0],
            "adaptivellm": setup.start(stack, "adaptivellm", []),
        }
        servers["adaptivellm"] = servers["adaptivellm"][0]
        for server in servers.values():
            drive_all(server, args, 0)  # warm-up
        for name, server in tqdm(servers.items(), desc="profiling"):
            assert server.proc is not None
            pids = group_pids(server.proc.pid)
            spies = []
            for pid, comm in pids.items():
                role = (
                    "api" if pid == server.proc.pid else comm.replace("::", "-").replace("/", "-")
                )
                raw = outdir / f"{name}-{role}.txt"  # gzip it to commit it
                spies.append(
                    (
                        raw,
                        subprocess.Popen(
                            [str(pyspy), "record", "-p", str(pid), "-d", str(int(args.profile)),
                             "-r", "200", "-f", "raw", "-o", str(raw), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        ),
                    )
                )  # fmt: skip
            deadline = time.monotonic() + args.profile
            seed = 100
            tokens = seconds = 0.0
            while time.monotonic() < deadline:
                r = drive_all(server, args, seed)
                tokens += r["tokens"]
                seconds += r["seconds"]
                seed += 1
            for raw, p in spies:
                p.wait()
                if raw.exists() and raw.stat().st_size:
                    (raw.with_suffix(".top.txt")).write_text(
                        f"{name} {raw.stem}: py-spy -r 200 --nonblocking for {args.profile} s "
                        f"under the overhead drive ({tokens / seconds:.0f} tok/s)\n\n"
                        + top_table(raw, args.top)
                    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=60, help="per workload, per round")
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--aborts", type=float, default=0.1)
    parser.add_argument("--kv-tokens", type=int, default=3072)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    parser.add_argument("--profile", type=int, default=0, help="py-spy for this many seconds")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    return profile(args) if args.profile else bench(args)


STEP_TIMER = r"""'''Engine-core step timer for bench/overhead.py, loaded through PYTHONPATH
in stock vLLM and `adaptivellm serve` alike (no vLLM plugin, so stock stays stock:
VLLM_PLUGINS="" still holds).

Only when ADAPTIVELLM_STEP_TIMER names a folder: when `vllm.v1.engine.core` is first imported,
wrap `EngineCore.step` and `EngineCore.step_with_batch_queue` with a perf_counter_ns timer that
counts the steps that ran the model, time the engine's scheduler's `schedule` and
`update_from_output` calls (instance attributes over the bound methods, so a subclass's own
`super()` calls are not counted twice), and rewrite `<folder>/<pid>.json` (steps, total ns,
scheduler ns) every 256 such steps. Nothing else changes.
'''

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

_OUT = os.environ.get("ADAPTIVELLM_STEP_TIMER")


def _patch(module: object) -> None:
    cls = getattr(module, "EngineCore", None)
    if cls is None:
        return
    state = {"steps": 0, "ns": 0, "sched_ns": 0}
    path = os.path.join(_OUT or ".", f"{os.getpid()}.json")

    def time_scheduler(core):  # type: ignore[no-untyped-def]
        scheduler = getattr(core, "scheduler", None)
        if scheduler is None or getattr(scheduler, "_step_timer", False):
            return
        for name in ("schedule", "update_from_output"):

            def call(*a, _bound=getattr(scheduler, name), **kw):  # type: ignore[no-untyped-def]
                t0 = time.perf_counter_ns()
                try:
                    return _bound(*a, **kw)
                finally:
                    state["sched_ns"] += time.perf_counter_ns() - t0

            setattr(scheduler, name, call)
        scheduler._step_timer = True

    def wrap(fn):  # type: ignore[no-untyped-def]
        def timed(self, *a, **kw):  # type: ignore[no-untyped-def]
            time_scheduler(self)
            t0 = time.perf_counter_ns()
            result = fn(self, *a, **kw)
            dt = time.perf_counter_ns() - t0
            if isinstance(result, tuple) and len(result) == 2 and result[1]:
                state["steps"] += 1
                state["ns"] += dt
                if state["steps"] % 256 == 0:
                    nonlocal path
                    path = os.path.join(_OUT or ".", f"{os.getpid()}.json")
                    with open(path + ".tmp", "w") as f:
                        json.dump(state, f)
                    os.replace(path + ".tmp", path)
            return result

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    for name in ("step", "step_with_batch_queue"):
        if hasattr(cls, name):
            setattr(cls, name, wrap(getattr(cls, name)))


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != "vllm.v1.engine.core":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            original(module)
            _patch(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if _OUT:
    os.makedirs(_OUT, exist_ok=True)
    sys.meta_path.insert(0, _Hook())
"""

if __name__ == "__main__":
    sys.exit(main())
