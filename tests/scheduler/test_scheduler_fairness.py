"""AdaptiveScheduler's policies applied through vLLM's real scheduler: a handful of KV blocks,
no model, hand-written model outputs (tests.scheduler.sim)."""

from __future__ import annotations

import random

import pytest

from adaptivellm.scheduler.config import FairnessConfig
from adaptivellm.scheduler.policies import ServiceModel, TurnaroundPreemption
from adaptivellm.scheduler.scheduler import AdaptiveScheduler
from tests.scheduler.sim import Run, check_no_leaks, make_request, make_scheduler

WT = FairnessConfig(policy="weighted-turnaround")


def admission_order(config: FairnessConfig) -> list[str]:
    """One sequence at a time; a long request arrives first, then a medium and a short one.
    All have waited 50 ms at the first step."""
    scheduler, clock = make_scheduler(config, num_blocks=40, max_num_seqs=1)
    for rid, prompt, out in [("long", 100, 60), ("mid", 50, 20), ("short", 10, 2)]:
        scheduler.add_request(make_request(rid, prompt, out, clock.now))
        clock.now += 0.0001
    clock.now += 0.05
    run = Run(scheduler, clock)
    run.until_idle()
    check_no_leaks(scheduler, 40)
    return run.order


def test_fcfs_admits_in_arrival_order() -> None:
    assert admission_order(FairnessConfig(policy="fcfs")) == ["long", "mid", "short"]


def test_weighted_turnaround_admits_shortest_first() -> None:
    assert admission_order(WT) == ["short", "mid", "long"]


def test_tenant_weight_can_outrank_service_time() -> None:
    # long's tenant weighs 100: its response ratio beats the short requests'.
    scheduler, clock = make_scheduler(
        FairnessConfig(tenant_weights={"gold": 100.0}), num_blocks=40, max_num_seqs=1
    )
    scheduler.add_request(make_request("long", 100, 60, clock.now, tenant="gold"))
    scheduler.add_request(make_request("short", 10, 2, clock.now, tenant="free"))
    clock.now += 0.05
    run = Run(scheduler, clock)
    run.until_idle()
    assert run.order == ["long", "short"]


def test_priority_in_xargs_raises_the_weight() -> None:
    from adaptivellm.scheduler.scheduler import request_info

    scheduler, clock = make_scheduler(WT, num_blocks=40, max_num_seqs=1)
    request = make_request("p", 10, 2, clock.now)
    assert request.sampling_params is not None
    request.sampling_params.extra_args = {"priority": -2, "tenant": "a"}
    assert request_info(request, scheduler.fairness).weight == 4.0


def test_victim_is_the_least_deserving_running_request() -> None:
    """Blocks: 8 usable of 16 tokens. Two requests of 48-token prompts take 3 blocks each and
    grow by a block every 16 tokens; they cannot both reach 48 + 60 tokens (7 blocks each), so
    one is preempted. Under weighted-turnaround the victim is the one with the lower key: the
    longer job (its ratio grows slower), whichever arrived first."""
    scheduler, clock = make_scheduler(WT, num_blocks=9, max_num_seqs=2)
    scheduler.add_request(make_request("short", 48, 30, clock.now))
    scheduler.add_request(make_request("long", 48, 60, clock.now + 0.001))
    clock.now += 0.05
    run = Run(scheduler, clock)
    run.until_idle()
    assert run.preempted and set(run.preempted) == {"long"}
    assert run.finished["short"] < run.finished["long"]
    check_no_leaks(scheduler, 9)


def test_fcfs_victim_is_vllms_newest() -> None:
    scheduler, clock = make_scheduler(FairnessConfig(policy="fcfs"), num_blocks=9, max_num_seqs=2)
    scheduler.add_request(make_request("long", 48, 60, clock.now))
    scheduler.add_request(make_request("short", 48, 30, clock.now + 0.001))
    run = Run(scheduler, clock)
    run.until_idle()
    assert set(run.preempted) == {"short"}  # vLLM FCFS preempts the last admitted


@pytest.mark.parametrize("policy", ["vtc", "weighted-turnaround"])
def test_light_tenant_is_served_ahead_of_a_heavy_backlog(policy: str) -> None:
    scheduler, clock = make_scheduler(FairnessConfig(policy=policy), num_blocks=40, max_num_seqs=1)
    run = Run(scheduler, clock)
    # Requests of equal cost: the slack (2048 here, one 1024-token request) lets no heavy
    # request ahead of a light one that costs the same, so they alternate.
    assert scheduler.fairness.tenant_slack(scheduler.vllm_config.model_config.max_model_len) == 2048
    for i in range(12):
        scheduler.add_request(make_request(f"heavy-{i}", 32, 8, clock.now, tenant="heavy"))
    for _ in range(20):  # heavy is being served and accumulates service
        run.step()
    scheduler.add_request(make_request("light-0", 32, 8, clock.now, tenant="light"))
    run.until_idle()
    light_pos = run.order.index("light-0")
    heavy_after = [r for r in run.order[light_pos:] if r.startswith("heavy")]
    assert heavy_after, "light must not wait for the whole heavy backlog"
    assert scheduler.served_tokens["light"] > 0


@pytest.mark.parametrize("policy", ["vtc", "weighted-turnaround"])
def test_counter_is_lifted_when_a_tenant_becomes_active_not_while_it_waits(policy: str) -> None:
    from vllm.v1.request import RequestStatus

    scheduler, clock = make_scheduler(FairnessConfig(policy=policy), num_blocks=40, max_num_seqs=1)
    scheduler.add_request(make_request("heavy-a", 32, 8, clock.now, tenant="heavy"))
    scheduler.add_request(make_request("light-a", 32, 8, clock.now, tenant="light"))
    scheduler.vtc_counters.update(heavy=100.0, light=10.0)  # light is behind, and waiting
    scheduler.add_request(make_request("light-b", 32, 8, clock.now, tenant="light"))
    assert scheduler.vtc_counters["light"] == 10.0  # a second request keeps the deficit
    scheduler.finish_requests(["light-a", "light-b"], RequestStatus.FINISHED_ABORTED)
    scheduler.add_request(make_request("light-c", 32, 8, clock.now, tenant="light"))
    assert scheduler.vtc_counters["light"] == 100.0  # idle, then active again: no banked credit


@pytest.mark.parametrize("policy", ["vtc", "weighted-turnaround"])
def test_counters_of_idle_tenants_do_not_pile_up(policy: str) -> None:
    """60 tenants with one request each (as when every end user sends its own OpenAI `user`),
    arriving one a step beside a steady tenant. A counter is dropped once its tenant is idle
    at or below the least counter any tenant can be lifted to: once all is served, a couple of
    counters are left, not one per name ever seen, and a tenant that comes back is lifted as
    if its counter had been kept."""
    scheduler, clock = make_scheduler(FairnessConfig(policy=policy), num_blocks=80, max_num_seqs=2)
    run = Run(scheduler, clock)
    for i in range(30):
        scheduler.add_request(make_request(f"steady-{i}", 16, 4, clock.now, tenant="steady"))
    for i in range(60):
        scheduler.add_request(make_request(f"u{i}", 16, 4, clock.now, tenant=f"user-{i}"))
        run.step()
    run.until_idle()
    # Everyone is idle: what the last tenant to leave had is the floor a newcomer starts at,
    # and only counters above it are kept.
    floor = scheduler.ledger.last_left
    assert floor > 0 and not scheduler.live_requests
    assert len(scheduler.vtc_counters) <= 2, scheduler.vtc_counters
    assert all(c > floor for c in scheduler.vtc_counters.values())
    scheduler.add_request(make_request("again", 16, 4, clock.now, tenant="user-0"))
    assert scheduler.vtc_counters["user-0"] == floor
    run.until_idle()
    check_no_leaks(scheduler, 80)


def test_a_tenants_running_work_counts_against_its_slack() -> None:
    scheduler, clock = make_scheduler(WT, num_blocks=40, max_num_seqs=2)
    scheduler.add_request(make_request("a", 20, 30, clock.now, tenant="x"))
    scheduler.add_request(make_request("b", 10, 10, clock.now, tenant="y"))
    scheduler.add_request(make_request("c", 10, 10, clock.now, tenant="x"))
    run = Run(scheduler, clock)
    run.step()
    running = {r.request_id for r in scheduler.running}
    assert running == {"b", "c"}  # the shorter two, one per tenant; "a" waits
    committed = scheduler.committed(exclude=())
    out, costs = scheduler.output_estimate, scheduler.fairness.vtc
    for rid in running:
        request = scheduler.requests[rid]
        assert request.num_output_tokens == 1  # prompt computed, first token sampled
        expected = (out.predict(request.max_tokens) - 1) * costs.output_token
        assert committed[scheduler.tracked[rid].info.tenant] == pytest.approx(expected)
    assert scheduler.committed(exclude=running) == {}  # ordering the running: none counted
    run.until_idle()
    assert scheduler.committed(exclude=()) == {}


def test_aborted_requests_are_forgotten() -> None:
    from vllm.v1.request import RequestStatus

    scheduler, clock = make_scheduler(WT, num_blocks=20, max_num_seqs=2)
    for i in range(4):
        scheduler.add_request(make_request(f"r{i}", 40, 20, clock.now))
    run = Run(scheduler, clock)
    run.step()
    scheduler.finish_requests(["r0", "r3"], RequestStatus.FINISHED_ABORTED)
    run.until_idle()
    assert set(run.finished) == {"r1", "r2"}
    check_no_leaks(scheduler, 20)


@pytest.mark.parametrize(("seed", "exponent"), [(0, 2.0), (1, 1.0), (2, 4.0)])
def test_stress_no_starvation_no_leaks(seed: int, exponent: float) -> None:
    """Seeded random overload: 150 requests (lengths mixed 1:10) arrive in 3 s of simulated
    time onto a server that needs far longer to serve them, with KV blocks for only a few at
    once (preemptions happen). With a 2 s starvation bound every request is admitted within the
    bound plus the time to serve the requests that were already starved before it; and all
    finish, with every KV block returned. Whatever the service-time exponent (the default 2,
    HRRN's 1, the most short-biased 4)."""
    rng = random.Random(seed)
    max_wait = 2.0
    config = FairnessConfig(max_wait_s=max_wait, service_exponent=exponent)
    scheduler, clock = make_scheduler(config, num_blocks=30, max_num_seqs=6,
                                      max_num_batched_tokens=128)  # fmt: skip
    run = Run(scheduler, clock, step_s=0.01)
    arrivals = sorted(rng.uniform(0, 3.0) for _ in range(150))
    start = clock.now
    pending = [
        make_request(f"r{i}", rng.choice([16, 64, 160]), rng.choice([4, 40]), start + t)
        for i, t in enumerate(arrivals)
    ]
    while pending or scheduler.has_requests():
        while pending and pending[0].arrival_time <= clock.now:
            scheduler.add_request(pending.pop(0))
        if scheduler.has_requests():
            run.step()
        else:
            clock.now = pending[0].arrival_time
    assert len(run.finished) == 150
    check_no_leaks(scheduler, 30)
    waits = {r: run.first_scheduled[r] - scheduler_arrival for r, scheduler_arrival in
             ((f"r{i}", start + t) for i, t in enumerate(arrivals))}  # fmt: skip
    # Starved requests are admitted oldest first.
    starved = [r for r in run.order if waits[r] > max_wait + 0.011]
    starved_arrivals = [start + arrivals[int(r[1:])] for r in starved]
    assert starved_arrivals == sorted(starved_arrivals)
    assert starved, "the workload must overload the server for the bound to matter"
    # Bound: once starved, a request is overtaken only by requests starved before it.
    for r in starved:
        became_starved = start + arrivals[int(r[1:])] + max_wait
        ahead = [x for x in run.order if became_starved <= run.first_scheduled[x] <
                 run.first_scheduled[r]]  # fmt: skip
        assert all(x in starved and waits[x] > max_wait for x in ahead), (r, ahead)


@pytest.mark.parametrize(("policy", "low", "high"), [("fcfs", 0.0, 0.6), (WT.policy, 0.9, 1.0)])
def test_jain_gauge_over_backlogged_tenants(policy: str, low: float, high: float) -> None:
    """Both tenants keep requests waiting all through the first 5-second window. FCFS serves
    heavy's earlier backlog alone in it (Jain 0.5); weighted-turnaround shares the server."""
    from prometheus_client import REGISTRY

    from adaptivellm.scheduler.policies import FAIRNESS_WINDOW_S

    scheduler, clock = make_scheduler(FairnessConfig(policy=policy), num_blocks=80, max_num_seqs=1)
    for tenant in ("heavy", "light"):
        for i in range(8):
            scheduler.add_request(make_request(f"{tenant}-{i}", 16, 20, clock.now, tenant=tenant))
            clock.now += 0.001
    run, start = Run(scheduler, clock, step_s=0.1), clock.now
    while clock.now < start + FAIRNESS_WINDOW_S + 0.5:  # one window closed, the next one under way
        run.step()
    jain = REGISTRY.get_sample_value("adaptivellm_tenant_jain_index", {"rank": "0"})
    assert jain is not None and low <= jain <= high


@pytest.mark.parametrize("policy", ["fcfs", "vtc", WT.policy])
def test_served_tokens_count_every_computed_token_per_tenant(policy: str) -> None:
    """The tenant counters (and their metric, added to once per tenant and step) hold each
    tenant's prompt tokens and computed output tokens (all but the last sampled one)."""
    from prometheus_client import REGISTRY

    def metric(tenant: str) -> float:
        labels = {"tenant": tenant}
        return REGISTRY.get_sample_value("adaptivellm_tenant_served_tokens_total", labels) or 0.0

    scheduler, clock = make_scheduler(FairnessConfig(policy=policy), num_blocks=200, max_num_seqs=3)
    rng = random.Random(5)
    expected = {"a": 0, "b": 0, "c": 0}
    before = {t: metric(t) for t in expected}
    for i in range(15):
        tenant, prompt, out = "abc"[i % 3], rng.randint(4, 90), rng.randint(1, 12)
        scheduler.add_request(make_request(f"r{i}", prompt, out, clock.now, tenant=tenant))
        expected[tenant] += prompt + out - 1
    Run(scheduler, clock).until_idle()
    assert dict(scheduler.served_tokens) == expected
    assert {t: metric(t) - before[t] for t in expected} == expected


def test_waiting_tenants_stops_once_every_asked_tenant_is_seen() -> None:
    scheduler, clock = make_scheduler(FairnessConfig(), num_blocks=40, max_num_seqs=1)
    for i, tenant in enumerate(["a", "b", "a", "c", "b"]):
        scheduler.add_request(make_request(f"r{i}", 16, 4, clock.now, tenant=tenant))
    assert scheduler._waiting_tenants(None) == {"a", "b", "c"}
    assert scheduler._waiting_tenants({"a", "b"}) == {"a", "b"}
    assert scheduler._waiting_tenants({"c", "gone"}) == {"c"}
    assert scheduler._waiting_tenants(set()) == set()


def preempt_for_short(
    config: FairnessConfig, shorts: int = 1, mode: str = "recompute"
) -> tuple[Run, AdaptiveScheduler]:
    """One batch slot; a long request runs 20 steps, then short requests arrive one by one,
    each as soon as the previous one has finished."""
    scheduler, clock = make_scheduler(config, num_blocks=40, max_num_seqs=1, preemption=mode,
                                      swap_slots=40 if mode != "recompute" else 0)  # fmt: skip
    scheduler.add_request(make_request("long", 16, 200, clock.now))
    run = Run(scheduler, clock)
    for _ in range(20):
        run.step()
    for i in range(shorts):
        scheduler.add_request(make_request(f"short{i}", 16, 4, clock.now))
        while f"short{i}" not in run.finished and scheduler.has_requests():
            run.step()
    run.until_idle()
    check_no_leaks(scheduler, 40)
    return run, scheduler


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_a_short_request_preempts_a_long_one_when_every_slot_is_taken(mode: str) -> None:
    run, scheduler = preempt_for_short(WT, mode=mode)
    assert run.preempted == ["long"]
    assert run.finished["short0"] < run.finished["long"]
    assert [d.mode for d in scheduler.advisor.decisions] == ([mode] if mode == "swap" else [])


def test_fairness_preemption_can_be_turned_off_and_fcfs_never_does_it() -> None:
    for config in (FairnessConfig(preemption=TurnaroundPreemption(enabled=False)),
                   FairnessConfig(policy="fcfs")):  # fmt: skip
        run, _ = preempt_for_short(config)
        assert not run.preempted
        assert run.finished["short0"] > run.finished["long"]


def test_a_request_loses_its_slot_at_most_max_per_request_times() -> None:
    # HRRN's key (exponent 1): the preempted long request resumes whenever a short one finishes,
    # so each new short one must preempt it again. (With the default exponent 2 the shorts
    # simply go first from the queue, one preemption in all: see the next test.)
    run, _ = preempt_for_short(FairnessConfig(service_exponent=1.0), shorts=5)
    assert run.preempted == ["long", "long"]
    assert all(run.finished[f"short{i}"] < run.finished["long"] for i in range(2))
    assert all(run.finished[f"short{i}"] > run.finished["long"] for i in range(2, 5))


def test_with_the_default_exponent_short_requests_go_before_a_preempted_long_one() -> None:
    run, _ = preempt_for_short(WT, shorts=5)
    assert run.preempted == ["long"]
    assert all(run.finished[f"short{i}"] < run.finished["long"] for i in range(5))


def prefill_steps(
    config: FairnessConfig, alone: bool = False, max_num_seqs: int = 4
) -> tuple[list[dict[str, int]], Run]:
    """A decoding request runs (unless `alone`); a 240-token prompt arrives, and an 8-token one
    one step later. Returns the tokens scheduled per request in each step until the long
    prompt is computed."""
    scheduler, clock = make_scheduler(config, num_blocks=60, max_num_seqs=max_num_seqs)
    run = Run(scheduler, clock)
    if not alone:
        scheduler.add_request(make_request("decoder", 16, 40, clock.now))
        run.step()
    scheduler.add_request(make_request("long", 240, 2, clock.now))
    steps = [dict(run.step().num_scheduled_tokens)]
    scheduler.add_request(make_request("short", 8, 2, clock.now))
    while scheduler.requests["long"].num_computed_tokens < 240:
        steps.append(dict(run.step().num_scheduled_tokens))
    run.until_idle()
    check_no_leaks(scheduler, 60)
    return steps, run


#: 1 ms per prompt token: --max-step-s 0.1 allows 100 tokens a step.
SLOW_PREFILL = ServiceModel(prefill_s_per_token=0.001)


def test_max_step_s_prefills_a_long_prompt_in_chunks_and_lets_a_newcomer_in() -> None:
    config = FairnessConfig(learn_service=False, service=SLOW_PREFILL, max_step_s=0.1)
    steps, _ = prefill_steps(config)
    assert all(sum(step.values()) <= 100 for step in steps)
    assert len(steps) >= 3
    assert all("decoder" in step for step in steps)  # its decode goes on meanwhile
    # Alone with its prompt, the long request takes the whole capped step (the decode 1).
    assert steps[0]["long"] == 99
    # The newcomer is admitted, its prompt in full, in the first step after it arrived: the
    # long prompt's chunk is held to half the step while it waits.
    assert steps[1].get("short") == 8 and steps[1]["long"] <= 50


def test_with_no_free_slot_the_long_prompt_keeps_the_whole_capped_step() -> None:
    """Every batch slot is taken (the decoder and the long request, --max-num-seqs 2): the
    newcomer cannot be admitted, so the long prompt's chunk is not halved for it."""
    config = FairnessConfig(
        learn_service=False,
        service=SLOW_PREFILL,
        max_step_s=0.1,
        preemption=TurnaroundPreemption(enabled=False),
    )
    steps, _ = prefill_steps(config, max_num_seqs=2)
    assert len(steps) == 3  # 99 + 99 + 42 prompt tokens
    assert all(step.get("long") == 99 for step in steps[:-1])  # 99 + the decode = 100
    assert all("short" not in step for step in steps)


@pytest.mark.parametrize(
    "config",
    [FairnessConfig(learn_service=False, service=SLOW_PREFILL, max_step_s=0.0),
     FairnessConfig(policy="fcfs", learn_service=False, service=SLOW_PREFILL, max_step_s=0.1)],
)  # fmt: skip
def test_without_the_step_cap_the_long_prompt_takes_one_step(config: FairnessConfig) -> None:
    steps, _ = prefill_steps(config)
    assert len(steps) == 1 and steps[0]["long"] == 240


def test_a_request_alone_is_not_capped() -> None:
    config = FairnessConfig(learn_service=False, service=SLOW_PREFILL, max_step_s=0.1)
    steps, _ = prefill_steps(config, alone=True)
    assert steps == [{"long": 240}]


@pytest.mark.parametrize("candidates", [1, 2])
def test_a_short_request_behind_a_long_head_of_queue_may_preempt(candidates: int) -> None:
    """The head (a long request that has waited longest) would not gain enough from a
    preemption; with two candidates the short request behind it does, and takes the running
    long one's slot at once (the head keeps its place for the next slot to free). With the
    head alone as candidate (the default) nothing is preempted."""
    rule = TurnaroundPreemption(candidates=candidates)
    # HRRN's key (exponent 1), under which the long request that waited longer is the head.
    config = FairnessConfig(learn_service=False, preemption=rule, service_exponent=1.0)
    scheduler, clock = make_scheduler(config, num_blocks=40, max_num_seqs=1)
    scheduler.add_request(make_request("long", 16, 200, clock.now))
    run = Run(scheduler, clock)
    for _ in range(20):
        run.step()
    scheduler.add_request(make_request("waiting-long", 16, 300, clock.now - 0.5))
    scheduler.add_request(make_request("short", 16, 4, clock.now))
    assert [r.request_id for r in scheduler.waiting] == ["waiting-long", "short"]
    scheduler._reorder(scheduler.waiting, clock.now)
    assert scheduler.waiting.peek_request().request_id == "waiting-long"  # the head
    out = run.step()
    if candidates == 1:
        assert not out.preempted_req_ids and "short" not in out.num_scheduled_tokens
        return
    assert list(out.preempted_req_ids or ()) == ["long"]
    assert "short" in out.num_scheduled_tokens
    run.until_idle()
    check_no_leaks(scheduler, 40)
    assert run.finished["short"] < run.finished["long"]


def _steps_metric() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("adaptivellm_scheduler_steps_total") or 0.0


def test_step_metrics_are_held_back_while_busy_and_written_when_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-step metrics, and the per-request histograms of the requests scheduled and
    finished meanwhile, are written at most every METRICS_FLUSH_S while requests run (each
    write is a multi-process file write in the engine core), and all of them once none is
    left: a scrape of an idle engine sees every step, every tenant's tokens and every
    request."""
    from prometheus_client import REGISTRY

    from adaptivellm.scheduler import observer

    def counts() -> tuple[float, ...]:
        names = ("queue_wait_seconds", "weighted_turnaround", "output_length_prediction_error")
        return tuple(REGISTRY.get_sample_value(f"adaptivellm_{n}_count") or 0.0 for n in names)

    monkeypatch.setattr(observer, "METRICS_FLUSH_S", 3600.0)
    scheduler, clock = make_scheduler(FairnessConfig(policy="fcfs"), num_blocks=60)
    before, counts_before = _steps_metric(), counts()
    scheduler.add_request(make_request("r0", 20, 6, clock.now, tenant="held"))
    scheduler.add_request(make_request("r1", 20, 2, clock.now, tenant="held"))
    run, steps = Run(scheduler, clock), 0
    for _ in range(3):
        steps += run.step().total_num_scheduled_tokens > 0
    assert "r1" in run.finished and "r0" not in run.finished
    assert steps == 3 and _steps_metric() == before  # three steps run, none written yet
    assert counts() == counts_before  # two requests scheduled, one finished: none written
    while scheduler.has_requests():
        steps += run.step().total_num_scheduled_tokens > 0
    assert _steps_metric() - before == steps
    assert [n - b for n, b in zip(counts(), counts_before, strict=True)] == [2, 2, 2]


def test_aborting_the_last_requests_writes_the_held_back_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prometheus_client import REGISTRY
    from vllm.v1.request import RequestStatus

    from adaptivellm.scheduler import observer

    monkeypatch.setattr(observer, "METRICS_FLUSH_S", 3600.0)
    scheduler, clock = make_scheduler(FairnessConfig(policy="fcfs"), num_blocks=60)
    before = _steps_metric()
    tokens_before = REGISTRY.get_sample_value(
        "adaptivellm_tenant_served_tokens_total", {"tenant": "aborts"}
    )
    for i in range(2):
        scheduler.add_request(make_request(f"a{i}", 24, 50, clock.now, tenant="aborts"))
    run = Run(scheduler, clock)
    for _ in range(4):
        run.step()
    assert _steps_metric() == before
    scheduler.finish_requests(["a0"], RequestStatus.FINISHED_ABORTED)
    assert _steps_metric() == before  # a1 still runs
    scheduler.finish_requests(["a1"], RequestStatus.FINISHED_ABORTED)
    assert _steps_metric() == before + 4
    served = REGISTRY.get_sample_value(
        "adaptivellm_tenant_served_tokens_total", {"tenant": "aborts"}
    )
    assert served is not None and served - (tokens_before or 0.0) == sum(
        scheduler.served_tokens.values()
    )


def test_step_metrics_are_written_every_flush_interval_while_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from adaptivellm.scheduler import observer

    monkeypatch.setattr(observer, "METRICS_FLUSH_S", 0.0)  # every step
    scheduler, clock = make_scheduler(FairnessConfig(policy="fcfs"), num_blocks=60)
    before = _steps_metric()
    scheduler.add_request(make_request("b0", 20, 30, clock.now, tenant="busy"))
    run = Run(scheduler, clock)
    for _ in range(3):
        run.step()
    assert _steps_metric() - before >= 2  # the third step's flush wrote the first two or more
