"""Pool several runs of the fairness benchmark (bench/fairness.py) round by round, and report
each system's ratios to stock vLLM FCFS with their spread.

One run's ratio moves 2-3% from run to run on this machine (bench/results/fairness-noise/), and
the throughput target (0.98x FCFS) is as close as that to what the benchmark reads: one run
cannot say on which side of the target a system is. Every round of a run replays the same
workload on every system, one system after the other, so a round's ratio (a system's round
against FCFS's round of the same turn) is a paired sample; this script collects them over the
runs given and reports, per scenario and system:

- `paired`: the per-round ratios of weighted turnaround and throughput, with their mean,
  standard deviation, standard error, min and max;
- `pooled`: the ratio of the figures over every round of every run together (output tokens
  over the summed round durations; mean weighted turnaround over every request), as a single
  longer run would give it;
- `paired_vs_fcfs_pair`, over the rounds of runs that had the A/A control (`fcfs_b`, a second
  identical stock FCFS server): the per-round ratios to the mean of the two FCFS servers'
  figures in that round. `fcfs_b`'s own `paired` ratios are the A/A spread: what the benchmark
  reads between two identical servers;
- `tail_s`: the time from a round's last arrival to its last completion, per round. Arrivals
  are the same for every system, so a longer tail is a longer round: where a policy that
  leaves the longest requests for last pays for it;
- `output_before_last_arrival`, over the rounds of runs whose harness recorded each round's
  output second by second (`round_output_per_s`): the output tokens delivered before the
  round's last arrival (the second it falls in counted pro rata). With the arrivals the same
  for every system, what a system had not delivered by then is what its tail had to do;
- `started_by_last_arrival`, `prompt_started_by_last_arrival` and
  `output_finished_by_last_arrival`, from the request rows of every report: the requests whose
  first token came by the last arrival, their prompt tokens, and the output tokens of those
  finished by then; `output_interpolated_by_last_arrival`, the output delivered by then were
  each request's tokens evenly spaced from its first to its last (an estimate, for the reports
  without `round_output_per_s`);
- `cpu_steal_share`, over the rounds of runs whose harness recorded it: the share of the
  machine's CPU time the hypervisor gave other guests during the system's rounds.

Weighted turnaround divides each request's latency by its service time from the run's own
service-time fit (the harness's `service_time_model`, fitted on stock vLLM alone), as the run's
own report does; rounds are split by the workload's request count.

    python bench/fairness_pool.py DIR [DIR ...]   # each DIR holds fairness-<scenario>.json
                                                  # writes bench/results/fairness-pooled.json
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from adaptivellm.benchmark.metrics import CalibrationFit
from adaptivellm.benchmark.scenarios import FAIRNESS_SCENARIOS as SCENARIOS
from adaptivellm.benchmark.scenarios import FAIRNESS_SYSTEMS

RESULTS = Path(__file__).resolve().parent / "results"
#: fairness.json's system keys -> the harness's system names, in every run so far.
SYSTEMS = {key: name for key, (name, _) in FAIRNESS_SYSTEMS.items()}
#: round_figures' fields every round has, reported as spreads over the rounds.
ROUND_SPREADS = (
    "tail_s",
    "started_by_last_arrival",
    "output_finished_by_last_arrival",
    "prompt_started_by_last_arrival",
    "output_interpolated_by_last_arrival",
)
#: Fields of a report's per-request rows this script reads.
FIELDS = ("prompt_tokens", "output_tokens", "arrival_s", "first_token_s", "end_s", "ok")


def round_figures(report: dict[str, Any], system: str) -> list[dict[str, Any]]:
    """Per round of `system` in a harness report: output tokens, duration, the weighted
    turnaround of each successful request, the tail (the time from the round's last arrival to
    its last completion), the requests started by the last arrival, their prompt tokens and the
    output of those finished by then, the output delivered by then were every request's tokens
    evenly spaced (an estimate), the output tokens delivered before it and the CPU steal share
    (these two None in reports made before the harness recorded them)."""
    section = report["systems"][system]
    columns = section["request_fields"]
    missing = [f for f in FIELDS if f not in columns]
    if missing:
        raise ValueError(f"{system}: the report's request rows lack {missing}")
    at = {f: columns.index(f) for f in FIELDS}
    model = report["service_time_model"]
    fit = CalibrationFit(
        model["a_s"], model["b_s_per_prompt_token"], model["c_s_per_output_token"], model["r2"]
    )
    per_round = int(report["workload"]["stats"]["requests"])
    rows = section["requests"]
    if per_round <= 0 or len(rows) % per_round:
        raise ValueError(f"{system}: {len(rows)} request rows are not rounds of {per_round}")
    steal = section.get("round_cpu_steal_share") or []
    timelines = section.get("round_output_per_s") or []
    durations = section.get("round_durations_s") or []
    if timelines and len(durations) < len(timelines):
        raise ValueError(f"{system}: {len(timelines)} round timelines but only "
                         f"{len(durations)} round durations to place them")  # fmt: skip
    out: list[dict[str, Any]] = []
    for k, start in enumerate(range(0, len(rows), per_round)):
        chunk = rows[start : start + per_round]
        ok = [r for r in chunk if r[at["ok"]]]
        begin = min(r[at["arrival_s"]] for r in chunk)
        end = max(r[at["end_s"]] for r in ok) if ok else begin
        last = max(r[at["arrival_s"]] for r in chunk)
        started = [r for r in ok if r[at["first_token_s"]] <= last]
        timeline = timelines[k] if k < len(timelines) else None
        # A timeline counts from the round's start: the earlier rounds' durations laid end to
        # end, as the harness lays the rows.
        zero = sum(durations[:k])
        turnarounds = [
            (r[at["end_s"]] - r[at["arrival_s"]])
            / fit.predict(r[at["prompt_tokens"]], r[at["output_tokens"]])
            for r in ok
        ]
        out.append({
            "output_tokens": float(sum(r[at["output_tokens"]] for r in ok)),
            "duration_s": end - begin,
            "tail_s": end - last,
            "output_before_last_arrival": None if timeline is None
            else delivered_before(timeline, last - zero),
            # From the rows alone (exact, in every report): what was done by the last arrival.
            "started_by_last_arrival": float(len(started)),
            "output_finished_by_last_arrival": float(
                sum(r[at["output_tokens"]] for r in ok if r[at["end_s"]] <= last)
            ),
            "prompt_started_by_last_arrival": float(sum(r[at["prompt_tokens"]] for r in started)),
            # From the rows too, but an estimate: see _interpolated.
            "output_interpolated_by_last_arrival": sum(
                _interpolated(r[at["output_tokens"]], r[at["first_token_s"]], r[at["end_s"]], last)
                for r in ok
            ),
            "turnarounds": turnarounds,
            "failed": float(len(chunk) - len(ok)),
            "cpu_steal_share": steal[k] if k < len(steal) else None,
        })  # fmt: skip
    return out


def delivered_before(per_second: list[int], t: float) -> float:
    """Tokens of a `round_output_per_s` timeline delivered before `t` seconds into the round:
    the whole seconds before it, and the second it falls in pro rata."""
    t = max(0.0, t)
    whole = math.floor(t)
    partial = per_second[whole] * (t - whole) if whole < len(per_second) else 0.0
    return float(sum(per_second[:whole]) + partial)


def _interpolated(tokens: int, first: float, end: float, t: float) -> float:
    """Output tokens of a request delivered by `t`, were they evenly spaced from its first
    token to its last: an estimate (a request preempted part-way delivered in two stretches)
    that every report's rows allow, where `round_output_per_s` gives the exact figure. A token
    exactly at `t` counts (`delivered_before` leaves it out: a difference of one token at
    most). On `results/timeline-check/` it reads within 1% of the timeline's figure."""
    if t < first or tokens <= 0:
        return 0.0
    if t >= end or end <= first:
        return float(tokens)
    return 1.0 + (tokens - 1) * (t - first) / (end - first)


def _spread(values: list[float]) -> dict[str, float]:
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return {"n": len(values), "mean": statistics.mean(values), "sd": sd,
            "se": sd / math.sqrt(len(values)), "min": min(values), "max": max(values)}  # fmt: skip


def pool(runs: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """`runs`: per run, its harness reports by scenario key. Per scenario, per system that every
    run has: the paired per-round ratios to FCFS and the pooled ratios."""
    out: dict[str, Any] = {}
    for key in SCENARIOS:
        reports = [run[key] for run in runs if key in run]
        if not reports:
            continue
        present = [name for name, harness in SYSTEMS.items()
                   if any(harness in r["systems"] for r in reports)]  # fmt: skip
        if "fcfs" not in present or any(SYSTEMS["fcfs"] not in r["systems"] for r in reports):
            raise ValueError(f"{key}: every run needs stock vLLM FCFS ({SYSTEMS['fcfs']})")
        section: dict[str, Any] = {}
        for name in present:
            wt: list[float] = []
            tput: list[float] = []
            mine: list[dict[str, Any]] = []
            base: list[dict[str, Any]] = []
            wt_pair: list[float] = []
            tput_pair: list[float] = []
            for report in reports:
                if SYSTEMS[name] not in report["systems"]:
                    continue
                rounds = round_figures(report, SYSTEMS[name])
                fcfs = round_figures(report, SYSTEMS["fcfs"])
                for r, f in zip(rounds, fcfs, strict=False):
                    wt.append(_turnaround(r) / _turnaround(f))
                    tput.append(_rate(r) / _rate(f))
                    mine.append(r)
                    base.append(f)
                if SYSTEMS["fcfs_b"] in report["systems"] and name not in ("fcfs", "fcfs_b"):
                    control = round_figures(report, SYSTEMS["fcfs_b"])
                    for r, f, b in zip(rounds, fcfs, control, strict=False):
                        wt_pair.append(_turnaround(r) / statistics.mean(map(_turnaround, (f, b))))
                        tput_pair.append(_rate(r) / statistics.mean(map(_rate, (f, b))))
            section[name] = {
                "runs": sum(SYSTEMS[name] in r["systems"] for r in reports),
                "paired": {"weighted_turnaround_ratio": _spread(wt),
                           "throughput_ratio": _spread(tput)},
                "pooled": {
                    "weighted_turnaround_ratio": _mean_turnaround(mine)
                    / _mean_turnaround(base),
                    "throughput_ratio": _throughput(mine) / _throughput(base),
                },
                "failed": sum(r["failed"] for r in mine),
            }  # fmt: skip
            for field in ROUND_SPREADS:
                section[name][field] = _spread([r[field] for r in mine])
            before = [r["output_before_last_arrival"] for r in mine
                      if r["output_before_last_arrival"] is not None]  # fmt: skip
            if before:
                section[name]["output_before_last_arrival"] = _spread(before)
            stolen = [r["cpu_steal_share"] for r in mine if r["cpu_steal_share"] is not None]
            if stolen:  # how much of the machine other guests took during this system's rounds
                section[name]["cpu_steal_share"] = _spread(stolen)
            if tput_pair:
                section[name]["paired_vs_fcfs_pair"] = {
                    "weighted_turnaround_ratio": _spread(wt_pair),
                    "throughput_ratio": _spread(tput_pair),
                }
        out[key] = section
    return out


def _turnaround(round_: dict[str, Any]) -> float:
    return statistics.mean(round_["turnarounds"])


def _rate(round_: dict[str, Any]) -> float:
    return float(round_["output_tokens"] / round_["duration_s"])


def _mean_turnaround(rounds: list[dict[str, Any]]) -> float:
    return statistics.mean(t for r in rounds for t in r["turnarounds"])


def _throughput(rounds: list[dict[str, Any]]) -> float:
    return sum(r["output_tokens"] for r in rounds) / sum(r["duration_s"] for r in rounds)


def load_run(folder: Path) -> dict[str, dict[str, Any]]:
    """The harness reports of one fairness run, by scenario key: every mix the folder has (a
    follow-up run, `bench/fairness.py --scenarios ...`, may have one only)."""
    run = {}
    paths = {key: folder / f"fairness-{scenario}.json" for key, scenario in SCENARIOS.items()}
    if not any(p.is_file() for p in paths.values()):
        names = " or ".join(p.name for p in paths.values())
        raise FileNotFoundError(f"{folder} has no {names} (a bench/fairness.py run?)")
    for key, path in paths.items():
        if not path.is_file():
            continue
        try:
            run[key] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON: {e}") from None
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="folders of bench/fairness.py runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "fairness-pooled.json")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(folder) for folder in args.runs]
        pooled = pool(runs)
    except (OSError, ValueError, KeyError) as e:
        parser.error(str(e))
    report = {
        "command": shlex.join(["python", "bench/fairness_pool.py",
                               *(sys.argv[1:] if argv is None else argv)]),
        "runs": [
            {"folder": str(folder), "scenarios": list(run),
             **{k: next(iter(run.values())).get(k)
                for k in ("command", "created", "source", "rounds")}}
            for folder, run in zip(args.runs, runs, strict=True)
        ],
        "targets": {"weighted_turnaround_ratio_max": 0.2, "throughput_ratio_min": 0.98},
        "scenarios": pooled,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for key, section in pooled.items():
        for name, s in section.items():
            p, q = s["paired"]["weighted_turnaround_ratio"], s["paired"]["throughput_ratio"]
            print(
                f"{key:13} {name:14} rounds {p['n']:2}  weighted turnaround "
                f"{s['pooled']['weighted_turnaround_ratio']:.3f} (per round {p['mean']:.3f} "
                f"+- {p['se']:.3f})  throughput {s['pooled']['throughput_ratio']:.4f} "
                f"(per round {q['mean']:.4f} +- {q['se']:.4f}, {q['min']:.3f}-{q['max']:.3f})"
            )
            line = f"{'':28} tail after the last arrival {s['tail_s']['mean']:.1f} s"
            if "output_before_last_arrival" in s:
                line += f", output before it {s['output_before_last_arrival']['mean']:.0f} tokens"
            print(line)
            if "paired_vs_fcfs_pair" in s:
                q = s["paired_vs_fcfs_pair"]["throughput_ratio"]
                print(f"{'':28} throughput against the FCFS pair, per round {q['mean']:.4f} "
                      f"+- {q['se']:.4f} ({q['n']} rounds)")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
