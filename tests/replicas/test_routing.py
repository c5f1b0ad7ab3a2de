"""Routing decisions across replicas (adaptivellm.replicas.router): pure, no Ray, no server."""

from __future__ import annotations

import math

import pytest

from adaptivellm.replicas.router import (
    Job,
    Published,
    ReplicaState,
    Router,
    SessionTable,
    choose_predicted,
    outstanding,
    predicted_completion,
    service_model,
)
from adaptivellm.scheduler.policies import OutputLengthEstimate, ServiceModel

OUT = OutputLengthEstimate()
JOB = Job(prompt_tokens=100, max_tokens=50)
TYPICAL = Job(prompt_tokens=100, max_tokens=50)


def replica(index: int, **kw: object) -> ReplicaState:
    r = ReplicaState(index=index, slots=int(kw.pop("slots", 8)), url=f"http://r{index}", ready=True)  # type: ignore[call-overload]
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_outstanding_adds_dispatched_since_the_report_and_is_at_least_the_router_inflight() -> None:
    r = replica(0, published=Published(running=3, waiting=2))
    assert outstanding(r) == 5
    r.dispatched_since_poll, r.finished_since_poll = 4, 1
    assert outstanding(r) == 8
    r.polled(Published(running=1))
    assert outstanding(r) == 1 and r.dispatched_since_poll == 0
    r.inflight = 6  # the router's own requests: a stale report cannot hide them
    assert outstanding(r) == 6


def test_service_model_is_the_replicas_own_with_the_prior_where_it_published_none() -> None:
    r = replica(0, published=Published(prefill_s_per_token=1e-3, decode_s_per_token=math.nan))
    model = service_model(r)
    assert model.prefill_s_per_token == 1e-3
    assert model.decode_s_per_token == ServiceModel().decode_s_per_token


def test_slower_hardware_is_priced_higher_for_the_same_request() -> None:
    fast = replica(0, published=Published(decode_s_per_token=0.004))
    slow = replica(1, published=Published(decode_s_per_token=0.02))
    assert predicted_completion(slow, JOB, OUT, TYPICAL) > predicted_completion(
        fast, JOB, OUT, TYPICAL
    )
    assert choose_predicted([slow, fast], JOB, OUT, TYPICAL).replica == 0  # type: ignore[union-attr]


def test_a_waiting_queue_costs_more_than_a_busy_batch() -> None:
    # Replica 0 runs 8 of 8 slots with 6 waiting; replica 1 runs 6 of 8 and has room.
    full = replica(0, published=Published(running=8, waiting=6))
    room = replica(1, published=Published(running=6))
    assert choose_predicted([full, room], JOB, OUT, TYPICAL).replica == 1  # type: ignore[union-attr]
    # ... even when the full one is faster per token, once its queue is long enough.
    full.published = Published(running=8, waiting=40, decode_s_per_token=0.004)
    assert choose_predicted([full, room], JOB, OUT, TYPICAL).replica == 1  # type: ignore[union-attr]


def test_predicted_counts_what_was_dispatched_since_the_last_report() -> None:
    a, b = replica(0), replica(1)
    router = Router("predicted")
    picks = []
    for _ in range(6):
        d = router.choose([a, b], JOB, OUT, TYPICAL, target_backlog=None)
        assert d is not None and d.reason == "predicted"
        picks.append(d.replica)
        chosen = a if d.replica == 0 else b
        chosen.dispatched_since_poll += 1
        chosen.inflight += 1
    assert sorted(picks) == [0, 0, 0, 1, 1, 1]  # no stale-report herding onto one replica


def test_idle_equal_replicas_take_turns() -> None:
    router = Router("predicted")
    rs = [replica(0), replica(1)]
    picks = [router.choose(rs, JOB, OUT, TYPICAL, None).replica for _ in range(4)]  # type: ignore[union-attr]
    assert picks == [0, 1, 0, 1]


def test_round_robin_and_least_loaded() -> None:
    rs = [replica(0), replica(1), replica(2)]
    rr = Router("round-robin")
    assert [rr.choose(rs, JOB, OUT, TYPICAL, None).replica for _ in range(4)] == [0, 1, 2, 0]  # type: ignore[union-attr]
    rs[1].ready = False
    assert [rr.choose(rs, JOB, OUT, TYPICAL, None).replica for _ in range(3)] == [2, 0, 2]  # type: ignore[union-attr]
    rs[1].ready = True
    ll = Router("least-loaded")
    rs[0].inflight, rs[1].inflight, rs[2].inflight = 3, 1, 2
    d = ll.choose(rs, JOB, OUT, TYPICAL, None)
    assert d is not None and d.replica == 1 and d.reason == "least_loaded"


def test_not_ready_excluded_and_full_replicas_get_nothing() -> None:
    rs = [replica(0, ready=False), replica(1, inflight=4), replica(2)]
    router = Router("predicted")
    d = router.choose(rs, JOB, OUT, TYPICAL, target_backlog=4)
    assert d is not None and d.replica == 2
    assert router.choose(rs, JOB, OUT, TYPICAL, 4, exclude=frozenset({2})) is None
    rs[2].url = None  # an endpoint not known yet
    assert router.choose(rs, JOB, OUT, TYPICAL, 4) is None


def test_session_affinity_with_bounded_fallback() -> None:
    rs = [replica(0), replica(1)]
    router = Router("session", session_imbalance=3.0)
    job = Job(100, 50, session="s1")
    first = router.choose(rs, job, OUT, TYPICAL, None)
    assert first is not None and first.reason == "session_new"
    home = first.replica
    # Moderately busier home: the session stays.
    rs[home].published = Published(running=4)
    again = router.choose(rs, job, OUT, TYPICAL, None)
    assert again is not None and again.replica == home and again.reason == "session_affinity"
    # Far busier home (a long queue): the bound is passed, the session moves and is re-pinned.
    rs[home].published = Published(running=8, waiting=200)
    moved = router.choose(rs, job, OUT, TYPICAL, None)
    assert moved is not None and moved.replica != home and moved.reason == "session_fallback"
    assert router.sessions.get("s1") == moved.replica
    # Home not ready: the session moves too.
    rs[moved.replica].ready = False
    last = router.choose(rs, job, OUT, TYPICAL, None)
    assert last is not None and last.replica == home and last.reason == "session_fallback"


def test_a_session_waits_for_its_full_home_while_within_the_bound() -> None:
    rs = [replica(0, inflight=2), replica(1)]
    router = Router("session", session_imbalance=math.inf)
    router.sessions.pin("s", 0)
    assert router.choose(rs, Job(100, 50, session="s"), OUT, TYPICAL, target_backlog=2) is None
    rs[0].inflight = 1
    d = router.choose(rs, Job(100, 50, session="s"), OUT, TYPICAL, target_backlog=2)
    assert d is not None and d.replica == 0


def test_requests_without_a_session_are_routed_by_prediction_under_session_routing() -> None:
    rs = [replica(0, published=Published(running=8, waiting=9)), replica(1)]
    d = Router("session").choose(rs, JOB, OUT, TYPICAL, None)
    assert d is not None and d.replica == 1 and d.reason == "predicted"


def test_session_table_is_bounded() -> None:
    table = SessionTable(capacity=3)
    for i in range(5):
        table.pin(f"s{i}", i)
    assert len(table) == 3 and table.get("s0") is None and table.get("s4") == 4


def test_bad_policy_and_imbalance_are_refused() -> None:
    with pytest.raises(ValueError):
        Router("random")
    with pytest.raises(ValueError):
        Router("session", session_imbalance=0.5)


def test_each_replica_has_its_own_backlog_unless_a_router_wide_one_is_given() -> None:
    from adaptivellm.replicas.router import candidates

    small = replica(0, slots=1, backlog=1, inflight=1)
    big = replica(1, slots=8, backlog=8, inflight=5)
    assert [r.index for r in candidates([small, big], None)] == [1]
    assert [r.index for r in candidates([small, big], 10)] == [0, 1]
    unlimited = replica(2, inflight=1000)
    assert [r.index for r in candidates([unlimited], None)] == [2]
