"""`adaptivellm plan`: print where each layer of one request should run, and why.

Wired into the `adaptivellm` CLI as the `plan` subcommand through `add_plan_arguments` and
`run_plan`. Exit codes: 0 a placement meets the SLA, 1 none does, 2 bad input.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from typing import Any, TextIO

from adaptivellm.split_client.planner import (
    PRESETS,
    ClientProfile,
    ModelShape,
    Plan,
    Request,
    ServerProfile,
    SplitCosts,
    build_costs,
    plan_dp,
)
from adaptivellm.split_client.workload import DEFAULT_PLANNERS, Planner, plan_all

EXIT_OK, EXIT_INFEASIBLE, EXIT_BAD_INPUT = 0, 1, 2


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `plan` subcommand's flags to `parser`."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "model",
        nargs="?",
        default="llama3-8b",
        help=f"model shape preset: {', '.join(sorted(PRESETS))} (default: %(default)s)",
    )
    model.add_argument("--model-path", help="a Hugging Face config.json, or a folder holding one")
    client = parser.add_argument_group("client and link")
    client.add_argument("--client-tflops", type=float, default=15.0, help="effective TFLOP/s")
    client.add_argument(
        "--client-gbps", type=float, default=300.0, help="client memory bandwidth, GB/s"
    )
    client.add_argument("--uplink-mbps", type=float, default=100.0, help="client to server")
    client.add_argument("--downlink-mbps", type=float, default=300.0, help="server to client")
    client.add_argument("--rtt-ms", type=float, default=20.0, help="round-trip time")
    client.add_argument(
        "--client-overhead-us",
        type=float,
        default=0.0,
        help="fixed client time per layer per forward pass (kernel launches)",
    )
    client.add_argument(
        "--client-memory-gb",
        type=float,
        default=None,
        help="memory the client can give the model's layers, weights and KV cache "
        "(default: no limit)",
    )
    server = parser.add_argument_group("server")
    server.add_argument("--server-tflops", type=float, default=400.0, help="effective TFLOP/s")
    server.add_argument("--server-gbps", type=float, default=2500.0, help="memory bandwidth GB/s")
    server.add_argument(
        "--server-batch", type=int, default=32, help="requests sharing each decode step"
    )
    request = parser.add_argument_group("request")
    request.add_argument("--prompt-tokens", type=int, default=512, help="prompt length")
    request.add_argument("--output-tokens", type=int, default=128, help="tokens generated")
    request.add_argument(
        "--sla-ms",
        type=float,
        required=True,
        help="end-to-end latency SLA (prompt sent to last token)",
    )
    parser.add_argument(
        "--step-ms", type=float, default=None, help="DP latency step (default: adaptive)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_plan(args: argparse.Namespace) -> int:
    """Plan the request described by `args`, print the result, return the exit code."""
    try:
        shape = _shape(args)
        costs = build_costs(shape, *_profiles(args))
        plans = _plans(costs, args.step_ms)
    except ValueError as exc:
        print(f"adaptivellm plan: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    report = _report(shape, costs, plans, args)
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        _print_table(report, sys.stdout)
    if not plans["dp"].feasible and not plans["prefix"].feasible:
        fastest = min(plans.values(), key=lambda plan: plan.latency_s)
        print(
            f"adaptivellm plan: no placement meets the SLA of {args.sla_ms:g} ms; the fastest "
            f"({fastest.method}) takes {fastest.latency_s * 1e3:.1f} ms",
            file=sys.stderr,
        )
        return EXIT_INFEASIBLE
    return EXIT_OK


def _shape(args: argparse.Namespace) -> ModelShape:
    if args.model_path:
        return ModelShape.from_hf_config(args.model_path)
    return ModelShape.preset(args.model)


def _profiles(args: argparse.Namespace) -> tuple[ClientProfile, ServerProfile, Request]:
    client = ClientProfile(
        flops_per_s=args.client_tflops * 1e12,
        uplink_bps=args.uplink_mbps * 1e6,
        downlink_bps=args.downlink_mbps * 1e6,
        rtt_s=args.rtt_ms / 1e3,
        mem_bytes_per_s=args.client_gbps * 1e9,
        layer_overhead_s=args.client_overhead_us / 1e6,
        memory_bytes=math.inf if args.client_memory_gb is None else args.client_memory_gb * 2**30,
    )
    server = ServerProfile(
        flops_per_s=args.server_tflops * 1e12,
        mem_bytes_per_s=args.server_gbps * 1e9,
        decode_batch=args.server_batch,
    )
    return client, server, Request(args.prompt_tokens, args.output_tokens, args.sla_ms / 1e3)


def _plans(costs: SplitCosts, step_ms: float | None) -> dict[str, Plan]:
    step_s = None if step_ms is None else step_ms / 1e3
    planners: dict[str, Planner] = {
        **DEFAULT_PLANNERS,
        "dp": functools.partial(plan_dp, step_s=step_s),
    }
    return plan_all(costs, planners)


def _ms(seconds: float) -> float | None:
    """Milliseconds for JSON; None stands for an impossible (infinite) time."""
    return round(seconds * 1e3, 3) if math.isfinite(seconds) else None


def _plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "placement": plan.placement_str,
        "split_layer": plan.split_layer,
        "client_layers": plan.client_layers,
        "server_gflop": round(plan.server_workload / 1e9, 3),
        "latency_ms": _ms(plan.latency_s),
        "meets_sla": plan.feasible,
    }


def _report(
    shape: ModelShape, costs: SplitCosts, plans: dict[str, Plan], args: argparse.Namespace
) -> dict[str, Any]:
    prefix, general = plans["prefix"].placement_str, plans["dp"].placement_str
    layers = [
        {
            "layer": j,
            "client_ms": _ms(float(costs.client_time[j])),
            "server_ms": _ms(float(costs.server_time[j])),
            "server_gflop": round(float(costs.server_work[j]) / 1e9, 3),
            "prefix": "client" if prefix[j] == "C" else "server",
            "general": "client" if general[j] == "C" else "server",
        }
        for j in range(costs.num_layers)
    ]
    return {
        "model": shape.name,
        "num_layers": shape.num_layers,
        "request": {
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "sla_ms": args.sla_ms,
        },
        "split_layer": plans["prefix"].client_layers if plans["prefix"].feasible else None,
        "layers": layers,
        "plans": {name: _plan_json(plan) for name, plan in plans.items()},
    }


def _compress(placement: str) -> str:
    """'CCCSS' -> 'C3 S2': readable for 80 layers."""
    runs: list[str] = []
    for letter in placement:
        if runs and runs[-1][0] == letter:
            runs[-1] += letter
        else:
            runs.append(letter)
    return " ".join(f"{run[0]}{len(run)}" for run in runs)


def _fmt(value: float | None) -> str:
    return "inf" if value is None else f"{value:.3f}"


def _print_table(report: dict[str, Any], out: TextIO) -> None:
    req = report["request"]
    print(
        f"{report['model']}: {report['num_layers']} layers; request {req['prompt_tokens']} "
        f"prompt + {req['output_tokens']} output tokens, SLA {req['sla_ms']:g} ms",
        file=out,
    )
    print(
        f"\n{'layer':>5} {'client_ms':>11} {'server_ms':>11} {'server_GFLOP':>13}  "
        f"{'prefix':<7} general",
        file=out,
    )
    for row in report["layers"]:
        print(
            f"{row['layer']:>5} {_fmt(row['client_ms']):>11} {_fmt(row['server_ms']):>11} "
            f"{row['server_gflop']:>13.3f}  {row['prefix']:<7} {row['general']}",
            file=out,
        )
    print(
        f"\n{'method':<12} {'server_GFLOP':>13} {'latency_ms':>11}  {'SLA':<5} placement", file=out
    )
    for name, plan in report["plans"].items():
        print(
            f"{name:<12} {plan['server_gflop']:>13.3f} {_fmt(plan['latency_ms']):>11}  "
            f"{'ok' if plan['meets_sla'] else 'MISS':<5} {_compress(plan['placement'])}",
            file=out,
        )
    k = report["split_layer"]
    if k is not None:
        print(
            f"\nsplit layer k = {k}: the client runs layers [0, {k}), the server the rest", file=out
        )
