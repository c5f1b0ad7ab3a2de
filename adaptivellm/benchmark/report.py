"""The report of a benchmark run: a JSON document (schema in bench/README.md) and text tables."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adaptivellm import __version__
from adaptivellm.benchmark.harness import BenchConfig, SystemRun
from adaptivellm.benchmark.metrics import CalibrationFit, ratios, summarise
from adaptivellm.benchmark.workloads import BenchRequest, workload_stats

SCHEMA_VERSION = 1
REFERENCE = "stock"


#: Columns of a report's per-request records (`requests`); times in seconds on the run's time
#: line (rounds laid end to end).
REQUEST_FIELDS = ("index", "tenant", "prompt_tokens", "output_tokens", "arrival_s",
                  "first_token_s", "end_s", "ok")  # fmt: skip


def service_model(runs: Mapping[str, SystemRun]) -> tuple[str, CalibrationFit]:
    """The calibration every system's service times come from: stock vLLM's when it ran (one
    denominator for all systems), else the first system's."""
    name = REFERENCE if REFERENCE in runs else next(iter(runs))
    fit = runs[name].calibration
    if fit is None:
        raise ValueError(f"system {name!r} was not calibrated")
    return name, fit


def system_report(
    run: SystemRun, fit: CalibrationFit, weights: Mapping[str, float]
) -> dict[str, Any]:
    """One system's section of the report (without ratios)."""
    summary = summarise(run.results, fit, weights)
    figures = summary.figures()
    failures = sorted({r.error for r in run.results if not r.ok})
    return {
        "kind": run.config.kind,
        "extra_flags": list(run.config.extra_flags),
        "command": shlex.join(run.command),
        "env": run.env,
        "calibration": _fit_dict(run.calibration),
        "figures": figures,
        "tenants": {k: dataclasses.asdict(v) for k, v in summary.tenants.items()},
        "counters": run.counters,
        "round_durations_s": run.round_durations_s,
        "round_started_at": [round(t, 3) for t in run.round_started_at],
        "round_cpu_steal_share": [
            None if x is None else round(x, 5) for x in run.round_cpu_steal_share
        ],
        "round_cpu_s": [{k: round(v, 3) for k, v in sorted(r.items())} for r in run.round_cpu_s],
        "cpu_ms_per_output_token": cpu_per_token(run.round_cpu_s, figures),
        "round_output_per_s": run.round_output_per_s,
        "errors": failures[:5],
        # Every request, so that figures can be computed again later (another service model,
        # another window) without a new run.
        "request_fields": list(REQUEST_FIELDS),
        "requests": [
            [
                r.index,
                r.tenant,
                r.prompt_tokens,
                r.output_tokens,
                round(r.arrival_s, 4),
                round(r.first_token_s, 4),
                round(r.end_s, 4),
                r.ok,
            ]
            for r in run.results
        ],
    }


def round_throughputs(section: Mapping[str, Any]) -> list[float]:
    """Output tokens per second of each round: the tokens delivered in it over its length."""
    return [
        sum(bins) / duration if duration > 0 else math.nan
        for bins, duration in zip(
            section["round_output_per_s"], section["round_durations_s"], strict=False
        )
    ]


def round_ratios(section: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """Throughput over the reference's, round by round (round i against the reference's round
    i: the same requests, minutes apart), with the median and the spread. One round gives no
    spread: its ratio is not comparable with another run's (`comparable` false)."""
    pairs = [
        a / b
        for a, b in zip(round_throughputs(section), round_throughputs(reference), strict=False)
        if math.isfinite(a) and math.isfinite(b) and b > 0
    ]
    if not pairs:
        return {"output_tokens_per_s": [], "comparable": False}
    return {
        "output_tokens_per_s": [round(x, 4) for x in pairs],
        "median": round(statistics.median(pairs), 4),
        "min": round(min(pairs), 4),
        "max": round(max(pairs), 4),
        "comparable": len(pairs) >= 2,
    }


def cpu_per_token(
    rounds: Sequence[Mapping[str, float]], figures: Mapping[str, float]
) -> dict[str, float]:
    """CPU milliseconds per output token by process role over all rounds (and `total`, of the
    server's processes, the client left out); empty without rounds or tokens."""
    tokens = figures.get("output_tokens") or 0.0
    if not rounds or not tokens > 0:
        return {}
    spent: dict[str, float] = {}
    for r in rounds:
        for role, t in r.items():
            spent[role] = spent.get(role, 0.0) + t
    out = {role: round(1000.0 * t / tokens, 4) for role, t in sorted(spent.items())}
    out["total"] = round(1000.0 * sum(t for k, t in spent.items() if k != "client") / tokens, 4)
    return out


def build_report(
    scenario: str,
    description: str,
    config: BenchConfig,
    requests: Sequence[BenchRequest],
    runs: Mapping[str, SystemRun],
    weights: Mapping[str, float],
    quick: bool,
) -> dict[str, Any]:
    """The whole report: context, service-time model and one section per system."""
    ref_name, fit = service_model(runs)
    systems = {name: system_report(run, fit, weights) for name, run in runs.items()}
    if REFERENCE in systems:
        ref = systems[REFERENCE]
        for section in systems.values():
            section["ratios_to_stock"] = {
                **ratios(section["figures"], ref["figures"]),
                **{f"counter:{k}": v for k, v in ratios(section["counters"], ref["counters"])
                   .items()},
            }  # fmt: skip
            section["round_ratios_to_stock"] = round_ratios(section, ref)
    return _finite({
        "schema": SCHEMA_VERSION,
        "scenario": scenario,
        "description": description,
        "quick": quick,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": invocation(),
        "machine": machine_info(),
        "versions": {"adaptivellm": __version__, "vllm": _vllm_version()},
        "source": source_revision(Path(__file__).parent),
        "model": model_info(config),
        "common_flags": list(config.common_flags),
        "rounds": config.rounds,
        "round_order": config.round_order,
        "workload": {"spec": dataclasses.asdict(config.workload),
                     "stats": workload_stats(list(requests)), "tenant_weights": dict(weights),
                     "load": config.load},
        "service_time_model": {"fit_on": ref_name, **_fit_dict(fit)},
        "systems": systems,
    })  # fmt: skip


def invocation() -> str:
    """The command line that started this process, as a user would type it."""
    argv = sys.argv or [""]
    prog = argv[0]
    if prog.endswith("__main__.py"):
        prog = "python -m adaptivellm.benchmark"
    elif prog.endswith("cli.py"):
        prog = "python -m adaptivellm.cli"
    else:
        prog = Path(prog).name
    return shlex.join([prog, *argv[1:]]).replace(shlex.quote(prog), prog, 1)


def source_revision(path: Path) -> dict[str, Any] | None:
    """The git commit of the checkout holding `path`, and whether tracked files differ from it
    (a result from a dirty tree is not that commit's); None outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()  # fmt: skip

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def machine_info() -> dict[str, Any]:
    """Where the benchmark ran."""
    from adaptivellm.cpu import cpu_count

    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 0
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": cpu_count(),
        "memory_bytes": mem,
        "python": platform.python_version(),
    }


def model_info(config: BenchConfig) -> dict[str, Any]:
    """The model's path, served name and shape (from its config.json)."""
    info: dict[str, Any] = {"path": config.model_path, "served_name": config.served_name}
    with contextlib.suppress(OSError, ValueError, KeyError):
        cfg = json.loads((Path(config.model_path) / "config.json").read_text())
        keys = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
                "max_position_embeddings")  # fmt: skip
        info.update({k: cfg.get(k) for k in keys})
    return info


def markdown_table(report: Mapping[str, Any]) -> str:
    """The report's main figures as a Markdown table (ratios to stock in parentheses)."""
    head = ("| system | out tok/s | req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms "
            "| E2E p50 / p99 s | weighted TAT | Jain | preemptions "
            "| CPU ms/tok API / engine |")  # fmt: skip
    lines = [head, "|" + "---|" * 10]
    for name, s in report["systems"].items():
        f = s["figures"]
        r = {} if name == REFERENCE else s.get("ratios_to_stock", {})

        def cell(key: str, scale: float = 1.0, fmt: str = ".1f", f: Any = f, r: Any = r) -> str:
            value = f.get(key)
            text = "-" if value is None else format(value * scale, fmt)
            return text + (f" ({r[key]:.2f}x)" if key in r else "")

        rounds = s.get("round_ratios_to_stock", {}) if name != REFERENCE else {}
        spread = (
            f" [rounds {rounds['min']:.2f}-{rounds['max']:.2f}]" if rounds.get("comparable") else ""
        )

        pre = s["counters"].get("vllm:num_preemptions_total")
        lines.append(
            f"| {name} | {cell('output_tokens_per_s')}{spread} "
            f"| {cell('requests_per_s', fmt='.2f')} "
            f"| {cell('ttft_p50_s', 1e3, '.0f')} / {cell('ttft_p99_s', 1e3, '.0f')} "
            f"| {cell('tpot_p50_s', 1e3, '.1f')} / {cell('tpot_p99_s', 1e3, '.1f')} "
            f"| {cell('e2e_p50_s', fmt='.2f')} / {cell('e2e_p99_s', fmt='.2f')} "
            f"| {cell('mean_weighted_turnaround', fmt='.2f')} "
            f"| {cell('jain_fairness', fmt='.3f')} | {'-' if pre is None else int(pre)} "
            f"| {_cpu_cell(s.get('cpu_ms_per_output_token') or {})} |"
        )
    if report.get("rounds", 0) < 2 and len(report["systems"]) > 1:
        lines.append(
            "\nOne round: these ratios have no spread and are not comparable with another run's "
            "(on a shared machine one round can read 0.8x where three rotated rounds read 1.06x). "
            "Use --rounds 3 or more."
        )
    return "\n".join(lines)


def _cpu_cell(per_token: Mapping[str, float]) -> str:
    """The API server's CPU per output token, and the engine's (engine core and workers)."""
    if not per_token:
        return "-"
    engine = per_token.get("engine_core", 0.0) + per_token.get("worker", 0.0)
    return f"{per_token.get('api_server', 0.0):.2f} / {engine:.1f}"


def _fit_dict(fit: CalibrationFit | None) -> dict[str, Any]:
    if fit is None:
        return {}
    return {"a_s": fit.a, "b_s_per_prompt_token": fit.b, "c_s_per_output_token": fit.c,
            "r2": fit.r2, "samples": [list(s) for s in fit.samples]}  # fmt: skip


def _finite(value: Any) -> Any:
    """Replace nan/inf by None everywhere: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _vllm_version() -> str | None:
    from adaptivellm.compat import installed_vllm

    found = installed_vllm()
    return found[1] if found else None
