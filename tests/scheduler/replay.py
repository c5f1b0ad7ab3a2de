"""Step-by-step record of the real scheduler serving the fairness simulator's workloads
(adaptivellm.benchmark.simulator) on a simulated clock: for every step, the requests scheduled
with their token counts (in the order vLLM lists them), the requests preempted and, for each, swap
or recompute. test_replay_identical compares it with a golden record made before a refactor.

Regenerate the golden (only when a change of behaviour is intended, and say so in the commit):

    .venv/bin/python -m tests.scheduler.replay
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import ModelRunnerOutput

from adaptivellm.benchmark.simulator import StepCost, workload
from adaptivellm.scheduler.config import FairnessConfig
from adaptivellm.scheduler.policies import TurnaroundPreemption
from adaptivellm.scheduler.scheduler import AdaptiveScheduler
from adaptivellm.scheduler.simulated import make_request, make_scheduler

GOLDEN = Path(__file__).parent / "data" / "replay_golden.json"
POLICIES = ("weighted-turnaround", "vtc", "fcfs", "priority")
#: Tenant weights of the multi-tenant workload (tenant-0 sends most of the requests).
WEIGHTS = {"tenant-0": 1.0, "tenant-1": 2.0, "tenant-2": 0.5, "tenant-3": 1.0, "tenant-4": 4.0}
#: (scenario, seed, requests): short workloads, arriving fast enough to contend.
WORKLOADS = (("multi-tenant", 1, 24), ("sharegpt", 2, 16))
NUM_BLOCKS = 32  # 31 usable blocks of 16 tokens: memory preemptions too
SWAP_SLOTS = 8


def cases() -> list[str]:
    return [
        f"{policy}/{mode}/{scenario}"
        for policy in POLICIES
        for mode in ("sync", "async")
        for scenario, _, _ in WORKLOADS
    ]


def record(case: str) -> list[dict[str, Any]]:
    """Serve the case's workload; one entry per step."""
    policy, mode, scenario = case.split("/")
    seed, num = next((s, n) for name, s, n in WORKLOADS if name == scenario)
    fairness = FairnessConfig(
        policy=policy,
        tenant_weights=WEIGHTS,
        preemption=TurnaroundPreemption(enabled=True, candidates=2),
    )
    scheduler, clock = make_scheduler(
        fairness,
        num_blocks=NUM_BLOCKS,
        max_num_seqs=3,
        max_num_batched_tokens=128,
        max_model_len=512,
        preemption="adaptive",
        swap_slots=SWAP_SLOTS,
        async_scheduling=mode == "async",
    )
    scheduler.step_timer = clock
    clock.now = 0.0
    cost = StepCost()
    pending = deque(sorted(workload(scenario, seed, 16.0, num), key=lambda r: r.arrival_s))
    steps: list[dict[str, Any]] = []
    in_flight: deque[tuple[SchedulerOutput, list[str]]] = deque()
    depth = 2 if mode == "async" else 1
    while pending or scheduler.has_requests() or in_flight:
        while pending and pending[0].arrival_s <= clock.now:
            r = pending.popleft()
            scheduler.add_request(
                make_request(f"r{r.index}", min(r.prompt_tokens, 200), min(r.max_tokens, 40),
                             clock.now, r.tenant, priority=r.index % 3)
            )  # fmt: skip
        if not in_flight and not scheduler.has_requests():
            clock.now = pending[0].arrival_s
            continue
        while scheduler.has_requests() and len(in_flight) < depth:
            out = scheduler.schedule()
            steps.append(_entry(scheduler, out))
            # A request samples a token in this step unless the step only prefills part of it.
            samples = [r for r in out.num_scheduled_tokens
                       if not scheduler.requests[r].is_prefill_chunk]  # fmt: skip
            in_flight.append((out, samples))
        if in_flight:
            _finish(scheduler, *in_flight.popleft(), clock, cost)
        if len(steps) > 5000:
            raise AssertionError(f"{case} did not drain")
    return steps


def _entry(scheduler: AdaptiveScheduler, out: SchedulerOutput) -> dict[str, Any]:
    preempted = sorted(out.preempted_req_ids or ())
    swapped = scheduler.advisor.swap.space.swapped if scheduler.advisor.swap is not None else {}
    return {
        "scheduled": [[rid, n] for rid, n in out.num_scheduled_tokens.items()],
        "preempted": {rid: "swap" if rid in swapped else "recompute" for rid in preempted},
    }


def _finish(
    scheduler: AdaptiveScheduler,
    out: SchedulerOutput,
    samples: list[str],
    clock: Any,
    cost: StepCost,
) -> None:
    counts = out.num_scheduled_tokens
    decodes = sum(1 for n in counts.values() if n == 1)
    clock.now += cost.step_s(decodes, sum(n for n in counts.values() if n > 1))
    ids = list(counts)
    sampled = [[5] if rid in samples else [] for rid in ids]
    runner = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)},
                               sampled_token_ids=sampled)  # fmt: skip
    scheduler.update_from_output(out, runner)


def main() -> None:
    golden = {case: record(case) for case in cases()}
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    lines = ["{"]
    for i, (case, steps) in enumerate(golden.items()):
        lines.append(f"  {json.dumps(case)}: [")
        lines += [
            "    " + json.dumps(s, separators=(",", ":")) + ("," if k < len(steps) - 1 else "")
            for k, s in enumerate(steps)
        ]
        lines.append("  ]" + ("," if i < len(golden) - 1 else ""))
    lines.append("}")
    GOLDEN.write_text("\n".join(lines) + "\n")
    for case, steps in golden.items():
        preempted = [m for s in steps for m in s["preempted"].values()]
        print(f"{case}: {len(steps)} steps, {preempted.count('swap')} swaps, "
              f"{preempted.count('recompute')} recomputes")  # fmt: skip


if __name__ == "__main__":
    main()
