"""Fairness benchmark: stock vLLM FCFS, stock vLLM priority, AdaptiveLLM vtc and AdaptiveLLM
weighted-turnaround (its defaults; with `--e3c3` also `adaptive_e3c3`: the same with
`--service-time-exponent 3 --fairness-preemption-candidates 3`, the candidate defaults that
bench/fairness_sim.py found better over many workload samples), side by side, on the
multi-tenant mix and on a single-tenant mixed-length mix (ShareGPT-shaped lengths), through the
benchmark harness (adaptivellm.benchmark).

A second, identical stock vLLM FCFS server (`fcfs_b`, the A/A control) runs too: how far its
figures are from `fcfs`'s is what the harness resolves between two servers on this machine
(bench/results/serving-aa.json had an identical stock server read 0.980x the first's
throughput over 10 rounds). The two FCFS servers take the two ends of the turn (the harness
reverses the order every other round), and every system is also reported against their mean
(`<name>_vs_fcfs_pair`); `<name>_vs_fcfs` is against the first alone, as the issue asks.

Scheduling order only matters when requests queue *in the engine*, so every server gets
`--max-num-seqs` (default 4) and the offered load is a little above what the engine can serve:
`--load 1.1` (default) offers 1.1 times the capacity of stock vLLM (FCFS) on this machine,
measured first on each scenario's workload (the harness's `--load`: a closed loop of 16
clients, requests/s while all are busy). A fixed `--rate` meant a different load on every
machine: the earlier default of 1.3 requests/s, chosen on a machine where FCFS served about 101
tokens/s, was 0.79x the capacity (1.65 requests/s) of a later one that served 116, and FCFS's
weighted turnaround moved from 19.6 to 9.0 with it.
The model is not the embedded 6-layer tiny model but a larger random-weight Llama built locally
(adaptivellm.benchmark.scenarios.BENCH_MODEL: 8 layers, hidden 1024, about 130M parameters).
With the tiny model, the HTTP front end and the load generator, not the engine, are the
bottleneck on a 2-core machine (measured at 6 requests/s: mean queue time in the engine 0.29 s,
mean TTFT at the client 2.1 s), so requests never pile up where a scheduler could reorder them.
With the larger model the engine is the bottleneck, as on a production GPU server, and the
client and the server agree on TTFT.

The harness's weighted turnaround uses one service-time model for every system (fitted on stock
vLLM alone on its idle server).

All servers are up at once (`--max-servers 6`) and replay the workload in turn, round by
round, so that drift in this machine's speed hits every system alike; an idle vLLM server takes
no CPU worth measuring. (Run two at a time, the AdaptiveLLM pair ran minutes after the stock pair
and their throughputs moved together.)

    python bench/fairness.py [--quick]      # writes bench/results/fairness.json

A follow-up run of part of it (more rounds of one mix, fewer systems) goes to a folder of its
own, for bench/fairness_pool.py, and leaves the canonical results alone:

    python bench/fairness.py --scenarios mixed_length --systems fcfs,adaptive,fcfs_b \
        --rounds 12 --round-order rotate --out-dir bench/results/fairness-mixed-focus
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from adaptivellm.benchmark.scenarios import (
    BENCH_MODEL_NAME,
    FAIRNESS_SCENARIOS,
    FAIRNESS_SYSTEMS,
    bench_model,
)

RESULTS = Path(__file__).resolve().parent / "results"
#: fairness.json key -> (harness system name, extra serve flags), in the harness's turn order:
#: the two FCFS servers at its ends. adaptive_e3c3 runs with --e3c3 only.
SYSTEMS = {k: v for k, v in FAIRNESS_SYSTEMS.items() if k != "adaptive_hrrn"}
SCENARIOS = FAIRNESS_SCENARIOS
#: Systems whose ratios to FCFS are reported (`<name>_vs_fcfs`, `<name>_vs_fcfs_pair`).
COMPARED = ("adaptive", "adaptive_e3c3", "vtc", "priority", "fcfs_b")


def run_scenario(scenario: str, stem: str, args: argparse.Namespace) -> dict:
    """Run the harness for one scenario with the chosen systems; return its report."""
    command = [sys.executable, "-m", "adaptivellm.benchmark", "--scenario", scenario,
               "--name", stem, "--out-dir", str(args.out_dir),
               "--vllm-args", f"--max-num-seqs {args.max_num_seqs}",
               "--max-servers", str(args.max_servers),
               "--rounds", str(args.rounds), "--model", args.model,
               "--round-order", args.round_order,
               "--served-model-name", BENCH_MODEL_NAME]  # fmt: skip
    if args.num_requests:
        command += ["--num-requests", str(args.num_requests)]
    command += ["--rate", str(args.rate)] if args.rate else ["--load", str(args.load)]
    for key, (name, flags) in SYSTEMS.items():
        if key in args.systems and (key != "adaptive_e3c3" or args.e3c3):
            command += ["--system", f"{name}={flags}" if flags else name]
    if args.quick:
        command.append("--quick")
    subprocess.run(command, check=True)
    return json.loads((args.out_dir / f"{stem}.json").read_text())


def figure(report: dict, name: str, *keys: str) -> float | None:
    """A figure of one system in a harness report (None when absent, or the system did not
    run: reports of earlier runs had `adaptive_hrrn`, plain HRRN, in place of adaptive_e3c3)."""
    value = report["systems"].get(name, {}).get("figures")
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the scenarios' small workloads")
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument(
        "--load", type=float, default=1.1,
        help="offered load as a multiple of stock vLLM's measured capacity (default 1.1)",
    )  # fmt: skip
    parser.add_argument("--rate", type=float, help="requests/s offered (instead of --load)")
    parser.add_argument("--num-requests", type=int, help="default 120 (30 with --quick)")
    parser.add_argument("--rounds", type=int, default=1, help="replays per system")
    parser.add_argument("--max-servers", type=int, default=6, help="servers up at once")
    parser.add_argument(
        "--round-order", choices=("reverse", "rotate"), default="reverse",
        help="the harness's turn order across rounds (default reverse; rotate balances over a "
        "multiple of the system count in rounds, and no system replays twice in a row)",
    )  # fmt: skip
    parser.add_argument("--e3c3", action="store_true", help="also run adaptive_e3c3")
    parser.add_argument("--model", help="model folder (default: BENCH_MODEL, built if missing)")
    parser.add_argument(
        "--scenarios", type=_scenario_keys, default=tuple(SCENARIOS),
        help=f"comma-separated mixes to run (default all: {','.join(SCENARIOS)})",
    )  # fmt: skip
    parser.add_argument(
        "--systems", type=_system_keys, default=tuple(SYSTEMS),
        help=f"comma-separated systems (default all; fcfs is required): {','.join(SYSTEMS)}",
    )  # fmt: skip
    parser.add_argument(
        "--out-dir", type=Path, default=RESULTS,
        help="folder for fairness.json and the harness reports (default bench/results)",
    )  # fmt: skip
    parser.add_argument(
        "--reuse", action="store_true", help="no run: aggregate the existing harness reports"
    )
    args = parser.parse_args(argv)
    if args.e3c3 and "adaptive_e3c3" not in args.systems:
        parser.error("--e3c3 runs adaptive_e3c3, which --systems leaves out")
    invocation = shlex.join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    args.model = args.model or str(bench_model())
    args.num_requests = args.num_requests or (30 if args.quick else 120)
    scenarios = {k: sc for k, sc in SCENARIOS.items() if k in args.scenarios}
    if args.reuse:  # aggregate the harness reports of an earlier run again
        try:
            reports = {k: json.loads((args.out_dir / f"fairness-{sc}.json").read_text())
                       for k, sc in scenarios.items()}  # fmt: skip
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"--reuse: {e}")
    else:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        reports = {k: run_scenario(sc, f"fairness-{sc}", args) for k, sc in scenarios.items()}
    out: dict = {"command": invocation, "quick": args.quick,
                 "max_num_seqs": args.max_num_seqs, "rate": args.rate,
                 "load": None if args.rate else args.load,
                 "rounds": args.rounds, "round_order": args.round_order,
                 "max_servers": args.max_servers,
                 "num_requests": args.num_requests, "model": args.model}  # fmt: skip
    if args.reuse:  # the command and settings of the run that made the reports, not these
        previous = json.loads((args.out_dir / "fairness.json").read_text())
        out = {k: previous.get(k) for k in out}  # None: not recorded by that run
    out["scenarios"] = {k: f"fairness-{v}.json" for k, v in scenarios.items()}
    # The offered rate and the capacity it came from, per scenario (None with --rate).
    out["offered"] = {k: r.get("workload", {}).get("load") for k, r in reports.items()}
    fields = {
        "avg_weighted_turnaround": ("mean_weighted_turnaround",),
        "throughput_tokens_per_s": ("output_tokens_per_s",),
        "jain": ("jain_fairness",),
        "jain_contended": ("jain_contended",),
        "jain_windows": ("jain_windows",),
        "p99_ttft_s": ("ttft_p99_s",),
    }
    for key, report in reports.items():
        ran = [k for k, (name, _) in SYSTEMS.items() if name in report["systems"]]
        section = {
            field: {k: figure(report, SYSTEMS[k][0], *path) for k in ran}
            for field, path in fields.items()
        }
        wt, tput = section["avg_weighted_turnaround"], section["throughput_tokens_per_s"]
        pair = ("fcfs", "fcfs_b")
        for name in (n for n in COMPARED if n in ran):
            section[f"{name}_vs_fcfs"] = {
                "weighted_turnaround_ratio": _ratio(wt[name], wt.get("fcfs")),
                "throughput_ratio": _ratio(tput[name], tput.get("fcfs")),
            }
            if name != "fcfs_b" and "fcfs_b" in ran:
                section[f"{name}_vs_fcfs_pair"] = {
                    "weighted_turnaround_ratio": _ratio(wt[name], _mean(wt, pair)),
                    "throughput_ratio": _ratio(tput[name], _mean(tput, pair)),
                }
        out[key] = section
    # The top-level fields are the multi-tenant mix's (absent when it did not run).
    if "multi_tenant" in out:
        out.update({f: out["multi_tenant"][f] for f in fields})
    out["targets"] = {"weighted_turnaround_ratio_max": 0.2, "throughput_ratio_min": 0.98,
                      "jain_min_multi_tenant": 0.95}  # fmt: skip
    if args.reuse:
        out["aggregated_again_by"] = invocation
    path = args.out_dir / "fairness.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    summary = {
        k: {n: out[k][f"{n}_vs_{base}"] for n in COMPARED for base in ("fcfs", "fcfs_pair")
            if f"{n}_vs_{base}" in out[k]}
        for k in scenarios
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


def _keys(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(n for n in (s.strip() for s in text.split(",")) if n)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}"
        )
    return names


def _scenario_keys(text: str) -> tuple[str, ...]:
    return _keys(text, tuple(SCENARIOS), "mix(es)")


def _system_keys(text: str) -> tuple[str, ...]:
    names = _keys(text, tuple(SYSTEMS), "system(s)")
    if "fcfs" not in names:
        raise argparse.ArgumentTypeError("fcfs is required: every ratio is against it")
    return names


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _mean(values: dict[str, float | None], keys: tuple[str, ...]) -> float | None:
    """The mean of `values[k]` over `keys` (None when one is missing)."""
    got = [v for k in keys if (v := values.get(k)) is not None]
    return sum(got) / len(got) if len(got) == len(keys) else None


if __name__ == "__main__":
    sys.exit(main())
