"""Benchmark of the SplitLLM planner in the style of the paper's evaluation (arXiv 2410.10759).

A grid of request types (model, prompt and output length, client device, link, RTT, server
load, SLA class) is planned with server-only, greedy, the exact best prefix and the DP. It
reports the server workload saved against server-only, the throughput gained over greedy, SLA
attainment, DP solve times for 32 and 80 layers, and a study of the DP's discretisation step.

    python bench/split_planner.py [--quick] [--out-dir bench/results]

Writes split_planner.json and split_planner.png under --out-dir. The scenario ranges are
explained in docs/split_planner.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from tqdm import tqdm

from adaptivellm.split_client.planner import (
    PRESETS,
    ClientProfile,
    Plan,
    Request,
    ServerProfile,
    SplitCosts,
    build_costs,
    default_budget_bins,
    plan_brute_force,
    plan_dp,
    plan_greedy,
    plan_prefix,
)
from adaptivellm.split_client.workload import Scenario, plan_all, summarise

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Client devices: effective (not peak) fp16 TFLOP/s and memory bandwidth, i.e. about 50 FLOP
# per byte like consumer GPUs. Each layer also pays 30 us of kernel launches per forward pass.
CLIENT_TIERS = {
    "laptop-igpu": (5e12, 100e9),  # integrated GPU / base Apple M-series
    "laptop-gpu": (15e12, 300e9),  # RTX 4060/4070 laptop class
    "desktop-gpu": (50e12, 1000e9),  # RTX 4090 class
}
CLIENT_LAYER_OVERHEAD_S = 30e-6
LINKS = {"10/50 Mbps": (10e6, 50e6), "100/300 Mbps": (100e6, 300e6), "1 Gbps": (1e9, 1e9)}
RTTS_MS = (10, 40)  # edge / metro data centre
SERVER_BATCHES = (32, 256)  # requests sharing each decode step: moderate load, saturated H100
# SLA classes as time-to-first-token + time-per-output-token targets, summed over the request.
SLA_CLASSES = {
    "tight": (0.5, 0.040),
    "interactive": (1.0, 0.080),
    "relaxed": (3.0, 0.150),
    "batch": (10.0, 0.500),
}
MODELS = ("gpt2", "llama3-8b")
PROMPTS = (128, 512, 2048)
OUTPUTS = (16, 128, 512)
METHODS = ("server-only", "greedy", "prefix", "dp")
STEP_STUDY_BINS = (50, 100, 200, 500, 1000, 2000, 5000)
TARGETS = {"workload_reduction": 0.40, "improvement_vs_greedy": 0.19, "solve_ms_80": 1.0}


@dataclass(frozen=True)
class Case:
    """One request type of the grid, with its labels for the breakdowns."""

    labels: dict[str, Any]
    scenario: Scenario


def sla_seconds(sla_class: str, output_tokens: int) -> float:
    ttft, tpot = SLA_CLASSES[sla_class]
    return ttft + (output_tokens - 1) * tpot


def build_grid(quick: bool) -> list[Case]:
    """Every combination of the ranges above; --quick keeps every 9th."""
    axes = itertools.product(
        MODELS, PROMPTS, OUTPUTS, CLIENT_TIERS, LINKS, RTTS_MS, SERVER_BATCHES, SLA_CLASSES
    )
    cases = []
    for model, prompt, output, tier, link, rtt_ms, batch, sla in axes:
        flops, mem = CLIENT_TIERS[tier]
        up, down = LINKS[link]
        client = ClientProfile(flops, up, down, rtt_ms / 1e3, mem, CLIENT_LAYER_OVERHEAD_S)
        request = Request(prompt, output, sla_seconds(sla, output))
        labels = {
            "model": model, "prompt": prompt, "output": output, "client": tier, "link": link,
            "rtt_ms": rtt_ms, "server_batch": batch, "sla": sla,
        }  # fmt: skip
        scenario = Scenario(PRESETS[model], client, ServerProfile(decode_batch=batch), request)
        cases.append(Case(labels, scenario))
    return cases[::9] if quick else cases


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def headline(plans: list[dict[str, Plan]], capacity: float) -> dict[str, Any]:
    """Workload reduction, improvement over greedy and SLA attainment over a set of plans."""
    mix = {m: summarise(m, [p[m] for p in plans], capacity) for m in METHODS}
    per_request = [1 - p["dp"].server_workload / p["server-only"].server_workload for p in plans]
    return {
        "requests": len(plans),
        "server_workload_reduction_vs_server_only": 1 - ratio(
            mix["dp"].mean_server_workload, mix["server-only"].mean_server_workload
        ),
        "greedy_workload_reduction_vs_server_only": 1 - ratio(
            mix["greedy"].mean_server_workload, mix["server-only"].mean_server_workload
        ),
        "mean_per_request_reduction_vs_server_only": statistics.fmean(per_request),
        "improvement_vs_greedy": ratio(mix["dp"].throughput_rps, mix["greedy"].throughput_rps) - 1,
        "workload_reduction_vs_greedy": 1 - ratio(
            mix["dp"].mean_server_workload, mix["greedy"].mean_server_workload
        ),
        "sla_attainment": mix["dp"].sla_attainment,
        "methods": {
            m: {
                "mean_server_tflop": r.mean_server_workload / 1e12,
                "throughput_rps": r.throughput_rps,
                "sla_attainment": r.sla_attainment,
            }
            for m, r in mix.items()
        },
    }  # fmt: skip


def breakdowns(cases: list[Case], plans: list[dict[str, Plan]], capacity: float) -> dict[str, Any]:
    """The headline figures again, per value of each grid axis."""
    out: dict[str, Any] = {}
    for axis in cases[0].labels:
        groups: dict[Any, list[dict[str, Plan]]] = defaultdict(list)
        for case, plan in zip(cases, plans, strict=True):
            groups[case.labels[axis]].append(plan)
        out[axis] = {
            str(value): {
                k: v
                for k, v in headline(group, capacity).items()
                if k != "methods" and k != "mean_per_request_reduction_vs_server_only"
            }
            for value, group in groups.items()
        }
    return out


def compare_greedy(plans: list[dict[str, Plan]]) -> dict[str, Any]:
    """How often, and by how much, the DP saves server work that greedy leaves on the server."""
    gains = [1 - p["dp"].server_workload / p["greedy"].server_workload for p in plans]
    better = [g for g in gains if g > 1e-9]
    return {
        "fraction_of_requests_dp_better": len(better) / len(gains),
        "fraction_of_requests_dp_worse": sum(g < -1e-9 for g in gains) / len(gains),
        "max_single_request_workload_saving": max(gains),
        "mean_saving_where_better": statistics.fmean(better) if better else 0.0,
        "greedy_infeasible_dp_feasible": sum(
            p["dp"].feasible and not p["greedy"].feasible for p in plans
        ),
    }


def brute_force_check(cases: list[Case], costs: list[SplitCosts]) -> dict[str, Any]:
    """On the 12-layer GPT-2 cases, the DP and the exact prefix against all 4096 placements."""
    dp_excess, prefix_exact, checked = [], 0, 0
    for case, c in zip(cases, costs, strict=True):
        if case.labels["model"] != "gpt2":
            continue
        oracle = plan_brute_force(c)
        checked += 1
        prefix_exact += plan_prefix(c).server_workload <= oracle.server_workload * (1 + 1e-12)
        dp_excess.append(plan_dp(c).server_workload / oracle.server_workload - 1)
    return {
        "requests": checked,
        "prefix_equals_brute_force": prefix_exact,
        "dp_equals_brute_force": sum(e <= 1e-12 for e in dp_excess),
        "dp_max_excess": max(dp_excess, default=0.0),
    }


def step_study(costs: list[SplitCosts], reps: int) -> list[dict[str, Any]]:
    """DP with budget/bins steps against the exact optimum (the best prefix, see docs)."""
    exact = [plan_prefix(c) for c in costs]
    timing = {n: timing_costs(n) for n in (32, 80)}
    rows = []
    for bins in tqdm(STEP_STUDY_BINS, desc="step study", leave=False):
        plans = [plan_dp(c, bins=bins) for c in costs]
        excess = [
            p.server_workload / e.server_workload - 1 for p, e in zip(plans, exact, strict=True)
        ]
        total = sum(p.server_workload for p in plans) / sum(e.server_workload for e in exact)
        rows.append({
            "bins": bins,
            "aggregate_workload_excess": total - 1,
            "max_request_excess": max(excess),
            "fraction_not_optimal": sum(x > 1e-9 for x in excess) / len(excess),
            "sla_violations": sum(p.latency_s > p.sla_s for p in plans if p.feasible),
            "solve_ms": {
                str(n): median_ms(partial(plan_dp, c, bins=bins), reps)
                for n, c in timing.items()
            },
        })  # fmt: skip
    return rows


def timing_costs(num_layers: int) -> SplitCosts:
    """A typical request (512 + 128 tokens, laptop GPU, 100 Mbps, interactive SLA)."""
    shape = {12: PRESETS["gpt2"], 32: PRESETS["llama3-8b"], 80: PRESETS["llama3-70b"]}[num_layers]
    flops, mem = CLIENT_TIERS["laptop-gpu"]
    client = ClientProfile(flops, 100e6, 300e6, 0.01, mem, CLIENT_LAYER_OVERHEAD_S)
    return build_costs(shape, client, ServerProfile(), Request(512, 128, 60.0))


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm caches
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def solve_times(reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in (12, 32, 80):
        c = timing_costs(n)
        out[str(n)] = {
            "dp_ms": median_ms(partial(plan_dp, c), reps),
            "dp_budget_bins": default_budget_bins(n),
            "prefix_ms": median_ms(partial(plan_prefix, c), reps),
            "greedy_ms": median_ms(partial(plan_greedy, c), reps),
        }
    return out


def scenario_rows(cases: list[Case], plans: list[dict[str, Plan]]) -> dict[str, Any]:
    fields = [*cases[0].labels, "sla_s"]
    fields += [f"{m}_{k}" for m in METHODS for k in ("server_gflop", "client_layers", "latency_s")]
    rows = []
    for case, plan in zip(cases, plans, strict=True):
        row: list[Any] = [*case.labels.values(), round(case.scenario.request.sla_s, 3)]
        for m in METHODS:
            p = plan[m]
            row += [round(p.server_workload / 1e9, 1), p.client_layers, round(p.latency_s, 3)]
        rows.append(row)
    return {"fields": fields, "rows": rows}


def plot(report: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    for ax, axis, title in zip(
        axes.flat,
        ("sla", "client", "link", "prompt"),
        ("SLA class", "client device", "uplink/downlink", "prompt tokens"),
        strict=False,
    ):
        groups = report["breakdown"][axis]
        names = list(groups)
        x = np.arange(len(names))
        for i, (key, label) in enumerate(
            [("greedy_workload_reduction_vs_server_only", "greedy"),
             ("server_workload_reduction_vs_server_only", "DP")]
        ):  # fmt: skip
            ax.bar(x + (i - 0.5) * 0.38, [groups[n][key] for n in names], 0.38, label=label)
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"server workload saved vs server-only, by {title}", fontsize=9)
        ax.legend(fontsize=8)
    ax = axes.flat[4]
    models = report["breakdown_methods_by_model"]
    x = np.arange(len(models))
    for i, m in enumerate(METHODS):
        rel = [
            models[k][m]["throughput_rps"] / models[k]["server-only"]["throughput_rps"]
            for k in models
        ]
        ax.bar(x + (i - 1.5) * 0.2, rel, 0.2, label=m)
    ax.set_xticks(x, list(models))
    ax.set_ylabel("x server-only")
    ax.set_title("requests/s one server sustains, relative to server-only", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes.flat[5]
    study = report["discretisation_study"]
    bins = [row["bins"] for row in study]
    ax.plot(bins, [100 * row["aggregate_workload_excess"] for row in study], "o-", label="excess")
    ax.set_xscale("log")
    ax.set_xlabel("budget bins (step = budget / bins)")
    ax.set_ylabel("server workload above optimum, %")
    twin = ax.twinx()
    twin.plot(bins, [row["solve_ms"]["80"] for row in study], "s--", color="C3", label="80 layers")
    twin.set_ylabel("DP solve time, 80 layers, ms", color="C3")
    ax.set_title("discretisation step: optimality vs solve time", fontsize=9)
    fig.suptitle(f"SplitLLM planner: {report['requests']} request types — {report['command']}",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def methods_by_model(cases: list[Case], plans: list[dict[str, Plan]], capacity: float) -> dict:
    out = {}
    for model in MODELS:
        group = [p for c, p in zip(cases, plans, strict=True) if c.labels["model"] == model]
        out[model] = headline(group, capacity)["methods"]
    return out


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    cases = build_grid(quick)
    capacity = ServerProfile().flops_per_s
    costs = [case.scenario.costs() for case in tqdm(cases, desc="costs", leave=False)]
    plans = [plan_all(c) for c in tqdm(costs, desc="planning")]
    reps = 50 if quick else 300
    report: dict[str, Any] = {"command": "python " + shlex.join(sys.argv), "quick": quick}
    report.update(headline(plans, capacity))
    report["improvement_vs_greedy_definition"] = (
        "throughput sustained: (capacity / mean DP server workload) / (capacity / mean greedy "
        "server workload) - 1 over the whole mix, each request type in equal share"
    )
    times = solve_times(reps)
    report["solve_ms"] = {n: t["dp_ms"] for n, t in times.items()}
    report["solve_ms_detail"] = times
    report["dp_vs_greedy"] = compare_greedy(plans)
    report["dp_vs_exact_prefix_workload_excess"] = (
        ratio(
            sum(p["dp"].server_workload for p in plans),
            sum(p["prefix"].server_workload for p in plans),
        )
        - 1
    )
    report["brute_force_check_gpt2"] = brute_force_check(cases, costs)
    report["discretisation_study"] = step_study(costs, reps=20 if quick else 100)
    report["targets"] = TARGETS
    report["targets_met"] = {
        "workload_reduction": report["server_workload_reduction_vs_server_only"]
        >= TARGETS["workload_reduction"]
        and report["sla_attainment"] == 1.0,
        "improvement_vs_greedy": report["improvement_vs_greedy"]
        >= TARGETS["improvement_vs_greedy"],
        "solve_ms_80": report["solve_ms"]["80"] < TARGETS["solve_ms_80"],
    }
    report["breakdown"] = breakdowns(cases, plans, capacity)
    report["breakdown_methods_by_model"] = methods_by_model(cases, plans, capacity)
    report["grid"] = grid_description()
    report["machine"] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "processor": platform.processor() or platform.machine(),
    }
    report["scenarios"] = scenario_rows(cases, plans)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "split_planner.json").write_text(to_json(report))
    plot(report, out_dir / "split_planner.png")
    return report


def to_json(report: dict[str, Any]) -> str:
    """Indented JSON, except one line per scenario row so that the file stays readable."""
    head = {k: v for k, v in report.items() if k != "scenarios"}
    scenarios = report["scenarios"]
    rows = ",\n  ".join(json.dumps(row, allow_nan=False) for row in scenarios["rows"])
    text = json.dumps(head, indent=1, allow_nan=False)[:-2]
    fields = json.dumps(scenarios["fields"])
    return f'{text},\n "scenarios": {{"fields": {fields}, "rows": [\n  {rows}\n ]}}\n}}\n'


def grid_description() -> dict[str, Any]:
    return {
        "models": list(MODELS),
        "prompt_tokens": list(PROMPTS),
        "output_tokens": list(OUTPUTS),
        "client_tiers_flops_and_mem_bytes_per_s": CLIENT_TIERS,
        "client_layer_overhead_s": CLIENT_LAYER_OVERHEAD_S,
        "links_up_down_bps": LINKS,
        "rtt_ms": list(RTTS_MS),
        "server": {"flops_per_s": 400e12, "mem_bytes_per_s": 2.5e12},
        "server_decode_batch": list(SERVER_BATCHES),
        "sla_classes_ttft_s_tpot_s": SLA_CLASSES,
    }


def summary_lines(report: dict[str, Any]) -> Iterable[str]:
    yield f"request types: {report['requests']}"
    yield (
        f"server workload reduction vs server-only: "
        f"{report['server_workload_reduction_vs_server_only']:.3f} (greedy "
        f"{report['greedy_workload_reduction_vs_server_only']:.3f})"
    )
    yield f"throughput improvement vs greedy: {report['improvement_vs_greedy']:.4f}"
    yield f"SLA attainment (DP): {report['sla_attainment']:.3f}"
    yield "DP solve ms: " + ", ".join(f"{n} layers {t:.3f}" for n, t in report["solve_ms"].items())
    yield f"targets met: {report['targets_met']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every 9th scenario, fewer timings")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    report = run(args.quick, args.out_dir)
    for line in summary_lines(report):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
