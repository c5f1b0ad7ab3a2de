"""AdaptiveLLM's code inside vLLM's engine loop never kills it: extreme request values are
bounded, and an error in any of its hooks falls back to vLLM's behaviour for that step (or fails
the one request concerned), counted in adaptivellm_internal_errors_total. Real vLLM scheduler,
no model (tests.scheduler.sim)."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from vllm.v1.request import RequestStatus

from adaptivellm.scheduler import fairness_policy
from adaptivellm.scheduler.config import (
    EFFECTIVE_WEIGHT_RANGE,
    PRIORITY_RANGE,
    FairnessConfig,
    effective_weight,
    finite_or,
)
from adaptivellm.scheduler.fail_safe import QUIET_S, InternalErrors
from adaptivellm.scheduler.policies import (
    OutputLengthEstimate,
    RequestInfo,
    RunningInfo,
    ServiceModel,
    TurnaroundPreemption,
    VTCWeights,
    choose_turnaround_victim,
    order_by_turnaround,
    vtc_charge,
    vtc_order,
)
from adaptivellm.scheduler.scheduler import AdaptiveScheduler, request_info
from adaptivellm.scheduler.swap_connector import BlockCopy, SwapMetadata
from tests.scheduler.sim import Clock, Run, check_no_leaks, make_request, make_scheduler

WT = FairnessConfig(policy="weighted-turnaround")


def counted(where: str) -> float:
    """adaptivellm_internal_errors_total{where} in this process."""
    return REGISTRY.get_sample_value("adaptivellm_internal_errors_total", {"where": where}) or 0.0


def boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected policy bug")


# --- the guard itself ---------------------------------------------------------------------


def test_guard_suppresses_exceptions_counts_them_and_lets_interrupts_through() -> None:
    errors = InternalErrors()
    before = counted("unit")
    with errors.guard("unit", "req-1"):
        raise ValueError("bug")
    assert errors.counts == {"unit": 1}
    assert counted("unit") == before + 1
    with errors.guard("unit"):
        pass  # no error, nothing counted
    assert errors.counts == {"unit": 1}
    with pytest.raises(KeyboardInterrupt), errors.guard("unit"):
        raise KeyboardInterrupt
    assert errors.counts == {"unit": 1}


def test_first_error_is_logged_with_its_traceback_then_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock(0.0)
    errors = InternalErrors(clock=clock)
    with caplog.at_level(logging.ERROR, logger="adaptivellm.scheduler.fail_safe"):
        for _ in range(5):
            with errors.guard("order", "req-7"):
                raise ValueError("bug")
        clock.now += QUIET_S
        with errors.guard("order", "req-8"):
            raise ValueError("bug again")
    assert errors.counts == {"order": 6}
    first, second = caplog.records
    assert first.exc_info is not None and "req-7" in first.getMessage()
    assert "req-8" in second.getMessage() and "4 more" in second.getMessage()


# --- values from requests are bounded ------------------------------------------------------


@pytest.mark.parametrize(
    ("tenant_weight", "weight", "priority", "expected"),
    [(1.0, 1.0, 0, 1.0), (2.0, 0.5, -1, 2.0), (1.0, 1.0, 3, 0.125),
     (1.0, 1.0, -1100, 2.0 ** -PRIORITY_RANGE[0]), (1.0, 1.0, 1100, 2.0 ** -PRIORITY_RANGE[1]),
     (1.0, 1.0, 10**400, 1.0), (1.0, math.nan, 0, 1.0), (1.0, math.inf, 0, 1.0),
     (1.0, -3.0, 0, 1.0), (1.0, 0.0, 0, 1.0), (1.0, "heavy", "high", 1.0), (1.0, True, 0, 1.0),
     (1e3, 1e3, -20, EFFECTIVE_WEIGHT_RANGE[1]), (1e-3, 1e-3, 20, EFFECTIVE_WEIGHT_RANGE[0])],
)  # fmt: skip
def test_effective_weight_is_bounded(
    tenant_weight: float, weight: object, priority: object, expected: float
) -> None:
    assert effective_weight(tenant_weight, weight, priority) == pytest.approx(expected)


def test_finite_or() -> None:
    assert finite_or(3, 0.0) == 3.0
    for bad in (None, "1", math.nan, -math.inf, True, 10**400):
        assert finite_or(bad, 7.0) == 7.0


@pytest.mark.parametrize("policy", ["weighted-turnaround", "vtc", "fcfs", "priority"])
def test_extreme_request_values_are_served_without_an_error(policy: str) -> None:
    """Before the bound, priority -1100 overflowed 2**-priority (OverflowError) and 1100 made
    the weight 0 (ZeroDivisionError in vtc_charge), inside the engine loop. Now every request
    is served, every weight is in range, every counter finite, and nothing needed the guard."""
    scheduler, clock = make_scheduler(FairnessConfig(policy=policy), num_blocks=40)
    extras: list[dict[str, Any] | None] = [
        {"priority": -1100}, {"priority": 1100}, {"priority": 10**400}, {"priority": "x"},
        {"weight": math.nan}, {"weight": math.inf}, {"weight": 0}, {"weight": -1},
        {"tenant": {"not": "a string"}}, {"tenant": "t" * 10_000}, None,
    ]  # fmt: skip
    for i, extra in enumerate(extras):
        request = make_request(f"r{i}", 20, 4, clock.now, priority=0)
        assert request.sampling_params is not None
        request.sampling_params.extra_args = extra
        scheduler.add_request(request)
    for priority in (-1100, 1100):  # vLLM's own request field
        scheduler.add_request(make_request(f"p{priority}", 20, 4, clock.now, priority=priority))
    low, high = EFFECTIVE_WEIGHT_RANGE
    assert all(low <= t.info.weight <= high for t in scheduler.tracked.values())
    assert all(len(t.info.tenant) <= 128 for t in scheduler.tracked.values())
    run = Run(scheduler, clock)
    run.until_idle()
    assert len(run.finished) == len(extras) + 2
    assert all(math.isfinite(c) for c in scheduler.vtc_counters.values())
    assert scheduler.errors.counts == {}
    check_no_leaks(scheduler, 40)


def test_request_info_with_a_huge_priority_field() -> None:
    scheduler, clock = make_scheduler(WT, num_blocks=40)
    request = make_request("p", 10, 2, clock.now, priority=-1100)
    assert request_info(request, scheduler.fairness).weight == 2.0**20


# --- a hook that raises falls back to vLLM's behaviour --------------------------------------


def three_requests(scheduler: AdaptiveScheduler, clock: Clock) -> Run:
    """One batch slot; long, mid and short requests in arrival order; run to the end."""
    for rid, prompt, out in [("long", 100, 60), ("mid", 50, 20), ("short", 10, 2)]:
        scheduler.add_request(make_request(rid, prompt, out, clock.now))
        clock.now += 0.0001
    clock.now += 0.05
    run = Run(scheduler, clock)
    run.until_idle()
    check_no_leaks(scheduler, 40)
    return run


def test_policy_that_raises_leaves_vllms_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fairness_policy, "order_by_turnaround", boom)
    before = counted("order_waiting")
    scheduler, clock = make_scheduler(WT, num_blocks=40, max_num_seqs=1)
    run = three_requests(scheduler, clock)
    assert run.order == ["long", "mid", "short"]  # FCFS, vLLM's own
    assert scheduler.errors.counts["order_waiting"] >= 1
    assert counted("order_waiting") > before


def test_without_the_fault_the_policy_orders_shortest_first() -> None:
    """The control of the test above: the same run reorders when the policy works."""
    scheduler, clock = make_scheduler(WT, num_blocks=40, max_num_seqs=1)
    assert three_requests(scheduler, clock).order == ["short", "mid", "long"]
    assert scheduler.errors.counts == {}


@pytest.mark.parametrize(
    ("target", "where"),
    [("choose_turnaround_victim", "turnaround_preemption"), ("vtc_charge", "accounting"),
     ("idle_counters_to_drop", "finish_accounting"), ("vtc_lift", "track")],
)  # fmt: skip
def test_each_hook_that_raises_is_contained(
    monkeypatch: pytest.MonkeyPatch, target: str, where: str
) -> None:
    monkeypatch.setattr(fairness_policy, target, boom)  # the policies call them
    scheduler, clock = make_scheduler(WT, num_blocks=40, max_num_seqs=1)
    run = three_requests(scheduler, clock)
    assert set(run.finished) == {"long", "mid", "short"}
    assert scheduler.errors.counts.get(where, 0) >= 1


def test_service_fit_and_step_budget_that_raise_are_contained(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scheduler, clock = make_scheduler(WT, num_blocks=40, max_num_seqs=2)
    monkeypatch.setattr(scheduler.service_times.fit, "observe", boom)
    monkeypatch.setattr(scheduler.fairness_policy, "step_budget", boom)
    run = three_requests(scheduler, clock)
    assert len(run.finished) == 3
    assert scheduler.errors.counts["service_fit"] >= 1
    assert scheduler.errors.counts["step_budget"] >= 1


def test_victim_mode_that_raises_recomputes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under KV pressure with the swap connector: a swap-or-recompute decision that raises
    makes that victim a recompute (stock vLLM), and every request still finishes."""
    scheduler, clock = make_scheduler(FairnessConfig(policy="fcfs"), num_blocks=25,
                                      preemption="adaptive", swap_slots=200)  # fmt: skip
    monkeypatch.setattr(scheduler, "_decide", boom)
    for i in range(12):
        scheduler.add_request(make_request(f"r{i}", 100, 80, clock.now))
    run = Run(scheduler, clock)
    run.until_idle()
    assert run.preempted and len(run.finished) == 12
    assert scheduler.errors.counts["preemption_mode"] == len(run.preempted)
    check_no_leaks(scheduler, 25)


def test_a_request_that_cannot_be_served_fails_alone() -> None:
    """_fail finishes the request with an error output at the next step, frees its blocks,
    and the others are served as before."""
    scheduler, clock = make_scheduler(WT, num_blocks=40, max_num_seqs=4)
    for rid in ("a", "doomed", "b"):
        scheduler.add_request(make_request(rid, 30, 5, clock.now))
    run = Run(scheduler, clock)
    run.step()  # all three are running
    scheduler._fail("doomed", "injected", RuntimeError("cannot go on"))
    errors: dict[str, Any] = {}
    while scheduler.has_requests():
        out = scheduler.schedule()
        req_ids = list(out.num_scheduled_tokens)
        from vllm.v1.outputs import ModelRunnerOutput

        runner = ModelRunnerOutput(req_ids=req_ids,
                                   req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                   sampled_token_ids=[[5] for _ in req_ids])  # fmt: skip
        assert "doomed" not in req_ids
        for batch in scheduler.update_from_output(out, runner).values():
            for o in batch.outputs:
                if o.finish_reason is not None:
                    errors[o.request_id] = o.finish_reason
    assert str(errors.pop("doomed")) == "error"
    assert {str(r) for r in errors.values()} == {"length"} and set(errors) == {"a", "b"}
    assert scheduler.errors.counts == {"injected": 1}
    check_no_leaks(scheduler, 40)
    assert RequestStatus.FINISHED_ERROR  # the status vLLM reports as finish_reason "error"


# --- the swap connector's worker side ------------------------------------------------------


def worker_connector() -> Any:
    """The swap connector over a real CPU KV tensor of 25 blocks, 8 host slots."""
    scheduler, _ = make_scheduler(FairnessConfig(policy="fcfs"), num_blocks=25,
                                  preemption="swap", swap_slots=8)  # fmt: skip
    connector = scheduler.advisor.swap
    assert connector is not None and connector.num_slots == 8
    connector.register_kv_caches({"layer": torch.randn(25, 1, 16, 2)})
    return connector


def test_failed_swap_out_copy_turns_its_swap_in_into_a_recompute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connector = worker_connector()
    device, host = connector.device_caches["layer"], connector.host_caches["layer"]
    real_copy = connector._copy
    monkeypatch.setattr(connector, "_copy", boom)
    connector.handle_preemptions(SwapMetadata(swap_outs=[BlockCopy("r", (3, 4), (0, 1))]))
    assert connector.bad_slots == {0, 1} and connector.errors.counts == {"swap_out_copy": 1}
    monkeypatch.setattr(connector, "_copy", real_copy)
    connector.handle_preemptions(SwapMetadata(swap_outs=[BlockCopy("q", (5,), (2,))]))
    ins = [BlockCopy("r", (7, 8), (0, 1)), BlockCopy("q", (9,), (2,))]
    connector.bind_connector_metadata(SwapMetadata(swap_ins=ins))
    connector.start_load_kv(None)
    # r's host copy is garbage: vLLM is told to recompute its blocks; q's is restored.
    assert connector.get_block_ids_with_load_errors() == {7, 8}
    assert connector.get_block_ids_with_load_errors() == set()
    assert torch.equal(device[9], host[2]) and torch.equal(device[9], device[5])
    # A later good swap-out into the same slots makes them good again.
    connector.handle_preemptions(SwapMetadata(swap_outs=[BlockCopy("s", (3, 4), (0, 1))]))
    assert connector.bad_slots == set()


def test_failed_swap_in_copy_reports_every_block_of_the_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connector = worker_connector()
    monkeypatch.setattr(connector, "_copy", boom)
    ins = [BlockCopy("r", (7, 8), (0, 1)), BlockCopy("q", (9,), (2,)), BlockCopy("x", (4,), ())]
    connector.bind_connector_metadata(SwapMetadata(swap_ins=ins))
    connector.start_load_kv(None)
    assert connector.get_block_ids_with_load_errors() == {4, 7, 8, 9}
    assert connector.errors.counts == {"swap_in_copy": 1}


def test_scheduler_side_match_that_raises_recomputes(monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler, clock = make_scheduler(FairnessConfig(policy="fcfs"), num_blocks=25,
                                      preemption="swap", swap_slots=200)  # fmt: skip
    connector = scheduler.advisor.swap
    assert connector is not None
    monkeypatch.setattr(connector, "_matched_tokens", boom)
    for i in range(12):
        scheduler.add_request(make_request(f"r{i}", 100, 80, clock.now))
    run = Run(scheduler, clock)
    run.until_idle()
    assert run.preempted and len(run.finished) == 12
    assert connector.errors.counts["swap_match"] >= 1
    check_no_leaks(scheduler, 25)  # the dropped host copies were released


# --- property tests over the pure policies ---------------------------------------------------

ANY = (
    st.none() | st.booleans() | st.integers(-(10**400), 10**400) | st.floats()
    | st.text(max_size=300) | st.lists(st.integers(), max_size=2)
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    tenant_weight=st.floats(1e-3, 1e3), weight=ANY, priority=ANY, tenant=ANY,
    request_priority=st.integers(-(10**6), 10**6),
)  # fmt: skip
def test_any_request_fields_give_a_bounded_weight_and_a_short_tenant(
    tenant_weight: float, weight: object, priority: object, tenant: object, request_priority: int
) -> None:
    scheduler, clock = make_scheduler(FairnessConfig(tenant_weights={"t": tenant_weight}), 40)
    request = make_request("r", 10, 2, clock.now, priority=request_priority)
    assert request.sampling_params is not None
    request.sampling_params.extra_args = {"weight": weight, "priority": priority, "tenant": tenant}
    info = request_info(request, scheduler.fairness)
    assert EFFECTIVE_WEIGHT_RANGE[0] <= info.weight <= EFFECTIVE_WEIGHT_RANGE[1]
    assert 0 < len(info.tenant) <= 128


INFOS = st.lists(
    st.builds(
        RequestInfo,
        request_id=st.uuids().map(str),
        arrival_time=st.floats(0, 1e9),
        prompt_tokens=st.integers(0, 10**6),
        max_tokens=st.integers(0, 10**6),
        tenant=st.sampled_from(["a", "b", "c"]),
        weight=st.floats(*EFFECTIVE_WEIGHT_RANGE),
    ),
    max_size=12,
    unique_by=lambda i: i.request_id,
)


@settings(max_examples=200, deadline=None)
@given(
    infos=INFOS, now=st.floats(0, 2e9), counters=st.dictionaries(
        st.sampled_from(["a", "b", "c"]), st.floats(0, 1e15)),
    exponent=st.floats(1, 4), slack=st.floats(0, 1e9),
)  # fmt: skip
def test_policies_take_any_bounded_input(
    infos: list[RequestInfo], now: float, counters: dict[str, float], exponent: float,
    slack: float,
) -> None:  # fmt: skip
    """Whatever the (engine-bounded) weights, sizes, times and counters: the policies return a
    permutation of their input, and the victim rule and VTC arithmetic stay finite."""
    model, out = ServiceModel(), OutputLengthEstimate()
    ordered = order_by_turnaround(infos, now, model, out, 60.0, counters, slack,
                                  VTCWeights(), exponent)  # fmt: skip
    assert sorted(i.request_id for i in ordered) == sorted(i.request_id for i in infos)
    assert sorted(map(id, vtc_order(infos, counters))) == sorted(map(id, infos))
    running = [RunningInfo(i, i.max_tokens // 2, i.prompt_tokens) for i in infos[1:]]
    if infos:
        rule = TurnaroundPreemption()
        victim = choose_turnaround_victim(infos[0], running, now, model, out, rule, 60.0,
                                          counters, slack)  # fmt: skip
        assert victim is None or victim in {r.info for r in running}
    for info in infos:
        charged = vtc_charge(counters.get(info.tenant, 0.0), info.prompt_tokens, info.max_tokens,
                             info.weight, VTCWeights())  # fmt: skip
        assert math.isfinite(charged)


def test_every_where_in_the_code_is_listed_and_starts_at_zero() -> None:
    """WHERES (docs/safety.md's table, the series created at start) names every `where` the
    engine-side code uses."""
    import re
    from pathlib import Path

    from adaptivellm.scheduler.fail_safe import WHERES

    root = Path(__file__).resolve().parents[2] / "scheduler"
    pattern = re.compile(r'(?:guard|record)\("([a-z_]+)"|_fail\([^,]+, "([a-z_]+)"')
    used = {a or b for f in root.glob("*.py") for a, b in pattern.findall(f.read_text())}
    used.discard("order")  # the module docstring's example
    assert used <= set(WHERES), used - set(WHERES)
    make_scheduler(WT, num_blocks=40)
    for where in WHERES:
        assert (
            REGISTRY.get_sample_value("adaptivellm_internal_errors_total", {"where": where})
            is not None
        ), where
