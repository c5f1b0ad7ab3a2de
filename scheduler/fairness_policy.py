"""Fairness policies as objects, one per `--fairness` value, built by `create_fairness_policy`
(in the spirit of vLLM's `create_request_queue(policy)`): the scheduler asks its policy instead
of comparing policy names.

First step of #32 item 1: the policies order requests and say which of the scheduler's
weighted-turnaround rules apply; their state (tenant ledger, service fit, output estimate) is
still the scheduler's, read through the scheduler passed to `order`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol

from adaptivellm.scheduler.config import FairnessConfig
from adaptivellm.scheduler.policies import RequestInfo, order_by_turnaround, vtc_order

if TYPE_CHECKING:
    from vllm.v1.request import Request

    from adaptivellm.scheduler.scheduler import AdaptiveScheduler


class FairnessPolicy(Protocol):
    queue: Literal["fcfs", "priority"]
    """vLLM's waiting-queue policy underneath."""
    reorders: bool
    """AdaptiveLLM re-orders the queue and keeps per-tenant counters (False: vLLM's order)."""
    turnaround: bool
    """Weighted-turnaround's rules apply: preemption for turnaround and the step-time cap."""

    def order(
        self,
        scheduler: AdaptiveScheduler,
        requests: dict[str, Request],
        infos: list[RequestInfo],
        now: float,
    ) -> list[RequestInfo]:
        """`infos` (of `requests`), most deserving first."""
        ...


class PassThrough:
    """fcfs and priority: vLLM's own queue, no re-ordering."""

    reorders = False
    turnaround = False

    def __init__(self, queue: Literal["fcfs", "priority"]) -> None:
        self.queue = queue

    def order(
        self,
        scheduler: AdaptiveScheduler,
        requests: dict[str, Request],
        infos: list[RequestInfo],
        now: float,
    ) -> list[RequestInfo]:
        return infos


class VirtualTokenCounter:
    """vtc: the tenant with the smallest weighted counter goes next (policies.vtc_order)."""

    queue: Literal["fcfs", "priority"] = "fcfs"
    reorders = True
    turnaround = False

    def order(
        self,
        scheduler: AdaptiveScheduler,
        requests: dict[str, Request],
        infos: list[RequestInfo],
        now: float,
    ) -> list[RequestInfo]:
        return vtc_order(infos, scheduler.vtc_counters)


class WeightedTurnaround:
    """weighted-turnaround: policies.order_by_turnaround, with preemption for turnaround and
    the step-time cap."""

    queue: Literal["fcfs", "priority"] = "fcfs"
    reorders = True
    turnaround = True

    def order(
        self,
        scheduler: AdaptiveScheduler,
        requests: dict[str, Request],
        infos: list[RequestInfo],
        now: float,
    ) -> list[RequestInfo]:
        s = scheduler
        progress = {i: (r.num_output_tokens, r.num_computed_tokens)
                    for i, r in requests.items()
                    if r.num_output_tokens or r.num_computed_tokens}  # fmt: skip
        return order_by_turnaround(infos, now, s.service, s.output_estimate,
                                   s.fairness.max_wait_s, s.vtc_counters, s.tenant_slack,
                                   s.fairness.vtc, s.fairness.service_exponent,
                                   s._committed(exclude=requests), progress)  # fmt: skip


def create_fairness_policy(config: FairnessConfig) -> FairnessPolicy:
    """The policy object of `config.policy` (validated by FairnessConfig)."""
    if config.policy == "vtc":
        return VirtualTokenCounter()
    if config.policy == "weighted-turnaround":
        return WeightedTurnaround()
    return PassThrough("priority" if config.policy == "priority" else "fcfs")
