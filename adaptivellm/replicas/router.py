"""Routing decisions across replicas: pure functions over what each replica published and what
the router itself dispatched since (no I/O, no Ray; unit-tested in tests/replicas/).

Policies (`--routing`):

- `predicted` (default): the replica with the lowest predicted completion time for this
  request. A replica's service-time model is its own published one
  (`adaptivellm_service_model_seconds_per_token{term=prefill|decode}`, learned from its engine's
  steps), so a slower replica prices the same request higher. Its load is what it published
  at the last poll (`vllm:num_requests_running`, `vllm:num_requests_waiting`) plus what the
  router dispatched to it since, less what finished since (vLLM's own DP balancer does the
  same between its stats), and never less than the router's own requests in flight there.

      S      = service time of the request alone on that replica (its model)
      n      = requests outstanding there, slots = its batch size (--max-num-seqs)
      queued = requests that must wait for a batch slot: max(published waiting, n + 1 - slots)
      T      = S * (1 + min(n, slots) / slots)  +  queued * S_typical / slots

  The first term is the request's own service, slowed as the batch fills (a full batch at
  most doubles a step); the second is the time until a slot frees, the queue ahead draining
  `slots` requests per typical service time. Below saturation on equal replicas it is
  least-loaded; with a waiting queue or slower hardware it prices both.
- `least-loaded`: fewest outstanding requests (same load estimate), ties rotating.
- `round-robin`: the next ready replica in turn.
- `session`: affinity on a header (`--session-header`, default X-Session-Id): a session stays on
  the replica that served it first, unless that replica is not ready, or is full while another
  has room, or its predicted completion exceeds the best one's by more than
  `session_imbalance` times (the bounded fallback); then `predicted` chooses and the session
  moves. Requests without the header are routed by `predicted`.

A split-execution WebSocket session is pinned by construction: the router proxies the one
connection to the one replica it chose.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from adaptivellm.scheduler.policies import OutputLengthEstimate, ServiceModel

ROUTING = ("predicted", "least-loaded", "round-robin", "session")

#: Decision reasons (the `reason` label of adaptivellm_router_decisions_total).
REASONS = (
    "predicted",
    "least_loaded",
    "round_robin",
    "session_affinity",
    "session_new",
    "session_fallback",
)


@dataclass(frozen=True)
class Job:
    """What routing knows about one request."""

    prompt_tokens: int
    max_tokens: int
    tenant: str = "default"
    session: str | None = None


@dataclass(frozen=True)
class Published:
    """A replica's load and service model as of its last poll (its /metrics)."""

    running: float = 0.0
    waiting: float = 0.0
    prefill_s_per_token: float | None = None
    decode_s_per_token: float | None = None


@dataclass
class ReplicaState:
    """The router's view of one replica."""

    index: int
    slots: int = 64
    #: Router requests in flight here before new ones wait at the router (None: no limit),
    #: used when the caller gives no router-wide target.
    backlog: int | None = None
    url: str | None = None
    ready: bool = False
    published: Published = field(default_factory=Published)
    #: Requests the router sent there that have not finished (exact for routed traffic).
    inflight: int = 0
    #: Sent and finished since the last poll (the published load's age).
    dispatched_since_poll: int = 0
    finished_since_poll: int = 0
    #: Consecutive /health polls that timed out.
    health_timeouts: int = 0

    def polled(self, published: Published) -> None:
        """A fresh report: what was dispatched before it is now in its counts."""
        self.published = published
        self.dispatched_since_poll = 0
        self.finished_since_poll = 0


def outstanding(r: ReplicaState) -> float:
    """Requests outstanding on a replica: its published running and waiting, plus what the router
    dispatched since that report, less what finished since; at least the router's own in
    flight there."""
    p = r.published
    estimate = p.running + p.waiting + r.dispatched_since_poll - r.finished_since_poll
    return max(float(r.inflight), estimate, 0.0)


#: The service model assumed for a replica that published none (the scheduler's prior).
PRIOR = ServiceModel()


def service_model(r: ReplicaState, prior: ServiceModel = PRIOR) -> ServiceModel:
    """The replica's own published service-time model, the prior's terms where it published none
    (its engine has not learned them yet, or runs another scheduler)."""
    p = r.published

    def term(v: float | None, default: float) -> float:
        return v if v is not None and math.isfinite(v) and v > 0 else default

    return ServiceModel(
        overhead_s=prior.overhead_s,
        prefill_s_per_token=term(p.prefill_s_per_token, prior.prefill_s_per_token),
        decode_s_per_token=term(p.decode_s_per_token, prior.decode_s_per_token),
    )


def predicted_completion(
    r: ReplicaState,
    job: Job,
    out: OutputLengthEstimate,
    typical: Job,
    prior: ServiceModel = PRIOR,
) -> float:
    """Predicted seconds until `job` completes on replica `r` (see the module docstring)."""
    model = service_model(r, prior)
    alone = model.service_time(job.prompt_tokens, out.predict(job.max_tokens))
    n = outstanding(r)
    slots = max(1, r.slots)
    queued = max(r.published.waiting, n + 1 - slots, 0.0)
    typical_s = model.service_time(typical.prompt_tokens, out.predict(typical.max_tokens))
    return alone * (1.0 + min(n, slots) / slots) + queued * typical_s / slots


@dataclass(frozen=True)
class Decision:
    """Where a request goes and why."""

    replica: int
    reason: str
    predicted_s: float | None = None


def candidates(replicas: Sequence[ReplicaState], target_backlog: int | None) -> list[ReplicaState]:
    """Ready replicas with room: fewer than `target_backlog` router requests in flight (None:
    each replica's own `backlog`, itself None for no limit)."""

    def room(r: ReplicaState) -> bool:
        limit = target_backlog if target_backlog is not None else r.backlog
        return limit is None or r.inflight < limit

    return [r for r in replicas if r.ready and r.url is not None and room(r)]


def choose_predicted(
    ready: Sequence[ReplicaState],
    job: Job,
    out: OutputLengthEstimate,
    typical: Job,
    turn: int = 0,
) -> Decision | None:
    """Lowest predicted completion; ties to the fewer outstanding, then rotating from `turn`."""
    if not ready:
        return None
    size = max(r.index for r in ready) + 1
    scored = [
        (predicted_completion(r, job, out, typical), outstanding(r), (r.index - turn) % size, r)
        for r in ready
    ]
    best = min(scored, key=lambda s: s[:3])
    return Decision(best[3].index, "predicted", best[0])


def choose_least_loaded(ready: Sequence[ReplicaState], turn: int) -> Decision | None:
    """Fewest outstanding requests; ties go to the replica after `turn` (rotating)."""
    if not ready:
        return None
    size = max(r.index for r in ready) + 1
    best = min(ready, key=lambda r: (outstanding(r), (r.index - turn) % size))
    return Decision(best.index, "least_loaded")


def choose_round_robin(ready: Sequence[ReplicaState], turn: int) -> Decision | None:
    """The first ready replica at or after index `turn` (cyclically)."""
    if not ready:
        return None
    size = max(r.index for r in ready) + 1
    best = min(ready, key=lambda r: (r.index - turn) % size)
    return Decision(best.index, "round_robin")


class SessionTable:
    """Session id -> replica, least recently used dropped beyond `capacity` (bounded memory)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._pins: OrderedDict[str, int] = OrderedDict()

    def get(self, session: str) -> int | None:
        replica = self._pins.get(session)
        if replica is not None:
            self._pins.move_to_end(session)
        return replica

    def pin(self, session: str, replica: int) -> None:
        self._pins[session] = replica
        self._pins.move_to_end(session)
        while len(self._pins) > self.capacity:
            self._pins.popitem(last=False)

    def __len__(self) -> int:
        return len(self._pins)


def choose_session(
    replicas: Sequence[ReplicaState],
    room: Sequence[ReplicaState],
    job: Job,
    out: OutputLengthEstimate,
    typical: Job,
    pinned: int | None,
    imbalance: float,
) -> Decision | None:
    """Session affinity with bounded fallback (module docstring). `replicas`: all ready ones;
    `room`: those of them with room now. Returns None when the request must wait: its pinned
    replica is ready and within the bound but full (it keeps its place for that replica)."""
    by_index = {r.index: r for r in replicas}
    if pinned is not None and pinned in by_index:
        home = by_index[pinned]
        if any(r.index == pinned for r in room):
            best = choose_predicted(room, job, out, typical)
            mine = predicted_completion(home, job, out, typical)
            if best is None or mine <= imbalance * best.predicted_s + 1e-9:  # type: ignore[operator]
                return Decision(pinned, "session_affinity", mine)
        elif not room:
            return None  # all full: wait for the home replica like everyone else
        else:
            # Home is full, another has room: wait unless home is far worse than the best.
            best = choose_predicted(room, job, out, typical)
            assert best is not None
            mine = predicted_completion(home, job, out, typical)
            if mine <= imbalance * (best.predicted_s or 0.0) + 1e-9:
                return None
    best = choose_predicted(room, job, out, typical)
    if best is None:
        return None
    reason = "session_new" if pinned is None else "session_fallback"
    return Decision(best.replica, reason, best.predicted_s)


@dataclass
class Router:
    """The routing state of one router: policy, rotation and session pins."""

    policy: str = "predicted"
    session_imbalance: float = 3.0
    sessions: SessionTable = field(default_factory=SessionTable)
    turn: int = 0

    def __post_init__(self) -> None:
        if self.policy not in ROUTING:
            raise ValueError(f"routing must be one of {ROUTING}, got {self.policy!r}")
        if not self.session_imbalance >= 1:
            raise ValueError(f"session imbalance must be >= 1, got {self.session_imbalance}")

    def choose(
        self,
        replicas: Sequence[ReplicaState],
        job: Job,
        out: OutputLengthEstimate,
        typical: Job,
        target_backlog: int | None,
        exclude: frozenset[int] = frozenset(),
    ) -> Decision | None:
        """Where `job` goes now, or None when it must wait (no ready replica with room).
        `exclude`: replicas that already failed this request."""
        ready = [r for r in replicas if r.ready and r.url is not None and r.index not in exclude]
        room = candidates(ready, target_backlog)
        if self.policy == "session" and job.session is not None:
            pinned = self.sessions.get(job.session)
            decision = choose_session(
                ready, room, job, out, typical, pinned, self.session_imbalance
            )
            if decision is not None:
                self.sessions.pin(job.session, decision.replica)
            return decision
        if self.policy == "round-robin":
            decision = choose_round_robin(room, self.turn)
        elif self.policy == "least-loaded":
            decision = choose_least_loaded(room, self.turn)
        else:
            decision = choose_predicted(room, job, out, typical, self.turn)
        if decision is not None:
            self.turn = decision.replica + 1
        return decision
