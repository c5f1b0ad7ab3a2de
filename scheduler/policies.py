"""Fairness policies as pure functions over small frozen dataclasses.

The scheduler (adaptivellm.scheduler.scheduler) gathers a `RequestInfo` per request, calls these
functions and applies the answer; nothing here touches vLLM.

Weighted turnaround of a request = (finish - arrival) / service time, where service time is its
latency alone on an idle server. The default policy, `weighted-turnaround`, ranks a waiting
request by

    weight * (waited + S) / S ** a     S = predicted service time (ServiceModel), a = exponent

that is, its weighted response ratio (waited + S) / S divided by S ** (a - 1). With a = 1 it is
highest response ratio next (HRRN): every request's ratio grows while it waits, short ones
fastest. With a = 2 (the default, `--service-time-exponent`) it is Smith's ratio rule with the
response ratio as aging: each second a request waits adds weight / S to the sum of weighted
turnarounds, and serving it takes S seconds of the engine, so the order that minimises the sum
serves the largest weight / S ** 2 first (shortest first among equal weights); the factor
(waited + S) still makes every key grow without bound while it waits. HRRN evens the
turnaround ratio out across lengths; under overload that leaves short requests waiting several
times their service behind long ones that have waited long; a = 2 lowers the mean weighted
turnaround (measured in docs/fairness.md), at the cost of longer waits for the longest requests,
which the starvation bound below caps. A request already part-served (preempted,
or running when victims are chosen) divides by R ** (a - 1) instead, R the service it has left
(service_left): Smith's rule on the remaining work, weighted shortest remaining time first,
so a victim preempted near its end resumes ahead of fresh requests longer than what it has
left. With a = 1 nothing changes.

Across tenants it keeps VTC's fairness (below): the requests of the
tenants with the least weight-normalised service so far (the smallest virtual token counter
among tenants with a request in the queue) go before the requests of other tenants, and the
response ratio orders them. A heavy tenant thus cannot crowd light tenants out, and within that
constraint short requests still go first (every tenant has short requests of its own). A
slack (`--tenant-slack-tokens`) also lets a request through that is cheaper than everything the
least-served tenant waits with and whose cost would leave its tenant's counter at most that far
above the least (counting the predicted cost of the work each tenant already has running):
a heavy tenant's short requests need not wait behind a light tenant's long ones, equal
requests still alternate, and the counters stay within slack plus one request's cost of each
other (with the default slack, one full-length request's cost U, within VTC's own bound 2U:
config.auto_tenant_slack). A tenant's counter is lifted to the least active one when it
becomes active (its first live request), never while it waits: idle time banks no credit, a
deficit earned while waiting is kept.

On top of that a hard starvation bound: a request that has waited `max_wait_s` is *starved* and
goes ahead of every non-starved request, oldest first, whatever its tenant. Hence no request
waits longer than `max_wait_s` plus the time to serve the starved requests that arrived before
it (a FIFO among starved requests): waiting is bounded. The seeded random stress test in
tests/scheduler/ checks this.

Preemption victims are chosen consistently: running requests are ranked by the same key (their
"waited" being the time since arrival), and the lowest-ranked one is preempted first when vLLM
must free KV blocks. weighted-turnaround also preempts when every batch slot is taken and the
most deserving waiting request would gain much more than a running one loses
(choose_turnaround_victim: weighted shortest-remaining-time-first with hysteresis); starved
requests are never chosen, and a request is chosen at most `max_per_request` times, so the
starvation bound stands.

`vtc` is the Virtual Token Counter of "Fairness in Serving Large Language Models" (Sheng et al.,
OSDI 2024): each tenant has a counter of weighted service received (input and output tokens,
divided by the tenant's weight); the waiting request of the tenant with the smallest counter goes
next (FCFS within a tenant); a tenant that becomes active again is lifted to the smallest counter
among active tenants (with none active, to the counter of the tenant that left last) so it cannot
bank credit while idle. The counters of idle tenants at or below that floor are then the same as
none and are dropped (idle_counters_to_drop), so they do not pile up per tenant name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

POLICIES = ("fcfs", "priority", "vtc", "weighted-turnaround")
#: Length of the windows over which tenant fairness is measured (server gauge and benchmarks).
FAIRNESS_WINDOW_S = 5.0


@dataclass(frozen=True)
class RequestInfo:
    """What the policies need to know about one request."""

    request_id: str
    arrival_time: float
    prompt_tokens: int
    max_tokens: int
    tenant: str = "default"
    weight: float = 1.0


@dataclass(frozen=True)
class ServiceModel:
    """Predicted latency of a request alone on the idle server:
    overhead + prefill_s_per_token * prompt + decode_s_per_token * predicted output. The defaults
    are a prior: the scheduler learns the per-token costs from its steps (service_fit)."""

    overhead_s: float = 0.02
    prefill_s_per_token: float = 0.0002
    decode_s_per_token: float = 0.008

    def __post_init__(self) -> None:
        values = (self.overhead_s, self.prefill_s_per_token, self.decode_s_per_token)
        if not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
            raise ValueError(f"service model coefficients must be finite, >= 0, not all 0: {self}")

    def service_time(self, prompt_tokens: int, output_tokens: float) -> float:
        """Seconds alone on the idle server (> 0)."""
        return max(
            1e-6,
            self.overhead_s
            + self.prefill_s_per_token * prompt_tokens
            + self.decode_s_per_token * output_tokens,
        )


@dataclass(frozen=True)
class VTCWeights:
    """Cost of a token in VTC's counter (the paper's w_p and w_q)."""

    input_token: float = 1.0
    output_token: float = 2.0


@dataclass(frozen=True)
class OutputLengthEstimate:
    """Predicted output length = ratio * max_tokens, ratio an exponentially weighted mean of
    (actual output / max_tokens) over finished requests. A documented estimate, not a learned
    model: requests say how long they may be, and the ratio learns how much of it they use."""

    ratio: float = 1.0
    alpha: float = 0.05

    def predict(self, max_tokens: int) -> float:
        """Predicted output tokens for a request allowed `max_tokens`."""
        return max(1.0, self.ratio * max_tokens)

    def update(self, max_tokens: int, actual: int) -> OutputLengthEstimate:
        """The estimate after a request allowed `max_tokens` produced `actual` tokens."""
        if max_tokens <= 0:
            return self
        observed = min(1.0, actual / max_tokens)
        return OutputLengthEstimate(self.ratio + self.alpha * (observed - self.ratio), self.alpha)


def predicted_service(info: RequestInfo, model: ServiceModel, out: OutputLengthEstimate) -> float:
    """Predicted service time of a request, in seconds."""
    return model.service_time(info.prompt_tokens, out.predict(info.max_tokens))


def response_ratio(info: RequestInfo, now: float, service: float) -> float:
    """weight * (waited + service) / service: 1 * weight on arrival, growing while it waits."""
    waited = max(0.0, now - info.arrival_time)
    return info.weight * (waited + service) / service


def turnaround_key(
    info: RequestInfo,
    now: float,
    service: float,
    max_wait_s: float,
    exponent: float = 1.0,
    left: float | None = None,
) -> tuple[int, float]:
    """Sort key, larger = goes first: starved requests (waited >= max_wait_s) before all others,
    oldest first among them; among the rest the weighted response ratio divided by
    left ** (exponent - 1) (1: HRRN; 2: Smith's rule with response-ratio aging). `left` is the
    service still to be given (service_left; default all of it): a request preempted part-way
    needs less than a fresh one of the same size, and Smith's rule orders by what is left
    (weighted shortest remaining time first)."""
    waited = now - info.arrival_time
    if waited >= max_wait_s:
        return (1, waited)
    rest = service if left is None else max(1e-6, min(left, service))
    return (0, response_ratio(info, now, service) / rest ** (exponent - 1.0))


def service_left(
    info: RequestInfo,
    generated: int,
    computed: int,
    model: ServiceModel,
    out: OutputLengthEstimate,
) -> float:
    """Predicted seconds of service a request still needs, `generated` output tokens in and
    holding the KV cache of `computed` tokens: the prefill of the tokens whose KV cache it does
    not hold (a preempted request's whole context: it is recomputed, or swapped back in, which
    is cheaper) and the decode of its predicted output not yet generated (at least one token)."""
    context = info.prompt_tokens + generated
    remaining = max(1.0, out.predict(info.max_tokens) - generated)
    return model.service_time(max(0, context - computed), remaining)


def order_by_turnaround(
    infos: Iterable[RequestInfo],
    now: float,
    model: ServiceModel,
    out: OutputLengthEstimate,
    max_wait_s: float,
    counters: Mapping[str, float] | None = None,
    slack: float = 0.0,
    costs: VTCWeights | None = None,
    exponent: float = 1.0,
    committed: Mapping[str, float] | None = None,
    progress: Mapping[str, tuple[int, int]] | None = None,
) -> list[RequestInfo]:
    """Requests in the order they should be served (first = most deserving): turnaround_key
    with `exponent`. Ties keep arrival order, so equal requests are served first come, first
    served. `progress` (request id -> output tokens generated, tokens whose KV cache it holds)
    gives the service left of requests already part-served (service_left); others have all of
    theirs left.

    With `counters` (the tenants' virtual token counters), the requests of the tenants with the
    smallest counter among these requests' tenants are *owed*: owed requests go first (starved
    requests still go before all), the response ratio orders them. With slack 0 that is VTC's
    rule. A slack also makes a request of a tenant ahead owed when it is cheaper than every
    request the least-served tenants wait with and serving it leaves its tenant's counter at
    most `slack` above the least (costs in counter units, `vtc_cost`, priced with `costs`):
    a short request of a tenant slightly ahead goes before the long ones of the tenant behind,
    requests of equal size still alternate between tenants, and the counters stay within slack
    plus one request's cost of each other (the order of VTC's own bound). Without counters,
    tenants are ignored.

    `committed` (tenant -> committed_cost of its running requests) counts the work a tenant
    has already been given but not yet been charged for (counters are charged as tokens are
    computed): the slack test compares counters plus committed work, so a tenant whose running
    requests will take it past the slack gets no more through. Without it, a tenant could fill
    every batch slot with requests that each looked within the slack when admitted."""
    ranked = sorted(infos, key=lambda i: i.arrival_time)
    is_owed = _owed_rule(ranked, out, counters, slack, costs or VTCWeights(), committed or {})

    def key(info: RequestInfo) -> tuple[int, int, float]:
        service = predicted_service(info, model, out)
        done = progress.get(info.request_id) if progress else None
        left = None if done is None else service_left(info, *done, model, out)
        starved, value = turnaround_key(info, now, service, max_wait_s, exponent, left)
        return (starved, int(is_owed(info) or starved), value)

    return sorted(ranked, key=key, reverse=True)


def _owed_rule(
    ranked: list[RequestInfo],
    out: OutputLengthEstimate,
    counters: Mapping[str, float] | None,
    slack: float,
    prices: VTCWeights,
    pending: Mapping[str, float],
) -> Callable[[RequestInfo], bool]:
    """order_by_turnaround's test of whether a request is owed (see there)."""
    if not counters:
        return _always
    values = [counters.get(i.tenant, 0.0) for i in ranked]
    least = min(values, default=0.0)
    if all(v <= least for v in values):  # one tenant (the usual case), or all level: all owed
        return _always
    behind = [i for i, v in zip(ranked, values, strict=True) if v <= least]
    cheapest = min((vtc_cost(i, out, prices) for i in behind), default=math.inf)

    def projected(tenant: str) -> float:
        return counters.get(tenant, 0.0) + pending.get(tenant, 0.0)

    floor = min((projected(i.tenant) for i in behind), default=least)

    def owed(info: RequestInfo) -> bool:
        if counters.get(info.tenant, 0.0) <= least:
            return True
        cost = vtc_cost(info, out, prices)
        return cost < cheapest and projected(info.tenant) + cost <= floor + slack

    return owed


def _always(info: RequestInfo) -> bool:
    """_owed_rule's answer without counters, or with every request's tenant at the least."""
    return True


# --- Preemption for turnaround -----------------------------------------------------------------


@dataclass(frozen=True)
class RunningInfo:
    """A running request, as the preemption rule sees it."""

    info: RequestInfo
    output_tokens: int
    """Tokens generated so far."""
    computed_tokens: int
    """Tokens whose KV cache it holds (prompt + output), to be restored if it is preempted."""
    preemptions: int = 0
    """Times it was already preempted for a waiting request (see choose_turnaround_victim)."""
    preemptible: bool = True
    """False for a request that cannot be preempted now (still in its prompt, say): it counts
    for when a slot frees, but is never a victim."""
    kept_tokens: int = 0
    """Computed tokens whose KV cache a preemption would keep (swapped to host memory and
    copied back in milliseconds); only the rest would be recomputed."""


@dataclass(frozen=True)
class TurnaroundPreemption:
    """When weighted-turnaround preempts a running request for a waiting one, with every batch
    slot taken (`--max-num-seqs`): see choose_turnaround_victim."""

    enabled: bool = True
    margin: float = 2.0
    """The candidate's gain must exceed the victim's loss this many times (hysteresis)."""
    max_per_request: int = 2
    """A request is preempted for others at most this many times."""
    candidates: int = 1
    """How many of the first waiting requests (in the policy's order) may preempt, tried in
    turn: with 1 only the head; more lets a short request behind a long head preempt."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin) and self.margin >= 1):
            raise ValueError(f"preemption margin must be a number >= 1, got {self.margin}")
        if isinstance(self.max_per_request, bool) or not isinstance(self.max_per_request, int):
            raise ValueError(f"max_per_request must be an integer, got {self.max_per_request!r}")
        if self.max_per_request < 0:
            raise ValueError(f"max_per_request must be >= 0, got {self.max_per_request}")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int):
            raise ValueError(f"candidates must be an integer, got {self.candidates!r}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")


def remaining_service(r: RunningInfo, model: ServiceModel, out: OutputLengthEstimate) -> float:
    """Predicted seconds until a running request finishes: its predicted output tokens not yet
    generated (at least one, at most what max_tokens still allows), at the decode rate."""
    predicted = out.predict(r.info.max_tokens)
    allowed = max(1, r.info.max_tokens - r.output_tokens)
    return model.decode_s_per_token * min(allowed, max(1.0, predicted - r.output_tokens))


def choose_turnaround_victim(
    candidate: RequestInfo,
    running: Sequence[RunningInfo],
    now: float,
    model: ServiceModel,
    out: OutputLengthEstimate,
    rule: TurnaroundPreemption,
    max_wait_s: float,
    counters: Mapping[str, float] | None = None,
    slack: float = 0.0,
) -> RequestInfo | None:
    """The running request to preempt so that `candidate` (the most deserving waiting request)
    can start now, or None to let it wait for a free slot.

    With every slot taken, the candidate waits until the first running request finishes, about
    W = the smallest remaining service among `running`. Preempting a victim v lets it start now
    and delays v by about the candidate's service S_c plus the time to restore v's KV cache R_v
    (predicted as a prefill of its computed tokens that a swap would not keep; prefix caching
    usually makes it cheaper).
    In weighted turnaround that is

        gain = w_c * W / S_c        loss = w_v * (S_c + R_v) / S_v

    (S = predicted service time alone on the idle server). The victim is the eligible request
    with the smallest loss, if gain > margin * loss and gain >= 1 (waiting would at least
    double the candidate's turnaround; smaller gains are not worth a preemption's overhead):
    shortest-remaining-time-first, weighted, with hysteresis. Eligible: not starved
    (waited < max_wait_s), preempted for others fewer than `rule.max_per_request` times, and,
    with VTC `counters`, of a tenant whose counter is at most `slack` below the candidate
    tenant's (a tenant further behind is never preempted for one ahead; order_by_turnaround's
    slack).
    Hence the starvation bound still holds: starved requests are never victims, and a request
    can lose its slot to this rule only a bounded number of times."""
    if not rule.enabled or not running:
        return None
    service_c = predicted_service(candidate, model, out)
    wait = min(remaining_service(r, model, out) for r in running)
    gain = candidate.weight * wait / service_c
    if gain < 1.0:
        return None
    own = counters.get(candidate.tenant, 0.0) if counters else 0.0
    best: tuple[float, RequestInfo] | None = None
    for r in running:
        if not r.preemptible or r.preemptions >= rule.max_per_request:
            continue
        if now - r.info.arrival_time >= max_wait_s:
            continue
        if counters and counters.get(r.info.tenant, 0.0) + slack < own:
            continue
        restore = model.prefill_s_per_token * max(0, r.computed_tokens - r.kept_tokens)
        loss = r.info.weight * (service_c + restore) / predicted_service(r.info, model, out)
        if gain > rule.margin * loss and (best is None or loss < best[0]):
            best = (loss, r.info)
    return None if best is None else best[1]


# --- Virtual Token Counter -------------------------------------------------------------------


def vtc_cost(info: RequestInfo, out: OutputLengthEstimate, costs: VTCWeights) -> float:
    """Predicted cost of serving a request, in its tenant's counter units (vtc_charge)."""
    return committed_cost(info, 0, 0, out, costs)


def committed_cost(
    info: RequestInfo,
    generated: int,
    computed: int,
    out: OutputLengthEstimate,
    costs: VTCWeights,
) -> float:
    """Predicted cost still to be charged for a request `generated` output tokens in and with
    `computed` tokens computed, in its tenant's counter units: its prompt tokens not yet
    computed and its predicted output not yet generated (nothing once it has outrun the
    prediction)."""
    prompt_left = max(0, info.prompt_tokens - computed)
    output_left = max(0.0, out.predict(info.max_tokens) - generated)
    return (costs.input_token * prompt_left + costs.output_token * output_left) / info.weight


def vtc_order(infos: Sequence[RequestInfo], counters: Mapping[str, float]) -> list[RequestInfo]:
    """Waiting requests in VTC order: tenant with the smallest counter first, FCFS within a
    tenant. Tenants without a counter count as 0 (they are lifted on arrival, see vtc_lift)."""
    return sorted(infos, key=lambda i: (counters.get(i.tenant, 0.0), i.arrival_time))


def vtc_lift(
    counters: Mapping[str, float], tenant: str, active: Iterable[str], last_left: float = 0.0
) -> float:
    """Counter of `tenant` when it becomes active: at least the smallest counter among the
    other active tenants, so that idle time earns no credit. With no other tenant active, at
    least `last_left`, the counter of the tenant that went idle last (VTC's rule for an empty
    queue): a tenant that was behind before everyone went idle does not keep that credit."""
    others = [counters.get(t, 0.0) for t in set(active) if t != tenant]
    own = counters.get(tenant, 0.0)
    return max(own, min(others) if others else last_left)


def vtc_floor(counters: Mapping[str, float], active: Iterable[str], last_left: float) -> float:
    """The least counter vtc_lift can give a tenant that becomes active from now on: the
    smallest counter of an active tenant, or `last_left` when none is active. It never falls:
    counters only grow, a tenant joins at the floor or above, and the last to leave was active.
    """
    return min((counters.get(t, 0.0) for t in active), default=last_left)


def idle_counters_to_drop(
    counters: Mapping[str, float], active: Iterable[str], last_left: float
) -> list[str]:
    """Idle tenants whose counters can be forgotten without changing any decision: a counter at
    or below vtc_floor is lifted to at least the floor when its tenant becomes active again,
    so 0 gives the same lift, and only active tenants' counters order requests. Dropping them
    keeps the counters from growing with every tenant name ever seen."""
    live = set(active)
    floor = vtc_floor(counters, live, last_left)
    return [t for t, c in counters.items() if t not in live and c <= floor]


def vtc_charge(
    counter: float, input_tokens: int, output_tokens: int, weight: float, costs: VTCWeights
) -> float:
    """Counter after serving tokens to a tenant of weight `weight`."""
    return counter + (costs.input_token * input_tokens + costs.output_token * output_tokens) / (
        weight
    )


# --- Fairness measures -----------------------------------------------------------------------


def jain_index(values: Iterable[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1 when all equal, 1/n when one takes all.
    Empty or all-zero input counts as perfectly fair (1.0)."""
    xs = [float(v) for v in values]
    if any(x < 0 or not math.isfinite(x) for x in xs):
        raise ValueError(f"Jain's index needs finite non-negative values, got {xs}")
    square_sum = sum(x * x for x in xs)
    if not xs or square_sum == 0:
        return 1.0
    return sum(xs) ** 2 / (len(xs) * square_sum)


def backlogged_jain(
    backlogged: Iterable[str], served: Mapping[str, float], weights: Mapping[str, float]
) -> float | None:
    """Fairness of one time window: Jain's index over the weight-normalised tokens served in the
    window to the tenants that were backlogged (had a request waiting) all through it.

    Only those tenants could have used more service, so only their shares can be unfair: a
    tenant that asked for less than its share and got all of it was treated fairly (max-min
    fairness). Totals over a whole run say nothing: once every request has finished, each
    tenant has been served exactly its demand. None when fewer than two tenants were backlogged
    all through the window (no tenant waited while another was served)."""
    tenants = sorted(set(backlogged))
    if len(tenants) < 2:
        return None
    return jain_index(served.get(t, 0.0) / weights.get(t, 1.0) for t in tenants)
