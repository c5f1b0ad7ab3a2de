"""Swap or recompute: the per-victim decision, a pure function, and its configuration.

When vLLM must preempt a request for lack of KV blocks, AdaptiveScheduler asks the cost
predictors (adaptivellm.predictors) what swapping the victim's computed KV blocks to host memory
and back would cost, and what recomputing them would cost, then calls `choose_mode`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
