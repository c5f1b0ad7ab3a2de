"""Run one scenario against several systems (stock vLLM, AdaptiveLLM configurations).

Up to `max_servers` systems are up at once and take turns: each is warmed up and calibrated
(solo requests on the idle server), then the systems replay the same workload one after the
other, round by round, so that drift in the machine's speed hits every system alike. Odd rounds
go in reverse order (A B C D, D C B A, ...: `round_order`), so that over an even number of
rounds every system has the same mean position in the turn: a linear drift, or an advantage of
going first, cancels out. With `round_order="rotate"` each round starts one system later
instead (A B C, B C A, C A B, ...): over a multiple of the system count in rounds every system
takes every place once, and, with three systems or more, none replays twice in a row across a
round's boundary; over each cycle every system has the same waits (counted in other replays)
between its own. With reversal the systems at the ends replay back to back at every other
boundary and wait twice as long at the next, and the middle never does either. Counters
are read from /metrics just before and after each replay. Each round also records when it
started (Unix time) and the share of the machine's CPU time the hypervisor took for other guests
meanwhile (/proc/stat `steal`; None where the kernel reports none): a noisy neighbour slows one
round and not the next, and this says which. It also records the CPU time (user + system) each of
the server's processes spent in the round, by role (`process_role`: the API server, the engine
core, a worker), and the harness's own (the client): on a machine with few cores the forward pass
shares them with everything else, so CPU a server spends outside its forward pass slows its steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

from adaptivellm.benchmark.client import (
    Target,
    calibration_shapes,
    replay_sync,
    scrape_metrics,
    solo_latencies,
)
from adaptivellm.benchmark.metrics import (
    CalibrationFit,
    RequestResult,
    counter_deltas,
    fit_calibration,
    output_timeline,
)
from adaptivellm.benchmark.workloads import BenchRequest, WorkloadSpec
from adaptivellm.launch import (
    STOCK_ENV,
    ServerProcess,
    adaptivellm_command,
    free_port,
    stock_vllm_command,
)
from adaptivellm.scheduler.step_trace import STEP_TRACE_NAME_ENV


@dataclass(frozen=True)
class SystemConfig:
    """A system under test: stock vLLM or AdaptiveLLM, with extra serve flags."""

    name: str
    kind: str
    """'stock' (vLLM's own launcher, plugins off) or 'adaptivellm' (`adaptivellm serve`)."""
    extra_flags: tuple[str, ...] = ()


def parse_system(text: str) -> SystemConfig:
    """`NAME` or `NAME=EXTRA FLAGS`. Names `stock` and `stock-*` run stock vLLM; every other
    name runs `adaptivellm serve`."""
    name, _, flags = text.partition("=")
    name = name.strip()
    if not name:
        raise ValueError(f"system {text!r} has no name")
    kind = "stock" if name == "stock" or name.startswith("stock-") else "adaptivellm"
    return SystemConfig(name, kind, tuple(shlex.split(flags)))


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run."""

    systems: tuple[SystemConfig, ...]
    workload: WorkloadSpec
    model_path: str
    served_name: str
    vocab_size: int
    common_flags: tuple[str, ...]
    """vLLM flags given to every server (after --served-model-name)."""
    log_dir: Path
    rounds: int = 1
    calibration_repeats: int = 2
    max_servers: int = 2
    round_order: str = "reverse"
    """`reverse` or `rotate`: see `round_order`."""
    startup_timeout_s: float = 600.0
    load: dict[str, object] | None = None
    """How the offered rate was set from a capacity probe (`measure_capacity`), for the report;
    None when the workload's rate was given."""


@dataclass
class SystemRun:
    """What one system produced."""

    config: SystemConfig
    command: list[str]
    env: dict[str, str]
    calibration: CalibrationFit | None = None
    results: list[RequestResult] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)
    round_durations_s: list[float] = field(default_factory=list)
    round_started_at: list[float] = field(default_factory=list)
    round_cpu_steal_share: list[float | None] = field(default_factory=list)
    round_cpu_s: list[dict[str, float]] = field(default_factory=list)
    """Per round: CPU seconds by role (`process_role`, and `client`), `cpu_deltas`."""
    round_output_per_s: list[list[int]] = field(default_factory=list)
    """Per round: output tokens delivered in each second of it (`output_timeline`)."""


def server_command(system: SystemConfig, config: BenchConfig, port: int) -> list[str]:
    """The command line that starts `system`."""
    flags = [
        "--served-model-name", config.served_name, *config.common_flags, *system.extra_flags,
    ]  # fmt: skip
    if system.kind == "stock":
        return stock_vllm_command(config.model_path, port, flags)
    return adaptivellm_command(config.model_path, port, flags)


def new_server(config: BenchConfig, system: SystemConfig, log_name: str) -> ServerProcess:
    """A server for `system` on a free port (not started), logging to log_dir / log_name."""
    port = free_port()
    # Named for ADAPTIVELLM_STEP_TRACE's header (scheduler/step_trace.py), when tracing is on.
    env = STOCK_ENV if system.kind == "stock" else {STEP_TRACE_NAME_ENV: system.name}
    command = server_command(system, config, port)
    return ServerProcess(command, port, config.log_dir / log_name, env)


def run_benchmark(
    config: BenchConfig,
    requests: Sequence[BenchRequest],
    on_result: Callable[[RequestResult], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, SystemRun]:
    """Run every system of `config` on `requests`; at most `max_servers` up at once."""
    runs = {}
    for i in range(0, len(config.systems), config.max_servers):
        group = config.systems[i : i + config.max_servers]
        runs.update(_run_group(config, group, requests, on_result, on_stage or (lambda s: None)))
    return runs


def _run_group(
    config: BenchConfig,
    group: Sequence[SystemConfig],
    requests: Sequence[BenchRequest],
    on_result: Callable[[RequestResult], None] | None,
    on_stage: Callable[[str], None],
) -> dict[str, SystemRun]:
    with contextlib.ExitStack() as stack:
        servers, runs = {}, {}
        for system in group:
            server = new_server(config, system, f"{system.name}.log")
            runs[system.name] = SystemRun(system, server.command, server.env)
            servers[system.name] = server
            stack.callback(servers[system.name].stop)
            servers[system.name].start()  # start all first: their start-ups overlap
        for name, server in servers.items():
            on_stage(f"waiting for {name}")
            server.wait_ready(config.startup_timeout_s)
        for name, server in servers.items():
            on_stage(f"calibrating {name}")
            runs[name].calibration = calibrate(_target(config, server), config)
        for round_ in range(config.rounds):
            for name in round_order(list(servers), round_, config.round_order):
                server = servers[name]
                on_stage(f"{name}: round {round_ + 1}/{config.rounds}")
                _replay_round(config, runs[name], server, requests, round_, on_result)
    return runs


@dataclass(frozen=True)
class CapacityProbe:
    """What `measure_capacity` found."""

    system: str
    clients: int
    requests: int
    capacity_req_s: float
    duration_s: float


def measure_capacity(
    config: BenchConfig,
    system: SystemConfig,
    requests: Sequence[BenchRequest],
    clients: int,
    on_stage: Callable[[str], None] | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
) -> CapacityProbe:
    """How many requests/s `system` serves when saturated: it is started alone, warmed up, and
    sent `requests` in a closed loop by `clients` clients (more than its batch slots, so that
    requests queue in the engine throughout). See saturated_rate. Raises RuntimeError when a
    probe request fails."""
    server = new_server(config, system, f"{system.name}-capacity.log")
    try:
        server.start()
        if on_stage:
            on_stage(f"capacity of {system.name}: starting")
        server.wait_ready(config.startup_timeout_s)
        warm_up = calibration_shapes(config.workload.max_model_len)[:1]
        asyncio.run(solo_latencies(_target(config, server), warm_up, repeats=0))
        if on_stage:
            on_stage(f"capacity of {system.name}: {clients} clients")
        results = replay_sync(_target(config, server), requests, clients, -1, on_result)
    finally:
        server.stop()
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"capacity probe: {len(failed)} requests failed: {failed[0].error}")
    return CapacityProbe(
        system.name,
        clients,
        len(results),
        saturated_rate([r.end_s for r in results], clients),
        max(r.end_s for r in results),
    )


def saturated_rate(end_times: Sequence[float], clients: int) -> float:
    """Requests/s completed while every one of `clients` closed-loop clients was busy, from the
    completion times of a replay that started at 0: each client sends its next request when one
    completes, so all are busy until the workload runs out, at the (n - clients)th completion.
    The drain after that (fewer requests than batch slots) is left out."""
    n = len(end_times)
    if clients < 1 or n <= clients:
        raise ValueError(f"need more requests ({n}) than clients ({clients}), and a client")
    last_busy = sorted(end_times)[n - clients - 1]
    if not last_busy > 0:
        raise ValueError("completion times must be after the start (0)")
    return (n - clients) / last_busy


ROUND_ORDERS = ("reverse", "rotate")


def round_order(names: Sequence[str], round_: int, how: str = "reverse") -> list[str]:
    """The order in which the systems replay in round `round_` (from 0). `reverse`: as given in
    even rounds, reversed in odd ones. `rotate`: started `round_` places later, wrapping round."""
    if how == "rotate":
        k = round_ % len(names) if names else 0
        return [*names[k:], *names[:k]]
    if how != "reverse":
        raise ValueError(f"round order {how!r}: expected one of {', '.join(ROUND_ORDERS)}")
    return list(names) if round_ % 2 == 0 else list(reversed(names))


def calibrate(target: Target, config: BenchConfig) -> CalibrationFit:
    """Fit the solo-latency model on the idle server."""
    shapes = calibration_shapes(config.workload.max_model_len)
    samples = asyncio.run(solo_latencies(target, shapes, config.calibration_repeats))
    return fit_calibration(samples)


def _replay_round(
    config: BenchConfig,
    run: SystemRun,
    server: ServerProcess,
    requests: Sequence[BenchRequest],
    round_: int,
    on_result: Callable[[RequestResult], None] | None,
) -> None:
    spec = config.workload
    closed = spec.concurrency if spec.arrival == "closed" else 0
    before = scrape_metrics(server.base_url)
    run.round_started_at.append(time.time())
    cpu_before = cpu_times()
    root = server.proc.pid if server.proc else None
    procs_before = process_cpu_s(root)
    # A fresh prompt seed per round: the prefix cache must not serve a repeated prompt.
    results = replay_sync(
        _target(config, server), requests, closed, spec.seed * 1000 + round_, on_result
    )
    run.round_cpu_steal_share.append(steal_share(cpu_before, cpu_times()))
    run.round_cpu_s.append(cpu_deltas(procs_before, process_cpu_s(root)))
    after = scrape_metrics(server.base_url)
    for name, delta in counter_deltas(before, after).items():
        run.counters[name] = run.counters.get(name, 0.0) + delta
    # Rounds are laid end to end on one time line, so that pooled figures span them all.
    offset = sum(run.round_durations_s)
    run.round_durations_s.append(max((r.end_s for r in results), default=0.0))
    run.round_output_per_s.append(output_timeline(results))
    run.results.extend(_shift(r, offset) for r in results)


def cpu_times(stat: Path = Path("/proc/stat")) -> tuple[int, int] | None:
    """(all CPU time, stolen CPU time) since boot, in clock ticks, summed over CPUs, from the
    first line of /proc/stat; None where it cannot be read (not Linux) or has no steal field."""
    try:
        first = stat.read_text().split("\n", 1)[0].split()
        ticks = [int(x) for x in first[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is already
    # counted in user and nice.
    if first[:1] != ["cpu"] or len(ticks) < 8:
        return None
    return sum(ticks[:8]), ticks[7]


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of CPU time stolen between two cpu_times() readings (None without both, or
    when no time passed)."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return (after[1] - before[1]) / (after[0] - before[0])


#: What a vLLM process calls itself (vllm.utils.system_utils.set_process_title: "VLLM::<name>",
#: with a suffix such as "_DP0"), by role.
PROCESS_ROLES = (("EngineCore", "engine_core"), ("Worker", "worker"), ("APIServer", "api_server"))


def process_role(title: str, is_root: bool) -> str:
    """The role of a server process from its title (its command line as setproctitle left it):
    the server's own process is the API server; vLLM names its engine core and workers; any
    other child (a resource tracker, a compile worker) is `other`."""
    if is_root:
        return "api_server"
    head = title.split(maxsplit=1)[0] if title.strip() else ""
    for name, role in PROCESS_ROLES:
        if name in head:
            return role
    return "other"


def process_cpu_s(root: int | None) -> dict[tuple[int, str], float]:
    """CPU seconds (user + system) so far of `root`, each of its live descendants, and this
    process (the harness: the client), keyed by (pid, role). A process that ends on the way is
    left out; an unknown or gone `root` leaves only the client."""
    out: dict[tuple[int, str], float] = {}
    me = psutil.Process()
    procs: list[tuple[psutil.Process, bool]] = []
    if root is not None:
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(root)
            procs = [(top, True), *((p, False) for p in top.children(recursive=True))]
    for proc, is_root in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            title = " ".join(proc.cmdline())
            out[(proc.pid, process_role(title, is_root))] = t.user + t.system
    t = me.cpu_times()
    out[(me.pid, "client")] = t.user + t.system
    return out


def cpu_deltas(
    before: Mapping[tuple[int, str], float], after: Mapping[tuple[int, str], float]
) -> dict[str, float]:
    """CPU seconds spent between two process_cpu_s() readings, summed by role. A process in
    `after` only (started meanwhile) counts from zero; one in `before` only (gone) is lost."""
    out: dict[str, float] = {}
    for (pid, role), t in after.items():
        spent = t - before.get((pid, role), 0.0)
        out[role] = out.get(role, 0.0) + max(spent, 0.0)
    return out


def _shift(result: RequestResult, offset: float) -> RequestResult:
    if not offset:
        return result
    return replace(
        result,
        arrival_s=result.arrival_s + offset,
        first_token_s=result.first_token_s + offset,
        end_s=result.end_s + offset,
        token_times=tuple(t + offset for t in result.token_times),
    )


def _target(config: BenchConfig, server: ServerProcess) -> Target:
    return Target(server.base_url, config.served_name, config.vocab_size)


def model_vocab_size(model_path: str) -> int:
    """vocab_size from the model folder's config.json."""
    return int(json.loads((Path(model_path) / "config.json").read_text())["vocab_size"])
