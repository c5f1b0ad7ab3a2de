"""Many requests on one server: the throughput each placement method lets the server sustain.

A mix is a list of request types (model, client, link, prompt, output, SLA), each arriving in
equal share. A server of capacity C FLOP/s spends, per request, the server workload of the
placement its planner chose, so it sustains C / mean(workload) requests per second before it
saturates. Pure functions over the planner's dataclasses; no vLLM, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from adaptivellm.split_client.planner import (
    ClientProfile,
    ModelShape,
    Plan,
    Request,
    ServerProfile,
    SplitCosts,
    build_costs,
    plan_dp,
    plan_greedy,
    plan_prefix,
    plan_server_only,
)

Planner = Callable[[SplitCosts], Plan]

#: The methods compared by `evaluate_mix` unless told otherwise.
DEFAULT_PLANNERS: Final[Mapping[str, Planner]] = {
    "server-only": plan_server_only,
    "greedy": plan_greedy,
    "prefix": plan_prefix,
    "dp": plan_dp,
}


def plan_all(
    costs: SplitCosts, planners: Mapping[str, Planner] = DEFAULT_PLANNERS
) -> dict[str, Plan]:
    """Each planner's plan for `costs`, by name."""
    return {name: plan(costs) for name, plan in planners.items()}


@dataclass(frozen=True)
class Scenario:
    """One request type of a mix: who asks, over which link, for what, within which SLA."""

    shape: ModelShape
    client: ClientProfile
    server: ServerProfile
    request: Request

    def costs(self) -> SplitCosts:
        """The planner's view of this request."""
        return build_costs(self.shape, self.client, self.server, self.request)


@dataclass(frozen=True)
class MixResult:
    """How one placement method fares on a whole mix."""

    method: str
    #: Mean server FLOPs per request.
    mean_server_workload: float
    #: Requests per second the server sustains: capacity / mean workload.
    throughput_rps: float
    #: Fraction of requests whose placement meets their SLA.
    sla_attainment: float


def sustained_throughput(workloads: Sequence[float], capacity_flops_per_s: float) -> float:
    """Requests/s a server of the given capacity sustains on a mix with these workloads."""
    if not (capacity_flops_per_s > 0 and math.isfinite(capacity_flops_per_s)):
        raise ValueError(f"capacity_flops_per_s must be finite and > 0, got {capacity_flops_per_s}")
    if not workloads:
        raise ValueError("a mix needs at least one request")
    mean = sum(workloads) / len(workloads)
    return capacity_flops_per_s / mean if mean > 0 else math.inf


def summarise(method: str, plans: Sequence[Plan], capacity_flops_per_s: float) -> MixResult:
    """Fold one method's plans for every request of a mix into a `MixResult`."""
    workloads = [plan.server_workload for plan in plans]
    return MixResult(
        method=method,
        mean_server_workload=sum(workloads) / len(workloads),
        throughput_rps=sustained_throughput(workloads, capacity_flops_per_s),
        sla_attainment=sum(plan.feasible for plan in plans) / len(plans),
    )


def evaluate_mix(
    mix: Sequence[Scenario | SplitCosts],
    capacity_flops_per_s: float,
    planners: Mapping[str, Planner] = DEFAULT_PLANNERS,
) -> dict[str, MixResult]:
    """Plan every request of `mix` with each planner and report each method's throughput.

    A request whose SLA no placement meets is still served (with the planner's fallback
    placement) and counts against SLA attainment.
    """
    if not mix:
        raise ValueError("a mix needs at least one request")
    costs = [item.costs() if isinstance(item, Scenario) else item for item in mix]
    return {
        name: summarise(name, [planner(c) for c in costs], capacity_flops_per_s)
        for name, planner in planners.items()
    }
