"""`adaptivellm bench` / `python -m adaptivellm.benchmark`: run a scenario against stock vLLM and
AdaptiveLLM side by side and write bench/results/<scenario>.json plus PNG plots."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from adaptivellm.benchmark.scenarios import SCENARIOS
from adaptivellm.benchmark.workloads import (
    ARRIVALS,
    BenchRequest,
    Scenario,
    WorkloadSpec,
    build_workload,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from adaptivellm.benchmark.harness import BenchConfig, SystemRun

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
#: Workload flag -> WorkloadSpec field (None: keep the scenario's value).
_OVERRIDES = {
    "num_requests": int, "arrival": str, "rate": float, "cv": float, "concurrency": int,
    "length_scale": float, "seed": int,
}  # fmt: skip


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's flags to `parser`."""
    parser.add_argument(
        "--scenario", default="sharegpt", choices=[*SCENARIOS, "all"],
        help="workload and server flags (default: sharegpt; 'all': each in turn)",
    )  # fmt: skip
    parser.add_argument(
        "--system", action="append", metavar="NAME[=FLAGS]",
        help="a system to run (repeatable; default: stock and adaptivellm). NAME=FLAGS adds "
        "serve flags; names 'stock'/'stock-*' run stock vLLM, others `adaptivellm serve`",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the scenario's small workload")
    parser.add_argument(
        "--vllm-args", default="", help="extra vLLM flags for every server (one quoted string)"
    )
    parser.add_argument("--model", help="model folder (default: the embedded model)")
    parser.add_argument("--served-model-name", default=None, help="name the servers answer to")
    for name, kind in _OVERRIDES.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(
            flag, type=kind, default=None, help=f"override the scenario's {name} (WorkloadSpec)",
            choices=ARRIVALS if name == "arrival" else None,
        )  # fmt: skip
    parser.add_argument(
        "--load", type=float, default=None, metavar="FACTOR",
        help="offer FACTOR times the capacity of the first --system, measured first (closed "
        "loop, saturated) on this machine, instead of the scenario's --rate: the same "
        "overload on a fast machine and a slow one",
    )  # fmt: skip
    parser.add_argument(
        "--capacity-clients", type=int, default=16,
        help="closed-loop clients of the --load capacity probe (more than the batch slots)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="workload replays per system")
    parser.add_argument(
        "--round-order", choices=("reverse", "rotate"), default="reverse",
        help="the systems' turn order across rounds: reversed every other round (default), or "
        "rotated one place a round (balanced over a multiple of the system count in rounds)",
    )  # fmt: skip
    parser.add_argument(
        "--calibration-repeats", type=int, default=2, help="solo requests per calibration shape"
    )
    parser.add_argument("--max-servers", type=int, default=2, help="servers up at once (default 2)")
    parser.add_argument(
        "--tenant-weight", action="append", default=[], metavar="TENANT=W",
        help="weight of a tenant for the fairness index (default 1)",
    )  # fmt: skip
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", help="output file stem (default: the scenario name)")
    parser.add_argument("--no-plots", action="store_true")


def workload_for(scenario: Scenario, args: argparse.Namespace) -> WorkloadSpec:
    """The scenario's workload (quick or full) with command-line overrides applied."""
    spec = scenario.quick if args.quick else scenario.workload
    changes = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k, None) is not None}
    return dataclasses.replace(spec, **changes)


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed `args`; 0 when every request of every system
    succeeded."""
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    status = 0
    for name in names:
        status |= _run_scenario(SCENARIOS[name], args, args.name if len(names) == 1 else None)
    return status


def _run_scenario(scenario: Scenario, args: argparse.Namespace, stem: str | None) -> int:
    from tqdm import tqdm

    from adaptivellm.benchmark.harness import run_benchmark

    stem = stem or scenario.name
    config, requests = _bench_config(scenario, args, stem)
    total = len(config.systems) * args.rounds * len(requests)
    with tqdm(total=total, unit="req", desc=scenario.name) as bar:

        def advance(_: object) -> None:
            bar.update(1)

        runs = run_benchmark(
            config, requests, on_result=advance,
            on_stage=lambda s: bar.set_description(f"{scenario.name}: {s}"),
        )  # fmt: skip
    return _write_report(scenario, args, stem, config, requests, runs)


def _bench_config(
    scenario: Scenario, args: argparse.Namespace, stem: str
) -> tuple[BenchConfig, list[BenchRequest]]:
    """The run's configuration and workload, from the scenario and the command line."""
    from adaptivellm.benchmark.harness import BenchConfig, model_vocab_size, parse_system
    from adaptivellm.model import DEFAULT_MODEL_NAME, ensure_model

    model = args.model or str(ensure_model())
    spec = workload_for(scenario, args)
    check_load_arguments(args, spec)
    requests = build_workload(spec)
    systems = tuple(parse_system(s) for s in (args.system or ["stock", "adaptivellm"]))
    if len({s.name for s in systems}) != len(systems):
        raise SystemExit("--system names must be distinct")
    config = BenchConfig(
        systems=systems,
        workload=spec,
        model_path=model,
        served_name=args.served_model_name or DEFAULT_MODEL_NAME,
        vocab_size=model_vocab_size(model),
        common_flags=(
            "--dtype",
            "float32",
            "--enforce-eager",
            *scenario.server_flags,
            *shlex.split(args.vllm_args),
        ),
        log_dir=args.out_dir / "logs" / stem,
        rounds=args.rounds,
        calibration_repeats=args.calibration_repeats,
        max_servers=max(1, args.max_servers),
        round_order=args.round_order,
    )
    if args.load is not None:
        config, requests = _set_load(config, requests, args.load, args.capacity_clients)
    return config, requests


def _write_report(
    scenario: Scenario,
    args: argparse.Namespace,
    stem: str,
    config: BenchConfig,
    requests: list[BenchRequest],
    runs: Mapping[str, SystemRun],
) -> int:
    """Write the JSON report and the plots, print the table; 1 if any request failed."""
    from adaptivellm.benchmark.plots import write_plots
    from adaptivellm.benchmark.report import build_report, markdown_table

    weights = {k: float(v) for k, _, v in (w.partition("=") for w in args.tenant_weight)}
    report = build_report(
        scenario.name, scenario.description, config, requests, runs, weights, args.quick
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{stem}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n## {scenario.name}: {scenario.description}\n\n{markdown_table(report)}\n")
    print(f"wrote {out}")
    if not args.no_plots:
        plots = write_plots(args.out_dir, stem, {n: r.results for n, r in runs.items()}, report)
        print("plots: " + ", ".join(str(p) for p in plots))
    return int(any(s["figures"]["failed"] for s in report["systems"].values()))


def check_load_arguments(args: argparse.Namespace, spec: WorkloadSpec) -> None:
    """SystemExit when --load cannot apply: it replaces the rate of an open-loop workload."""
    if args.load is None:
        return
    if args.rate is not None:
        raise SystemExit("--load and --rate both set the offered rate: give one")
    if spec.arrival == "closed":
        raise SystemExit("--load sets an arrival rate; this workload is a closed loop")
    if not args.load > 0 or not math.isfinite(args.load):
        raise SystemExit(f"--load must be a positive factor, not {args.load}")
    if args.capacity_clients < 1 or args.capacity_clients >= spec.num_requests:
        raise SystemExit(
            f"--capacity-clients must be at least 1 and fewer than the workload's "
            f"{spec.num_requests} requests, not {args.capacity_clients}"
        )


def _set_load(
    config: BenchConfig, requests: list[BenchRequest], load: float, clients: int
) -> tuple[BenchConfig, list[BenchRequest]]:
    """Probe the first system's capacity on `requests`; the config and workload that offer
    `load` times it (same seed: the same requests, arrival gaps scaled)."""
    from tqdm import tqdm

    from adaptivellm.benchmark.harness import measure_capacity

    system = config.systems[0]
    with tqdm(total=len(requests), unit="req", desc=f"capacity of {system.name}") as bar:

        def advance(_: object) -> None:
            bar.update(1)

        probe = measure_capacity(
            config, system, requests, clients, on_stage=bar.set_description, on_result=advance
        )
    rate = load * probe.capacity_req_s
    print(f"capacity of {system.name}: {probe.capacity_req_s:.3f} requests/s; offering "
          f"{load:g}x = {rate:.3f} requests/s")  # fmt: skip
    spec = dataclasses.replace(config.workload, rate=rate)
    record = {"factor": load, "rate": rate, **dataclasses.asdict(probe)}
    return dataclasses.replace(config, workload=spec, load=record), build_workload(spec)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m adaptivellm.benchmark`."""
    parser = argparse.ArgumentParser(prog="python -m adaptivellm.benchmark", description=__doc__)
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))
