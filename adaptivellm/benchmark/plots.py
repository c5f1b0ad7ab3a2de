"""PNG plots of a benchmark run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adaptivellm.benchmark.metrics import RequestResult


def service_over_time(
    results: Sequence[RequestResult],
) -> dict[str, tuple[list[float], list[float]]]:
    """Per tenant: (times, cumulative tokens served). A request's prompt counts at its first
    token; its output tokens are spread over its streamed chunks (a chunk may carry several)."""
    events: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        if not r.ok or not r.token_times:
            continue
        per_chunk = r.output_tokens / len(r.token_times)
        mine = events.setdefault(r.tenant, [])
        mine.append((r.first_token_s, float(r.prompt_tokens)))
        mine.extend((t, per_chunk) for t in r.token_times)
    out = {}
    for tenant, evs in sorted(events.items()):
        evs.sort()
        total, times, cumulative = 0.0, [], []
        for t, tokens in evs:
            total += tokens
            times.append(t)
            cumulative.append(total)
        out[tenant] = (times, cumulative)
    return out


def write_plots(
    out_dir: Path,
    scenario: str,
    results: Mapping[str, Sequence[RequestResult]],
    report: Mapping[str, Any],
) -> list[Path]:
    """Latency CDFs, throughput bars and per-tenant service over time; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        _latency_cdfs(out_dir / f"{scenario}-latency.png", scenario, results),
        _throughput_bars(out_dir / f"{scenario}-throughput.png", scenario, report),
        _tenant_service(out_dir / f"{scenario}-tenants.png", scenario, results),
    ]
    return paths


def _latency_cdfs(
    path: Path, scenario: str, results: Mapping[str, Sequence[RequestResult]]
) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    metrics = (("TTFT (s)", "ttft_s"), ("TPOT (s)", "tpot_s"), ("end-to-end latency (s)",
               "latency_s"))  # fmt: skip
    for ax, (label, attr) in zip(axes, metrics, strict=True):
        for name, rs in results.items():
            values = sorted(v for r in rs if r.ok and (v := getattr(r, attr)) == v)
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
        ax.set_xscale("log")  # tails span orders of magnitude on a shared machine
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{scenario}: latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _throughput_bars(path: Path, scenario: str, report: Mapping[str, Any]) -> Path:
    import matplotlib.pyplot as plt

    names = list(report["systems"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, (key, label) in zip(
        axes,
        (("output_tokens_per_s", "output tokens/s"), ("requests_per_s", "requests/s")),
        strict=True,
    ):
        values = [report["systems"][n]["figures"][key] or 0.0 for n in names]
        bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_ylabel(label)
    fig.suptitle(f"{scenario}: throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _tenant_service(
    path: Path, scenario: str, results: Mapping[str, Sequence[RequestResult]]
) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, (name, rs) in zip(axes[0], results.items(), strict=True):
        for tenant, (times, cumulative) in service_over_time(rs).items():
            ax.plot(times, cumulative, label=tenant)
        ax.set_title(name)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("tokens served (prompt + output)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{scenario}: per-tenant service over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
