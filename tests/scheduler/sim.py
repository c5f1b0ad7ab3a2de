"""The simulated scheduler of the tests (adaptivellm.scheduler.simulated) and the checks the
tests make on it."""

from __future__ import annotations

from adaptivellm.scheduler.scheduler import AdaptiveScheduler
from adaptivellm.scheduler.simulated import (
    BLOCK_SIZE,
    EOS,
    Clock,
    Run,
    make_request,
    make_scheduler,
)

__all__ = [
    "BLOCK_SIZE",
    "EOS",
    "Clock",
    "Run",
    "check_invariants",
    "check_no_leaks",
    "make_request",
    "make_scheduler",
]


def check_no_leaks(scheduler: AdaptiveScheduler, num_blocks: int) -> None:
    """Every KV block is back in the pool and nothing is tracked once all requests are done."""
    assert not scheduler.requests
    assert not scheduler.tracked
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == num_blocks - 1
    if scheduler.advisor.swap is not None:
        scheduler.advisor.swap.space.check_integrity()
        assert scheduler.advisor.swap.space.used == 0, "host swap slots leaked"


def check_invariants(scheduler: AdaptiveScheduler, num_blocks: int) -> None:
    """After any step: device blocks in use + free == usable, host slots consistent, and no
    request both swapped out and running."""
    pool = scheduler.kv_cache_manager.block_pool
    held = [b for rid in scheduler.requests for b in _block_ids(scheduler, rid)]
    assert len(held) == len(set(held)), "a device block is held by two requests"
    assert len(held) + pool.get_num_free_blocks() == num_blocks - 1, "device blocks leaked"
    if scheduler.advisor.swap is not None:
        scheduler.advisor.swap.space.check_integrity()
        running = {r.request_id for r in scheduler.running}
        assert not running & set(scheduler.advisor.swap.space.swapped) - set(
            scheduler.advisor.swap._consumed
        )


def _block_ids(scheduler: AdaptiveScheduler, request_id: str) -> list[int]:
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    return [b.block_id for b in manager.req_to_blocks.get(request_id, [])]
