"""bench/split_serving.py's pure parts: the seeded pool and arrivals, the sustainable rate, the
replay clients' modelled time (the planner's own cost model), and the replay model (no
server)."""

from __future__ import annotations

import argparse
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from adaptivellm.model import ensure_model
from adaptivellm.split_client.planner import Request as PlannerRequest
from adaptivellm.split_client.planner import ServerProfile, build_costs
from adaptivellm.split_client.shapes import ModelShape
from tests.support import load_bench_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> types.ModuleType:
    return load_bench_script("split_serving")


def test_the_pool_is_seeded_clipped_and_mixed(bench: types.ModuleType) -> None:
    a = bench.pool(300, 64, 24, 0.25, seed=1)
    assert a == bench.pool(300, 64, 24, 0.25, seed=1)
    assert a != bench.pool(300, 64, 24, 0.25, seed=2)
    assert all(4 <= len(i.prompt) <= 64 and 4 <= i.max_tokens <= 24 for i in a)
    tiers = [i.tier for i in a]
    assert 0.15 < tiers.count("ordinary") / len(a) < 0.35
    assert set(tiers) == {"ordinary", *bench.TIERS}
    assert {i.sla_class for i in a} == set(bench.SLA_CLASSES)
    assert all(bench.pool(50, 64, 24, 0.0, seed=0)[j].tier != "ordinary" for j in range(50))
    first, per_token = bench.SLA_CLASSES[a[0].sla_class]
    assert a[0].sla_s == pytest.approx(first + per_token * (a[0].max_tokens - 1))


def test_arrivals_are_poisson_at_the_rate_and_the_same_for_every_policy(
    bench: types.ModuleType,
) -> None:
    times = [t for t, _ in bench.arrivals(5.0, 400.0, 10, seed=0)]
    assert times == sorted(times) and times[-1] < 400
    assert 1800 < len(times) < 2200  # 2,000 expected, sd 45
    gaps = np.diff(times)
    assert np.std(gaps) == pytest.approx(np.mean(gaps), rel=0.1)  # exponential: sd = mean
    assert bench.arrivals(2.0, 30, 8, 0) == bench.arrivals(2.0, 30, 8, 0)
    assert bench.arrivals(2.0, 30, 8, 0) != bench.arrivals(3.0, 30, 8, 0)
    assert all(0 <= i < 8 for _, i in bench.arrivals(2.0, 30, 8, 0))


def test_sustainable_rate_is_the_last_rate_before_the_first_miss(bench: types.ModuleType) -> None:
    assert bench.sustainable_rate({1: 1.0, 2: 0.995, 3: 0.97, 4: 1.0}, 0.99) == 2
    assert bench.sustainable_rate({1: 0.5, 2: 1.0}, 0.99) == 0.0
    assert bench.sustainable_rate({3: 1.0, 1: 1.0, 2: 1.0}, 0.99) == 3
    assert bench.sustainable_rate({}, 0.99) == 0.0


def test_decisions_compare_the_planners_k_with_each_baseline(bench: types.ModuleType) -> None:
    """On the benchmark's own pool the planner never costs the server more than a baseline (it
    takes the least server work that meets the SLA), and the shares are of split requests only
    (ordinary ones are not planned)."""
    items = bench.pool(24, 512, 48, 0.25, 0)
    out = bench.decisions(items, bench.ModelSpec(num_layers=16), batches=(1, 8), slacks=(1.2,))
    split = sum(item.tier in bench.TIERS for item in items)
    assert out["requests"] == 2 * split > 0
    for policy in ("greedy", "static"):
        assert 0 <= out["same_k_share"][policy] <= 1
        assert out["planner_server_work_ratio"][policy] <= 1 + 1e-12
    # Static takes every layer or none: the planner's interior splits differ from it.
    assert out["same_k_share"]["static"] < 1


def test_model_spec_keeps_the_earlier_build_and_widens_on_request(
    bench: types.ModuleType,
) -> None:
    """The default width is the build every earlier run served (same cache key); --hidden
    widens the MLP and the heads with it, and keeps the KV heads."""
    default = argparse.Namespace(layers=16, hidden=256)
    assert bench.model_spec(default).key() == bench.ModelSpec(num_layers=16).key()
    wide = bench.model_spec(argparse.Namespace(layers=16, hidden=512))
    assert (wide.hidden_size, wide.intermediate_size, wide.num_heads) == (512, 2048, 8)
    assert wide.num_kv_heads == bench.ModelSpec().num_kv_heads
    assert wide.key() != bench.model_spec(default).key()


def test_pass_cost_fits_the_runs_counters(bench: types.ModuleType) -> None:
    """The fit recovers a linear pass cost from the runs' counters, keys each run by policy and
    rate, skips runs that made no pass, and needs at least three runs."""

    def run(policy: str, rate: float, passes: float, layers_per_pass: float) -> dict:
        ms = 11.0 + 0.05 * layers_per_pass
        counters = {"forward_passes": passes, "token_layers": passes * layers_per_pass,
                    "forward_s": passes * ms / 1e3}  # fmt: skip
        return {"policy": policy, "rate": rate, "counters": counters}

    runs = [run("off", 1, 100, 60), run("off", 4, 200, 250), run("planner", 1, 90, 30),
            {"policy": "static", "rate": 2, "counters": {"forward_passes": 0}}]  # fmt: skip
    fit = bench.pass_cost(runs)
    assert fit["fixed_ms"] == pytest.approx(11.0)
    assert fit["per_token_layer_ms"] == pytest.approx(0.05)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit["runs"] == 3
    assert fit["pass_ms"]["off@4"] == pytest.approx(23.5)
    assert fit["token_layers_per_pass"]["planner@1"] == pytest.approx(30)
    assert bench.pass_cost(runs[:2]) is None


def test_latency_counts_from_the_clients_start_and_the_harness_lateness_apart(
    bench: types.ModuleType,
) -> None:
    """A request the harness started 0.5 s late meets a 1 s SLA if it took 0.7 s from its
    start, but not counted from its scheduled arrival; `_timed` measures that lateness."""
    late = bench.Outcome(0, "phone", "tight", 1.0, 0.7, late_start_s=0.5)
    assert late.met and not late.met_from_arrival
    assert not bench.Outcome(0, "phone", "tight", 1.0, 0.7, error="boom").met
    scheduled = time.perf_counter() - 0.25

    def call(_bench: object, _ref: object, began: float) -> object:
        return bench.Outcome(0, "phone", "tight", 1.0, time.perf_counter() - began)

    outcome = bench._timed(call, None, None, scheduled)
    assert 0.25 <= outcome.late_start_s < 5 and outcome.latency_s < outcome.late_start_s


@pytest.mark.parametrize("k", [0, 1, 5, 16])
def test_replayed_client_time_is_what_the_planner_predicts(bench: types.ModuleType, k: int) -> None:
    """The replay sleeps, step by step, exactly the client time the server's planner assumes
    for the whole request, so the benchmark's clients are the clients the planner plans for."""
    shape = ModelShape(16, 256, 4, 2, 64, 1024, dtype_bytes=4, vocab_size=4096, name="deep")
    spec = bench.TIERS["phone"]
    prompt, out = 100, 12
    costs = build_costs(shape, spec, ServerProfile(), PlannerRequest(prompt, out, math.inf))
    planned = float(costs.client_time[:k].sum())
    steps = bench.client_compute_s(shape, spec, k, prompt, 0) + sum(
        bench.client_compute_s(shape, spec, k, 1, prompt + i) for i in range(out - 1)
    )
    assert steps == pytest.approx(planned, rel=1e-9)
    assert (steps > 0) == (k > 0)


def test_the_link_costs_a_round_trip_and_the_frame(bench: types.ModuleType) -> None:
    spec = bench.TIERS["laptop"]
    assert bench.link_s(spec, 0) == pytest.approx(spec.rtt_s + 32 / spec.downlink_bps)
    assert bench.link_s(spec, 1e6) - bench.link_s(spec, 0) == pytest.approx(8e6 / spec.uplink_bps)


def test_the_priced_planner_runs_the_planner_with_the_cost_profile(bench: types.ModuleType) -> None:
    """`planner-priced` is the planner on a server started with --split-cost-profile; the other
    policies' servers have none."""
    args = argparse.Namespace(max_clients=8, server_arg=["--x"], cost_profile=Path("p.json"))
    flags = bench.server_flags(args, "planner-priced")
    assert flags[flags.index("--split-policy") + 1] == "planner"
    assert flags[flags.index("--split-cost-profile") + 1] == "p.json" and flags[-1] == "--x"
    for policy in ("planner", "greedy", "static"):
        flags = bench.server_flags(args, policy)
        assert "--split-cost-profile" not in flags
        assert flags[flags.index("--split-policy") + 1] == policy
    assert "planner-priced" in bench.EXTRA_POLICIES


def test_off_again_measures_the_machines_drift_over_a_sitting(bench: types.ModuleType) -> None:
    """`off-again` runs off once more, last, at the lowest rate only, on a server like off's
    (the planner's flags; every client ordinary), and `drift` is its server forward-seconds per
    request over off's first run at that rate; None without both, or at different rates. It
    counts as no policy's sustainable rate."""
    args = argparse.Namespace(max_clients=8, server_arg=[], cost_profile=Path("p.json"))
    flags = bench.server_flags(args, "off-again")
    assert flags[flags.index("--split-policy") + 1] == "planner"
    assert "--split-cost-profile" not in flags
    assert "off-again" in bench.EXTRA_POLICIES and "off-again" in bench.ORDINARY_ONLY

    def run(policy: str, rate: float, seconds: float) -> dict:
        return {"policy": policy, "rate": rate, "server_seconds_per_request": seconds}

    runs = [run("off", 1, 0.40), run("off", 2, 0.30), run("planner", 1, 0.2),
            run("off-again", 1, 0.46)]  # fmt: skip
    drift = bench.drift(runs)
    assert drift["rate"] == 1 and drift["ratio"] == pytest.approx(1.15)
    assert drift["off_server_seconds_per_request"] == 0.40
    assert bench.drift(runs[:3]) is None
    assert bench.drift([*runs[:3], run("off-again", 2, 0.3)]) is None
    assert bench.drift([run("off", 1, 0.0), run("off-again", 1, 0.4)])["ratio"] is None


@pytest.fixture(scope="module")
def model_path() -> Path:
    return ensure_model()


def test_the_replay_model_sends_the_reference_rows_and_sleeps(
    bench: types.ModuleType, model_path: Path
) -> None:
    layers, hidden = 6, 256
    item = bench.Item(0, [5, 6, 7], 3, "laptop", "tight")
    states = np.random.default_rng(0).standard_normal((layers + 1, 5, hidden)).astype(np.float32)
    ref = bench.Reference(item, [8, 9, 10], states)
    fast = bench.TIERS["workstation"]
    model = bench.ReplayModel(model_path, fast)
    model.ensure_layers(layers)
    with pytest.raises(ValueError, match="out of range"):
        model.ensure_layers(layers + 1)
    model.begin(ref)
    cache = DynamicCache()
    began = time.perf_counter()
    prefill = model.hidden_states([5, 6, 7], 4, cache)
    assert time.perf_counter() - began >= bench.link_s(fast, 3 * hidden * 4)
    torch.testing.assert_close(prefill, torch.from_numpy(states[4, :3]))
    torch.testing.assert_close(
        model.hidden_states([8], 4, cache)[0], torch.from_numpy(states[4, 3])
    )
    assert model.mismatches == 0
    model.hidden_states([99], 4, cache)  # not the reference's next token: counted, still sent
    assert model.mismatches == 1
    extra = model.hidden_states([1, 2], 4, cache)  # past the reference: the last row repeated
    assert extra.shape == (2, hidden) and model.mismatches == 2
    torch.testing.assert_close(extra[1], torch.from_numpy(states[4, -1]))


@pytest.fixture(scope="module")
def joint() -> types.ModuleType:
    sys.path.insert(0, str(ROOT / "bench"))  # it imports split_serving's tiers
    return load_bench_script("split_joint")


def test_the_joint_optimum_is_never_worse_and_per_request_plans_stay_feasible(
    joint: types.ModuleType,
) -> None:
    """The per-request vector is one the exhaustive search sees, so the joint optimum meets at
    least as many SLAs at no more busy time; and a k a session chose alone, pricing every layer
    at the full batch, still meets its SLA when fewer rows share the layers."""
    args = joint.argparse.Namespace(
        layers=6, cpu_flops=5e10, cpu_mem=2e10, cpu_step_s=0.01, host_cost=None
    )
    rng = np.random.default_rng(3)
    for setup in joint.setups(args)[:2]:
        for _ in range(6):
            row = joint.study(setup, joint.scenario(rng, 2, 256, 24), background=0)
            mine, best = row["per_request"], row["joint"]
            assert best["met"] >= mine["met"]
            if best["met"] == mine["met"]:
                assert best["busy_s"] <= mine["busy_s"] + 1e-12
            alone = [
                joint.plan_prefix(joint.build_costs(
                    setup.shape, joint.TIERS[t], setup.server.__class__(**{
                        **joint.dataclasses.asdict(setup.server), "decode_batch": 2}),
                    joint.PlannerRequest(row["prompt"], row["output"],
                                         joint.sla_s(c, row["output"]))))
                for t, c in zip(row["tiers"], row["sla_classes"], strict=True)
            ]  # fmt: skip
            assert mine["met"] >= sum(p.feasible for p in alone)


def test_joint_planning_pays_only_where_the_row_count_sets_a_steps_time(
    joint: types.ModuleType,
) -> None:
    """On the weight-read-bound CPU profile the server's per-request plans are within a few
    percent of the joint optimum's server time; on a compute-bound server, where each
    session's rows slow the others, the exhaustive search finds much less in some scenarios."""
    args = joint.argparse.Namespace(
        layers=16, cpu_flops=5e10, cpu_mem=2e10, cpu_step_s=0.01, host_cost=None
    )
    cpu, compute_bound, _ = joint.setups(args)
    found = {}
    for setup in (cpu, compute_bound):
        rng = np.random.default_rng(0)
        rows = [joint.study(setup, joint.scenario(rng, 3, 512, 48), 0) for _ in range(30)]
        found[setup.name] = joint.summary(rows)
    key = "busy_time_ratio_joint_over_per_request"
    assert found["tiny16-cpu"][key]["mean"] >= 0.95
    assert found["tiny16-compute-bound"][key]["mean"] <= 0.8
    assert found["tiny16-compute-bound"]["scenarios_where_joint_saves_over_5pct_busy"] > 0


def test_the_measured_model_prices_passes_and_host_cost_as_the_server_does(
    joint: types.ModuleType,
) -> None:
    """split_joint's measured model (bench/results/split_host_cost.json) costs a step as
    PassCosts prices a token: requests served whole share one pass, each split session runs
    one of its own; the optimum of that model is never worse than the per-request plans, and
    the server's priced plans never meet fewer SLAs than its FLOP-priced ones."""
    costs = joint.load_pass_costs(ROOT / "bench" / "results" / "split_host_cost.json")
    n = costs.layers
    vectors = np.array([[0, 0, 0], [n, 0, 0], [8, n, n]])
    busy = joint.measured_busy(costs, vectors, background=2)
    whole_pass = costs.head_s + n * (costs.layer_s + costs.layer_row_s * 5)
    assert busy[0] == pytest.approx(whole_pass + 5 * costs.whole_host_s)
    four = costs.head_s + n * (costs.layer_s + costs.layer_row_s * 4) + 4 * costs.whole_host_s
    assert busy[1] == pytest.approx(four + costs.split_s(n))
    three = costs.head_s + n * (costs.layer_s + costs.layer_row_s * 2) + 2 * costs.whole_host_s
    assert busy[2] == pytest.approx(three + costs.split_s(8) + 2 * costs.split_s(n))
    args = joint.argparse.Namespace(
        layers=16, cpu_flops=5e10, cpu_mem=2e10, cpu_step_s=0.01,
        host_cost=ROOT / "bench" / "results" / "split_host_cost.json", slacks=[2.0],
    )  # fmt: skip
    setup = next(s for s in joint.setups(args) if s.measured is not None)
    rng = np.random.default_rng(1)
    rows = [joint.study(setup, joint.scenario(rng, 3, 512, 48), 4) for _ in range(12)]
    for row in rows:
        mine, best = row["per_request"], row["joint_measured"]
        priced = row["per_request_priced"]
        assert best["met"] >= mine["met"] and priced["met"] >= mine["met"]
        if best["met"] == mine["met"]:
            assert best["measured_busy_s"] <= mine["measured_busy_s"] + 1e-12
            assert best["measured_busy_s"] <= priced["measured_busy_s"] + 1e-12
    summary = joint.summary(rows)["measured"]
    assert summary["priced_meets_fewer_slas"] == 0
    assert summary["priced_over_per_request"]["mean"] <= 1.0
    # Beside 4 requests served whole, some interior split the FLOP price chose costs more.
    assert any(r["per_request_priced"]["k"] != r["per_request"]["k"] for r in rows)
