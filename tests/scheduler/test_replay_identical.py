"""The scheduler makes the same decisions, step by step, as when the golden record was made
(tests/scheduler/data/replay_golden.json, by tests/scheduler/replay.py): every policy
(weighted-turnaround, vtc, fcfs, priority), with sync and async scheduling, fairness preemption
on, on two of the fairness simulator's workloads (several weighted tenants; one tenant, so ties).
A refactor that means to change nothing must keep this passing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.scheduler import replay


@pytest.fixture(scope="module")
def golden() -> dict[str, list[dict[str, Any]]]:
    data: dict[str, list[dict[str, Any]]] = json.loads(replay.GOLDEN.read_text())
    return data


def first_difference(want: list[dict[str, Any]], got: list[dict[str, Any]]) -> str | None:
    """A message naming the first step that differs (None if none does)."""
    for step, (w, g) in enumerate(zip(want, got, strict=False)):
        if w != g:
            return (f"step {step} differs:\n  golden: {json.dumps(w)}\n  now:    {json.dumps(g)}"
                    f"\n  step before: {json.dumps(want[step - 1]) if step else None}")  # fmt: skip
    if len(want) != len(got):
        same = min(len(want), len(got))
        return f"same first {same} steps, then golden has {len(want)}, now {len(got)}"
    return None


def test_the_golden_covers_every_case(golden: dict[str, list[dict[str, Any]]]) -> None:
    assert sorted(golden) == sorted(replay.cases())
    preempted = [m for steps in golden.values() for s in steps for m in s["preempted"].values()]
    assert "swap" in preempted and "recompute" in preempted


@pytest.mark.parametrize("case", replay.cases())
def test_replay_is_identical(case: str, golden: dict[str, list[dict[str, Any]]]) -> None:
    difference = first_difference(golden[case], replay.record(case))
    assert difference is None, f"{case}: {difference}"
