"""Is per-request split planning enough, or must concurrent sessions be planned jointly?

The server plans each split session alone (`choose_split_layer`): the least server work that
meets its SLA, pricing its server layers as if every running request shared every layer's
decode step (`decode_batch` = the requests running). But sessions share the server: a layer
that every session runs on its client is not run on the server at all, and a layer with fewer
rows is faster. So the sessions' choices interact, and a joint plan could do better. This
study measures by how much, with the planner's own cost model, by exhaustive search.

A scenario is `--sessions` sessions decoding together, with the same prompt and output length
(ShareGPT pairs) and each its own client tier and SLA class (bench/split_serving.py's TIERS and
SLA_CLASSES). For a vector k (session s runs layers [0, k_s) on its client), layer l carries
rows_l = #{s : k_s <= l} rows per step, and

- session s's latency is the planner's latency of its placement with each server layer priced
  at rows_l rows (`build_costs` with decode_batch = rows_l);
- the server's busy time is the sum over layers with rows_l > 0 of that layer's time at rows_l
  rows (a layer no session runs on the server costs nothing);
- the server's FLOPs are the sum of each session's server layers' FLOPs.

Per-request planning (what the server does) is compared with the joint optimum over all
(L + 1)^S vectors: most sessions within SLA first, then the least busy time. Both are scored in
the joint model. Two setups: the capacity benchmark's 16-layer model on this machine's CPU
server profile (`--cpu-flops`, `--cpu-mem`), the same model on a compute-bound server (where
a step's row count sets its time), and Llama-3-8B on an H100 profile; each alone and beside
`--background` ordinary requests that share every decode step.

The cost model the planner uses is not what a split costs this CPU server
(bench/split_host_cost.py): a split row seldom shares a pass with the requests served whole,
and each split token costs the API server a WebSocket message and an input chunk. The
`tiny16-cpu-measured-slack*` setups score the same plans in that measured model as well
(`measured_busy`, from `--host-cost`'s PassCosts), at each `--slacks` slack (the SLA divided by
it, as the server plans once calibrated): the per-request plans, the optimum of the measured
model, serving every session whole (what split off costs), and the per-request plans that
`--split-cost-profile` gives (`priced_plans`: a split that saves no server time in that model
is served whole where that meets as many SLAs).

    python bench/split_joint.py        # writes bench/results/split_joint.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from adaptivellm.benchmark.workloads import sharegpt_pairs
from adaptivellm.split_client.planner import (
    PRESETS,
    ServerProfile,
    SplitCosts,
    build_costs,
    evaluate_placements,
    plan_prefix,
    prefix_masks,
)
from adaptivellm.split_client.planner import Request as PlannerRequest
from adaptivellm.split_client.shapes import ModelShape
from adaptivellm.split_costs import PassCosts, load_pass_costs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from split_serving import SLA_CLASSES, TIERS  # the capacity benchmark's mix

RESULTS = Path(__file__).resolve().parent / "results"


def measured_busy(model: PassCosts, vectors: np.ndarray, background: int) -> np.ndarray:
    """Seconds of server time (forward and API-server CPU) per decode step of each k vector in
    the measured model (adaptivellm.split_costs, from bench/results/split_host_cost.json).
    Requests served whole (k = 0, and the background) share one pass of every layer; each
    split session runs a pass of its own, as the measurement found (a split row waits for its
    round trip, so it seldom shares a pass: 1.1-1.5 output tokens a pass against 3.3 for
    requests served whole)."""
    whole = background + (vectors == 0).sum(axis=1)
    whole_pass = model.head_s + model.layers * (model.layer_s + model.layer_row_s * whole)
    busy = np.where(whole > 0, whole_pass + whole * model.whole_host_s, 0.0)
    # A split session's time a step at each k (none at k = 0): PassCosts.split_s.
    split = np.array([model.split_s(k) if k else 0.0 for k in range(model.layers + 1)])
    return busy + split[vectors].sum(axis=1)


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    shape: ModelShape
    server: ServerProfile
    #: Score server time in this measured model as well (the planner's latencies still set
    #: which SLAs are met).
    measured: PassCosts | None = None
    #: Plan and score against SLA / slack, as the server does once it has calibrated itself
    #: (its slack read 1.6-1.9 in the capacity runs: `Calibration.budget`).
    slack: float = 1.0


def setups(args: argparse.Namespace) -> list[Setup]:
    tiny = ModelShape(args.layers, 256, 4, 2, 64, 1024, dtype_bytes=4, vocab_size=4096,
                      name=f"tiny-{args.layers}")  # fmt: skip
    cpu = ServerProfile(flops_per_s=args.cpu_flops, mem_bytes_per_s=args.cpu_mem,
                        step_overhead_s=args.cpu_step_s)  # fmt: skip
    # A server whose layers are compute-bound (slow arithmetic, fast memory): the row count of
    # a step then sets its time, which is where sessions' choices interact.
    compute_bound = dataclasses.replace(cpu, flops_per_s=2e9, mem_bytes_per_s=1e12)
    measured = load_pass_costs(args.host_cost) if args.host_cost else None
    if measured is not None and measured.layers != args.layers:
        raise ValueError(f"{args.host_cost} measured a {measured.layers}-layer model")
    # The CPU server scored in the measured model too, at each slack (`Setup.slack`).
    scored = [
        Setup(f"tiny16-cpu-measured-slack{slack:g}", tiny, cpu, measured, slack)
        for slack in (args.slacks if measured else [])
    ]
    return [
        Setup("tiny16-cpu", tiny, cpu),
        *scored,
        Setup("tiny16-compute-bound", tiny, compute_bound),
        Setup("llama3-8b-h100", PRESETS["llama3-8b"], ServerProfile()),
    ]


def scenario(
    rng: np.random.Generator, sessions: int, max_prompt: int, max_tokens: int
) -> tuple[int, int, list[str], list[str]]:
    pairs = sharegpt_pairs()
    prompt, out = pairs[int(rng.integers(len(pairs)))]
    tiers = [list(TIERS)[int(rng.integers(len(TIERS)))] for _ in range(sessions)]
    classes = [list(SLA_CLASSES)[int(rng.integers(len(SLA_CLASSES)))] for _ in range(sessions)]
    return int(np.clip(prompt, 4, max_prompt)), int(np.clip(out, 4, max_tokens)), tiers, classes


def sla_s(sla_class: str, out: int) -> float:
    first, per_token = SLA_CLASSES[sla_class]
    return first + per_token * (out - 1)


def study(
    setup: Setup, scen: tuple[int, int, list[str], list[str]], background: int
) -> dict[str, Any]:
    """Per-request plans against the joint optimum for one scenario; `background` ordinary
    requests share every decode step."""
    prompt, out, tiers, classes = scen
    sessions, layers = len(tiers), setup.shape.num_layers

    def priced(tier: str, sla_class: str, rows: int) -> SplitCosts:
        server = dataclasses.replace(setup.server, decode_batch=max(1, background + rows))
        request = PlannerRequest(prompt, out, sla_s(sla_class, out) / setup.slack)
        return build_costs(setup.shape, TIERS[tier], server, request)

    # costs[s][j]: session s priced with j split rows (and the background) in each step.
    costs = [
        [priced(tier, c, j) for j in range(sessions + 1)]
        for tier, c in zip(tiers, classes, strict=True)
    ]
    # What the server does: each session alone, every layer priced at the full batch.
    served = []
    for s in range(sessions):
        plan = plan_prefix(costs[s][sessions])
        served.append(plan.client_layers if plan.feasible else 0)
    vectors = np.array(list(itertools.product(range(layers + 1), repeat=sessions)))  # (V, S)
    met, busy, flops = joint_scores(costs, vectors, layers, background)
    index = {tuple(v): i for i, v in enumerate(vectors.tolist())}
    mine = index[tuple(served)]
    best = int(np.lexsort((busy, -met))[0])

    def scored(i: int, ks: list[int]) -> dict[str, Any]:
        return {"k": ks, "met": int(met[i]), "busy_s": float(busy[i]), "flops": float(flops[i])}

    row: dict[str, Any] = {
        "layers": layers,
        "prompt": prompt,
        "output": out,
        "tiers": tiers,
        "sla_classes": classes,
        "per_request": scored(mine, served),
        "joint": scored(best, vectors[best].tolist()),
    }
    if setup.measured is not None:
        seconds = measured_busy(setup.measured, vectors, background)
        ideal = int(np.lexsort((seconds, -met))[0])
        for key, i in (("per_request", mine), ("joint", best)):
            row[key]["measured_busy_s"] = float(seconds[i])
        row["joint_measured"] = {**scored(ideal, vectors[ideal].tolist()),
                                 "measured_busy_s": float(seconds[ideal])}  # fmt: skip
        gated = priced_plans(setup.measured, served, background, lambda ks: met[index[ks]])
        i = index[tuple(gated)]
        row["per_request_priced"] = {**scored(i, gated), "measured_busy_s": float(seconds[i])}
        row["all_whole"] = {**scored(0, [0] * sessions), "measured_busy_s": float(seconds[0])}
    return row


def priced_plans(
    costs: PassCosts, served: list[int], background: int, met: Callable[[tuple[int, ...]], int]
) -> list[int]:
    """The server's per-request plans with `--split-cost-profile`: each split session in turn
    is served whole instead where its split saves no server time beside the requests then
    served whole (`PassCosts.split_saves`) and whole it meets its SLA (here: the vector meets
    as many SLAs)."""
    plans = list(served)
    for s, k in enumerate(served):
        whole_rows = background + sum(1 for j, kj in enumerate(plans) if j != s and kj == 0)
        if k <= 0 or costs.split_saves(k, whole_rows):
            continue
        trial = [*plans[:s], 0, *plans[s + 1 :]]
        if met(tuple(trial)) >= met(tuple(plans)):
            plans = trial
    return plans


def joint_scores(
    costs: list[list[SplitCosts]], vectors: np.ndarray, layers: int, background: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each k vector: sessions within SLA, server busy time, server FLOPs (joint model)."""
    sessions = vectors.shape[1]
    on_server = np.arange(layers)[None, None, :] >= vectors[:, :, None]  # (V, S, L)
    rows = on_server.sum(axis=1)  # (V, L): split rows per layer
    # Every layer has the same shape, so one layer's time at j rows stands for each layer.
    layer_time = np.array([costs[0][j].server_time[0] for j in range(sessions + 1)])
    runs = (rows > 0) | (background > 0)
    busy = np.where(runs, layer_time[rows], 0.0).sum(axis=1)
    met = np.zeros(len(vectors), dtype=np.int64)
    flops = np.zeros(len(vectors))
    masks = prefix_masks(layers)
    for s in range(sessions):
        k = vectors[:, s]
        # Session s's latency: its placement's latency priced at 1 split row, plus, for each
        # of its server layers, the extra time of that layer's real row count; the LM head
        # runs for every session at the full batch.
        base, work = evaluate_placements(costs[s][1], masks)
        lm_head = costs[s][sessions].fixed_time - costs[s][1].fixed_time
        extra_per_rows = np.array([c.server_time[0] - costs[s][1].server_time[0]
                                   for c in costs[s]])  # fmt: skip
        extra = np.where(on_server[:, s, :], extra_per_rows[rows], 0.0).sum(axis=1)
        latency = base[k] + extra + lm_head
        met += (latency <= costs[s][1].sla_s) & np.isfinite(latency)
        flops += work[k]
    return met, busy, flops


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    same = [r for r in rows if r["joint"]["met"] == r["per_request"]["met"]]
    busy_ratio = [_ratio(r, "busy_s") for r in same if r["per_request"]["busy_s"]]
    flops_ratio = [_ratio(r, "flops") for r in same if r["per_request"]["flops"]]
    return {
        "scenarios": len(rows),
        "joint_meets_more_slas": sum(r["joint"]["met"] > r["per_request"]["met"] for r in rows),
        "sla_met_share": {
            "per_request": sum(r["per_request"]["met"] for r in rows)
            / sum(len(r["tiers"]) for r in rows),
            "joint": sum(r["joint"]["met"] for r in rows) / sum(len(r["tiers"]) for r in rows),
        },
        "busy_time_ratio_joint_over_per_request": _spread(busy_ratio),
        "flops_ratio_joint_over_per_request": _spread(flops_ratio),
        "scenarios_where_joint_saves_over_5pct_busy": sum(r < 0.95 for r in busy_ratio),
        **(measured_summary(rows) if "joint_measured" in rows[0] else {}),
    }


def measured_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Server time in the measured model: the per-request plans (FLOP-priced) against serving
    every session whole, and the optimum of the measured model (most SLAs met, then the least
    measured time) against the per-request plans where both meet as many SLAs."""
    sessions = sum(len(r["tiers"]) for r in rows)

    def seconds(r: dict[str, Any], key: str) -> float:
        return float(r[key]["measured_busy_s"])

    def share(key: str, interior: bool) -> float:
        ks = [(k, r["layers"]) for r in rows for k in r[key]["k"]]
        return sum((0 < k < n) if interior else k == n for k, n in ks) / sessions

    def ratio(a: str, b: str, among: list[dict[str, Any]]) -> dict[str, float | None]:
        """Plan `a`'s measured time over plan `b`'s, per scenario of `among`."""
        return _spread([seconds(r, a) / seconds(r, b) for r in among])

    same = [r for r in rows if r["joint_measured"]["met"] == r["per_request"]["met"]]
    return {
        "measured": {
            "per_request_over_all_whole": ratio("per_request", "all_whole", rows),
            "optimum_over_per_request": ratio("joint_measured", "per_request", same),
            "optimum_over_all_whole": ratio("joint_measured", "all_whole", rows),
            "priced_over_all_whole": ratio("per_request_priced", "all_whole", rows),
            "priced_over_per_request": ratio("per_request_priced", "per_request", rows),
            "priced_over_optimum": ratio("per_request_priced", "joint_measured", same),
            "priced_meets_fewer_slas": sum(
                r["per_request_priced"]["met"] < r["per_request"]["met"] for r in rows
            ),
            "optimum_meets_more_slas": sum(
                r["joint_measured"]["met"] > r["per_request"]["met"] for r in rows
            ),
            "sla_met_share_all_whole": sum(r["all_whole"]["met"] for r in rows) / sessions,
            "split_shares": {
                key: {"interior": share(key, True), "all_client": share(key, False)}
                for key in ("per_request", "per_request_priced", "joint_measured")
            },
        }
    }


def _ratio(row: dict[str, Any], key: str) -> float:
    return float(row["joint"][key] / row["per_request"][key])


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p10": None, "median": None, "p90": None}
    q = np.quantile(values, [0.1, 0.5, 0.9])
    return {"mean": statistics.fmean(values), "p10": float(q[0]), "median": float(q[1]),
            "p90": float(q[2])}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=3, help="sessions decoding together")
    parser.add_argument("--layers", type=int, default=16, help="layers of the tiny model")
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--cpu-flops", type=float, default=5e10, help="CPU server FLOP/s")
    parser.add_argument("--cpu-mem", type=float, default=2e10, help="CPU server bytes/s")
    parser.add_argument("--cpu-step-s", type=float, default=0.01, help="CPU step overhead")
    parser.add_argument(
        "--background", type=int, nargs="+", default=[0, 4, 32],
        help="ordinary requests sharing every decode step (one study each)",
    )  # fmt: skip
    parser.add_argument(
        "--host-cost", type=Path, default=RESULTS / "split_host_cost.json",
        help="bench/split_host_cost.py's result: also score server time as it measured "
        "this CPU's passes and API-server CPU (the tiny16-cpu-measured setup)",
    )  # fmt: skip
    parser.add_argument(
        "--slacks", type=float, nargs="+", default=[1.0, 2.0],
        help="SLA slacks of the measured setups (one setup each)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "split_joint.json")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 4:
        parser.error("--sessions must be 1 to 4 (the search is exhaustive: (L + 1)^S vectors)")
    result: dict[str, Any] = {"command": shlex.join(["python", *sys.argv]), "setups": {}}
    for setup in setups(args):
        for background in args.background:
            rng = np.random.default_rng(args.seed)
            name = f"{setup.name}-background{background}"
            rows = [
                study(
                    setup,
                    scenario(rng, args.sessions, args.max_prompt, args.max_tokens),
                    background,
                )
                for _ in tqdm(range(args.scenarios), desc=name)
            ]
            result["setups"][name] = {
                "server": dataclasses.asdict(setup.server),
                "layers": setup.shape.num_layers,
                "background_requests": background,
                **summary(rows),
                "rows": rows,
            }
            print(name, json.dumps(summary(rows)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=_finite) + "\n")
    return 0


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(type(value))


if __name__ == "__main__":
    sys.exit(main())
