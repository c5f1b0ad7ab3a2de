"""Fairness policies as objects, one per `--fairness` value, built by `create_fairness_policy`
(in the spirit of vLLM's `create_request_queue(policy)`): the scheduler asks its policy instead
of comparing policy names.

A policy orders the waiting queue and the victims, names the running request to preempt for a
waiting one, and sets each step's token budget (the last two: weighted-turnaround only). It owns
its state: the tenant ledger (per-tenant virtual token counters and live requests;
`TenantLedger`) and, for weighted-turnaround, the tenant slack. The scheduler calls the ledger's
hooks as requests arrive, are scheduled and finish. What every policy shares, the learned
service-time model and the output-length estimate, stays the scheduler's (its gauges and
metrics are published under every policy); a policy reads them through `SchedulerView`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from adaptivellm.scheduler.config import FairnessConfig, VTCWeights
from adaptivellm.scheduler.policies import (
    OutputLengthEstimate,
    RequestInfo,
    RunningInfo,
    ServiceModel,
    choose_turnaround_victim,
    idle_counters_to_drop,
    order_by_turnaround,
    vtc_charge,
    vtc_lift,
    vtc_order,
)

if TYPE_CHECKING:
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

#: The fewest prompt tokens a step capped by --max-step-s may schedule.
MIN_STEP_TOKENS = 64


@dataclass(frozen=True)
class StepLoad:
    """What is in the engine as a step is scheduled (for the step budget)."""

    requests: int
    """Requests in the engine: running, waiting and waiting for streaming input."""
    running: int
    chunked_prefill: bool
    """vLLM's chunked prefill is on (without it a prompt cannot be split)."""


class SchedulerView(Protocol):
    """What a policy reads of the scheduler."""

    @property
    def service(self) -> ServiceModel:
        """The service-time model requests are ranked with."""
        ...

    @property
    def output_estimate(self) -> OutputLengthEstimate: ...

    def committed(self, exclude: Container[str]) -> dict[str, float]:
        """Per tenant, the predicted cost still to be charged for its running requests but
        those in `exclude`."""
        ...

    def step_load(self) -> StepLoad:
        """What is in the engine now."""
        ...

    def prefilling(self) -> int:
        """Requests with prompt tokens to compute this step: running ones in their prompt, and
        waiting ones with a free batch slot to go to."""
        ...


class TenantLedger:
    """Per-tenant virtual token counters (VTC) and live requests.

    `keeps_counters` False (fcfs, priority): only live requests are counted. A tenant's counter
    is lifted to the least active one when it becomes active (its first live request), so idle
    time banks no credit; a tenant already waiting keeps its deficit. When a tenant goes idle,
    the idle counters that no longer matter are dropped (policies.idle_counters_to_drop)."""

    def __init__(self, costs: VTCWeights, keeps_counters: bool) -> None:
        self.costs = costs
        self.keeps_counters = keeps_counters
        self.counters: dict[str, float] = {}
        #: Live (tracked) requests per active tenant; a tenant with none is idle.
        self.live: dict[str, int] = defaultdict(int)
        #: Counter of the tenant that went idle last (vtc_lift's floor with no tenant active).
        self.last_left = 0.0

    def admit(self, tenant: str) -> None:
        """A new live request of `tenant`."""
        self.live[tenant] += 1
        if self.keeps_counters and self.live[tenant] == 1:
            self.counters[tenant] = vtc_lift(self.counters, tenant, self.live, self.last_left)

    def charge(self, tenant: str, prompt: int, output: int, weight: float) -> None:
        """`prompt` prompt and `output` output tokens of a request of `tenant` were scheduled."""
        self.counters[tenant] = vtc_charge(
            self.counters.get(tenant, 0.0), prompt, output, weight, self.costs
        )

    def leave(self, tenant: str) -> None:
        """One live request of `tenant` is gone."""
        self.live[tenant] -= 1
        if self.live[tenant] > 0:
            return
        del self.live[tenant]
        if self.keeps_counters:
            self.last_left = self.counters.get(tenant, 0.0)
            for idle in idle_counters_to_drop(self.counters, self.live, self.last_left):
                del self.counters[idle]


class FairnessPolicy(Protocol):
    queue: Literal["fcfs", "priority"]
    """vLLM's waiting-queue policy underneath."""
    reorders: bool
    """AdaptiveLLM re-orders the queue (False: vLLM's order)."""
    preempts_for_turnaround: bool
    """`turnaround_victim` may name a victim (weighted-turnaround with --fairness-preemption)."""
    ledger: TenantLedger

    def order(
        self,
        infos: list[RequestInfo],
        requests: Mapping[str, Request],
        now: float,
        view: SchedulerView,
    ) -> list[RequestInfo]:
        """`infos` (of `requests`), most deserving first."""
        ...

    def order_victims(
        self,
        infos: list[RequestInfo],
        requests: Mapping[str, Request],
        now: float,
        view: SchedulerView,
    ) -> list[RequestInfo]:
        """The running `infos`, most deserving first: vLLM preempts from the end."""
        ...

    def turnaround_victim(
        self,
        candidate: RequestInfo,
        running: Sequence[RunningInfo],
        now: float,
        view: SchedulerView,
    ) -> RequestInfo | None:
        """The running request to preempt so that `candidate` takes its batch slot, or None."""
        ...

    def step_budget(self, full: int, view: SchedulerView) -> tuple[int, int]:
        """This step's token budget and the most prompt tokens one request may take in it (0:
        vLLM's own --long-prefill-token-threshold); vLLM's is `full`."""
        ...


class PassThrough:
    """fcfs and priority: vLLM's own queue, no re-ordering."""

    reorders = False
    preempts_for_turnaround = False

    def __init__(self, queue: Literal["fcfs", "priority"], config: FairnessConfig) -> None:
        self.queue = queue
        self.ledger = TenantLedger(config.vtc, keeps_counters=False)

    def order(
        self,
        infos: list[RequestInfo],
        requests: Mapping[str, Request],
        now: float,
        view: SchedulerView,
    ) -> list[RequestInfo]:
        return infos

    def order_victims(
        self,
        infos: list[RequestInfo],
        requests: Mapping[str, Request],
        now: float,
        view: SchedulerView,
    ) -> list[RequestInfo]:
        return self.order(infos, requests, now, view)

    def turnaround_victim(
        self,
        candidate: RequestInfo,
        running: Sequence[RunningInfo],
        now: float,
        view: SchedulerView,
    ) -> RequestInfo | None:
        return None

    def step_budget(self, full: int, view: SchedulerView) -> tuple[int, int]:
        return full, 0


class VirtualTokenCounter(PassThrough):
    """vtc: the tenant with the smallest weighted counter goes next (policies.vtc_order)."""

    reorders = True

    def __init__(self, config: FairnessConfig) -> None:
        self.queue = "fcfs"
        self.ledger = TenantLedger(config.vtc, keeps_counters=True)

    def order(
        self,
        infos: list[RequestInfo],
        requests: Mapping[str, Request],
        now: float,
        view: SchedulerView,
    ) -> list[RequestInfo]:
        return vtc_order(infos, self.ledger.counters)


class WeightedTurnaround(VirtualTokenCounter):
    """weighted-turnaround: policies.order_by_turnaround, with preemption for turnaround and
    the step-time cap."""

    def __init__(self, config: FairnessConfig, max_model_len: int) -> None:
        super().__init__(config)
        self.config = config
        self.preempts_for_turnaround = config.preemption.enabled
        #: Counter units a tenant ahead may still be served within (order_by_turnaround).
        self.tenant_slack = config.tenant_slack(max_model_len)
        logger.info(
            "weighted-turnaround: service-time exponent %g, tenant slack %g counter units%s, "
            "starvation bound %g s, step cap %g s",
            config.service_exponent,
            self.tenant_slack,
            " (auto)" if config.tenant_slack_tokens is None else "",
            config.max_wait_s,
            config.max_step_s,
        )

    def order(
        self,
        infos: list[RequestInfo],
        requests: Mapping[str, Request],
        now: float,
        view: SchedulerView,
    ) -> list[RequestInfo]:
        c = self.config
        progress = {i: (r.num_output_tokens, r.num_computed_tokens)
                    for i, r in requests.items()
                    if r.num_output_tokens or r.num_computed_tokens}  # fmt: skip
        # The work committed to running requests only matters between tenants (the slack
        # test); with one tenant among `infos` every request is owed, so it is not summed.
        one_tenant = len({i.tenant for i in infos}) <= 1
        committed = {} if one_tenant else view.committed(exclude=requests)
        return order_by_turnaround(infos, now, view.service, view.output_estimate, c.max_wait_s,
                                   self.ledger.counters, self.tenant_slack, c.vtc,
                                   c.service_exponent, committed, progress)  # fmt: skip

    def turnaround_victim(
        self,
        candidate: RequestInfo,
        running: Sequence[RunningInfo],
        now: float,
        view: SchedulerView,
    ) -> RequestInfo | None:
        c = self.config
        return choose_turnaround_victim(candidate, running, now, view.service,
                                        view.output_estimate, c.preemption, c.max_wait_s,
                                        self.ledger.counters, self.tenant_slack)  # fmt: skip

    def step_budget(self, full: int, view: SchedulerView) -> tuple[int, int]:
        """With --max-step-s, chunked prefill on and at least two requests in the engine: about
        max_step_s of prefill by the service model (never below MIN_STEP_TOKENS plus one token
        per running request, for their decodes), so a long prompt goes in chunks while the
        running requests keep decoding. vLLM schedules running requests first, so when two or
        more requests have prompt tokens to compute, one request's chunk is held to half the
        budget: a long prompt being prefilled leaves the other half to admit the waiting
        requests (a short prompt in full) this step, not after it. On a fast device the cap is
        above vLLM's budget, which then stands unchanged."""
        limit = self.config.max_step_s
        if limit <= 0:
            return full, 0
        per_token = view.service.prefill_s_per_token
        capped = int(limit / per_token) if per_token > 0 else full
        if capped >= full:  # a fast device: the cap is above vLLM's budget in any load
            return full, 0
        load = view.step_load()
        if not load.chunked_prefill or load.requests < 2:
            return full, 0
        budget = max(capped, MIN_STEP_TOKENS + load.running)
        if budget >= full:
            return full, 0
        return budget, (budget // 2 if view.prefilling() >= 2 else 0)


def waiting_queue(config: FairnessConfig) -> Literal["fcfs", "priority"]:
    """vLLM's waiting-queue policy under `config.policy` (vLLM's --scheduling-policy)."""
    return "priority" if config.policy == "priority" else "fcfs"


def policy_class(config: FairnessConfig) -> type[PassThrough]:
    """The class of `config.policy` (validated by FairnessConfig)."""
    classes: dict[str, type[PassThrough]] = {
        "vtc": VirtualTokenCounter,
        "weighted-turnaround": WeightedTurnaround,
    }
    return classes.get(config.policy, PassThrough)


def reorders(config: FairnessConfig) -> bool:
    """AdaptiveLLM orders the requests under `config.policy` (False: vLLM's own order)."""
    return policy_class(config).reorders


def create_fairness_policy(config: FairnessConfig, max_model_len: int) -> FairnessPolicy:
    """The policy object of `config.policy`."""
    cls = policy_class(config)
    if cls is WeightedTurnaround:
        return WeightedTurnaround(config, max_model_len)
    if cls is VirtualTokenCounter:
        return VirtualTokenCounter(config)
    return PassThrough(waiting_queue(config), config)
