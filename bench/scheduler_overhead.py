"""The scheduler's own cost per engine step, AdaptiveLLM's against stock vLLM's, in one run.

On CPU, vLLM runs without async scheduling: the engine core schedules the next step only after
the model has finished this one, so every microsecond spent in `schedule()` and
`update_from_output()` is a microsecond the model waits. This benchmark replays the fairness
benchmark's workloads (its own sample, seed 0, at its offered rate; bench/fairness_sim.py's
simulated clock, no model) through stock vLLM's `Scheduler` and through `AdaptiveScheduler`
under each policy, and times those two calls for real on this machine. Each configuration is
replayed `--repeats` times in turn and the fastest replay counts (the others measured the
machine's noise, not the code).

It reports, per scenario and configuration: microseconds per step in each call, the ratio to
stock vLLM, the microseconds added per step, and that addition as a share of the fairness run's
mean step (the simulator's step-cost model, read off the real run): the throughput the extra
Python costs when the engine core's step is on the critical path. A live server on this 2-core
machine runs the same code about 2-4x slower than this single process (the engine core shares
a core with the API server and the worker's busy-waiting), so the shares are lower bounds.

The `light` and `pressure` scenarios are bench/overhead.py's live workloads replayed the same
way (replay_live): 24 streams at a time, a new request as one ends, 10% aborted part-way, a KV
cache of 3,072 tokens and vLLM's CPU defaults for the API server (128 sequences, 2,048 tokens a
step). They reproduce the live engine core's scheduler time per step (bench/overhead.py's
`engine_scheduler_us`, about 300 us for stock vLLM) in a run that resolves a few microseconds,
so a cut can be measured here before the live benchmark, whose throughput band is 20% wide on
this machine. Their share of a step is of stock vLLM's mean live step (LIVE_STEP_MS).

AdaptiveLLM's metrics are written to multi-process files, as in the live engine core
(`--metrics memory` keeps them in memory).

    python bench/scheduler_overhead.py [--repeats 5] [--scenarios light,pressure]
                                        # writes bench/results/scheduler-overhead.json
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from adaptivellm.benchmark.scenarios import FAIRNESS_SCENARIOS
from adaptivellm.benchmark.simulator import (
    DEFAULT_RATE,
    StepCost,
    replay,
    runner_output,
    swap_slots,
    timed_schedule,
    workload,
    write_report,
)
from adaptivellm.scheduler.config import FairnessConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
#: Configurations timed: (fairness policy, preemption mode); policy None = stock vLLM's
#: Scheduler (which always recomputes), else AdaptiveScheduler. `fcfs-recompute` is vLLM's own
#: policy with no swap connector (`--fairness fcfs --preemption-mode recompute`); the others
#: run with the swap connector, `default` as `adaptivellm serve` does by default
#: (weighted-turnaround, adaptive preemption: swap or recompute per victim).
CONFIGS: dict[str, tuple[str | None, str]] = {
    "stock": (None, "recompute"),
    "fcfs-recompute": ("fcfs", "recompute"),
    "fcfs": ("fcfs", "swap"),
    "vtc": ("vtc", "swap"),
    "weighted-turnaround": ("weighted-turnaround", "swap"),
    "default": ("weighted-turnaround", "adaptive"),
}
#: The same under vLLM's async scheduling (CUDA's default): stock vLLM's AsyncScheduler against
#: AdaptiveAsyncScheduler, two steps in flight (replay_async).
ASYNC_CONFIGS: dict[str, tuple[str | None, str]] = {
    f"{name}_async": config for name, config in CONFIGS.items()
}


def replay_async(
    requests: list[Any], fairness: FairnessConfig, cost: StepCost, stock: bool,
    timing: dict[str, float], max_num_seqs: int = 4, max_model_len: int = 2048,
    preemption: str = "swap",
) -> dict[str, float]:  # fmt: skip
    """fairness_sim.replay's workload with two steps in flight, as vLLM's engine core drives
    an async scheduler: schedule(N + 1) before update_from_output(N). Times the two calls into
    `timing` (schedule_s, update_s, waiting) and returns the steps and the simulated time."""
    from collections import deque

    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.outputs import ModelRunnerOutput

    from adaptivellm.scheduler.scheduler import AdaptiveScheduler
    from adaptivellm.scheduler.simulated import make_request, make_scheduler

    mode = "recompute" if stock else preemption
    scheduler, clock = make_scheduler(
        fairness, num_blocks=2 + max_num_seqs * max_model_len // 16,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_model_len,
        max_model_len=max_model_len, preemption=mode,
        swap_slots=swap_slots(mode, max_num_seqs, max_model_len),
        scheduler_cls=AsyncScheduler if stock else AdaptiveScheduler, async_scheduling=True,
    )  # fmt: skip
    scheduler.step_timer = clock
    clock.now = 0.0
    pending = sorted(requests, key=lambda r: r.arrival_s)
    in_flight: deque[tuple[Any, list[str], list[list[int]], float]] = deque()
    i = steps = finished = 0
    while finished < len(pending):
        while i < len(pending) and pending[i].arrival_s <= clock.now:
            r = pending[i]
            scheduler.add_request(make_request(f"r{r.index}", r.prompt_tokens, r.max_tokens,
                                                   clock.now, r.tenant))  # fmt: skip
            i += 1
        if len(in_flight) < 2 and scheduler.has_requests():
            out = timed_schedule(scheduler, timing)
            counts = out.num_scheduled_tokens
            ids = list(counts)
            sampled = [[] if scheduler.requests[r].is_prefill_chunk else [5] for r in ids]
            decodes = sum(1 for n in counts.values() if n == 1)
            prefill = sum(n for n in counts.values() if n > 1)
            in_flight.append((out, ids, sampled, cost.step_s(decodes, prefill)))
            if len(in_flight) < 2:
                continue
        if not in_flight:
            clock.now = pending[i].arrival_s
            continue
        out, ids, sampled, step = in_flight.popleft()
        clock.now += step
        steps += 1
        runner = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)},
                                   sampled_token_ids=sampled)  # fmt: skip
        started = time.perf_counter()
        outputs = scheduler.update_from_output(out, runner)
        timing["update_s"] = timing.get("update_s", 0.0) + time.perf_counter() - started
        finished += sum(o.finish_reason is not None for b in outputs.values() for o in b.outputs)
    return {"steps": float(steps), "sim_time_s": clock.now}


#: bench/overhead.py's workloads (its WORKLOADS, in tokens: a prompt of w words is w + 4 tokens
#: of the embedded model), replayed as the live benchmark drives them (replay_live).
LIVE_WORKLOADS: dict[str, dict[str, tuple[int, int]]] = {
    "light": {"prompt": (8, 20), "out": (8, 128)},
    "pressure": {"prompt": (124, 244), "out": (32, 128)},
}
LIVE_CONCURRENCY = 24
LIVE_KV_TOKENS = 3072
LIVE_ABORTS = 0.1
#: A live workload replays --num-requests times this many requests (its steps are short).
LIVE_REQUESTS_FACTOR = 4
#: vLLM's CPU defaults for the OpenAI API server (what the live servers run with).
LIVE_MAX_NUM_SEQS = 128
LIVE_MAX_BATCHED_TOKENS = 2048
#: Stock vLLM's mean step in the live benchmark, ms (bench/results/overhead-scheduler-us.json,
#: `engine_step_us_by_config.stock`): the live workloads' share of a step is of this.
LIVE_STEP_MS = 12.74


def replay_live(
    workload: str, fairness: FairnessConfig, cost: StepCost, stock: bool,
    timing: dict[str, float], num_requests: int, preemption: str = "swap", seed: int = 0,
) -> dict[str, float]:  # fmt: skip
    """bench/overhead.py's `workload` (LIVE_WORKLOADS) in a closed loop: LIVE_CONCURRENCY
    requests at a time, the next one added as one finishes, LIVE_ABORTS of them aborted
    part-way (finish_requests, as the API server does when a client goes away), until
    `num_requests` have ended. Times schedule() and update_from_output() into `timing` (as
    replay) and returns the steps and the simulated time (steps last `cost.step_s`)."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import RequestStatus

    from adaptivellm.scheduler.scheduler import AdaptiveScheduler
    from adaptivellm.scheduler.simulated import make_request, make_scheduler

    mode = "recompute" if stock else preemption
    scheduler, clock = make_scheduler(
        fairness, num_blocks=1 + LIVE_KV_TOKENS // 16, max_num_seqs=LIVE_MAX_NUM_SEQS,
        max_num_batched_tokens=LIVE_MAX_BATCHED_TOKENS, max_model_len=1024, preemption=mode,
        swap_slots=swap_slots(mode, LIVE_CONCURRENCY, 1024),
        scheduler_cls=Scheduler if stock else AdaptiveScheduler,
    )  # fmt: skip
    scheduler.step_timer = clock
    rng = random.Random(seed)
    shape = LIVE_WORKLOADS[workload]
    aborts: dict[str, int] = {}  # request -> output tokens after which its client goes away
    added = ended = steps = 0

    def add() -> None:
        nonlocal added
        rid, out = f"r{added}", rng.randint(*shape["out"])
        if rng.random() < LIVE_ABORTS:
            aborts[rid] = rng.randint(1, max(1, out - 1))
        scheduler.add_request(make_request(rid, rng.randint(*shape["prompt"]), out, clock.now))
        added += 1

    for _ in range(LIVE_CONCURRENCY):
        add()
    while ended < num_requests:
        out = timed_schedule(scheduler, timing)
        counts = out.num_scheduled_tokens
        runner = runner_output(scheduler, out)
        clock.now += cost.step_s(sum(n == 1 for n in counts.values()),
                                 sum(n for n in counts.values() if n > 1))  # fmt: skip
        steps += 1
        started = time.perf_counter()
        outputs = scheduler.update_from_output(out, runner)
        timing["update_s"] = timing.get("update_s", 0.0) + time.perf_counter() - started
        done = sum(o.finish_reason is not None for b in outputs.values() for o in b.outputs)
        gone = []
        for rid, at in list(aborts.items()):
            if (request := scheduler.requests.get(rid)) is None or request.num_output_tokens >= at:
                del aborts[rid]  # ended before its client went away, or goes away now
                if request is not None:
                    gone.append(rid)
        if gone:
            started = time.perf_counter()
            scheduler.finish_requests(gone, RequestStatus.FINISHED_ABORTED)
            timing["update_s"] += time.perf_counter() - started
        ended += done + len(gone)
        for _ in range(done + len(gone)):
            add()
    return {"steps": float(steps), "sim_time_s": clock.now}


def metrics_to_files() -> None:
    """Have the metrics created from now on write to multi-process files in a temporary folder
    (removed at exit), as the engine core of `adaptivellm serve` does: a counter's inc() is then
    a write to an mmap'ed file, which the scheduler pays on its step."""
    from prometheus_client import values

    path = tempfile.mkdtemp(prefix="adaptivellm-scheduler-overhead-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values.ValueClass = values.MultiProcessValue()


def time_replays(
    scenario: str, num_requests: int, rate: float, repeats: int, cost: StepCost
) -> dict[str, Any]:
    """Per configuration: the fastest of `repeats` replays of the scenario's seed-0 workload,
    as microseconds per step, with the simulated figures the replay produced. A live workload
    (LIVE_WORKLOADS) is replayed synchronously only (replay_live), as the CPU engine runs."""
    live = scenario in LIVE_WORKLOADS
    requests = [] if live else workload(scenario, 0, rate, num_requests)
    best: dict[str, dict[str, float]] = {}
    figures: dict[str, dict[str, float]] = {}
    configs = CONFIGS if live else {**CONFIGS, **ASYNC_CONFIGS}
    for _ in range(repeats):
        for name, (policy, mode) in configs.items():  # interleaved: machine drifts hit all
            timing: dict[str, float] = {}
            fairness = FairnessConfig(policy=policy or "fcfs")
            stock = policy is None
            if live:
                figures[name] = replay_live(
                    scenario, fairness, cost, stock, timing, num_requests, preemption=mode
                )
            else:
                run = replay_async if name in ASYNC_CONFIGS else replay
                figures[name] = run(
                    requests, fairness, cost, stock=stock, timing=timing, preemption=mode
                )
            total = timing["schedule_s"] + timing["update_s"]
            if name not in best or total < best[name]["schedule_s"] + best[name]["update_s"]:
                best[name] = timing
    # Microseconds per step in (schedule, update); every replay of a configuration takes the
    # same steps. Stock's total is summed as every other's, so its own ratio is exactly 1.
    per_step = {
        name: tuple(1e6 * timing[k] / figures[name]["steps"] for k in ("schedule_s", "update_s"))
        for name, timing in best.items()
    }
    out: dict[str, Any] = {}
    for name, (schedule_us, update_us) in per_step.items():
        stock_us = sum(per_step["stock_async" if name in ASYNC_CONFIGS else "stock"])
        steps = figures[name]["steps"]
        total_us = schedule_us + update_us
        mean_step_s = LIVE_STEP_MS / 1e3 if live else figures[name]["sim_time_s"] / steps
        out[name] = {
            "steps": int(steps),
            "mean_waiting": best[name]["waiting"] / steps,
            "schedule_us_per_step": schedule_us,
            "update_us_per_step": update_us,
            "total_us_per_step": total_us,
            "total_vs_stock": total_us / stock_us,
            "added_us_per_step": total_us - stock_us,
            "mean_step_ms": 1e3 * mean_step_s,
            "added_share_of_step": (total_us - stock_us) / (1e6 * mean_step_s),
        }
    return out


def table(scenarios: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'scenario':13} {'config':20} {'waiting':>7} {'sched us':>8} {'update us':>9} "
             f"{'x stock':>7} {'+us':>6} {'% step':>6}"]  # fmt: skip
    for key, configs in scenarios.items():
        for name, r in configs.items():
            lines.append(
                f"{key:13} {name:20} {r['mean_waiting']:7.1f} {r['schedule_us_per_step']:8.1f} "
                f"{r['update_us_per_step']:9.1f} {r['total_vs_stock']:7.2f} "
                f"{r['added_us_per_step']:6.1f} {100 * r['added_share_of_step']:6.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="replays per configuration")
    parser.add_argument("--num-requests", type=int, default=120)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="requests/s offered")
    parser.add_argument(
        "--scenarios", default=",".join([*FAIRNESS_SCENARIOS.values(), *LIVE_WORKLOADS]),
        help="fairness benchmark scenarios (replayed at --rate, --num-requests each) and live "
        "workloads of bench/overhead.py (light, pressure: --num-requests x 4 in a closed loop)",
    )  # fmt: skip
    parser.add_argument(
        "--metrics", choices=("files", "memory"), default="files",
        help="files (default): AdaptiveLLM's metrics are written to multi-process files, as in "
        "a live engine core; memory: kept in memory (only where none was created before)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "scheduler-overhead.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.num_requests < 2 or args.rate <= 0:
        parser.error("--repeats must be >= 1, --num-requests >= 2, --rate > 0")
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    known = [*FAIRNESS_SCENARIOS.values(), *LIVE_WORKLOADS]
    if not scenarios or any(s not in known for s in scenarios):
        parser.error(f"unknown scenario(s) {args.scenarios!r}; known: {', '.join(known)}")
    logging.disable(logging.WARNING)  # a vLLM start-up line for every scheduler built
    if args.metrics == "files":
        metrics_to_files()
    cost = StepCost()
    by_key = {**{v: k for k, v in FAIRNESS_SCENARIOS.items()}, **{w: w for w in LIVE_WORKLOADS}}
    results = {}
    for s in tqdm(scenarios, desc="scenarios"):
        n = args.num_requests * (LIVE_REQUESTS_FACTOR if s in LIVE_WORKLOADS else 1)
        results[by_key[s]] = time_replays(s, n, args.rate, args.repeats, cost)
    write_report("bench/scheduler_overhead.py", argv, args.out, {
        "rate": args.rate,
        "num_requests": args.num_requests,
        "repeats": args.repeats,
        "max_num_seqs": 4,  # of the fairness scenarios; the live ones: `live`
        "live": {
            "concurrency": LIVE_CONCURRENCY, "kv_tokens": LIVE_KV_TOKENS, "aborts": LIVE_ABORTS,
            "max_num_seqs": LIVE_MAX_NUM_SEQS, "max_num_batched_tokens": LIVE_MAX_BATCHED_TOKENS,
            "step_ms": LIVE_STEP_MS, "workloads": LIVE_WORKLOADS,
            "num_requests": args.num_requests * LIVE_REQUESTS_FACTOR,
        },
        "metrics": args.metrics,
        "scenarios": results,
    }, table(results))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
