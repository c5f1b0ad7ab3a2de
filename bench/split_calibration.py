"""How well the split planner's calibration bounds measured latency: five rules replayed.

The split server plans each session against a bound on its latency learned from recent
sessions of the same kind (`adaptivellm.split_server.SplitService.fit`): measured = offset +
factor x predicted, fitted over the last 64 (`fit_calibration`, the server's own code), times
a slack, the SLA target's quantile of measured over the line. The rules replayed:

- `factor`: the first rule, the prediction times the quantile of measured / predicted;
- `line`: the line times the interpolated quantile of measured over it (commit 40c5556);
- `unpadded`: the line times that quantile with its tail extrapolated (`tail_quantile`: 64
  sessions cannot show a 0.99 quantile; commit 43f9de2);
- `tail`: the server's rule now, `unpadded` read on latencies padded by half the window's
  median measured latency (`PAD_SHARE`): bound = (line + pad) x slack - pad, so that the
  short sessions' tail (a fixed delay is several times a short prediction) does not set the
  slack of long ones;
- `load`: not the server's, a candidate: the `tail` rule fitted to the 32 sessions of the last
  256 planned at the load nearest the session's (the requests in flight when it was planned,
  `running_requests`; only runs that recorded it).

This script replays the sessions of capacity-benchmark runs (`bench/split_serving.py` JSON,
each outcome's prediction, measured latency and k) in the order they finished, rate after rate
on each policy's server, and checks each session against the bound each rule would have set
from the sessions before it on that server:

- `coverage`: the share of sessions within their bound (the planner aims at the SLA target);
- `coverage_short`: the same for sessions of at most 16 output tokens, which a factor alone
  under-bounds (a fixed cost per session weighs more in them);
- `bound_over_prediction_p50`: how far above the prediction the bound sits at the median (the
  smaller, the more sessions a rule lets the planner split at an SLA);
- `coverage_long` and `bound_over_prediction_p50_long`: the same for sessions predicted at
  2 s or more, whose splits save the server the most work;
- `few_sessions`: a fresh server's sessions, the 5th to the 16th of each kind, where the slack
  is read off too few ratios to pad or extrapolate. The rules: `interpolated` (their
  quantile), `extrapolated` (its tail read off them; the server's rule before) and `server`
  (the interpolated quantile times 1 + 2 / n, the server's rule now).

    python bench/split_calibration.py                 # the committed runs; JSON + PNG
    python bench/split_calibration.py --runs a.json b.json.gz --out /tmp/cal.json

No server is started: this reads outcomes only. The sessions replayed were planned by one rule
or another, so each rule is checked on the same sessions, not on the ones it would have
chosen; and each outcome's prediction is the calibrated one of the rule in force then.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from adaptivellm.split_server import (
    MIN_PADDED_SESSIONS,
    MIN_RATIOS,
    fit_calibration,
    session_kind,
    tail_quantile,
)

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
#: The files of the committed replay (`split_calibration.json`). The full run at 8b7178a was
#: `split_serving.json` then; the run at f811e44 that replaced it is not in the replay yet.
DEFAULT_RUNS = (
    "archive/split-serving-open-loop-earlier/run11-60s-pad-from-4th.json.gz",
    "archive/split-serving-open-loop-earlier/run10-60s-before-pad.json.gz",
    "archive/split-serving-open-loop-earlier/run9-60s-before-tail-slack.json.gz",
    "archive/split-serving-open-loop-earlier/run8-60s-before-affine-calibration.json.gz",
    "split-planner-reruns/planner-1-per-s.json",
    "split-planner-reruns/planner-from-2-per-s.json",
    "split-planner-reruns/planner-per-kind-slack.json",
    "split-planner-reruns/planner-prefill-rate.json",
    "split-planner-reruns/planner-affine-from-2-per-s.json",
    "split-planner-reruns/planner-tail-slack-rerun.json",
    "split-planner-reruns/off-planner-edf496c.json",
    "split-planner-reruns/off-planner-padded-rerun.json",
)
SPLIT_POLICIES = ("planner", "greedy", "static")
KINDS = ("interior", "client")
#: The server's window of recent sessions, and what counts as a short session here.
WINDOW = 64
SHORT_TOKENS = 16
LONG_S = 2.0
#: The load-conditioned rule's history, and how many sessions at the nearest load it fits.
LOAD_WINDOW = 256
LOAD_NEIGHBOURS = 32


def load_runs(path: Path) -> dict[str, Any]:
    """A capacity benchmark's JSON, gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        result: dict[str, Any] = json.load(handle)
    return result


def _split_serving() -> ModuleType:
    """bench/split_serving.py as a module (its pool of requests gives each outcome's length)."""
    spec = importlib.util.spec_from_file_location("split_serving", ROOT / "split_serving.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("split_serving", module)
    spec.loader.exec_module(module)
    return module


def output_tokens(result: dict[str, Any]) -> list[int]:
    """Each pool index's output tokens, rebuilt from the run's setup as the benchmark drew it."""
    setup = result["setup"]
    pool = _split_serving().pool(
        setup["pool"],
        setup["max_prompt"],
        setup["max_tokens"],
        setup["ordinary_share"],
        setup.get("seed", 0),
    )
    return [item.max_tokens for item in pool]


def sessions(result: dict[str, Any], tokens: list[int]) -> list[list[dict[str, Any]]]:
    """Per split policy's server: its split sessions, rate after rate, each rate's in the order
    they finished, as {kind, predicted, measured, tokens, load} (load: the requests in flight
    when it was planned, None where the run did not record it). The benchmark runs one server per
    policy through its sweep, so the sessions of its lower rates are the history its planner
    had at the next. Runs a file kept from an earlier one (`--keep-from`: its `kept_from`
    policies) are that file's, and are read from it, not twice: pass that file too."""
    num_layers = result["setup"]["layers"]
    kept = set((result.get("kept_from") or {}).get("policies", ()))
    servers: dict[str, list[dict[str, Any]]] = {}
    for run in result["runs"]:
        if run["policy"] not in SPLIT_POLICIES or run["policy"] in kept:
            continue
        rows = servers.setdefault(run["policy"], [])
        for outcome in run["outcomes"]:
            layer, predicted = outcome.get("layer"), outcome.get("predicted_s")
            if layer is None or not predicted or outcome.get("error"):
                continue
            rows.append(
                {
                    "kind": session_kind(layer, num_layers),
                    "predicted": float(predicted),
                    "measured": float(outcome["latency_s"]),
                    "tokens": tokens[outcome["index"]],
                    "load": outcome.get("running_requests"),
                }
            )
    return list(servers.values())


def factor_bound(history: np.ndarray, row: dict[str, Any], quantile: float) -> float | None:
    """The rule before: the prediction times the quantile of measured / predicted (at least 1)."""
    return float(row["predicted"]) * factor_slack(history[-WINDOW:], quantile)


def factor_slack(samples: np.ndarray, quantile: float) -> float:
    """The factor rule's bound over the prediction: the quantile of measured / predicted."""
    return max(1.0, float(np.quantile(samples[:, 1] / samples[:, 0], quantile)))


def line_bound(history: np.ndarray, row: dict[str, Any], quantile: float) -> float | None:
    """The rule of 40c5556: the server's line, times the interpolated quantile of measured over
    it (at least 1)."""
    recent = history[-WINDOW:, :2]
    line = fit_calibration(recent, quantile, within_sla=True)
    over = recent[:, 1] / np.array([line.predict(p) for p in recent[:, 0]])
    return line.predict(row["predicted"]) * max(1.0, float(np.quantile(over, quantile)))


def unpadded_bound(history: np.ndarray, row: dict[str, Any], quantile: float) -> float | None:
    """The rule of 43f9de2: the server's, its slack read on unpadded ratios."""
    fit = fit_calibration(history[-WINDOW:, :2], quantile, within_sla=True, pad_share=0.0)
    return fit.bound(row["predicted"])


def tail_bound(history: np.ndarray, row: dict[str, Any], quantile: float) -> float | None:
    """The server's rule now (`fit_calibration`, its slack by `tail_quantile` on padded
    latencies)."""
    return fit_calibration(history[-WINDOW:, :2], quantile, within_sla=True).bound(row["predicted"])


def load_bound(history: np.ndarray, row: dict[str, Any], quantile: float) -> float | None:
    """A load-conditioned rule, not the server's: the server's fit over the LOAD_NEIGHBOURS
    sessions of the last LOAD_WINDOW planned at the load nearest this one's (the most recent
    first among equals). None where a load was not recorded."""
    recent = history[-LOAD_WINDOW:]
    if row.get("load") is None or np.isnan(recent[:, 2]).any():
        return None
    distance = np.abs(recent[:, 2] - float(row["load"]))
    order = np.lexsort((-np.arange(len(recent)), distance))[:LOAD_NEIGHBOURS]
    return fit_calibration(recent[order, :2], quantile, within_sla=True).bound(row["predicted"])


RULES = {
    "factor": factor_bound,
    "line": line_bound,
    "unpadded": unpadded_bound,
    "tail": tail_bound,
    "load": load_bound,
}


def replay(runs: list[list[dict[str, Any]]], kind: str, quantile: float) -> dict[str, Any]:
    """Each session of `kind` checked against each rule's bound from the sessions of its kind
    before it on its server (from the MIN_RATIOS + 1st on; a rule that sets no bound for a
    session, the load rule where loads were not recorded, does not count it)."""
    checks: dict[str, list[tuple[bool, bool, float, bool]]] = {rule: [] for rule in RULES}
    sessions_checked = 0
    for rows in runs:
        history: list[tuple[float, float, float]] = []
        for row in rows:
            if row["kind"] != kind:
                continue
            if len(history) >= MIN_RATIOS:
                sessions_checked += 1
                past = np.array(history)
                for rule, bound_of in RULES.items():
                    bound = bound_of(past, row, quantile)
                    if bound is None:
                        continue
                    short = row["tokens"] <= SHORT_TOKENS
                    over = bound / row["predicted"]
                    long = row["predicted"] >= LONG_S
                    checks[rule].append((row["measured"] <= bound, short, over, long))
            load = row.get("load")
            history.append((row["predicted"], row["measured"], math.nan if load is None else load))
    out: dict[str, Any] = {"checks": sessions_checked}
    for rule, rows_checked in checks.items():
        if not rows_checked:
            out[rule] = None
            continue
        within = [ok for ok, *_ in rows_checked]
        short = [ok for ok, is_short, _, _ in rows_checked if is_short]
        long = [(ok, over) for ok, _, over, is_long in rows_checked if is_long]
        out[rule] = {
            "checks": len(rows_checked),
            "coverage": round(float(np.mean(within)), 4),
            "coverage_short": round(float(np.mean(short)), 4) if short else None,
            "short_checks": len(short),
            "bound_over_prediction_p50": round(
                float(np.median([over for _, _, over, _ in rows_checked])), 3
            ),
            "coverage_long": round(float(np.mean([ok for ok, _ in long])), 4) if long else None,
            "long_checks": len(long),
            "bound_over_prediction_p50_long": (
                round(float(np.median([over for _, over in long])), 3) if long else None
            ),
        }
    return out


def few_sessions_slack(samples: np.ndarray, quantile: float, rule: str) -> float:
    """A few sessions' bound over the prediction (the median ratio is the line below
    MIN_PADDED_SESSIONS): `interpolated`, the quantile of the ratios over it; `extrapolated`,
    that quantile read off their tail (`tail_quantile`, the server's rule before 16 sessions
    were needed); `server`, the server's rule now (`fit_calibration`: the interpolated quantile
    times 1 + FEW_SESSIONS_MARGIN / n)."""
    if rule == "server":
        return fit_calibration(samples, quantile, within_sla=True).bound(1.0)
    ratios = samples[:, 1] / samples[:, 0]
    factor = float(np.median(ratios))
    slack = tail_quantile(ratios / factor, quantile, extrapolate=rule == "extrapolated")
    return factor * max(1.0, slack)


def replay_few(runs: list[list[dict[str, Any]]], kind: str, quantile: float) -> dict[str, Any]:
    """Each session of `kind` that followed at least MIN_RATIOS and fewer than
    MIN_PADDED_SESSIONS of its kind on its server, checked against each few-session rule's
    bound (`few_sessions_slack`): how a fresh server plans."""
    checks: dict[str, list[tuple[bool, float]]] = {rule: [] for rule in FEW_SESSIONS_RULES}
    for rows in runs:
        history = [(row["predicted"], row["measured"]) for row in rows if row["kind"] == kind]
        for seen in range(MIN_RATIOS, min(len(history), MIN_PADDED_SESSIONS)):
            predicted, measured = history[seen]
            for rule, rule_checks in checks.items():
                over = few_sessions_slack(np.array(history[:seen]), quantile, rule)
                rule_checks.append((measured <= over * predicted, over))
    return {
        rule: {
            "checks": len(rows_checked),
            "coverage": round(float(np.mean([ok for ok, _ in rows_checked])), 4),
            "bound_over_prediction_p50": round(
                float(np.median([over for _, over in rows_checked])), 3
            ),
        }
        if rows_checked
        else None
        for rule, rows_checked in checks.items()
    }


FEW_SESSIONS_RULES = ("interpolated", "extrapolated", "server")


def plot(runs: list[list[dict[str, Any]]], quantile: float, out: Path) -> None:
    """Interior splits: measured / predicted against the prediction, with each rule's bound
    fitted over all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for run in runs for row in run if row["kind"] == "interior"]
    if len(rows) < MIN_RATIOS:
        return
    samples = np.array([(row["predicted"], row["measured"]) for row in rows])
    short = np.array([row["tokens"] <= SHORT_TOKENS for row in rows])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ratio = samples[:, 1] / samples[:, 0]
    ax.scatter(samples[~short, 0], ratio[~short], s=10, alpha=0.5, label="interior split")
    ax.scatter(samples[short, 0], ratio[short], s=14, alpha=0.8, label="<= 16 tokens")
    grid = np.linspace(samples[:, 0].min(), samples[:, 0].max(), 200)
    fit = fit_calibration(samples, quantile, within_sla=True)  # once, not per point
    over = samples[:, 1] / np.array([fit.predict(p) for p in samples[:, 0]])
    interpolated = max(1.0, float(np.quantile(over, quantile)))
    ax.plot(grid, [fit.predict(p) * interpolated / p for p in grid],
            label="bound: line x interpolated quantile")  # fmt: skip
    unpadded = fit_calibration(samples, quantile, within_sla=True, pad_share=0.0)
    ax.plot(grid, [unpadded.bound(p) / p for p in grid], label="bound: line x tail quantile")
    ax.plot(grid, [fit.bound(p) / p for p in grid],
            label="bound: padded line x tail quantile (now)")  # fmt: skip
    ax.axhline(factor_slack(samples, quantile), linestyle="--", color="grey",
               label="bound: factor alone")  # fmt: skip
    ax.set_xlabel("predicted latency (s)")
    ax.set_ylabel("measured / predicted")
    ax.set_title(f"Split planner calibration, {len(rows)} interior splits (quantile {quantile})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _shown(path: Path) -> str:
    """A run file's path as the JSON records it: relative to the repository where it is in it."""
    resolved = path.resolve()
    if resolved.is_relative_to(ROOT.parent):
        return str(resolved.relative_to(ROOT.parent))
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--runs",
        nargs="+",
        type=Path,
        default=[RESULTS / name for name in DEFAULT_RUNS],
        help="capacity benchmark JSON files (.json or .json.gz)",
    )
    parser.add_argument("--quantile", type=float, default=0.99, help="the SLA target")
    parser.add_argument("--out", type=Path, default=RESULTS / "split_calibration.json")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.runs if not path.exists()]
    if missing:
        parser.error(f"no such run file: {', '.join(missing)}")
    if not 0.5 <= args.quantile < 1:
        parser.error("--quantile must be in [0.5, 1)")
    runs: list[list[dict[str, Any]]] = []
    for path in args.runs:
        result = load_runs(path)
        runs.extend(sessions(result, output_tokens(result)))
    recorded = [rows for rows in runs if all(row["load"] is not None for row in rows)]
    report = {
        "benchmark": "split_calibration",
        "command": shlex.join(["python", "bench/split_calibration.py", *(argv or sys.argv[1:])]),
        "runs": [_shown(path) for path in args.runs],
        "quantile": args.quantile,
        "window": WINDOW,
        "load_window": LOAD_WINDOW,
        "load_neighbours": LOAD_NEIGHBOURS,
        "short_tokens": SHORT_TOKENS,
        "kinds": {kind: replay(runs, kind, args.quantile) for kind in KINDS},
        # Every rule on the same sessions: the servers whose runs recorded the load.
        "kinds_where_load_recorded": {
            kind: replay(recorded, kind, args.quantile) for kind in KINDS
        },
        # A fresh server: the 5th to 16th session of each kind.
        "few_sessions": {kind: replay_few(runs, kind, args.quantile) for kind in KINDS},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(runs, args.quantile, args.out.with_suffix(".png"))
    for kind, figures in report["kinds"].items():
        print(kind, json.dumps(figures))
    for kind, figures in report["kinds_where_load_recorded"].items():
        print(f"{kind} (load recorded)", json.dumps(figures))
    for kind, figures in report["few_sessions"].items():
        print(f"{kind} (5th to 16th session)", json.dumps(figures))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
