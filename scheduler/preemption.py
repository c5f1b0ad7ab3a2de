"""Swap or recompute: the per-victim decision (`choose_mode`, a pure function), its
configuration, and the scheduler's part that applies it (`PreemptionAdvisor`).

When vLLM must preempt a request for lack of KV blocks, AdaptiveScheduler asks its advisor,
which asks the cost predictors (adaptivellm.predictors) what swapping the victim's computed KV
blocks to host memory and back would cost, and what recomputing them would cost, calls
`choose_mode`, and plans the swap-out with the swap connector.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.v1.request import Request

    from adaptivellm.scheduler.fail_safe import InternalErrors
    from adaptivellm.scheduler.swap_connector import AdaptiveSwapConnector

#: (num_tokens, num_blocks) -> (swap_s, recompute_s): the cost predictors (scheduler.costs).
CostFn = Callable[[int, int], tuple[float, float]]
#: Recent decisions kept for tests and debugging.
KEPT_DECISIONS = 1000

MODES = ("adaptive", "swap", "recompute")


@dataclass(frozen=True)
class PreemptionConfig:
    """How preempted requests keep their KV cache."""

    mode: str = "adaptive"
    """adaptive: the cheaper of swap and recompute per victim; swap: always swap when the swap
    space has room; recompute: stock vLLM behaviour (drop the KV cache, recompute on resume)."""
    swap_space_bytes: int = 0
    """Host memory for swapped KV blocks (0 with mode recompute)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown preemption mode {self.mode!r}; choose from {MODES}")
        if self.swap_space_bytes < 0:
            raise ValueError(f"swap space must be >= 0 bytes, got {self.swap_space_bytes}")
        if self.mode != "recompute" and self.swap_space_bytes == 0:
            raise ValueError(f"--preemption-mode {self.mode} needs --swap-space > 0")


@dataclass(frozen=True)
class Decision:
    """What to do with one victim, and why."""

    mode: str
    """swap | recompute"""
    reason: str
    """cheaper | forced | swap-space-full | nothing-to-swap | no-prediction | internal-error"""
    swap_s: float
    recompute_s: float


def choose_mode(
    setting: str, swap_s: float, recompute_s: float, swappable_blocks: int, space_has_room: bool
) -> Decision:
    """Swap or recompute one victim.

    `swap_s`: predicted swap-out + swap-in time of its swappable blocks; `recompute_s`:
    predicted time to recompute the same tokens. Swapping needs blocks to swap and room in the
    swap space; otherwise the victim is recomputed (a swap fallback when swapping was wanted).
    A NaN prediction never wins.
    """
    if setting == "recompute":
        return Decision("recompute", "forced", swap_s, recompute_s)
    if swappable_blocks == 0:
        return Decision("recompute", "nothing-to-swap", swap_s, recompute_s)
    if math.isnan(swap_s) and math.isnan(recompute_s):
        return Decision("recompute", "no-prediction", swap_s, recompute_s)
    wants_swap = setting == "swap" or _less(swap_s, recompute_s)
    if not wants_swap:
        return Decision("recompute", "cheaper", swap_s, recompute_s)
    if not space_has_room:
        return Decision("recompute", "swap-space-full", swap_s, recompute_s)
    return Decision("swap", "forced" if setting == "swap" else "cheaper", swap_s, recompute_s)


def _less(a: float, b: float) -> bool:
    if math.isnan(a):
        return False
    return math.isnan(b) or a < b


class PreemptionAdvisor:
    """Swap or recompute, per victim: the swap connector vLLM built (None: every victim is
    recomputed, stock vLLM), the cost predictors, and the recent decisions. A failing cost
    predictor is counted in `errors` and costs that victim a recompute, never the engine."""

    def __init__(
        self,
        config: PreemptionConfig,
        swap: AdaptiveSwapConnector | None,
        costs: CostFn | None,
        errors: InternalErrors,
    ) -> None:
        if config.mode != "recompute" and swap is None:
            raise ValueError(
                f"preemption mode {config.mode} needs AdaptiveSwapConnector as the KV "
                "connector (adaptivellm serve configures it)"
            )
        self.config = config
        self.swap = swap
        self.costs = costs
        self.errors = errors
        self.decisions: list[Decision] = []

    def kept_tokens(self, request: Request) -> int:
        """Computed tokens of `request` that a preemption now would swap out rather than drop
        (0 under --preemption-mode recompute, or when the swap space has no room)."""
        if self.swap is None or self.config.mode == "recompute":
            return 0
        tokens = self.swap.swappable_tokens(request, request.num_computed_tokens)
        return tokens if self.swap.space.can_swap_out(self.swap.blocks_for(tokens)) else 0

    def decide(self, request: Request, block_ids: Callable[[], list[int]]) -> Decision:
        """Swap or recompute this victim; plans the swap-out of its blocks (`block_ids()`)."""
        if self.swap is None or self.costs is None:
            return Decision("recompute", "forced", math.nan, math.nan)
        tokens = self.swap.swappable_tokens(request, request.num_computed_tokens)
        blocks = self.swap.blocks_for(tokens)
        if blocks == 0:  # preempted before any token was computed: nothing to swap
            return choose_mode(self.config.mode, math.nan, math.nan, 0, False)
        swap_s = recompute_s = math.nan
        with self.errors.guard("cost_predictor", request.request_id):
            swap_s, recompute_s = self.costs(tokens, blocks)
        room = self.swap.space.can_swap_out(blocks)
        decision = choose_mode(self.config.mode, swap_s, recompute_s, blocks, room)
        if decision.mode == "swap" and not self.swap.swap_out(request, block_ids(), tokens):
            decision = Decision("recompute", "swap-space-full", swap_s, recompute_s)
        from adaptivellm.metrics import EngineMetrics  # prometheus_client: not for pure users

        EngineMetrics.get().predicted_cost.labels(mode="swap").observe(swap_s)
        EngineMetrics.get().predicted_cost.labels(mode="recompute").observe(recompute_s)
        self.decisions.append(decision)
        del self.decisions[:-KEPT_DECISIONS]
        return decision

    def swap_space_bytes(self) -> float | None:
        """Host memory held by swapped KV blocks; None without swap."""
        return None if self.swap is None else self.swap.space.used * self.swap.bytes_per_block

    def release(self, request_id: str) -> None:
        """The request is gone: free what it holds in the swap space."""
        if self.swap is not None:
            self.swap.release(request_id)
