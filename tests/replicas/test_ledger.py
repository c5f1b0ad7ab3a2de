"""The global tenant ledger, the router's fair queue and the global Jain window
(adaptivellm.replicas.ledger): pure, no Ray, no server."""

from __future__ import annotations

import pytest

from adaptivellm.replicas.ledger import Charge, FairQueue, JainWindow, Ledger
from adaptivellm.scheduler.policies import VTCWeights, vtc_charge


def test_charged_at_dispatch_with_the_predicted_output_and_corrected_on_completion() -> None:
    ledger = Ledger(weights={"gold": 2.0})
    ledger.arrive("gold")
    charge = ledger.charge("gold", prompt_tokens=10, max_tokens=20)
    assert charge == Charge(10, 20)  # the estimate starts at the whole of max_tokens
    assert ledger.counters["gold"] == vtc_charge(0.0, 10, 20, 2.0, VTCWeights())
    actual = ledger.settle("gold", charge, 20, prompt_tokens=12, output_tokens=5)
    assert actual == vtc_charge(0.0, 12, 5, 2.0, VTCWeights())
    assert ledger.counters["gold"] == pytest.approx(actual)
    assert ledger.out.ratio < 1.0  # the output estimate learned from the usage


def test_unknown_usage_keeps_the_charge() -> None:
    ledger = Ledger()
    ledger.arrive("a")
    charge = ledger.charge("a", 10, 10)
    before = ledger.counters["a"]
    ledger.settle("a", charge, 10, None, None)
    assert ledger.counters["a"] == before


def test_a_tenant_becoming_active_is_lifted_and_idle_counters_are_dropped() -> None:
    ledger = Ledger()
    ledger.arrive("heavy")
    ledger.settle("heavy", ledger.charge("heavy", 100, 100), 100, 100, 100)
    ledger.arrive("light")  # joins at the least active counter: no banked credit
    assert ledger.counters["light"] == ledger.counters["heavy"]
    # A newcomer is lifted to what the others were served, not to their unsettled predictions.
    charge = ledger.charge("heavy", 10, 1000)
    ledger.arrive("third")
    assert ledger.counters["third"] == ledger.counters["light"]
    ledger.settle("heavy", charge, 1000, 10, 10)
    assert ledger.pending == {}
    ledger.leave("third")
    ledger.leave("heavy")
    ledger.leave("light")
    assert ledger.active_tenants() == set()
    # At or below the floor once idle: forgotten (the lift would give them the same); heavy was
    # served more than the last to leave, so its counter is kept.
    assert set(ledger.counters) == {"heavy"}


def test_queue_releases_the_least_served_tenant_first_fifo_within() -> None:
    queue: FairQueue[str] = FairQueue(limit=10)
    queue.push("heavy", "h1")
    queue.push("heavy", "h2")
    queue.push("light", "l1")
    queue.push("light", "l2")
    counters = {"heavy": 500.0, "light": 100.0}
    order = []
    while len(queue):
        entry = queue.release(lambda e: True, counters)
        assert entry is not None
        order.append(entry.item)
    assert order == ["l1", "l2", "h1", "h2"]


def test_queue_without_the_ledger_releases_in_arrival_order() -> None:
    queue: FairQueue[str] = FairQueue(limit=10)
    for tenant, item in [("heavy", "h1"), ("light", "l1"), ("heavy", "h2")]:
        queue.push(tenant, item)
    order = [queue.release(lambda e: True, None).item for _ in range(3)]  # type: ignore[union-attr]
    assert order == ["h1", "l1", "h2"]


def test_queue_skips_requests_that_cannot_go_now() -> None:
    queue: FairQueue[str] = FairQueue(limit=10)
    queue.push("light", "pinned-to-full")
    queue.push("light", "free")
    queue.push("heavy", "h1")
    entry = queue.release(lambda e: e.item != "pinned-to-full", {"light": 0.0, "heavy": 9.0})
    assert entry is not None and entry.item == "free"
    assert queue.release(lambda e: False, {}) is None
    assert len(queue) == 2


def test_queue_limit_and_remove() -> None:
    queue: FairQueue[int] = FairQueue(limit=2)
    a = queue.push("t", 1)
    queue.push("t", 2)
    assert queue.full()
    assert queue.remove(a) and not queue.remove(a)
    assert not queue.full() and queue.depth("t") == 1
    with pytest.raises(ValueError):
        FairQueue(limit=-1)


def test_jain_window_counts_only_tenants_backlogged_all_through() -> None:
    window = JainWindow(window_s=5.0)
    window.begin(0.0, {"a", "b", "c"})
    window.add("a", 100)
    window.add("b", 100)
    window.add("c", 1)
    window.idle("c")  # c ran out of work: it was served all it asked for
    assert window.tick(1.0, {"a", "b"}) is None  # window not over
    assert window.tick(5.0, {"a", "b"}) == pytest.approx(1.0)
    window.add("a", 300)
    window.add("b", 100)
    assert window.tick(10.0, {"a", "b"}) == pytest.approx(400**2 / (2 * (300**2 + 100**2)))
