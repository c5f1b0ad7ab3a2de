"""AdaptiveLLM's scheduler under vLLM's async scheduling (CUDA's default), the way vLLM's own
async-scheduler tests drive it: two steps in flight (`schedule(N + 1)` before
`update_from_output(N)`), hand-written model outputs, no model. On the same trace it orders,
preempts, learns the service time and charges tenants as the synchronous scheduler does."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from vllm.config import SchedulerConfig
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import ModelRunnerOutput

from adaptivellm.scheduler import simulated
from adaptivellm.scheduler.config import FairnessConfig
from adaptivellm.scheduler.policies import ServiceModel
from adaptivellm.scheduler.scheduler import AdaptiveAsyncScheduler, AdaptiveScheduler
from tests.scheduler.sim import Clock, Run, check_no_leaks, make_request, make_scheduler

WT = FairnessConfig(policy="weighted-turnaround")


def make_async(fairness: FairnessConfig, **kwargs: Any) -> Any:
    """make_scheduler with vLLM's async scheduling on: AdaptiveScheduler itself, which must
    build its async variant."""
    return make_scheduler(fairness, async_scheduling=True, **kwargs)


@dataclass
class Pipeline:
    """Drives a scheduler with up to two steps in flight, as vLLM's engine core does under
    async scheduling. Each step runs on a simulated device for `step_cost(output)` seconds,
    from when it was scheduled or when the step before it finished, whichever is later; its
    output comes back when it finishes."""

    scheduler: AdaptiveScheduler
    clock: Clock
    step_cost: Callable[[SchedulerOutput], float] = lambda out: 0.01
    timer: Clock = field(default_factory=lambda: Clock(0.0))
    order: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.scheduler.step_timer = self.timer

    def schedule(self) -> tuple[SchedulerOutput, dict[str, bool], float]:
        out = self.scheduler.schedule()
        cost = self.step_cost(out)  # from the requests' state as scheduled
        for new in out.scheduled_new_reqs:
            if new.req_id not in self.order:
                self.order.append(new.req_id)
        self.preempted.extend(out.preempted_req_ids or ())
        # A request samples a token in this step unless the step only prefills part of it.
        samples = {rid: not self.scheduler.requests[rid].is_prefill_chunk
                   for rid in out.num_scheduled_tokens}  # fmt: skip
        return out, samples, (self.timer.now, cost)

    def finish(
        self, out: SchedulerOutput, samples: dict[str, bool], timing: tuple[float, float]
    ) -> None:
        ran_from, cost = timing
        self.timer.now = max(self.timer.now, ran_from) + cost
        req_ids = list(out.num_scheduled_tokens)
        sampled = [[5] if samples[r] else [] for r in req_ids]
        runner = ModelRunnerOutput(req_ids=req_ids,
                                   req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                   sampled_token_ids=sampled)  # fmt: skip
        for outputs in self.scheduler.update_from_output(out, runner).values():
            for o in outputs.outputs:
                if o.finish_reason is not None:
                    self.finished.add(o.request_id)
        self.clock.now += 0.01

    def until_idle(self, max_steps: int = 100_000) -> None:
        in_flight: deque[tuple[SchedulerOutput, dict[str, bool], tuple[float, float]]] = deque()
        in_flight.append(self.schedule())
        for _ in range(max_steps):
            if not in_flight:
                return
            if self.scheduler.has_requests() and len(in_flight) < 2:
                in_flight.append(self.schedule())  # N + 1 before N's output
            out, samples, ran_from = in_flight.popleft()
            # The device starts this step when the one before it is done (self.timer).
            self.finish(out, samples, ran_from)
            if self.scheduler.has_requests() and not in_flight:
                in_flight.append(self.schedule())
        raise AssertionError("scheduler did not drain")


def workload(scheduler: AdaptiveScheduler, clock: Clock, seed: int = 0, n: int = 10) -> None:
    rng = random.Random(seed)
    for i in range(n):
        scheduler.add_request(make_request(f"r{i}", rng.choice([10, 40, 90]),
                                           rng.choice([2, 8, 30]), clock.now,
                                           tenant=rng.choice(["a", "b"])))  # fmt: skip
        clock.now += 0.0001
    clock.now += 0.05


def test_async_config_builds_the_async_variant() -> None:
    sync, _ = make_scheduler(WT, num_blocks=40)
    assert type(sync) is AdaptiveScheduler
    scheduler, _ = make_async(WT, num_blocks=40)
    assert type(scheduler) is AdaptiveAsyncScheduler
    assert isinstance(scheduler, AsyncScheduler) and isinstance(scheduler, AdaptiveScheduler)


@pytest.mark.parametrize("policy", ["weighted-turnaround", "vtc", "fcfs"])
def test_async_orders_and_charges_as_sync_on_the_same_trace(policy: str) -> None:
    fairness = FairnessConfig(policy=policy)
    sync2, clock2 = make_scheduler(fairness, num_blocks=60, max_num_seqs=2)
    workload(sync2, clock2)
    run = Run(sync2, clock2)
    run.until_idle()

    async_scheduler, aclock = make_async(fairness, num_blocks=60, max_num_seqs=2)
    workload(async_scheduler, aclock)
    pipe = Pipeline(async_scheduler, aclock)
    pipe.until_idle()

    if policy == "vtc":
        # VTC admits by the counters as of the step being scheduled, which under async
        # scheduling already hold the charge of the step in flight: a slot that frees is given
        # with one more step charged than in the synchronous run, and which tenant is behind
        # can differ by that step. Everything else below is the same.
        assert sorted(pipe.order) == sorted(run.order)
    else:
        assert pipe.order == run.order
    assert pipe.finished == set(run.finished) == {f"r{i}" for i in range(10)}
    assert dict(async_scheduler.served_tokens) == dict(sync2.served_tokens)
    assert async_scheduler.output_estimate == sync2.output_estimate
    assert async_scheduler.errors.counts == {} == sync2.errors.counts
    check_no_leaks(async_scheduler, 60)


TRUE = ServiceModel(overhead_s=0.02, prefill_s_per_token=0.0005, decode_s_per_token=0.012)


def true_cost(out: SchedulerOutput, scheduler: AdaptiveScheduler) -> float:
    """A step's device time, called right after schedule(): 2 ms, 0.5 ms per prompt token, 10
    ms per decoding request (service_fit's model: decode_s_per_token = c0 + c_decode = 12 ms),
    counted as the scheduler counts them (the step that computes a prompt's last token samples
    its first output: that token counts as a decode)."""
    prompt = decode = 0
    for rid, n in out.num_scheduled_tokens.items():
        request = scheduler.requests[rid]
        before = request.num_computed_tokens - n
        part = max(0, min(n, request.num_tokens - 1 - before))
        prompt += part
        decode += n > part
    return 0.002 + 0.0005 * prompt + 0.010 * decode


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_service_time_is_learned_with_two_steps_in_flight(mode: str) -> None:
    """With two steps in flight, the time from schedule(N) to update_from_output(N) spans
    step N - 1 too; timing each step from when the one before it finished learns the true
    per-token costs, the same as the synchronous scheduler."""
    fairness = FairnessConfig(policy="weighted-turnaround")
    build = make_scheduler if mode == "sync" else lambda *a, **k: make_async(*a, **k)
    scheduler, clock = build(fairness, num_blocks=200, max_num_seqs=4)
    workload(scheduler, clock, seed=3, n=40)
    if mode == "sync":
        timer = Clock(0.0)
        scheduler.step_timer = timer
        run = Run(scheduler, clock, step_cost=lambda out: true_cost(out, scheduler), timer=timer)
        run.until_idle()
    else:
        Pipeline(scheduler, clock, step_cost=lambda out: true_cost(out, scheduler)).until_idle()
    learned = scheduler.service_times.fit.model
    assert scheduler.service_times.fit.coefficients is not None
    assert learned.prefill_s_per_token == pytest.approx(TRUE.prefill_s_per_token, rel=0.05)
    assert learned.decode_s_per_token == pytest.approx(TRUE.decode_s_per_token, rel=0.05)


def test_fairness_preemption_with_deferred_frees() -> None:
    """With the swap connector (kv_both) and two batches in flight vLLM defers block frees,
    so every running request is in the step in flight: the long request is still preempted
    for the short one that arrives behind it, its blocks come back a step later, and nothing
    leaks."""
    scheduler, clock = make_async(WT, num_blocks=40, max_num_seqs=1,
                                  preemption="swap", swap_slots=40)  # fmt: skip
    assert scheduler.defer_block_free
    scheduler.add_request(make_request("long", 40, 200, clock.now))
    pipe = Pipeline(scheduler, clock)
    in_flight = deque([pipe.schedule()])
    for _ in range(5):  # long is running, two steps in flight
        in_flight.append(pipe.schedule())
        pipe.finish(*in_flight.popleft())
    clock.now += 5.0  # long has run a while
    scheduler.add_request(make_request("short", 10, 2, clock.now))
    while in_flight or scheduler.has_requests():
        if scheduler.has_requests() and len(in_flight) < 2:
            in_flight.append(pipe.schedule())
        pipe.finish(*in_flight.popleft())
    assert "long" in pipe.preempted
    assert pipe.order.index("short") > 0 and pipe.finished == {"long", "short"}
    check_no_leaks(scheduler, 40)


def test_priority_queue_is_replaced_under_own_policies() -> None:
    """vLLM's --scheduling-policy priority keeps a heap that cannot be re-ordered: under
    AdaptiveLLM's own policies the scheduler orders a FCFS queue itself (priority scales the
    weight), so two waiting requests no longer crash the first step."""
    fairness = FairnessConfig(policy="weighted-turnaround")
    scheduler, clock = make_scheduler(fairness, num_blocks=40, max_num_seqs=1)
    assert scheduler.policy.value == "fcfs"
    from vllm.v1.core.sched.request_queue import SchedulingPolicy

    # Build one with vLLM's priority policy in its config.
    def priority_config(**config: Any) -> SchedulerConfig:
        return SchedulerConfig(**{**config, "policy": "priority"})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simulated, "SchedulerConfig", priority_config)
        scheduler, clock = make_scheduler(fairness, num_blocks=40, max_num_seqs=1)
    assert scheduler.policy == SchedulingPolicy.FCFS
    scheduler.add_request(make_request("low", 10, 2, clock.now, priority=3))
    scheduler.add_request(make_request("high", 10, 2, clock.now + 0.001, priority=-3))
    clock.now += 0.05
    run = Run(scheduler, clock)
    run.until_idle()
    assert run.order == ["high", "low"]
    check_no_leaks(scheduler, 40)
