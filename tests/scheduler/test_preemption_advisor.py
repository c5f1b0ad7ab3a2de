"""PreemptionAdvisor (scheduler/preemption.py) against a hand-made swap connector, without vLLM:
which victims keep their KV, when the cost predictors are asked, and what a swap-out that fails
turns into. The advisor inside the real scheduler is tested in test_preemption.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from adaptivellm.scheduler.fail_safe import InternalErrors
from adaptivellm.scheduler.preemption import PreemptionAdvisor, PreemptionConfig

BLOCK = 16


@dataclass
class Space:
    slots: int
    used: int = 0

    def can_swap_out(self, blocks: int) -> bool:
        return self.used + blocks <= self.slots


@dataclass
class Swap:
    """The parts of AdaptiveSwapConnector the advisor uses."""

    space: Space
    bytes_per_block: int = 1000
    accept: bool = True
    swapped: list[tuple[str, list[int], int]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)

    def swappable_tokens(self, request: Request, num_computed_tokens: int) -> int:
        return num_computed_tokens

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // BLOCK)

    def swap_out(self, request: Request, block_ids: list[int], tokens: int) -> bool:
        self.swapped.append((request.request_id, block_ids, tokens))
        return self.accept

    def release(self, request_id: str) -> None:
        self.released.append(request_id)


@dataclass
class Request:
    request_id: str
    num_computed_tokens: int


class Costs:
    """Cost predictors that record what they were asked."""

    def __init__(self, swap_s: float, recompute_s: float) -> None:
        self.answer = (swap_s, recompute_s)
        self.asked: list[tuple[int, int]] = []

    def __call__(self, tokens: int, blocks: int) -> tuple[float, float]:
        self.asked.append((tokens, blocks))
        return self.answer


def advisor(
    mode: str = "adaptive", slots: int = 10, costs: Costs | None = None, swap: bool = True
) -> PreemptionAdvisor:
    config = PreemptionConfig(mode, swap_space_bytes=0 if mode == "recompute" else 1)
    connector = Swap(Space(slots)) if swap else None
    return PreemptionAdvisor(config, connector, costs or Costs(0.1, 1.0), InternalErrors())  # type: ignore[arg-type]


def test_a_swap_mode_needs_the_swap_connector() -> None:
    with pytest.raises(ValueError, match="AdaptiveSwapConnector"):
        advisor("adaptive", swap=False)
    assert advisor("recompute", swap=False).swap is None


@pytest.mark.parametrize("mode", ["adaptive", "swap"])
def test_kept_tokens_are_the_computed_ones_when_the_space_has_room(mode: str) -> None:
    a = advisor(mode, slots=2)
    assert a.kept_tokens(Request("r", 32)) == 32  # 2 blocks: room
    assert a.kept_tokens(Request("r", 33)) == 0  # 3 blocks: none


def test_nothing_is_kept_under_recompute_or_without_swap() -> None:
    assert advisor("recompute").kept_tokens(Request("r", 32)) == 0
    assert advisor("recompute", swap=False).kept_tokens(Request("r", 32)) == 0


def test_the_cheaper_prediction_wins_and_the_swap_is_planned() -> None:
    costs = Costs(0.1, 1.0)
    a = advisor(costs=costs)
    decision = a.decide(Request("r", 40), lambda: [7, 8, 9])
    assert (decision.mode, decision.reason) == ("swap", "cheaper")
    assert costs.asked == [(40, 3)]
    assert a.swap is not None and a.swap.swapped == [("r", [7, 8, 9], 40)]  # type: ignore[attr-defined]
    assert a.decisions == [decision]
    recompute = advisor(costs=Costs(1.0, 0.1)).decide(Request("r", 40), lambda: [1, 2, 3])
    assert (recompute.mode, recompute.reason) == ("recompute", "cheaper")


def test_a_victim_with_nothing_computed_is_recomputed_without_asking() -> None:
    costs = Costs(0.1, 1.0)
    a = advisor(costs=costs)
    decision = a.decide(Request("r", 0), lambda: [])
    assert (decision.mode, decision.reason) == ("recompute", "nothing-to-swap")
    assert costs.asked == [] and a.decisions == []
    a.decide(Request("one-block", 1), lambda: [4])  # one block: asked
    assert costs.asked == [(1, 1)]


def test_without_predictors_every_victim_is_recomputed() -> None:
    a = advisor()
    a.costs = None
    decision = a.decide(Request("r", 40), lambda: [1, 2, 3])
    assert (decision.mode, decision.reason) == ("recompute", "forced")
    assert a.swap is not None and a.swap.swapped == []  # type: ignore[attr-defined]
    forced = advisor("recompute", swap=False).decide(Request("r", 40), lambda: [1, 2, 3])
    assert (forced.mode, forced.reason) == ("recompute", "forced")


def test_a_swap_out_the_connector_refuses_is_a_recompute() -> None:
    a = advisor()
    assert a.swap is not None
    a.swap.accept = False  # type: ignore[attr-defined]
    decision = a.decide(Request("r", 40), lambda: [1, 2, 3])
    assert (decision.mode, decision.reason) == ("recompute", "swap-space-full")
    assert a.decisions == [decision]


def test_a_failing_predictor_is_counted_and_costs_a_recompute() -> None:
    def broken(tokens: int, blocks: int) -> tuple[float, float]:
        raise RuntimeError("predictor bug")

    a = advisor()
    a.costs = broken
    decision = a.decide(Request("r", 40), lambda: [1, 2, 3])
    assert (decision.mode, decision.reason) == ("recompute", "no-prediction")
    assert math.isnan(decision.swap_s) and a.errors.counts == {"cost_predictor": 1}


def test_swap_space_bytes_and_release() -> None:
    a = advisor()
    assert a.swap is not None
    a.swap.space.used = 3
    assert a.swap_space_bytes() == 3000
    a.release("r")
    assert a.swap.released == ["r"]  # type: ignore[attr-defined]
    plain = advisor("recompute", swap=False)
    assert plain.swap_space_bytes() is None
    plain.release("r")  # nothing to free, no error


def test_only_the_recent_decisions_are_kept() -> None:
    a = advisor(slots=10**6)
    for i in range(1005):
        a.decide(Request(f"r{i}", 16), lambda: [1])
    assert len(a.decisions) == 1000
