"""The fairness policies as objects (scheduler/fairness_policy.py), without vLLM: the factory,
the step budget against a hand-made scheduler view, and the tenant ledger. The scheduler's use
of them is tested in test_scheduler_fairness.py and by the golden replay."""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field

import pytest

from adaptivellm.scheduler.config import FairnessConfig, VTCWeights
from adaptivellm.scheduler.fairness_policy import (
    MIN_STEP_TOKENS,
    PassThrough,
    StepLoad,
    TenantLedger,
    VirtualTokenCounter,
    WeightedTurnaround,
    create_fairness_policy,
    reorders,
    waiting_queue,
)
from adaptivellm.scheduler.policies import (
    POLICIES,
    OutputLengthEstimate,
    ServiceModel,
    TurnaroundPreemption,
)


@dataclass
class View:
    """A scheduler as a policy sees it."""

    load: StepLoad = field(default_factory=lambda: StepLoad(3, running=2, chunked_prefill=True))
    prefill_s_per_token: float = 0.001
    prefilling_requests: int = 2
    output_estimate: OutputLengthEstimate = field(default_factory=OutputLengthEstimate)

    @property
    def service(self) -> ServiceModel:
        return ServiceModel(prefill_s_per_token=self.prefill_s_per_token)

    def committed(self, exclude: Container[str]) -> dict[str, float]:
        return {}

    def step_load(self) -> StepLoad:
        return self.load

    def prefilling(self) -> int:
        return self.prefilling_requests


class Untouchable(View):
    """A view that must not be read."""

    def step_load(self) -> StepLoad:
        raise AssertionError("read the engine's load")

    def prefilling(self) -> int:
        raise AssertionError("counted the prefilling requests")


@pytest.mark.parametrize(
    ("name", "cls", "queue", "reorder"),
    [("fcfs", PassThrough, "fcfs", False), ("priority", PassThrough, "priority", False),
     ("vtc", VirtualTokenCounter, "fcfs", True),
     ("weighted-turnaround", WeightedTurnaround, "fcfs", True)],
)  # fmt: skip
def test_the_factory_builds_each_policy(name: str, cls: type, queue: str, reorder: bool) -> None:
    config = FairnessConfig(policy=name)
    policy = create_fairness_policy(config, max_model_len=1024)
    assert type(policy) is cls
    assert policy.queue == waiting_queue(config) == queue
    assert policy.reorders is reorders(config) is reorder
    assert policy.ledger.keeps_counters is reorder
    assert policy.preempts_for_turnaround is (name == "weighted-turnaround")


def test_every_policy_name_has_a_policy() -> None:
    assert {type(create_fairness_policy(FairnessConfig(policy=p), 1024)) for p in POLICIES} == {
        PassThrough, VirtualTokenCounter, WeightedTurnaround
    }  # fmt: skip


def test_turnaround_preemption_can_be_turned_off() -> None:
    config = FairnessConfig(preemption=TurnaroundPreemption(enabled=False))
    assert not create_fairness_policy(config, 1024).preempts_for_turnaround


@pytest.mark.parametrize("name", ["fcfs", "priority", "vtc"])
def test_only_weighted_turnaround_caps_the_step(name: str) -> None:
    """The others keep vLLM's budget without reading the engine's state (a step's cost)."""
    policy = create_fairness_policy(FairnessConfig(policy=name), 1024)
    assert policy.step_budget(2048, Untouchable()) == (2048, 0)


def wt(max_step_s: float = 0.1) -> WeightedTurnaround:
    return WeightedTurnaround(FairnessConfig(max_step_s=max_step_s), max_model_len=1024)


def test_the_step_cap_is_max_step_s_of_prefill_with_half_for_one_chunk() -> None:
    """0.1 s at 1 ms a prompt token: 100 tokens. Two requests prefilling: one may take 50."""
    assert wt().step_budget(2048, View()) == (100, 50)
    assert wt().step_budget(2048, View(prefilling_requests=1)) == (100, 0)


def test_the_step_cap_keeps_vllms_budget_when_it_cannot_or_need_not_apply() -> None:
    assert wt(max_step_s=0).step_budget(2048, Untouchable()) == (2048, 0)  # off
    no_chunks = StepLoad(requests=3, running=2, chunked_prefill=False)
    assert wt().step_budget(2048, View(load=no_chunks)) == (2048, 0)
    alone = StepLoad(requests=1, running=1, chunked_prefill=True)
    assert wt().step_budget(2048, View(load=alone)) == (2048, 0)
    # A fast device: the cap is above vLLM's budget whatever the load, which is not read.
    assert wt().step_budget(64, Untouchable()) == (64, 0)
    assert wt().step_budget(2048, Untouchable(prefill_s_per_token=0.0)) == (2048, 0)


def test_the_step_cap_never_starves_the_running_decodes() -> None:
    """A slow device (1 s a token): the floor is MIN_STEP_TOKENS plus one per running request."""
    load = StepLoad(requests=40, running=30, chunked_prefill=True)
    budget, chunk = wt().step_budget(2048, View(load=load, prefill_s_per_token=1.0))
    assert budget == MIN_STEP_TOKENS + 30
    assert chunk == budget // 2


def test_the_ledger_lifts_a_returning_tenant_and_forgets_idle_ones() -> None:
    ledger = TenantLedger(VTCWeights(), keeps_counters=True)
    ledger.admit("a")
    ledger.charge("a", prompt=100, output=10, weight=1.0)
    ledger.admit("b")  # new while a is active: lifted to a's counter, no credit banked
    assert ledger.counters["b"] == ledger.counters["a"] > 0
    assert dict(ledger.live) == {"a": 1, "b": 1}
    ledger.leave("a")
    ledger.leave("b")
    assert not ledger.live
    plain = TenantLedger(VTCWeights(), keeps_counters=False)
    plain.admit("a")
    plain.leave("a")
    assert not plain.counters and not plain.live


class Uncommitted(View):
    """A view whose committed work must not be summed."""

    def committed(self, exclude: Container[str]) -> dict[str, float]:
        raise AssertionError("summed the running requests' committed work")


def test_weighted_turnaround_sums_committed_work_only_between_tenants() -> None:
    """The committed work of running requests feeds the slack test between tenants; with one
    tenant waiting every request is owed, and the per-step sum over the running requests is
    skipped. Two tenants: it is summed."""
    from types import SimpleNamespace

    from adaptivellm.scheduler.policies import RequestInfo

    policy = wt()
    infos = [RequestInfo(f"r{i}", 4.9 + i / 100, 100 * (3 - i), 16, tenant="a") for i in range(3)]
    requests = {i.request_id: SimpleNamespace(num_output_tokens=0, num_computed_tokens=0)
                for i in infos}  # fmt: skip
    ranked = policy.order(infos, requests, 5.0, Uncommitted())  # type: ignore[arg-type]
    assert [i.request_id for i in ranked] == ["r2", "r1", "r0"]  # shortest first
    infos.append(RequestInfo("b0", 4.9, 300, 16, tenant="b"))
    requests["b0"] = SimpleNamespace(num_output_tokens=0, num_computed_tokens=0)
    with pytest.raises(AssertionError, match="committed work"):
        policy.order(infos, requests, 5.0, Uncommitted())  # type: ignore[arg-type]
    policy.ledger.charge("a", 100_000, 0, 1.0)  # a far ahead of b: b's request goes first
    assert policy.order(infos, requests, 5.0, View())[0].request_id == "b0"  # type: ignore[arg-type]
