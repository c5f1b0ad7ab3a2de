"""Swap or recompute: the pure decision, the host swap space, and the swap connector's
scheduler side driven through vLLM's real scheduler (tests.scheduler.sim)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from adaptivellm.scheduler.config import FairnessConfig
from adaptivellm.scheduler.preemption import PreemptionConfig, choose_mode
from adaptivellm.scheduler.scheduler import AdaptiveScheduler
from adaptivellm.scheduler.swap_connector import HostSwapSpace
from tests.scheduler.sim import Run, check_invariants, check_no_leaks, make_request, make_scheduler


@pytest.mark.parametrize(
    ("setting", "swap_s", "recompute_s", "blocks", "room", "mode", "reason"),
    [("adaptive", 1.0, 2.0, 4, True, "swap", "cheaper"),
     ("adaptive", 3.0, 2.0, 4, True, "recompute", "cheaper"),
     ("adaptive", 1.0, 2.0, 4, False, "recompute", "swap-space-full"),
     ("adaptive", 1.0, 2.0, 0, True, "recompute", "nothing-to-swap"),
     ("adaptive", math.nan, 2.0, 4, True, "recompute", "cheaper"),
     ("adaptive", 1.0, math.nan, 4, True, "swap", "cheaper"),
     # Equal predictions: swapping is not cheaper, so recompute (vLLM's own way).
     ("adaptive", 2.0, 2.0, 4, True, "recompute", "cheaper"),
     ("adaptive", 0.0, 0.0, 4, True, "recompute", "cheaper"),
     ("adaptive", math.inf, math.inf, 4, True, "recompute", "cheaper"),
     ("adaptive", 1.0, math.inf, 4, True, "swap", "cheaper"),
     ("adaptive", 1.0, 2.0, 1, True, "swap", "cheaper"),  # one block is something to swap
     ("adaptive", 1.0, 2.0, 1, False, "recompute", "swap-space-full"),
     ("swap", 1.0, 2.0, 0, True, "recompute", "nothing-to-swap"),
     ("swap", 2.0, 2.0, 4, True, "swap", "forced"),
     ("recompute", math.nan, math.nan, 0, False, "recompute", "forced"),
     ("swap", 9.0, 1.0, 4, True, "swap", "forced"),
     ("swap", 9.0, 1.0, 4, False, "recompute", "swap-space-full"),
     ("recompute", 0.0, 9.0, 4, True, "recompute", "forced"),
     ("adaptive", math.nan, math.nan, 4, True, "recompute", "no-prediction"),
     ("swap", math.nan, math.nan, 4, True, "recompute", "no-prediction")],
)  # fmt: skip
def test_choose_mode(setting: str, swap_s: float, recompute_s: float, blocks: int, room: bool,
                     mode: str, reason: str) -> None:  # fmt: skip
    decision = choose_mode(setting, swap_s, recompute_s, blocks, room)
    assert (decision.mode, decision.reason) == (mode, reason)


def test_preemption_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown preemption mode"):
        PreemptionConfig(mode="evict")
    with pytest.raises(ValueError, match="needs --swap-space"):
        PreemptionConfig(mode="swap", swap_space_bytes=0)
    assert PreemptionConfig(mode="recompute").swap_space_bytes == 0
    # The exact bounds: -1 byte is refused in any mode, 1 byte is enough to swap with.
    for mode in ("recompute", "swap", "adaptive"):
        with pytest.raises(ValueError, match="swap space must be >= 0 bytes"):
            PreemptionConfig(mode=mode, swap_space_bytes=-1)
        assert PreemptionConfig(mode=mode, swap_space_bytes=1).swap_space_bytes == 1
    with pytest.raises(ValueError, match="needs --swap-space"):
        PreemptionConfig(mode="adaptive", swap_space_bytes=0)


def test_host_swap_space_check_then_do() -> None:
    space = HostSwapSpace(5)
    assert space.can_swap_out(3) and not space.can_swap_out(6) and not space.can_swap_out(0)
    kv = space.swap_out("a", 3, 48)
    assert len(set(kv.slots)) == 3 and space.used == 3
    assert not space.can_swap_out(3)
    with pytest.raises(RuntimeError):
        space.swap_out("b", 3, 48)
    with pytest.raises(RuntimeError):
        space.swap_out("a", 1, 16)  # one copy per request
    assert space.release("a") == 3 and space.release("a") == 0
    space.check_integrity()
    assert space.used == 0


def pressure_run(
    preemption: str,
    slots: int,
    seed: int = 0,
    prepare: Callable[[AdaptiveScheduler], None] | None = None,
) -> Run:
    """12 requests of 64-160 prompt tokens and 40-80 output tokens, 8 at a time, on 24 usable
    blocks of 16 tokens (384 tokens for up to 8 x 240): preemption happens. `prepare` is called
    with the scheduler before any request arrives."""
    rng = random.Random(seed)
    scheduler, clock = make_scheduler(FairnessConfig(policy="fcfs"), num_blocks=25,
                                      preemption=preemption, swap_slots=slots)  # fmt: skip
    if prepare is not None:
        prepare(scheduler)
    for i in range(12):
        scheduler.add_request(make_request(f"r{i}", rng.choice([64, 100, 160]),
                                           rng.choice([40, 80]), clock.now))  # fmt: skip
    run = Run(scheduler, clock)
    while scheduler.has_requests():
        run.step()
        check_invariants(scheduler, 25)
    check_no_leaks(scheduler, 25)
    return run


def test_swap_mode_swaps_and_restores_without_leaks() -> None:
    run = pressure_run("swap", slots=200)
    decisions = run.scheduler.advisor.decisions
    assert run.preempted and decisions
    assert {d.mode for d in decisions} == {"swap"}
    assert len(run.finished) == 12


def test_swap_space_exhaustion_falls_back_to_recompute() -> None:
    run = pressure_run("swap", slots=6)
    reasons = {d.reason for d in run.scheduler.advisor.decisions}
    assert "swap-space-full" in reasons
    assert "forced" in reasons  # some did fit
    assert len(run.finished) == 12


def preemptions_counted(mode: str) -> float:
    """adaptivellm_preemptions_total{mode} in this process's registry (the sim's scheduler
    counts there)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("adaptivellm_preemptions_total", {"mode": mode}) or 0.0


def test_recompute_mode_never_swaps() -> None:
    """Recompute mode asks no predictor and makes no swap decision: every preemption is counted
    as a recompute, none as a swap, and a victim's decision is vLLM's own (forced)."""
    before = {mode: preemptions_counted(mode) for mode in ("swap", "recompute")}
    run = pressure_run("recompute", slots=0)
    assert run.preempted
    assert run.scheduler.advisor.swap is None and run.scheduler.advisor.costs is None
    assert run.scheduler.advisor.decisions == []  # recorded only when there was a choice to make
    assert preemptions_counted("recompute") - before["recompute"] == len(run.preempted)
    assert preemptions_counted("swap") == before["swap"]
    decision = run.scheduler._decide(make_request("x", 40, 10, run.clock.now))
    assert (decision.mode, decision.reason) == ("recompute", "forced")


def test_adaptive_follows_the_cheaper_prediction() -> None:
    """With the analytic predictor every victim is priced and goes the cheaper way (here always
    a swap: the sim's victims hold many tokens and host copies are cheap)."""
    run = pressure_run("adaptive", slots=200)
    assert run.scheduler.advisor.decisions
    for d in run.scheduler.advisor.decisions:
        assert d.reason == "cheaper", d
        assert (d.mode == "swap") == (d.swap_s < d.recompute_s), d


@pytest.mark.parametrize("cheaper", ["swap", "recompute", "tie", "alternate"])
def test_adaptive_takes_either_way_as_the_prediction_says(cheaper: str) -> None:
    """Predictions stubbed so that each way is the cheaper one in turn (alternate: every
    other victim swaps); equal predictions recompute."""
    calls: list[int] = []

    def predict(tokens: int, blocks: int) -> tuple[float, float]:
        calls.append(tokens)
        if cheaper == "alternate":
            return (1.0, 2.0) if len(calls) % 2 else (2.0, 1.0)
        return {"swap": (1.0, 2.0), "recompute": (2.0, 1.0), "tie": (1.5, 1.5)}[cheaper]

    def stub(scheduler: AdaptiveScheduler) -> None:
        scheduler.advisor.costs = predict

    run = pressure_run("adaptive", slots=200, prepare=stub)
    decisions = run.scheduler.advisor.decisions
    assert decisions and {d.reason for d in decisions} == {"cheaper"}
    modes = {d.mode for d in decisions}
    assert len(decisions) == len(calls)
    if cheaper == "alternate":
        assert modes == {"swap", "recompute"}, decisions
        for d in decisions:
            assert (d.mode == "swap") == (d.swap_s < d.recompute_s), d
    else:
        assert modes == {"swap" if cheaper == "swap" else "recompute"}
    assert len(run.finished) == 12


def test_abort_while_swapped_frees_host_copy() -> None:
    from vllm.v1.request import RequestStatus

    scheduler, clock = make_scheduler(FairnessConfig(policy="fcfs"), num_blocks=25,
                                      preemption="swap", swap_slots=200)  # fmt: skip
    for i in range(8):
        scheduler.add_request(make_request(f"r{i}", 100, 80, clock.now))
    run = Run(scheduler, clock)
    while not scheduler.advisor.swap.space.swapped:  # type: ignore[union-attr]
        run.step()
    victim = next(iter(scheduler.advisor.swap.space.swapped))  # type: ignore[union-attr]
    scheduler.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
    assert victim not in scheduler.advisor.swap.space.swapped  # type: ignore[union-attr]
    run.until_idle()
    check_no_leaks(scheduler, 25)


@pytest.mark.parametrize("mode", ["swap", "adaptive"])
def test_victim_without_a_computed_token_is_recomputed(mode: str) -> None:
    """Regression: a victim preempted before any of it was computed has nothing to swap;
    pricing 0 tokens raised inside the engine core and killed it (long-context bench)."""
    scheduler, clock = make_scheduler(FairnessConfig(policy="fcfs"), num_blocks=25,
                                      preemption=mode, swap_slots=100)  # fmt: skip
    request = make_request("r0", 40, 30, clock.now)
    scheduler.add_request(request)
    decision = scheduler._decide(request)
    assert (decision.mode, decision.reason) == ("recompute", "nothing-to-swap")
    assert scheduler.advisor.swap is not None and not scheduler.advisor.swap.space.swapped


def test_partly_filled_last_block_is_swapped_and_nothing_but_the_last_token_recomputed() -> None:
    """A victim's tokens in its last, partly filled block are swapped too (with the CPU
    backend's 128-token blocks, swapping whole blocks only left up to 127 tokens a victim to
    recompute): on resume the connector reports every swapped token as computed, and the
    copy back covers the partial block."""
    swapped: dict[str, int] = {}
    restored: dict[str, tuple[int, int]] = {}
    copied_in: list[tuple[str, int]] = []

    def spy(scheduler: AdaptiveScheduler) -> None:
        swap = scheduler.advisor.swap
        assert swap is not None
        swap_out, matched, after_alloc = (swap.swap_out, swap.get_num_new_matched_tokens,
                                          swap.update_state_after_alloc)  # fmt: skip

        def spy_swap_out(request, block_ids, num_tokens):  # type: ignore[no-untyped-def]
            ok = swap_out(request, block_ids, num_tokens)
            if ok:
                swapped[request.request_id] = num_tokens
            return ok

        def spy_matched(request, num_computed_tokens):  # type: ignore[no-untyped-def]
            tokens, asynchronous = matched(request, num_computed_tokens)
            if tokens:
                restored[request.request_id] = (num_computed_tokens, tokens)
            return tokens, asynchronous

        def spy_after_alloc(request, blocks, num_external_tokens):  # type: ignore[no-untyped-def]
            after_alloc(request, blocks, num_external_tokens)
            copied_in.extend((c.request_id, len(c.device_blocks)) for c in swap._ins)

        swap.swap_out = spy_swap_out  # type: ignore[method-assign]
        swap.get_num_new_matched_tokens = spy_matched  # type: ignore[method-assign]
        swap.update_state_after_alloc = spy_after_alloc  # type: ignore[method-assign]

    run = pressure_run("swap", slots=200, prepare=spy)
    partial = {rid: n for rid, n in swapped.items() if n % 16}
    assert partial, f"no victim was preempted inside a block: {swapped}"
    for rid, tokens in partial.items():
        local, loaded = restored[rid]  # no prefix caching here: all of it comes from host
        assert (local, loaded) == (0, tokens)
        assert (rid, -(-tokens // 16)) in copied_in
    assert len(run.finished) == 12


def test_failing_predictor_recomputes_instead_of_crashing() -> None:
    scheduler, clock = make_scheduler(FairnessConfig(policy="fcfs"), num_blocks=25,
                                      preemption="adaptive", swap_slots=200)  # fmt: skip

    def broken(num_tokens: int, num_blocks: int) -> tuple[float, float]:
        raise ValueError("predictor bug")

    scheduler.advisor.costs = broken
    for i in range(12):
        scheduler.add_request(make_request(f"r{i}", 100, 80, clock.now))
    run = Run(scheduler, clock)
    run.until_idle()
    assert run.preempted
    assert {d.reason for d in scheduler.advisor.decisions} == {"no-prediction"}
    check_no_leaks(scheduler, 25)
