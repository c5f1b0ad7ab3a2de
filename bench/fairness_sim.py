"""Fairness policies on a simulated clock: the fairness benchmark's workloads (bench/fairness.py:
the multi-tenant mix and the single-tenant mixed-length mix, at its offered rate) replayed
through the real AdaptiveScheduler, with no model and a step-cost model in place of the engine,
for many workload samples (seeds) in seconds instead of an hour per run.

What it is for: telling a policy's structural effect from the noise of one run. A real run of
bench/fairness.py replays one workload sample (seed 0) and its ratios move 2-3% between runs
of the same code on this machine. Here every run of the same code gives the same figures, and
the spread over seeds shows how much of a ratio belongs to the sample: the same code's
throughput ratio reads 0.97x-1.01x across samples, because a finite workload ends in a drain
(the last requests finish with part of the batch empty), and shortest-first leaves the longest
requests for the drain.

The scheduler is the one `serve` runs (adaptivellm.scheduler.simulated builds it over a KV
cache large enough that nothing is preempted for memory, as in the benchmark; swap preemption, so a
turnaround victim resumes with its KV cache). Each step lasts

    decode_step_ms + decode_token_ms * (decoding requests) + prefill_token_ms * (prompt tokens)

read off the fairness run on this machine (bench/results/fairness-multi-tenant.json: stock
vLLM alone decodes at 18 ms per token, and at 25 ms per step with 4 sequences; prefill about
1.2 ms per prompt token). Weighted turnaround divides by each request's service time alone by
the same cost model; Jain's index is the benchmark's (adaptivellm.benchmark.metrics
.window_fairness) over the simulated token times. Not modelled: the cost of the scheduler's own
Python (bench/scheduler_overhead.py times it on these workloads: about 0.06 ms per step more than
stock vLLM under weighted-turnaround, in one process), swap copies, and the machine's noise; so
the simulated throughput ratio is an upper bound of the real one.

    python bench/fairness_sim.py [--seeds 8] [--variants default,exponent-3,...]
                                               # writes bench/results/fairness-sim.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import statistics
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from adaptivellm.benchmark.scenarios import FAIRNESS_SCENARIOS as SCENARIO_KEYS
from adaptivellm.benchmark.simulator import (
    DEFAULT_RATE,
    StepCost,
    replay,
    workload,
    write_report,
)
from adaptivellm.scheduler.config import FairnessConfig
from adaptivellm.scheduler.policies import TurnaroundPreemption

__all__ = ["DEFAULT_RATE", "VARIANTS", "StepCost", "main", "replay", "workload"]

RESULTS = Path(__file__).resolve().parent / "results"
#: Named scheduler configurations: FairnessConfig fields that differ from `serve`'s defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "hrrn": {"service_exponent": 1.0},
    "exponent-3": {"service_exponent": 3.0},
    "candidates-3": {"preemption": TurnaroundPreemption(candidates=3)},
    "exponent-3+candidates-3": {
        "service_exponent": 3.0,
        "preemption": TurnaroundPreemption(candidates=3),
    },
    "no-turnaround-preemption": {"preemption": TurnaroundPreemption(enabled=False)},
    "tenant-slack-2U": {"tenant_slack_tokens": 2 * 2 * 2048.0},
    "vtc": {"policy": "vtc"},
}


def _job(args: tuple[str, int, float, int, tuple[str, ...], StepCost]) -> dict[str, Any]:
    scenario, seed, rate, num_requests, variants, cost = args
    requests = workload(scenario, seed, rate, num_requests)
    figures = {"fcfs": replay(requests, FairnessConfig(policy="fcfs"), cost)}
    for name in variants:
        figures[name] = replay(requests, FairnessConfig(**VARIANTS[name]), cost)
    return {"scenario": scenario, "seed": seed, "figures": figures}


def _quiet() -> None:
    """Pool workers: no vLLM start-up lines for every scheduler built."""
    logging.disable(logging.WARNING)


def summarise(runs: list[dict[str, Any]], variants: tuple[str, ...]) -> dict[str, Any]:
    """Per scenario and variant: the ratios to FCFS of each seed, their mean, min and max."""
    out: dict[str, Any] = {}
    for key, scenario in SCENARIO_KEYS.items():
        mine = sorted((r for r in runs if r["scenario"] == scenario), key=lambda r: r["seed"])
        if not mine:
            continue
        section: dict[str, Any] = {"seeds": [r["seed"] for r in mine], "variants": {}}
        for name in ("fcfs", *variants):
            rows = [r["figures"][name] for r in mine]
            base = [r["figures"]["fcfs"] for r in mine]
            ratios = {
                f"{m}_vs_fcfs": [x[m] / b[m] for x, b in zip(rows, base, strict=True)]
                for m in ("avg_weighted_turnaround", "throughput_tokens_per_s")
            }
            per_seed = {m: [x[m] for x in rows] for m in ("jain", "drain_s", "p99_ttft_s", "steps")}
            section["variants"][name] = {
                **{m: _spread(v) for m, v in {**ratios, **per_seed}.items()},
                "per_seed": {**ratios, **per_seed},
            }
        out[key] = section
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def table(summary: Mapping[str, Any]) -> str:
    """The summary as a text table (means over seeds; seed 0 is the benchmark's workload)."""
    lines = [f"{'scenario':13} {'variant':26} {'wt/fcfs':>8} {'tput/fcfs':>9} {'min':>6} "
             f"{'jain':>6} {'drain s':>7}"]  # fmt: skip
    for key, section in summary.items():
        for name, v in section["variants"].items():
            lines.append(
                f"{key:13} {name:26} {v['avg_weighted_turnaround_vs_fcfs']['mean']:8.3f} "
                f"{v['throughput_tokens_per_s_vs_fcfs']['mean']:9.4f} "
                f"{v['throughput_tokens_per_s_vs_fcfs']['min']:6.3f} {v['jain']['mean']:6.3f} "
                f"{v['drain_s']['mean']:7.2f}"
            )
    return "\n".join(lines)


def _variant_names(text: str) -> tuple[str, ...]:
    names = tuple(n for n in (s.strip() for s in text.split(",")) if n)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {', '.join(unknown) or '(none given)'}; known: "
            + ", ".join(VARIANTS)
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="workload samples (0..N-1)")
    parser.add_argument("--num-requests", type=int, default=120)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="requests/s offered")
    parser.add_argument(
        "--variants",
        type=_variant_names,
        default=tuple(VARIANTS),
        help=f"comma-separated, of: {', '.join(VARIANTS)} (default: all)",
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIO_KEYS.values()))
    parser.add_argument("--jobs", type=int, default=2, help="processes")
    parser.add_argument("--out", type=Path, default=RESULTS / "fairness-sim.json")
    for f in dataclasses.fields(StepCost):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=float, default=f.default)
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.num_requests < 2 or args.rate <= 0 or args.jobs < 1:
        parser.error("--seeds and --jobs must be >= 1, --num-requests >= 2, --rate > 0")
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if bad := [s for s in scenarios if s not in SCENARIO_KEYS.values()]:
        parser.error(f"unknown scenario(s) {bad}; known: {', '.join(SCENARIO_KEYS.values())}")
    cost = StepCost(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StepCost)})
    jobs = [(s, seed, args.rate, args.num_requests, args.variants, cost)
            for s in scenarios for seed in range(args.seeds)]  # fmt: skip
    if args.jobs == 1:  # in this process
        runs = [_job(job) for job in tqdm(jobs, desc="workloads")]
    else:
        with multiprocessing.get_context("spawn").Pool(args.jobs, initializer=_quiet) as pool:
            runs = list(tqdm(pool.imap_unordered(_job, jobs), total=len(jobs), desc="workloads"))
    summary = summarise(runs, args.variants)
    write_report("bench/fairness_sim.py", argv, args.out, {
        "step_cost_ms": dataclasses.asdict(cost),
        "rate": args.rate,
        "num_requests": args.num_requests,
        "max_num_seqs": 4,
        "variants": {n: {k: repr(v) for k, v in VARIANTS[n].items()} for n in args.variants},
        "scenarios": summary,
    }, table(summary))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
