"""Workloads replayed through the real scheduler on a simulated clock, with no model: a
step-cost model stands in for the engine. Shared by bench/fairness_sim.py (fairness policies
over many workload samples) and bench/scheduler_overhead.py (the scheduler's own time per step).

Each simulated step lasts

    decode_step_ms + decode_token_ms * (decoding requests) + prefill_token_ms * (prompt tokens)

(`StepCost`; its defaults were read off a fairness run on the project's CPU benchmark model).
Weighted turnaround divides by each request's service time alone by the same cost model; Jain's
index is the benchmark's (`adaptivellm.benchmark.metrics.window_fairness`) over the simulated
token times."""

from __future__ import annotations

import dataclasses
import json
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adaptivellm.benchmark.metrics import RequestResult, window_fairness
from adaptivellm.benchmark.report import source_revision
from adaptivellm.benchmark.scenarios import SCENARIOS
from adaptivellm.benchmark.workloads import BenchRequest, build_workload
from adaptivellm.scheduler.config import FairnessConfig

#: The checkout (for the report's source revision; None outside a git checkout).
ROOT = Path(__file__).resolve().parents[2]
#: The offered rate of the canonical fairness run (bench/results/fairness.json, --load 1.1).
DEFAULT_RATE = 1.75


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Simulated duration of an engine step, in milliseconds (see the module docstring)."""

    decode_step_ms: float = 16.0
    decode_token_ms: float = 2.3
    prefill_token_ms: float = 1.2

    def step_s(self, decodes: int, prefill_tokens: int) -> float:
        ms = self.decode_step_ms + self.decode_token_ms * decodes
        return (ms + self.prefill_token_ms * prefill_tokens) / 1e3

    def alone_s(self, prompt_tokens: int, output_tokens: int) -> float:
        """Latency of a request alone: its prefill step (which samples the first token), then
        one decode step per further token."""
        return self.step_s(0, prompt_tokens) + self.step_s(1, 0) * max(0, output_tokens - 1)


def replay(
    requests: list[BenchRequest],
    fairness: FairnessConfig,
    cost: StepCost,
    max_num_seqs: int = 4,
    max_model_len: int = 2048,
    stock: bool = False,
    timing: dict[str, float] | None = None,
    preemption: str = "swap",
) -> dict[str, float]:
    """Serve `requests` (arriving at their arrival_s) on the simulated clock; their figures.

    `stock`: stock vLLM's Scheduler (what `vllm serve` runs on CPU) instead of AdaptiveLLM's,
    with no KV connector; `fairness` is then ignored. `timing`: add to it the real seconds spent
    in schedule() and update_from_output() (keys `schedule_s`, `update_s`, and `waiting`, the
    waiting requests summed over steps; the figures count the steps). `preemption`: AdaptiveLLM's
    preemption mode (stock vLLM always recomputes)."""
    from adaptivellm.scheduler.simulated import make_request

    scheduler, clock = _simulated_scheduler(
        fairness, max_num_seqs, max_model_len, stock, preemption
    )
    spent = timing if timing is not None else {}
    clock.now = 0.0
    pending = sorted(requests, key=lambda r: r.arrival_s)
    last_arrival = pending[-1].arrival_s
    served = _Served()
    drain_s = 0.0  # time after the last arrival with nothing waiting and the batch part-empty
    i = steps = 0
    while i < len(pending) or scheduler.has_requests():
        while i < len(pending) and pending[i].arrival_s <= clock.now:
            r = pending[i]
            scheduler.add_request(
                make_request(f"r{r.index}", r.prompt_tokens, r.max_tokens, clock.now, r.tenant)
            )
            i += 1
        if not scheduler.has_requests():
            clock.now = pending[i].arrival_s
            continue
        out = timed_schedule(scheduler, spent)
        counts = out.num_scheduled_tokens
        decodes = sum(1 for n in counts.values() if n == 1)
        step = cost.step_s(decodes, sum(n for n in counts.values() if n > 1))
        if clock.now > last_arrival and not scheduler.waiting and len(counts) < max_num_seqs:
            drain_s += step
        clock.now += step
        steps += 1
        started = time.perf_counter()
        served.record(scheduler.update_from_output(out, runner_output(scheduler, out)), clock.now)
        spent["update_s"] = spent.get("update_s", 0.0) + time.perf_counter() - started
    figures = served.figures(pending, cost)
    return {**figures, "drain_s": drain_s, "steps": float(steps), "sim_time_s": clock.now}


def _simulated_scheduler(
    fairness: FairnessConfig, max_num_seqs: int, max_model_len: int, stock: bool,
    preemption: str = "swap",
) -> tuple[Any, Any]:  # fmt: skip
    """The scheduler replay serves with, and its simulated clock (also its step timer, so
    the service model learns from the simulated steps)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from adaptivellm.scheduler.scheduler import AdaptiveScheduler
    from adaptivellm.scheduler.simulated import make_scheduler

    mode = "recompute" if stock else preemption
    scheduler, clock = make_scheduler(
        fairness,
        num_blocks=2 + max_num_seqs * max_model_len // 16,  # never preempted for memory
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_model_len,
        max_model_len=max_model_len,
        preemption=mode,
        swap_slots=swap_slots(mode, max_num_seqs, max_model_len),
        scheduler_cls=Scheduler if stock else AdaptiveScheduler,
    )
    scheduler.step_timer = clock
    return scheduler, clock


def swap_slots(preemption: str, max_num_seqs: int, max_model_len: int) -> int:
    """Swap space (in blocks) of a replayed scheduler: ten full batches, none when it only
    recomputes (no swap connector then)."""
    return 0 if preemption == "recompute" else 10 * max_num_seqs * max_model_len // 16


def timed_schedule(scheduler: Any, timing: dict[str, float]) -> Any:
    """`scheduler.schedule()`, its seconds added to `timing["schedule_s"]` and the requests
    waiting before it to `timing["waiting"]` (the replays' timing)."""
    timing["waiting"] = timing.get("waiting", 0.0) + len(scheduler.waiting)
    started = time.perf_counter()
    out = scheduler.schedule()
    timing["schedule_s"] = timing.get("schedule_s", 0.0) + time.perf_counter() - started
    return out


def runner_output(scheduler: Any, out: Any) -> Any:
    """The model runner's output for the step `out`: one token for each request past its
    prompt."""
    from vllm.v1.outputs import ModelRunnerOutput

    ids = list(out.num_scheduled_tokens)
    sampled = [
        [5] if scheduler.requests[r].num_computed_tokens >= scheduler.requests[r].num_tokens
        else []
        for r in ids
    ]  # fmt: skip
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)},
                             sampled_token_ids=sampled)  # fmt: skip


class _Served:
    """When each request's tokens came and when it finished, on the simulated clock."""

    def __init__(self) -> None:
        self.token_times: dict[str, list[float]] = defaultdict(list)
        self.finished: dict[str, float] = {}

    def record(self, engine_outputs: Mapping[int, Any], now: float) -> None:
        for outputs in engine_outputs.values():
            for o in outputs.outputs:
                if o.new_token_ids:
                    self.token_times[o.request_id].append(now)
                if o.finish_reason is not None:
                    self.finished[o.request_id] = now

    def figures(self, requests: list[BenchRequest], cost: StepCost) -> dict[str, float]:
        if len(self.finished) != len(requests):
            raise RuntimeError(f"{len(requests) - len(self.finished)} requests did not finish")
        times = self.token_times
        results = [
            RequestResult(r.index, r.tenant, r.prompt_tokens, r.max_tokens, r.arrival_s,
                          times[f"r{r.index}"][0], self.finished[f"r{r.index}"],
                          token_times=tuple(times[f"r{r.index}"]))
            for r in requests
        ]  # fmt: skip
        start = min(r.arrival_s for r in results)
        end = max(r.end_s for r in results)
        turnarounds = [r.latency_s / cost.alone_s(r.prompt_tokens, r.output_tokens)
                       for r in results]  # fmt: skip
        return {
            "avg_weighted_turnaround": statistics.mean(turnarounds),
            "throughput_tokens_per_s": sum(r.output_tokens for r in results) / (end - start),
            "jain": window_fairness(results).jain,
            "p99_ttft_s": statistics.quantiles([r.ttft_s for r in results], n=100)[-1],
        }


def workload(scenario: str, seed: int, rate: float, num_requests: int) -> list[BenchRequest]:
    """The benchmark's workload of `scenario` with another seed (seed 0: the benchmark's own)."""
    spec = SCENARIOS[scenario].workload
    return build_workload(spec.replace(num_requests=num_requests, rate=rate, seed=seed))


def write_report(
    script: str, argv: list[str] | None, out: Path, fields: Mapping[str, Any], text: str
) -> None:
    """Write `fields` as the JSON report `out`, headed by the command that made it (`script` and
    its arguments: `argv`, or the command line's) and the source revision; print `text` and
    where the report went."""
    invocation = shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])
    report = {"command": invocation, "source": source_revision(ROOT), **fields}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    print(f"wrote {out}")
