"""Tenant fairness across replicas: one ledger of VTC counters for the whole service, and the
router's per-tenant admission queue. Pure (no I/O); unit-tested in tests/replicas/.

Each replica's engine keeps its own VTC counters, so on its own it can only be fair among the
requests it was sent: a tenant pinned to one replica shares that replica while the others
share theirs, and a weighted policy collapses toward whatever the routing gives. The router
therefore keeps one counter per tenant over every replica, with the project's own VTC
functions (adaptivellm.scheduler.policies):

- **charged at dispatch**: prompt tokens plus predicted output (`OutputLengthEstimate` of
  max_tokens), over the tenant's weight (`vtc_charge`);
- **corrected on completion** with the usage the replica reported (or the tokens streamed);
- a tenant becoming active is lifted to the least active counter (`vtc_lift`), so idle time
  banks no credit; idle counters at or below the floor are dropped (`idle_counters_to_drop`).

When every replica a request may go to holds `target_backlog` router requests, the request
waits at the router in its tenant's queue; whenever a replica has room, the queued request of
the tenant with the smallest counter that may go there is released (FIFO within a tenant). With
the ledger off (`--no-global-fairness`) the queue releases in arrival order instead, which is
what a plain load balancer does.

`JainWindow` measures the result as the engines do (`backlogged_jain`): Jain's index over the
weight-normalised service given, in each window, to the tenants that had requests queued or in
flight all through it.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from adaptivellm.scheduler.policies import (
    FAIRNESS_WINDOW_S,
    OutputLengthEstimate,
    VTCWeights,
    backlogged_jain,
    idle_counters_to_drop,
    vtc_charge,
    vtc_lift,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Charge:
    """What a request was charged at dispatch (tokens, before weighting)."""

    prompt_tokens: int
    output_tokens: int


@dataclass
class Ledger:
    """Global per-tenant virtual token counters."""

    weights: Mapping[str, float] = field(default_factory=dict)
    costs: VTCWeights = field(default_factory=VTCWeights)
    counters: dict[str, float] = field(default_factory=dict)
    #: Requests queued or in flight per tenant (a tenant with one is active).
    active: dict[str, int] = field(default_factory=dict)
    #: Counter units charged at dispatch for requests not settled yet, per tenant.
    pending: dict[str, float] = field(default_factory=dict)
    #: Weight-normalised service given so far, per tenant (counter units, actual tokens).
    served: dict[str, float] = field(default_factory=dict)
    out: OutputLengthEstimate = field(default_factory=OutputLengthEstimate)
    last_left: float = 0.0

    def weight(self, tenant: str) -> float:
        return float(self.weights.get(tenant, 1.0))

    def arrive(self, tenant: str) -> None:
        """A request of `tenant` arrived at the router (queued or about to be dispatched)."""
        if self.active.get(tenant, 0) == 0:
            # Lifted to what the others were actually served: their unsettled charges are
            # predictions (of whole max_tokens at first) and must not lift a newcomer past them.
            others = [t for t, n in self.active.items() if n > 0]
            settled = {t: self.counters.get(t, 0.0) - self.pending.get(t, 0.0) for t in others}
            settled[tenant] = self.counters.get(tenant, 0.0)
            self.counters[tenant] = vtc_lift(settled, tenant, others, self.last_left)
        self.active[tenant] = self.active.get(tenant, 0) + 1

    def charge(self, tenant: str, prompt_tokens: int, max_tokens: int) -> Charge:
        """Charge a request dispatched to a replica with its predicted cost."""
        charge = Charge(prompt_tokens, round(self.out.predict(max_tokens)))
        self.counters[tenant] = vtc_charge(
            self.counters.get(tenant, 0.0),
            charge.prompt_tokens,
            charge.output_tokens,
            self.weight(tenant),
            self.costs,
        )
        self.pending[tenant] = self.pending.get(tenant, 0.0) + self.cost(
            tenant, charge.prompt_tokens, charge.output_tokens
        )
        return charge

    def cost(self, tenant: str, prompt_tokens: int, output_tokens: int) -> float:
        """Counter units of serving these tokens to `tenant`."""
        return vtc_charge(0.0, prompt_tokens, output_tokens, self.weight(tenant), self.costs)

    def settle(
        self,
        tenant: str,
        charge: Charge,
        max_tokens: int,
        prompt_tokens: int | None,
        output_tokens: int | None,
    ) -> float:
        """Correct the dispatch charge with what was actually served (None: unknown, the charge
        stands for it). Returns the actual cost in counter units."""
        prompt = charge.prompt_tokens if prompt_tokens is None else prompt_tokens
        output = charge.output_tokens if output_tokens is None else output_tokens
        actual = self.cost(tenant, prompt, output)
        charged = self.cost(tenant, charge.prompt_tokens, charge.output_tokens)
        left = self.pending.get(tenant, 0.0) - charged
        if left > 1e-9:
            self.pending[tenant] = left
        else:
            self.pending.pop(tenant, None)
        # The counter as if charged with the actual tokens from the start.
        self.counters[tenant] = vtc_charge(
            self.counters.get(tenant, 0.0) - charged,
            prompt,
            output,
            self.weight(tenant),
            self.costs,
        )
        if output_tokens is not None:
            self.out = self.out.update(max_tokens, output_tokens)
        return actual

    def record_served(self, tenant: str, units: float) -> None:
        """Service actually given (for the Jain index and /metrics)."""
        self.served[tenant] = self.served.get(tenant, 0.0) + units

    def leave(self, tenant: str) -> None:
        """A request of `tenant` left the router (finished, failed or given up)."""
        left = self.active.get(tenant, 0) - 1
        if left > 0:
            self.active[tenant] = left
            return
        self.active.pop(tenant, None)
        self.last_left = self.counters.get(tenant, 0.0)
        for idle in idle_counters_to_drop(self.counters, self.active, self.last_left):
            self.counters.pop(idle, None)

    def active_tenants(self) -> set[str]:
        return {t for t, n in self.active.items() if n > 0}


@dataclass
class Waiting(Generic[T]):
    """One request waiting at the router."""

    tenant: str
    seq: int
    item: T


class FairQueue(Generic[T]):
    """Per-tenant FIFO queues; `release` picks the least-served tenant's first eligible request
    (by the ledger's counters), or the oldest eligible request when `fair` is off."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"queue limit must be >= 0, got {limit}")
        self.limit = limit
        self._queues: dict[str, deque[Waiting[T]]] = {}
        self._seq = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def full(self) -> bool:
        return self._size >= self.limit

    def push(self, tenant: str, item: T) -> Waiting[T]:
        """Queue a request (the caller checks `full` first)."""
        entry = Waiting(tenant, next(self._seq), item)
        self._queues.setdefault(tenant, deque()).append(entry)
        self._size += 1
        return entry

    def remove(self, entry: Waiting[T]) -> bool:
        """Take a request out (its client went away); False if it was not queued."""
        queue = self._queues.get(entry.tenant)
        if queue is None or entry not in queue:
            return False
        queue.remove(entry)
        self._size -= 1
        if not queue:
            del self._queues[entry.tenant]
        return True

    def entries(self) -> Iterator[Waiting[T]]:
        for queue in self._queues.values():
            yield from queue

    def depth(self, tenant: str) -> int:
        return len(self._queues.get(tenant, ()))

    def release(
        self,
        eligible: Callable[[Waiting[T]], bool],
        counters: Mapping[str, float] | None,
    ) -> Waiting[T] | None:
        """Remove and return the next request to dispatch among those `eligible` says can go
        now: with `counters` (the ledger on), the first eligible request of the tenant with the
        smallest counter (ties: the older head); without, the oldest eligible request."""
        if counters is not None:
            order = sorted(
                self._queues.items(), key=lambda kv: (counters.get(kv[0], 0.0), kv[1][0].seq)
            )
            for _, queue in order:
                for entry in queue:
                    if eligible(entry):
                        self.remove(entry)
                        return entry
            return None
        best: Waiting[T] | None = None
        for queue in self._queues.values():
            for entry in queue:
                if (best is None or entry.seq < best.seq) and eligible(entry):
                    best = entry
                    break
        if best is not None:
            self.remove(best)
        return best


@dataclass
class JainWindow:
    """Jain's index of service across tenants, window by window (see module docstring)."""

    window_s: float = FAIRNESS_WINDOW_S
    start: float = 0.0
    #: Tenants active at the window's start that have stayed active since.
    backlogged: set[str] = field(default_factory=set)
    served: dict[str, float] = field(default_factory=dict)
    last: float | None = None

    def begin(self, now: float, active: set[str]) -> None:
        self.start = now
        self.backlogged = set(active)
        self.served = {}

    def idle(self, tenant: str) -> None:
        """`tenant` has nothing queued or in flight: it was not backlogged all through."""
        self.backlogged.discard(tenant)

    def add(self, tenant: str, units: float) -> None:
        """Weight-normalised service given to `tenant`."""
        self.served[tenant] = self.served.get(tenant, 0.0) + units

    def tick(self, now: float, active: set[str]) -> float | None:
        """Close the window if it is over; returns the last complete window's index (None until
        one with two or more backlogged tenants closed)."""
        if now - self.start >= self.window_s:
            value = backlogged_jain(self.backlogged, self.served, {})
            if value is not None:
                self.last = value
            self.begin(now, active)
        return self.last
