"""Fairness policies as pure functions (no vLLM)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from adaptivellm.scheduler.policies import (
    OutputLengthEstimate,
    RequestInfo,
    RunningInfo,
    ServiceModel,
    TurnaroundPreemption,
    VTCWeights,
    backlogged_jain,
    choose_turnaround_victim,
    committed_cost,
    idle_counters_to_drop,
    jain_index,
    order_by_turnaround,
    predicted_service,
    remaining_service,
    response_ratio,
    service_left,
    turnaround_key,
    vtc_charge,
    vtc_cost,
    vtc_floor,
    vtc_lift,
    vtc_order,
)

MODEL = ServiceModel(overhead_s=0.0, prefill_s_per_token=0.0, decode_s_per_token=0.01)
EXACT = OutputLengthEstimate(ratio=1.0)


def info(rid: str, arrival: float, max_tokens: int, tenant: str = "t", weight: float = 1.0):
    return RequestInfo(rid, arrival, prompt_tokens=10, max_tokens=max_tokens, tenant=tenant,
                       weight=weight)  # fmt: skip


def test_response_ratio_grows_with_waiting_and_weight() -> None:
    r = info("a", arrival=0.0, max_tokens=100)  # service 1 s
    assert response_ratio(r, now=0.0, service=1.0) == 1.0
    assert response_ratio(r, now=3.0, service=1.0) == 4.0
    heavy = info("b", 0.0, 100, weight=2.0)
    assert response_ratio(heavy, now=3.0, service=1.0) == 8.0


def test_short_requests_first_when_waits_are_equal() -> None:
    reqs = [info("long", 0.0, 1000), info("short", 0.0, 10), info("mid", 0.0, 100)]
    order = order_by_turnaround(reqs, now=1.0, model=MODEL, out=EXACT, max_wait_s=60)
    assert [r.request_id for r in order] == ["short", "mid", "long"]


def test_long_wait_overtakes_short_service() -> None:
    old_long = info("old-long", arrival=0.0, max_tokens=1000)  # S = 10 s, waited 30: ratio 4
    new_short = info("new-short", arrival=29.9, max_tokens=10)  # S = 0.1 s, waited 0.1: ratio 2
    order = order_by_turnaround([new_short, old_long], 30.0, MODEL, EXACT, max_wait_s=60)
    assert order[0].request_id == "old-long"


def test_service_exponent_2_keeps_short_requests_ahead_until_the_starvation_bound() -> None:
    old_long = info("old-long", arrival=0.0, max_tokens=1000)  # S = 10 s
    new_short = info("new-short", arrival=29.9, max_tokens=10)  # S = 0.1 s
    # Keys (waited + S) / S^2: old-long 40 / 100 = 0.4, new-short 0.2 / 0.01 = 20.
    assert turnaround_key(old_long, 30.0, 10.0, 60, exponent=2.0) == (0, pytest.approx(0.4))
    assert turnaround_key(new_short, 30.0, 0.1, 60, exponent=2.0) == (0, pytest.approx(20.0))
    order = order_by_turnaround([old_long, new_short], 30.0, MODEL, EXACT, 60, exponent=2.0)
    assert [r.request_id for r in order] == ["new-short", "old-long"]
    # Once old-long has waited max_wait_s it is starved and goes first whatever the exponent.
    later = info("later-short", arrival=59.9, max_tokens=10)
    order = order_by_turnaround([later, old_long], 60.0, MODEL, EXACT, 60, exponent=4.0)
    assert [r.request_id for r in order] == ["old-long", "later-short"]
    # The weight still scales the key, on arrival weight / S: a 0.5 s request of weight 1 has
    # 2, a 1 s request of weight 1.5 has 1.5 (goes second), of weight 3 has 3 (goes first).
    mid = info("mid", 0.0, 50)
    for weight, first in ((1.5, "mid"), (3.0, "heavy")):
        heavy = info("heavy", 0.0, 100, weight=weight)
        order = order_by_turnaround([heavy, mid], 0.0, MODEL, EXACT, 60, exponent=2.0)
        assert order[0].request_id == first


def test_starved_requests_go_first_oldest_first() -> None:
    starved_late = info("starved-late", arrival=5.0, max_tokens=10_000)
    starved_early = info("starved-early", arrival=0.0, max_tokens=10_000)
    fresh_short = info("fresh-short", arrival=69.99, max_tokens=1)  # ratio 2 but not starved
    order = order_by_turnaround([fresh_short, starved_late, starved_early], 70.0, MODEL, EXACT,
                                max_wait_s=60)  # fmt: skip
    assert [r.request_id for r in order] == ["starved-early", "starved-late", "fresh-short"]
    assert turnaround_key(starved_early, 70.0, 100.0, 60)[0] == 1


def test_tenant_with_least_service_goes_first_short_first_within() -> None:
    heavy_short = info("heavy-short", 0.0, 5, tenant="heavy")
    light_long = info("light-long", 0.0, 500, tenant="light")
    light_short = info("light-short", 0.0, 50, tenant="light")
    counters = {"heavy": 9000.0, "light": 100.0}
    order = order_by_turnaround([heavy_short, light_long, light_short], 1.0, MODEL, EXACT, 60,
                                counters)  # fmt: skip
    assert [r.request_id for r in order] == ["light-short", "light-long", "heavy-short"]
    # Without counters (or equal ones) the shortest goes first whatever its tenant.
    for c in (None, {"heavy": 5.0, "light": 5.0}):
        order = order_by_turnaround(
            [light_long, light_short, heavy_short], 1.0, MODEL, EXACT, 60, c
        )
        assert order[0].request_id == "heavy-short"


def test_tenant_slack_lets_a_short_request_of_a_tenant_slightly_ahead_through() -> None:
    heavy_short = info("heavy-short", 0.0, 5, tenant="heavy")  # costs 10 + 2 * 5 = 20
    heavy_long = info("heavy-long", 0.0, 500, tenant="heavy")  # costs 1010
    light_long = info("light-long", 0.0, 400, tenant="light")
    counters = {"heavy": 1100.0, "light": 1000.0}
    reqs = [heavy_long, light_long, heavy_short]
    order = order_by_turnaround(reqs, 1.0, MODEL, EXACT, 60, counters, slack=150.0)
    # heavy-short would leave heavy 120 ahead (<= 150): owed, and shortest. heavy-long is not.
    assert [r.request_id for r in order] == ["heavy-short", "light-long", "heavy-long"]
    # No slack: VTC's strict rule, the least-served tenant first.
    order = order_by_turnaround(reqs, 1.0, MODEL, EXACT, 60, counters, slack=0.0)
    assert [r.request_id for r in order] == ["light-long", "heavy-short", "heavy-long"]
    # Just too little slack: 1100 + 20 > 1000 + 119.
    order = order_by_turnaround(reqs, 1.0, MODEL, EXACT, 60, counters, slack=119.0)
    assert order[0].request_id == "light-long"
    # The cost is priced with the configured token costs: 10 + 0.5 * 5 = 12.5.
    cheap = VTCWeights(input_token=1.0, output_token=0.5)
    for slack, first in ((112.5, "heavy-short"), (112.0, "light-long")):
        order = order_by_turnaround(reqs, 1.0, MODEL, EXACT, 60, counters, slack, cheap)
        assert order[0].request_id == first
    # A request no cheaper than what the tenant behind waits with is not let through: requests
    # of equal size alternate between tenants.
    light_short = info("light-short", 0.5, 5, tenant="light")
    order = order_by_turnaround([heavy_short, light_short], 1.0, MODEL, EXACT, 60, counters, 1e6)
    assert [r.request_id for r in order] == ["light-short", "heavy-short"]
    assert vtc_cost(info("w", 0.0, 5, weight=2.0), EXACT, VTCWeights()) == 10.0


def test_service_left_after_part_of_the_work() -> None:
    model = ServiceModel(overhead_s=0.0, prefill_s_per_token=0.001, decode_s_per_token=0.01)
    r = info("r", 0.0, 100)  # 10 prompt tokens, 100 output tokens predicted: 0.01 + 1.0 s
    assert service_left(r, 0, 0, model, EXACT) == pytest.approx(1.01)
    # Preempted 60 tokens in, KV cache dropped: 70 tokens to prefill again, 40 to decode.
    assert service_left(r, 60, 0, model, EXACT) == pytest.approx(0.07 + 0.40)
    # Running 60 tokens in, holding the KV cache of all but the last sampled token.
    assert service_left(r, 60, 69, model, EXACT) == pytest.approx(0.001 + 0.40)
    # Past its prediction: one more token.
    assert service_left(r, 150, 159, model, EXACT) == pytest.approx(0.001 + 0.01)


def test_a_part_served_request_is_ranked_by_what_it_has_left() -> None:
    # Exponent 2: the key divides the response ratio by the service left.
    r = info("r", 0.0, 100)
    assert turnaround_key(r, 1.0, 1.0, 60, 2.0, left=0.25) == (0, pytest.approx(2.0 / 0.25))
    assert turnaround_key(r, 1.0, 1.0, 60, 2.0) == turnaround_key(r, 1.0, 1.0, 60, 2.0, left=1.0)
    assert turnaround_key(r, 1.0, 1.0, 60, 1.0, left=0.25) == (0, pytest.approx(2.0))  # HRRN
    # A long request preempted 90% through goes before a fresh one half its size.
    long_done = info("long", 0.0, 200)
    mid = info("mid", 0.0, 100)
    progress = {"long": (180, 0)}
    order = order_by_turnaround([mid, long_done], 1.0, MODEL, EXACT, 60, exponent=2.0,
                                progress=progress)  # fmt: skip
    assert [r.request_id for r in order] == ["long", "mid"]
    order = order_by_turnaround([mid, long_done], 1.0, MODEL, EXACT, 60, exponent=2.0)
    assert [r.request_id for r in order] == ["mid", "long"]


def test_slack_counts_the_work_a_tenant_already_has_running() -> None:
    heavy_short = info("heavy-short", 0.0, 5, tenant="heavy")  # costs 20
    light_long = info("light-long", 0.0, 400, tenant="light")
    counters = {"heavy": 1100.0, "light": 1000.0}
    reqs = [light_long, heavy_short]
    # Nothing running: 1100 + 20 <= 1000 + 150, heavy-short is let through.
    order = order_by_turnaround(reqs, 1.0, MODEL, EXACT, 60, counters, 150.0, committed={})
    assert order[0].request_id == "heavy-short"
    # heavy already has 40 units of work running: 1100 + 40 + 20 > 1150, light goes first.
    committed = {"heavy": 40.0}
    order = order_by_turnaround(reqs, 1.0, MODEL, EXACT, 60, counters, 150.0, committed=committed)
    assert [r.request_id for r in order] == ["light-long", "heavy-short"]
    # Work running for the tenant behind counts for it too: 1160 <= 1040 + 150.
    committed = {"heavy": 40.0, "light": 40.0}
    order = order_by_turnaround(reqs, 1.0, MODEL, EXACT, 60, counters, 150.0, committed=committed)
    assert order[0].request_id == "heavy-short"


def test_committed_cost_is_what_a_running_request_has_left() -> None:
    r = info("r", 0.0, 50)  # 10 prompt tokens, 50 predicted output tokens (EXACT)
    assert (
        committed_cost(r, 0, 0, EXACT, VTCWeights())
        == 10 + 2 * 50
        == vtc_cost(r, EXACT, VTCWeights())
    )
    assert committed_cost(r, 0, 4, EXACT, VTCWeights()) == 6 + 2 * 50  # prompt part-computed
    assert committed_cost(r, 20, 30, EXACT, VTCWeights()) == 2 * 30
    assert committed_cost(r, 60, 70, EXACT, VTCWeights()) == 0.0  # outran its prediction
    heavy = info("h", 0.0, 50, weight=2.0)
    assert committed_cost(heavy, 0, 10, EXACT, VTCWeights(1.0, 0.5)) == 0.5 * 50 / 2


def test_starved_request_goes_first_whatever_its_tenants_service() -> None:
    starved = info("starved", 0.0, 10, tenant="heavy")
    fresh = info("fresh", 69.0, 10, tenant="light")
    order = order_by_turnaround([fresh, starved], 70.0, MODEL, EXACT, 60, {"heavy": 1e9})
    assert order[0].request_id == "starved"


def test_ties_keep_arrival_order() -> None:
    reqs = [info("b", 1.0, 10), info("a", 0.5, 10), info("c", 2.0, 10)]
    order = order_by_turnaround(reqs, now=2.0, model=MODEL, out=EXACT, max_wait_s=60)
    assert order[0].request_id == "a"


#: Service times that are exact binary fractions (1/8 s a token), so that keys tie exactly.
BINARY = ServiceModel(overhead_s=0.0, prefill_s_per_token=0.0, decode_s_per_token=0.125)


@pytest.mark.parametrize("exponent", [1.0, 2.0])
def test_real_ties_are_served_in_arrival_order_whatever_the_input_order(exponent: float) -> None:
    """Equal keys from different arrivals: `early` (weight 1) has waited 2 s, `late` (weight
    1.5) 1 s, both S = 1 s: response ratios 1 * 3 / 1 and 1.5 * 2 / 1, both exactly 3. Passed
    later-first, the earlier arrival still goes first."""
    early = info("early", 0.0, 8)
    late = info("late", 1.0, 8, weight=1.5)
    for reqs in ([late, early], [early, late]):
        keys = {turnaround_key(r, 2.0, 1.0, 60, exponent) for r in reqs}
        assert keys == {(0, 3.0)}  # a real tie
        order = order_by_turnaround(reqs, 2.0, BINARY, EXACT, 60, exponent=exponent)
        assert [r.request_id for r in order] == ["early", "late"]
    # The same with tenants' counters (both tenants equally served): still arrival order.
    a, b = info("early", 0.0, 8, tenant="a"), info("late", 1.0, 8, tenant="b", weight=1.5)
    order = order_by_turnaround([b, a], 2.0, BINARY, EXACT, 60, {"a": 5.0, "b": 5.0})
    assert [r.request_id for r in order] == ["early", "late"]


def test_starvation_starts_exactly_at_max_wait() -> None:
    """A request that has waited exactly max_wait_s is starved; a hair less, not."""
    r = info("r", 0.0, 8)
    assert turnaround_key(r, 60.0, 1.0, 60.0)[0] == 1
    assert turnaround_key(r, 59.75, 1.0, 60.0)[0] == 0


def test_output_length_estimate_learns_the_used_fraction() -> None:
    est = OutputLengthEstimate(ratio=1.0, alpha=0.5)
    assert est.predict(100) == 100
    est = est.update(100, 20).update(100, 20).update(100, 20)
    assert est.ratio == pytest.approx(0.3)
    assert est.predict(100) == pytest.approx(30)
    assert est.update(0, 5) == est  # no information in a zero budget


@pytest.mark.parametrize(
    "kwargs",
    [{"overhead_s": -1.0}, {"decode_s_per_token": math.nan},
     {"overhead_s": 0.0, "prefill_s_per_token": 0.0, "decode_s_per_token": 0.0},
     # One coefficient bad while the sum is still positive, or infinite.
     {"overhead_s": -0.001}, {"prefill_s_per_token": -1e-9}, {"decode_s_per_token": math.inf},
     {"overhead_s": math.inf, "decode_s_per_token": -1.0}],
)  # fmt: skip
def test_service_model_rejects_bad_coefficients(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ServiceModel(**kwargs)


def test_vtc_serves_the_least_served_tenant_first_fcfs_within() -> None:
    reqs = [info("h1", 0.0, 10, tenant="heavy"), info("h2", 0.1, 10, tenant="heavy"),
            info("l1", 0.2, 10, tenant="light")]  # fmt: skip
    order = vtc_order(reqs, {"heavy": 500.0, "light": 20.0})
    assert [r.request_id for r in order] == ["l1", "h1", "h2"]


def test_vtc_lift_and_charge() -> None:
    counters = {"a": 100.0, "b": 40.0, "idle": 1.0}
    assert vtc_lift(counters, "idle", active=["a", "b", "idle"]) == 40.0  # no banked credit
    assert vtc_lift(counters, "a", active=["a", "b"]) == 100.0  # never lowered
    assert vtc_lift({}, "new", active=["new"]) == 0.0
    # With nobody else active: at least the counter of the tenant that left last (VTC's rule).
    assert vtc_lift(counters, "idle", active=[], last_left=70.0) == 70.0
    assert vtc_lift(counters, "a", active=[], last_left=70.0) == 100.0
    assert vtc_charge(0.0, 10, 5, weight=2.0, costs=VTCWeights(1.0, 2.0)) == 10.0


def test_vtc_charge_adds_to_a_counter_already_charged() -> None:
    assert vtc_charge(37.5, 10, 5, weight=2.0, costs=VTCWeights(1.0, 2.0)) == 47.5
    assert vtc_charge(100.0, 0, 0, weight=1.0, costs=VTCWeights()) == 100.0
    assert vtc_charge(1.0, 4, 3, weight=0.5, costs=VTCWeights(0.5, 4.0)) == 1.0 + (2 + 12) / 0.5


@pytest.mark.parametrize(
    ("values", "expected"),
    [([1, 1, 1, 1], 1.0), ([1, 0, 0, 0], 0.25), ([3, 1], 16 / 20), ([], 1.0), ([0, 0], 1.0)],
)
def test_jain_index(values: list[float], expected: float) -> None:
    assert jain_index(values) == pytest.approx(expected)


def test_jain_index_is_scale_invariant() -> None:
    assert jain_index([2.0, 6.0, 1.0]) == pytest.approx(jain_index([20.0, 60.0, 10.0]))


def test_jain_index_rejects_negative_and_nan() -> None:
    with pytest.raises(ValueError):
        jain_index([1, -1])
    with pytest.raises(ValueError):
        jain_index([math.nan])


def test_backlogged_jain_counts_only_tenants_backlogged_and_normalises_by_weight() -> None:
    # gold (weight 2) got twice free's tokens: fair. idle asked for little and is not backlogged.
    served = {"gold": 200.0, "free": 100.0, "idle": 5.0}
    assert backlogged_jain(["gold", "free"], served, {"gold": 2}) == pytest.approx(1.0)
    assert backlogged_jain(["gold", "free"], served, {}) == pytest.approx(0.9)
    # A backlogged tenant that got nothing in the window: as unfair as two tenants can be.
    assert backlogged_jain(["gold", "free"], {"gold": 10.0}, {}) == pytest.approx(0.5)


def test_backlogged_jain_is_none_without_two_backlogged_tenants() -> None:
    assert backlogged_jain([], {"a": 1.0}, {}) is None
    assert backlogged_jain(["a", "a"], {"a": 1.0, "b": 9.0}, {}) is None


# --- preemption for turnaround ----------------------------------------------------------------

RULE = TurnaroundPreemption()


def running(rid: str, max_tokens: int, done: int, tenant: str = "t", preemptions: int = 0,
            arrival: float = 0.0, weight: float = 1.0) -> RunningInfo:  # fmt: skip
    return RunningInfo(info(rid, arrival, max_tokens, tenant, weight), done, 10 + done, preemptions)


def victim(
    candidate: RequestInfo,
    batch: list[RunningInfo],
    now: float = 1.0,
    counters: dict[str, float] | None = None,
    rule: TurnaroundPreemption = RULE,
) -> str | None:
    found = choose_turnaround_victim(candidate, batch, now, MODEL, EXACT, rule, 60.0, counters)
    return None if found is None else found.request_id


def test_remaining_service_counts_tokens_still_to_generate() -> None:
    assert remaining_service(running("a", 100, 30), MODEL, EXACT) == pytest.approx(0.70)
    # Past its prediction: at least one token, at most what max_tokens still allows.
    half = OutputLengthEstimate(ratio=0.5)
    assert remaining_service(running("a", 100, 80), MODEL, half) == pytest.approx(0.01)
    assert remaining_service(running("a", 100, 100), MODEL, EXACT) == pytest.approx(0.01)


def test_a_short_request_preempts_the_long_request_with_most_work_left() -> None:
    # Slot wait 1.0 s (the 100-token request has 100 left), candidate service 0.05 s: gain 20.
    batch = [running("long", 1000, 100), running("mid", 200, 100)]
    assert victim(info("short", 1.0, 5), batch) == "long"


def test_no_preemption_when_a_slot_frees_soon_or_the_candidate_is_long() -> None:
    assert victim(info("short", 1.0, 5), [running("long", 1000, 100), running("end", 200, 199)]) \
        is None  # fmt: skip
    assert victim(info("long2", 1.0, 900), [running("long", 1000, 100)]) is None
    assert victim(info("short", 1.0, 5), []) is None


def test_margin_is_the_hysteresis() -> None:
    # gain = 0.5 / 0.1 = 5; loss = (0.1 + 0) / 1.0 = 0.1: a ratio of 50.
    batch = [running("long", 100, 50)]
    assert victim(info("c", 1.0, 10), batch, rule=TurnaroundPreemption(margin=49.0)) == "long"
    assert victim(info("c", 1.0, 10), batch, rule=TurnaroundPreemption(margin=51.0)) is None
    assert victim(info("c", 1.0, 10), batch, rule=TurnaroundPreemption(enabled=False)) is None


def test_unpreemptible_requests_count_for_the_slot_wait_but_are_never_victims() -> None:
    ending = RunningInfo(info("ending", 0.0, 200), 199, 209, preemptible=False)
    assert victim(info("short", 1.0, 5), [running("long", 1000, 100), ending]) is None
    in_prompt = RunningInfo(info("in-prompt", 0.0, 1000), 0, 5, preemptible=False)
    assert victim(info("short", 1.0, 5), [in_prompt]) is None
    assert victim(info("short", 1.0, 5), [in_prompt, running("long", 1000, 100)]) == "long"


def test_starved_and_often_preempted_requests_are_never_victims() -> None:
    candidate = info("short", 100.0, 5)
    assert victim(candidate, [running("long", 1000, 100, arrival=30.0)], now=100.0) is None
    assert victim(candidate, [running("long", 1000, 100, arrival=50.0)], now=100.0) == "long"
    assert victim(candidate, [running("long", 1000, 100, preemptions=2)]) is None
    assert victim(candidate, [running("long", 1000, 100, preemptions=1)]) == "long"


def test_a_light_tenant_is_never_preempted_for_a_heavier_one() -> None:
    batch = [running("light-long", 1000, 100, tenant="light")]
    counters = {"light": 10.0, "heavy": 500.0}
    assert victim(info("heavy-short", 1.0, 5, tenant="heavy"), batch, counters=counters) is None
    assert victim(info("light-short", 1.0, 5, tenant="light"), batch, counters=counters) \
        == "light-long"  # fmt: skip
    # Within the tenant slack the heavier tenant's short request may preempt; beyond, not.
    heavy_short = info("heavy-short", 1.0, 5, tenant="heavy")
    rule = TurnaroundPreemption()
    for slack, expected in ((490.0, "light-long"), (489.0, None)):
        found = choose_turnaround_victim(heavy_short, batch, 1.0, MODEL, EXACT, rule, 60.0,
                                         counters, slack)  # fmt: skip
        assert (found and found.request_id) == expected


def test_kv_a_swap_keeps_is_not_counted_as_restore_cost() -> None:
    """loss = (S_c + R_v) / S_v, R_v = prefill of the computed tokens a swap would not keep."""
    prefill = ServiceModel(overhead_s=0.0, prefill_s_per_token=0.01, decode_s_per_token=0.01)
    # Candidate S 0.15 s (10-token prompt, 5 out), slot wait 0.5 s: gain 3.3. Victim S 1.1 s,
    # 400 computed tokens: R_v 4 s, loss 3.8 > gain / 2. With 384 swapped: R_v 0.16 s, loss 0.28.
    dropped = RunningInfo(info("long", 0.0, 100), 50, 400)
    kept = RunningInfo(info("long", 0.0, 100), 50, 400, kept_tokens=384)
    for batch, expected in (([dropped], None), ([kept], "long")):
        found = choose_turnaround_victim(info("c", 1.0, 5), batch, 1.0, prefill, EXACT, RULE, 60.0)
        assert (None if found is None else found.request_id) == expected


def test_weights_scale_gain_and_loss() -> None:
    batch = [running("gold-long", 100, 50, weight=100.0)]
    assert victim(info("c", 1.0, 10), batch) is None  # loss 100 * 0.1 = 10 > gain 5 / 2
    assert victim(info("c", 1.0, 10, weight=100.0), batch) == "gold-long"


def test_idle_counters_at_or_below_the_floor_are_dropped() -> None:
    counters = {"a": 50.0, "b": 80.0, "gone-behind": 10.0, "gone-equal": 50.0, "gone-ahead": 90.0}
    assert vtc_floor(counters, ["a", "b"], last_left=0.0) == 50.0
    dropped = idle_counters_to_drop(counters, ["a", "b"], last_left=0.0)
    assert sorted(dropped) == ["gone-behind", "gone-equal"]  # never an active one, nor one ahead
    assert vtc_floor(counters, [], last_left=85.0) == 85.0
    assert sorted(idle_counters_to_drop(counters, [], last_left=85.0)) == [
        "a", "b", "gone-behind", "gone-equal"
    ]  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
def test_dropping_idle_counters_changes_no_counter_an_active_tenant_has(seed: int) -> None:
    """Random arrivals, departures and charges over 40 tenants, replayed on counters that keep
    every tenant and on counters that drop idle_counters_to_drop whenever a tenant goes idle:
    every active tenant's counter is the same in both after every event, and fewer are kept.
    Everyone goes idle now and then (the empty-queue case of vtc_lift)."""
    rng = random.Random(seed)
    full: dict[str, float] = {}
    pruned: dict[str, float] = {}
    live: Counter[str] = Counter()
    last_left = {"full": 0.0, "pruned": 0.0}
    most_kept = 0
    for step in range(3000):
        tenant = f"t{rng.randrange(40)}"
        if step % 400 == 399:  # everyone leaves
            events = [("leave", t) for t in list(live.elements())]
        elif live and rng.random() < 0.45:
            events = [("leave", rng.choice(sorted(live)))]
        elif live and rng.random() < 0.5:
            events = [("charge", rng.choice(sorted(live)))]
        else:
            events = [("arrive", tenant)]
        for kind, t in events:
            if kind == "arrive":
                if live[t] == 0:
                    full[t] = vtc_lift(full, t, +live, last_left["full"])
                    pruned[t] = vtc_lift(pruned, t, +live, last_left["pruned"])
                live[t] += 1
            elif kind == "charge":
                amount = rng.uniform(1, 300)
                full[t] += amount
                pruned[t] += amount
            else:
                live[t] -= 1
                if live[t] == 0:
                    del live[t]
                    last_left["full"] = full[t]
                    last_left["pruned"] = pruned[t]
                    for idle in idle_counters_to_drop(pruned, live, last_left["pruned"]):
                        del pruned[idle]
            assert {t: pruned[t] for t in live} == {t: full[t] for t in live}
            most_kept = max(most_kept, len(pruned))
    assert len(full) == 40
    assert most_kept < 40


# --- exact boundaries of the victim rule (BINARY: every time below is an exact binary fraction)


def binary_victim(
    candidate: RequestInfo,
    batch: list[RunningInfo],
    now: float = 1.0,
    rule: TurnaroundPreemption = RULE,
    max_wait_s: float = 60.0,
) -> str | None:
    found = choose_turnaround_victim(candidate, batch, now, BINARY, EXACT, rule, max_wait_s)
    return None if found is None else found.request_id


def test_a_gain_of_exactly_one_is_enough() -> None:
    """`long` (S_v 64 s) has 16 tokens left: the slot frees in W = 2 s. A candidate of S_c = 2 s
    gains W / S_c = 1 exactly (loss 2 / 64): it preempts. One of 3 s gains 2/3: it waits,
    although 2/3 is still more than margin * loss = 6/64."""
    batch = [running("long", 512, 496)]
    assert remaining_service(batch[0], BINARY, EXACT) == 2.0
    assert binary_victim(info("c", 1.0, 16), batch) == "long"
    assert binary_victim(info("c", 1.0, 24), batch) is None


def test_a_gain_of_exactly_margin_times_the_loss_is_not_enough() -> None:
    """gain 1, loss 1/32: margin 32 makes them equal (no preemption), margin 31.5 does not."""
    batch = [running("long", 512, 496)]
    candidate = info("c", 1.0, 16)
    assert binary_victim(candidate, batch, rule=TurnaroundPreemption(margin=32.0)) is None
    assert binary_victim(candidate, batch, rule=TurnaroundPreemption(margin=31.5)) == "long"


def test_a_request_that_has_waited_exactly_max_wait_is_starved_and_never_a_victim() -> None:
    candidate = info("c", 100.0, 16)
    at_bound = [running("long", 512, 496, arrival=40.0)]  # waited 60 s of 60
    assert binary_victim(candidate, at_bound, now=100.0) is None
    just_under = [running("long", 512, 496, arrival=40.25)]  # waited 59.75 s
    assert binary_victim(candidate, just_under, now=100.0) == "long"


def test_a_request_preempted_exactly_max_per_request_times_is_never_a_victim() -> None:
    candidate = info("c", 1.0, 16)
    for limit, done, expected in ((1, 1, None), (1, 0, "long"), (3, 3, None), (3, 2, "long")):
        batch = [running("long", 512, 496, preemptions=done)]
        rule = TurnaroundPreemption(max_per_request=limit)
        assert binary_victim(candidate, batch, rule=rule) == expected, (limit, done)


def test_equal_losses_go_to_the_first_running_request() -> None:
    """Two victims with the same loss: the first in `running` is chosen (deterministic)."""
    a, b = running("a", 512, 496), running("b", 512, 496)
    assert binary_victim(info("c", 1.0, 16), [a, b]) == "a"
    assert binary_victim(info("c", 1.0, 16), [b, a]) == "b"
    # A strictly smaller loss wins wherever it is: b is longer (S_v 128 s), so it loses less.
    b_long = running("b", 1024, 1008)
    assert binary_victim(info("c", 1.0, 16), [a, b_long]) == "b"
    assert binary_victim(info("c", 1.0, 16), [b_long, a]) == "b"


# --- exact values of the small helpers (binary fractions: every sum below is exact) -----------


def test_service_time_adds_overhead_prefill_and_decode_and_is_never_zero() -> None:
    model = ServiceModel(overhead_s=0.5, prefill_s_per_token=0.25, decode_s_per_token=0.125)
    assert model.service_time(4, 8) == 0.5 + 1.0 + 1.0
    assert model.service_time(0, 0) == 0.5
    assert ServiceModel(0.0, 0.25, 0.0).service_time(0, 3) == 1e-6  # floor: never 0
    r = RequestInfo("r", 0.0, prompt_tokens=4, max_tokens=16)
    assert predicted_service(r, model, OutputLengthEstimate(ratio=0.5)) == 0.5 + 1.0 + 1.0


def test_response_ratio_counts_no_negative_wait() -> None:
    r = info("r", 10.0, 8)
    assert response_ratio(r, now=9.0, service=2.0) == 1.0  # clock behind arrival: no wait
    assert response_ratio(r, now=11.0, service=2.0) == 1.5


def test_output_length_estimate_bounds() -> None:
    assert OutputLengthEstimate(ratio=0.0).predict(100) == 1.0  # at least one token
    assert OutputLengthEstimate(ratio=0.25).predict(8) == 2.0
    est = OutputLengthEstimate(ratio=0.5, alpha=0.5)
    assert est.update(8, 16).ratio == 0.75  # observed fraction capped at 1
    assert est.update(8, 2).ratio == 0.375
    assert est.update(8, 2).alpha == 0.5
    assert est.update(-1, 5) == est and est.update(0, 0) == est
    assert est.update(1, 1).ratio == 0.75  # a budget of one token is information


def test_turnaround_key_uses_the_service_left_within_bounds() -> None:
    r = info("r", 0.0, 8)  # waited 1 s, S 1 s: ratio 2
    assert turnaround_key(r, 1.0, 1.0, 60, 2.0, left=4.0) == (0, 2.0)  # never more than S
    assert turnaround_key(r, 1.0, 1.0, 60, 2.0, left=0.5) == (0, 4.0)
    assert turnaround_key(r, 1.0, 1.0, 60, 2.0, left=0.0) == (0, 2.0 / 1e-6)
    assert turnaround_key(r, 1.0, 1.0, 60, 3.0, left=0.5) == (0, 8.0)
    assert turnaround_key(r, 61.0, 1.0, 60) == (1, 61.0)


def test_service_left_exact() -> None:
    model = ServiceModel(overhead_s=0.5, prefill_s_per_token=0.25, decode_s_per_token=0.125)
    r = RequestInfo("r", 0.0, prompt_tokens=4, max_tokens=16)
    assert service_left(r, 0, 0, model, EXACT) == 0.5 + 1.0 + 2.0
    assert service_left(r, 8, 12, model, EXACT) == 0.5 + 0.0 + 1.0  # holds its whole context
    assert service_left(r, 8, 0, model, EXACT) == 0.5 + 3.0 + 1.0  # preempted: 12 to redo
    assert service_left(r, 8, 20, model, EXACT) == 0.5 + 1.0  # more computed than context
    assert service_left(r, 16, 20, model, EXACT) == 0.5 + 0.125  # at least one token


def test_remaining_service_exact_bounds() -> None:
    r = RunningInfo(RequestInfo("r", 0.0, 4, 16), output_tokens=4, computed_tokens=8)
    assert remaining_service(r, BINARY, EXACT) == 12 * 0.125
    half = OutputLengthEstimate(ratio=0.5)
    assert remaining_service(r, BINARY, half) == 4 * 0.125
    done = RunningInfo(RequestInfo("r", 0.0, 4, 16), output_tokens=16, computed_tokens=20)
    assert remaining_service(done, BINARY, EXACT) == 0.125  # at least one token
    over = RunningInfo(RequestInfo("r", 0.0, 4, 16), output_tokens=15, computed_tokens=19)
    assert remaining_service(over, BINARY, OutputLengthEstimate(ratio=4.0)) == 0.125  # cap


def test_committed_cost_exact() -> None:
    r = RequestInfo("r", 0.0, prompt_tokens=4, max_tokens=16, weight=2.0)
    assert committed_cost(r, 0, 0, EXACT, VTCWeights(1.0, 2.0)) == (4 + 32) / 2
    assert committed_cost(r, 8, 2, EXACT, VTCWeights(1.0, 2.0)) == (2 + 16) / 2
    assert committed_cost(r, 8, 6, EXACT, VTCWeights(1.0, 2.0)) == 16 / 2  # prompt done


def test_vtc_order_and_lift_exact() -> None:
    reqs = [info("b2", 2.0, 8, tenant="b"), info("a", 3.0, 8, tenant="a"),
            info("b1", 1.0, 8, tenant="b"), info("c", 0.0, 8, tenant="c")]  # fmt: skip
    order = vtc_order(reqs, {"a": 5.0, "b": 5.0, "c": 6.0})
    assert [r.request_id for r in order] == ["b1", "b2", "a", "c"]
    assert [r.request_id for r in vtc_order(reqs, {"c": 1.0})] == ["b1", "b2", "a", "c"]
    counters = {"a": 10.0, "b": 20.0, "c": 30.0}
    assert vtc_lift(counters, "new", active=["b", "c"]) == 20.0
    assert vtc_lift(counters, "a", active=["a", "b", "c"]) == 20.0  # itself does not count
    assert vtc_lift(counters, "c", active=["b", "c"], last_left=99.0) == 30.0
    assert vtc_lift(counters, "a", active=["a"], last_left=15.0) == 15.0
    assert vtc_lift({}, "x", active=["x", "y"]) == 0.0


def test_vtc_floor_and_idle_counters_exact() -> None:
    counters = {"a": 10.0, "b": 20.0, "idle-low": 5.0, "idle-at": 10.0, "idle-high": 11.0}
    assert vtc_floor(counters, ["a", "b"], last_left=50.0) == 10.0
    assert vtc_floor(counters, ["unknown"], last_left=50.0) == 0.0
    assert sorted(idle_counters_to_drop(counters, ["a", "b"], 0.0)) == ["idle-at", "idle-low"]


def test_jain_index_exact() -> None:
    assert jain_index([1.0, 3.0]) == 16 / 20
    assert jain_index([2.0]) == 1.0
    with pytest.raises(ValueError):
        jain_index([1.0, math.inf])
    with pytest.raises(ValueError):
        jain_index([-0.5, 1.0])
    assert jain_index([0.0, 4.0]) == 0.5


def test_backlogged_jain_exact() -> None:
    served, weights = {"a": 4.0, "b": 4.0, "c": 100.0}, {"b": 2.0}
    assert backlogged_jain(["a", "b"], served, weights) == jain_index([4.0, 2.0])
    assert backlogged_jain(["b", "a", "b"], served, weights) == jain_index([4.0, 2.0])
    assert backlogged_jain(["a", "d"], served, weights) == jain_index([4.0, 0.0]) == 0.5
    assert backlogged_jain(["a"], served, weights) is None


def test_the_default_exponent_is_hrrn() -> None:
    """Without an exponent, the key is the plain weighted response ratio (HRRN)."""
    r = info("r", 0.0, 8)
    assert turnaround_key(r, 1.0, 4.0, 60) == (0, (1.0 + 4.0) / 4.0)
    assert turnaround_key(r, 1.0, 4.0, 60, left=2.0) == (0, 1.25)  # left does not matter
    # A 4 s request that waited 4 s (ratio 2) goes before a 1 s one that waited 0.5 s (1.5);
    # with exponent 2 the short one would (2 / 4 < 1.5 / 1).
    long, short = info("long", 0.0, 32), info("short", 3.5, 8)
    order = order_by_turnaround([short, long], 4.0, BINARY, EXACT, 60)
    assert [x.request_id for x in order] == ["long", "short"]
    order = order_by_turnaround([short, long], 4.0, BINARY, EXACT, 60, exponent=2.0)
    assert [x.request_id for x in order] == ["short", "long"]


# --- order_by_turnaround's tenant rule, exactly ----------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_a_tenant_without_counter_or_committed_work_counts_as_zero(seed: int) -> None:
    """Random queues over tenants some of which have no counter (or no committed work): the
    order is the one with those tenants given an explicit 0."""
    rng = random.Random(seed)
    tenants = ["a", "b", "c", "d"]
    reqs = [
        info(f"r{i}", rng.choice([0.0, 1.0, 2.0, 3.0]), rng.choice([1, 2, 4, 8, 16]),
             tenant=rng.choice(tenants), weight=rng.choice([1.0, 2.0]))
        for i in range(rng.randint(2, 6))
    ]  # fmt: skip
    known = rng.sample(tenants, rng.randint(1, 3))
    counters = {t: float(rng.choice([0, 1, 2, 4, 8, 16, 32])) for t in known}
    busy = rng.sample(tenants, rng.randint(0, 2))
    committed = {t: float(rng.choice([1, 4, 16])) for t in busy}
    slack = float(rng.choice([0, 1, 8, 32, 1000]))
    explicit = {t: counters.get(t, 0.0) for t in tenants}
    explicit_committed = {t: committed.get(t, 0.0) for t in tenants}
    for exponent in (1.0, 2.0):
        got = order_by_turnaround(reqs, 4.0, BINARY, EXACT, 60, counters, slack,
                                  exponent=exponent, committed=committed)  # fmt: skip
        want = order_by_turnaround(reqs, 4.0, BINARY, EXACT, 60, explicit, slack,
                                   exponent=exponent, committed=explicit_committed)  # fmt: skip
        assert [r.request_id for r in got] == [r.request_id for r in want]


def test_a_tenant_without_counter_is_the_least_served() -> None:
    """`b` has no counter (0): its long request goes before `a`'s short one (counter 0.5)."""
    a = info("a-short", 0.0, 1, tenant="a")
    b = info("b-long", 0.0, 16, tenant="b")
    order = order_by_turnaround([a, b], 1.0, BINARY, EXACT, 60, {"a": 0.5})
    assert [r.request_id for r in order] == ["b-long", "a-short"]
    # A request of the tenant ahead more expensive than the cheapest the tenant behind waits
    # with is not let through, whatever the slack: `a` (cost 26) waited long, `b` (18) not.
    a_long = info("a", 0.0, 8, tenant="a")
    b_short = info("b", 7.5, 4, tenant="b")
    order = order_by_turnaround([a_long, b_short], 8.0, BINARY, EXACT, 60, {"a": 0.5}, 100.0)
    assert [r.request_id for r in order] == ["b", "a"]


def test_cheaper_than_the_cheapest_request_of_the_tenants_behind() -> None:
    """`light` waits with requests costing 14 and 42; `heavy`'s costing 22 is cheaper than
    one of them but not than the cheapest: it is not let through."""
    light = [info("l-2", 0.0, 2, tenant="light"), info("l-16", 0.0, 16, tenant="light")]
    heavy = info("h-6", 0.0, 6, tenant="heavy")
    counters = {"light": 1000.0, "heavy": 1001.0}
    order = order_by_turnaround([*light, heavy], 1.0, BINARY, EXACT, 60, counters, 1000.0)
    assert [r.request_id for r in order] == ["l-2", "l-16", "h-6"]
    cheap = info("h-1", 0.0, 1, tenant="heavy")  # cost 12 < 14: let through, and shortest
    order = order_by_turnaround([*light, cheap], 1.0, BINARY, EXACT, 60, counters, 1000.0)
    assert [r.request_id for r in order] == ["h-1", "l-2", "l-16"]


def test_the_slack_is_measured_from_the_least_projected_tenant_behind() -> None:
    """Two tenants behind at 1000, one with 50 units of work running: the floor is 1000, so
    `heavy` (1005, a request costing 12) needs a slack of 17."""
    reqs = [info("l1", 0.0, 4, tenant="l1"), info("l2", 0.0, 4, tenant="l2"),
            info("h", 0.0, 1, tenant="heavy")]  # fmt: skip
    counters = {"l1": 1000.0, "l2": 1000.0, "heavy": 1005.0}
    committed = {"l2": 50.0}
    for slack, first in ((17.0, "h"), (16.0, "l1")):
        order = order_by_turnaround(reqs, 1.0, BINARY, EXACT, 60, counters, slack,
                                    committed=committed)  # fmt: skip
        assert order[0].request_id == first, slack


def test_the_default_slack_is_zero() -> None:
    """With token costs of 0.25 an output token, `a`'s one-token request costs 0.25: 0.5 + 0.25
    is within a slack of 1 of `b`'s 0, not within the default 0."""
    prices = VTCWeights(input_token=0.0, output_token=0.25)
    a = info("a", 0.0, 1, tenant="a")
    b = info("b", 0.0, 16, tenant="b")
    counters = {"a": 0.5, "b": 0.0}
    order = order_by_turnaround([b, a], 1.0, BINARY, EXACT, 60, counters, costs=prices)
    assert [r.request_id for r in order] == ["b", "a"]
    order = order_by_turnaround([b, a], 1.0, BINARY, EXACT, 60, counters, 1.0, prices)
    assert [r.request_id for r in order] == ["a", "b"]


def test_the_slack_floor_counts_a_tenant_behind_without_counter_or_work_as_zero() -> None:
    """`light` has no counter and no committed work: the floor is 0, so `heavy` (5, a request
    costing 12) needs a slack of 17, not 16."""
    reqs = [info("l", 0.0, 4, tenant="light"), info("h", 0.0, 1, tenant="heavy")]
    for committed in (None, {}, {"heavy": 0.0}):
        for slack, first in ((17.0, "h"), (16.0, "l")):
            order = order_by_turnaround(reqs, 1.0, BINARY, EXACT, 60, {"heavy": 5.0}, slack,
                                        committed=committed)  # fmt: skip
            assert order[0].request_id == first, (committed, slack)


def test_turnaround_preemption_settings_are_checked_at_their_bounds() -> None:
    assert TurnaroundPreemption(margin=1.0, max_per_request=0, candidates=1).margin == 1.0
    for bad in ({"margin": 0.99}, {"margin": math.inf}, {"margin": math.nan},
                {"max_per_request": -1}, {"max_per_request": True}, {"max_per_request": 1.0},
                {"candidates": 0}, {"candidates": True}, {"candidates": 2.0}):  # fmt: skip
        with pytest.raises(ValueError):
            TurnaroundPreemption(**bad)  # type: ignore[arg-type]


def test_a_least_served_tenant_is_owed_whatever_work_it_has_running() -> None:
    """`a` is at the least counter but has 50 units of work running: still owed, so it goes
    before `h` (ahead, and too expensive to be let through) although `h` waited longer."""
    reqs = [info("a", 3.0, 8, tenant="a"), info("h", 0.0, 16, tenant="h"),
            info("b", 3.0, 16, tenant="b")]  # fmt: skip
    counters = {"a": 0.0, "b": 0.0, "h": 10.0}
    order = order_by_turnaround(reqs, 4.0, BINARY, EXACT, 60, counters, committed={"a": 50.0})
    assert [r.request_id for r in order] == ["a", "b", "h"]


def test_victims_tenant_rule_counts_missing_counters_as_zero_and_default_slack_as_zero() -> None:
    batch_of = {t: [running("long", 512, 496, tenant=t)] for t in ("v", "missing")}
    candidate = info("c", 1.0, 16, tenant="cand")
    # The victim's tenant 0.5 behind the candidate's: never preempted without slack.
    found = choose_turnaround_victim(candidate, batch_of["v"], 1.0, BINARY, EXACT, RULE, 60.0,
                                     {"v": 10.0, "cand": 10.5})  # fmt: skip
    assert found is None
    found = choose_turnaround_victim(candidate, batch_of["v"], 1.0, BINARY, EXACT, RULE, 60.0,
                                     {"v": 10.0, "cand": 10.5}, 0.5)  # fmt: skip
    assert found is not None and found.request_id == "long"
    # A candidate's tenant without a counter is at 0: a victim's tenant at 0.5 is not behind.
    found = choose_turnaround_victim(candidate, batch_of["v"], 1.0, BINARY, EXACT, RULE, 60.0,
                                     {"v": 0.5})  # fmt: skip
    assert found is not None and found.request_id == "long"
    # A victim's tenant without a counter is at 0: behind a candidate's tenant at 0.5.
    found = choose_turnaround_victim(candidate, batch_of["missing"], 1.0, BINARY, EXACT, RULE,
                                     60.0, {"cand": 0.5})  # fmt: skip
    assert found is None


def test_restore_cost_counts_exactly_the_tokens_a_swap_would_not_keep() -> None:
    """Prefill 0.25 s a token: the candidate (10 + 16 tokens) needs S_c 4.5 s, the victim
    (10 + 1024) S_v 130.5 s with 64 tokens (8 s) left: gain 8 / 4.5, loss 4.5 / 130.5 with
    nothing to restore, gain / loss 51.6. One token to restore would make it 48.8, a negative
    restore (more kept than computed) 54.6."""
    model = ServiceModel(overhead_s=0.0, prefill_s_per_token=0.25, decode_s_per_token=0.125)
    candidate = info("c", 1.0, 16)
    for kept in (970, 1000):  # all of it kept, or (impossible) more: nothing to restore
        batch = [RunningInfo(info("long", 0.0, 1024), 960, 970, kept_tokens=kept)]
        for margin, expected in ((50.0, "long"), (53.0, None)):
            rule = TurnaroundPreemption(margin=margin)
            found = choose_turnaround_victim(candidate, batch, 1.0, model, EXACT, rule, 60.0)
            assert (found and found.request_id) == expected, (kept, margin)
