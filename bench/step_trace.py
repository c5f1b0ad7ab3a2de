"""Compare servers' engine steps from ADAPTIVELLM_STEP_TRACE traces (scheduler/step_trace.py).

A benchmark run with the variable set (every AdaptiveLLM server it starts inherits it) leaves
one trace per engine core in the folder; this script puts them side by side: how many steps
each server took for the same workload, what a step held (decoding requests, prompt tokens,
context), and where its time went (the scheduler's own `schedule()` and
`update_from_output()`, the model's execution, the engine core's loop between steps). A
common least-squares fit of a step's execution time on what it held,

    exec_s = F + v * decode + p * prefill + q * context

then says whether one server's steps were slower than another's for the same contents
(`excess_exec_ms`: its mean residual against the common fit) or whether it took more steps,
or steps with more in them.

    ADAPTIVELLM_STEP_TRACE=/tmp/trace python -m adaptivellm.benchmark ...  # the run
    python bench/step_trace.py /tmp/trace --out bench/results/step-trace.json

Servers are named by their trace header: the benchmark harness's system name, or, for a
server started by hand, the policy, `-nocap` for `--max-step-s 0`,
`-nopre` for `--no-fairness-preemption`, `-recompute` for `--preemption-mode recompute`,
and `#2`, `#3` for more than one of a kind. Stock vLLM servers write no trace.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adaptivellm.benchmark.report import source_revision
from adaptivellm.scheduler.step_trace import read_trace

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "bench" / "results"
#: A gap between steps longer than this is idle time (between rounds), not the engine's loop.
IDLE_GAP_S = 0.5
#: The columns of the common fit, after the constant.
FIT_TERMS = ("decode", "prefill", "context")


def label(header: dict[str, Any]) -> str:
    """A server's name from its trace header: the benchmark system's name when the harness
    set one, else made from its flags (see the module docstring)."""
    if header.get("name"):
        return str(header["name"])
    name = str(header.get("policy", "unknown"))
    if header.get("policy") == "weighted-turnaround":
        if not header.get("max_step_s"):
            name += "-nocap"
        if header.get("fairness_preemption") is False:
            name += "-nopre"
    if header.get("preemption_mode") == "recompute":
        name += "-recompute"
    return name


def load(folders: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    """Every trace in `folders`, by server name; a folder without traces raises ValueError."""
    traces: dict[str, list[dict[str, Any]]] = {}
    for folder in folders:
        paths = sorted(folder.glob("steps-*.jsonl"))
        if not paths:
            raise ValueError(
                f"{folder} has no steps-*.jsonl traces (was ADAPTIVELLM_STEP_TRACE set?)"
            )
        for path in paths:
            header, steps = read_trace(path)
            name = base = label(header)
            n = 1
            while name in traces:
                n += 1
                name = f"{base}#{n}"
            traces[name] = steps
    return traces


def _work(steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps that scheduled tokens (an idle engine's steps schedule none)."""
    return [s for s in steps if s["decode"] or s["prefill"]]


def _design(steps: Sequence[dict[str, Any]]) -> np.ndarray:
    """The common fit's design matrix: a constant and FIT_TERMS, one row per step."""
    return np.array([[1.0, *(float(s[t]) for t in FIT_TERMS)] for s in steps])


def summarise(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Totals and per-step means of one server's steps (only steps that scheduled tokens)."""
    work = _work(steps)
    if not work:
        raise ValueError("a trace has no step that scheduled tokens")
    gaps = []
    for a, b in itertools.pairwise(work):
        gap = b["t"] - (a["t"] + a["sched_s"] + a["exec_s"] + a["update_s"])
        if 0 <= gap < IDLE_GAP_S:
            gaps.append(gap)
    parts = {k: sum(s[k] for s in work) for k in ("sched_s", "exec_s", "update_s")}
    busy = sum(parts.values()) + sum(gaps)
    n = len(work)
    widest = max(s["running"] for s in work)
    return {
        "steps": float(n),
        "busy_s": busy,
        "decode_tokens": float(sum(s["decode"] for s in work)),
        "prefill_tokens": float(sum(s["prefill"] for s in work)),
        "mean_decode": statistics.mean(s["decode"] for s in work),
        "mean_prefill": statistics.mean(s["prefill"] for s in work),
        "mean_context": statistics.mean(s["context"] for s in work),
        "full_batch_share": statistics.mean(s["running"] >= widest for s in work),
        "preempted": float(sum(s.get("preempted", 0) for s in work)),
        "sched_ms": 1e3 * parts["sched_s"] / n,
        "exec_ms": 1e3 * parts["exec_s"] / n,
        "update_ms": 1e3 * parts["update_s"] / n,
        "loop_ms": 1e3 * sum(gaps) / n,  # per step, so the four parts sum to step_ms
        "step_ms": 1e3 * busy / n,
    }


def common_fit(traces: dict[str, list[dict[str, Any]]]) -> tuple[np.ndarray, float]:
    """Least-squares coefficients (F, v, p, q) of exec_s over every server's steps, and R^2."""
    rows = [s for steps in traces.values() for s in _work(steps)]
    x = _design(rows)
    y = np.array([s["exec_s"] for s in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ coef
    r2 = 1.0 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())
    return coef, r2


def compare(traces: dict[str, list[dict[str, Any]]], reference: str | None) -> dict[str, Any]:
    """Per server: summarise() and the mean residual of its steps against the common fit;
    against `reference` (default: fcfs when traced, else the first): the ratios of steps and
    busy time, and how much of the busy-time difference each part of a step accounts for."""
    coef, r2 = common_fit(traces)
    out: dict[str, Any] = {
        "fit": {"F_ms": 1e3 * coef[0], **{f"{t}_ms": 1e3 * c for t, c in zip(FIT_TERMS, coef[1:], strict=True)}, "r2": r2},  # noqa: E501
        "servers": {},
    }  # fmt: skip
    for name, steps in traces.items():
        work = _work(steps)
        residual = np.array([s["exec_s"] for s in work]) - _design(work) @ coef
        out["servers"][name] = {**summarise(steps), "excess_exec_ms": 1e3 * float(residual.mean())}
    names = list(out["servers"])
    ref = reference or ("fcfs" if "fcfs" in names else names[0])
    if ref not in out["servers"]:
        raise ValueError(f"no trace of {ref!r}; traced: {', '.join(names)}")
    base = out["servers"][ref]
    out["reference"] = ref
    for name, s in out["servers"].items():
        if name == ref:
            continue
        s["vs_reference"] = {
            "steps_ratio": s["steps"] / base["steps"],
            "busy_ratio": s["busy_s"] / base["busy_s"],
            # busy = steps * (sched + exec + update + loop) per step: the difference, by part
            "busy_diff_s": s["busy_s"] - base["busy_s"],
            "from_more_steps_s": (s["steps"] - base["steps"]) * base["step_ms"] / 1e3,
            **{
                f"from_{part}_s": s["steps"] * (s[f"{part}_ms"] - base[f"{part}_ms"]) / 1e3
                for part in ("sched", "exec", "update", "loop")
            },
        }
    return out


def table(result: dict[str, Any]) -> str:
    f = result["fit"]
    lines = [
        f"common fit of a step's execution: {f['F_ms']:.2f} ms + {f['decode_ms']:.2f} ms/decode "
        f"+ {f['prefill_ms']:.3f} ms/prompt token + {f['context_ms'] * 1e3:.2f} us/context "
        f"token (R^2 {f['r2']:.3f})",
        f"{'server':26} {'steps':>7} {'busy s':>8} {'step ms':>8} {'exec':>6} {'excess':>7} "
        f"{'sched':>6} {'update':>6} {'loop':>6} {'decode':>6} {'prefill':>7} {'context':>7}",
    ]
    for name, s in result["servers"].items():
        lines.append(
            f"{name:26} {s['steps']:7.0f} {s['busy_s']:8.1f} {s['step_ms']:8.2f} "
            f"{s['exec_ms']:6.2f} {s['excess_exec_ms']:7.3f} {s['sched_ms']:6.3f} "
            f"{s['update_ms']:6.3f} {s['loop_ms']:6.3f} {s['mean_decode']:6.2f} "
            f"{s['mean_prefill']:7.1f} {s['mean_context']:7.0f}"
        )
    for name, s in result["servers"].items():
        if v := s.get("vs_reference"):
            parts = ", ".join(f"{k[5:-2]} {v[k]:+.1f}" for k in v if k.startswith("from_"))
            lines.append(
                f"{name} vs {result['reference']}: steps {v['steps_ratio']:.4f}x, busy "
                f"{v['busy_ratio']:.4f}x ({v['busy_diff_s']:+.1f} s: {parts})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="ADAPTIVELLM_STEP_TRACE folders")
    parser.add_argument("--reference", help="server to compare against (default fcfs)")
    parser.add_argument("--out", type=Path, default=RESULTS / "step-trace.json")
    args = parser.parse_args(argv)
    try:
        result = compare(load(args.folders), args.reference)
    except (OSError, ValueError, KeyError) as e:
        parser.error(str(e))
    command = shlex.join(
        ["python", "bench/step_trace.py", *(sys.argv[1:] if argv is None else argv)]
    )
    report = {"command": command, "source": source_revision(ROOT), **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
