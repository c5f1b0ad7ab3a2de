"""bench/split_calibration.py: replaying sessions against the planner's calibration rules (no
server), on synthetic runs and end to end on a small capacity-benchmark JSON."""

from __future__ import annotations

import gzip
import json
import types
from pathlib import Path

import numpy as np
import pytest

from tests.support import load_bench_script


@pytest.fixture(scope="module")
def bench() -> types.ModuleType:
    return load_bench_script("split_calibration")


def _run(rows: list[tuple[str, float, float, int]], loads: list[int] | None = None) -> list[dict]:
    return [
        {
            "kind": k,
            "predicted": p,
            "measured": m,
            "tokens": t,
            "load": None if loads is None else loads[i],
        }
        for i, (k, p, m, t) in enumerate(rows)
    ]


def test_a_fixed_cost_per_session_is_covered_by_the_line_not_by_the_factor(
    bench: types.ModuleType,
) -> None:
    """Sessions that each ran 0.3 s beyond their prediction: 40 long ones, then shorter and
    shorter ones among long ones. The factor alone, its quantile set by the sessions seen so
    far, misses each new short one (each runs later against its prediction than any before);
    the line covers most (fitted on long ones, its offset is off by the noise at first)."""
    rng = np.random.default_rng(1)
    rows = []
    shorts = iter(np.linspace(0.5, 0.12, 10))
    for i in range(80):
        short = i >= 40 and i % 4 == 3
        predicted = float(next(shorts)) if short else float(rng.uniform(2.0, 4.0))
        tokens = 10 if short else 45
        rows.append(("interior", predicted, 0.3 + predicted * rng.uniform(1.0, 1.03), tokens))
    out = bench.replay([_run(rows)], "interior", 0.99)
    assert out["checks"] == 80 - bench.MIN_RATIOS
    factor, line = out["factor"], out["line"]
    assert factor["short_checks"] == line["short_checks"] == 10
    assert factor["coverage_short"] <= 0.2 and line["coverage_short"] >= 0.7
    assert line["coverage"] > factor["coverage"]
    assert bench.replay([_run(rows)], "client", 0.99) == {
        "checks": 0,
        "factor": None,
        "line": None,
        "unpadded": None,
        "tail": None,
        "load": None,
    }


def test_the_tail_rule_covers_the_next_session_where_the_interpolated_quantile_does_not(
    bench: types.ModuleType,
) -> None:
    """600 sessions whose latency runs lognormally late of the line: the interpolated 0.99
    quantile of the last 64 is exceeded by more than 1 in 100 of the next; the extrapolated one
    (the server's rule now) by about 1 in 100 or fewer, at a bound further above the line."""
    rng = np.random.default_rng(2)
    rows = []
    for _ in range(600):
        predicted = float(rng.uniform(0.5, 4.0))
        measured = (0.2 + predicted) * float(np.exp(rng.normal(0.0, 0.25)))
        rows.append(("client", predicted, measured, 30))
    out = bench.replay([_run(rows)], "client", 0.99)
    assert out["line"]["coverage"] < 0.985 <= out["tail"]["coverage"]
    assert out["tail"]["bound_over_prediction_p50"] > out["line"]["bound_over_prediction_p50"]


def test_the_padded_rule_bounds_long_sessions_tighter_than_ratios_alone(
    bench: types.ModuleType,
) -> None:
    """600 sessions from 0.05 s to 5 s, each late by a spread factor and a fixed delay: the
    padded rule (the server's) covers the next session as well as the unpadded one or better,
    at a bound for the long ones (2 s and more) well below the unpadded one's."""
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(600):
        predicted = float(np.exp(rng.uniform(np.log(0.05), np.log(5.0))))
        measured = predicted * float(rng.lognormal(0.0, 0.1)) + float(rng.exponential(0.1))
        rows.append(("client", predicted, measured, 30))
    out = bench.replay([_run(rows)], "client", 0.99)
    tail, unpadded = out["tail"], out["unpadded"]
    assert tail["coverage"] >= max(0.985, unpadded["coverage"] - 0.005)
    assert tail["long_checks"] == unpadded["long_checks"] > 50
    long_padded = tail["bound_over_prediction_p50_long"]
    assert long_padded < 0.8 * unpadded["bound_over_prediction_p50_long"]


def test_sessions_are_checked_only_against_their_own_server_and_kind(
    bench: types.ModuleType,
) -> None:
    """A server's first MIN_RATIOS sessions of a kind set no bound; another kind's sessions
    between them do not count; a second server starts over."""
    one = _run([("interior", 1.0, 1.0, 20)] * 3 + [("client", 1.0, 9.0, 20)] * 5)
    two = _run([("interior", 1.0, 1.0, 20)] * 6)
    out = bench.replay([one, two], "interior", 0.99)
    assert out["checks"] == 2  # the 5th and 6th of run two
    assert out["line"]["coverage"] == 1.0 and out["line"]["bound_over_prediction_p50"] == 1.0
    assert out["line"]["coverage_short"] is None


def test_a_few_sessions_bound_is_their_largest_ratio_with_a_margin_not_a_blown_up_tail(
    bench: types.ModuleType,
) -> None:
    """Four sessions on the line, then one 2x late (beyond every rule's bound: none had seen
    a late one) and one 1.9x late: the server's rule (the interpolated quantile times 1 + 2 / n)
    bounds that one at 1.96 x 1.4 = 2.74x, the extrapolated tail (the rule before) at several
    times that. Only sessions after 4 and before 16 of a kind are checked."""
    rows = [("interior", 1.0, 1.0, 20)] * 4 + [
        ("interior", 1.0, 2.0, 20),
        ("interior", 1.0, 1.9, 20),
    ]
    out = bench.replay_few([_run(rows)], "interior", 0.99)
    assert [out[rule]["checks"] for rule in ("interpolated", "extrapolated", "server")] == [2] * 3
    server = bench.few_sessions_slack(np.array([[1.0, r] for r in (1, 1, 1, 1, 2)]), 0.99, "server")
    assert server == pytest.approx(1.96 * (1 + 2 / 5))
    extrapolated = bench.few_sessions_slack(
        np.array([[1.0, r] for r in (1, 1, 1, 1, 2)]), 0.99, "extrapolated"
    )
    assert extrapolated > 2 * server
    assert out["server"]["coverage"] == 0.5 and out["extrapolated"]["coverage"] == 0.5
    assert out["server"]["bound_over_prediction_p50"] == pytest.approx((1.5 + 1.96 * 1.4) / 2)
    long = _run([("interior", 1.0, 1.0, 20)] * 30)
    assert bench.replay_few([long], "interior", 0.99)["server"]["checks"] == 12


def test_the_script_reads_runs_and_writes_its_report(
    bench: types.ModuleType, tmp_path: Path
) -> None:
    """A capacity-benchmark JSON (gzipped too): outcomes of split policies with a k and a
    prediction become sessions, ordinary ones and errors do not; the report and the plot are
    written; a missing run file is a clear error."""
    setup = {"layers": 16, "pool": 8, "max_prompt": 64, "max_tokens": 48, "ordinary_share": 0.25}
    outcomes = [
        {"index": i % 8, "layer": 16 if i % 2 else 5, "predicted_s": 1.0 + i / 10,
         "latency_s": 1.2 + i / 10, "error": None}
        for i in range(40)
    ]  # fmt: skip
    outcomes.append({"index": 0, "layer": None, "predicted_s": None, "latency_s": 0.1})
    outcomes.append({"index": 0, "layer": 5, "predicted_s": 1.0, "latency_s": 9.0, "error": "x"})
    result = {
        "setup": setup,
        "runs": [
            {"policy": "planner", "outcomes": outcomes},
            {"policy": "off", "outcomes": outcomes},
        ],
    }
    path = tmp_path / "run.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump(result, handle)
    runs = bench.sessions(bench.load_runs(path), bench.output_tokens(result))
    assert len(runs) == 1 and len(runs[0]) == 40
    two_rates = {**result, "runs": [result["runs"][0], *result["runs"]]}
    assert [len(rows) for rows in bench.sessions(two_rates, bench.output_tokens(result))] == [80]
    # A policy's runs kept from another file (--keep-from) are that file's: not read again.
    kept = {**result, "kept_from": {"path": "earlier.json", "policies": ["planner", "off"]}}
    assert bench.sessions(kept, bench.output_tokens(result)) == []
    assert {row["kind"] for row in runs[0]} == {"interior", "client"}
    out = tmp_path / "cal.json"
    assert bench.main(["--runs", str(path), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kinds"]["interior"]["checks"] == 20 - bench.MIN_RATIOS
    assert report["kinds"]["client"]["line"]["coverage"] == 1.0
    # No outcome recorded its load: no server's sessions to compare the rules on there.
    assert report["kinds_where_load_recorded"]["interior"]["checks"] == 0
    assert report["kinds"]["interior"]["load"] is None
    # A fresh server's 5th to 16th session of each kind: 12 of the 20 interior ones.
    assert report["few_sessions"]["interior"]["server"]["checks"] == 12
    assert set(report["few_sessions"]["client"]) == {"interpolated", "extrapolated", "server"}
    assert report["runs"] == [str(path)] and report["command"].startswith("python bench/")
    assert out.with_suffix(".png").stat().st_size > 0
    with pytest.raises(SystemExit):
        bench.main(["--runs", str(tmp_path / "missing.json"), "--out", str(out)])


def test_the_load_rule_bounds_each_session_by_sessions_at_its_own_load(
    bench: types.ModuleType,
) -> None:
    """Sessions alternately planned with 1 and with 12 requests in flight, those at 12 running
    twice as late: the server's rule, fitted over both, bounds the sessions at 1 by the late
    ones' tail; the load rule fits each by its own load's, with about the same coverage at a
    bound far closer to the prediction for the sessions at 1."""
    rng = np.random.default_rng(3)
    rows, loads = [], []
    for i in range(400):
        predicted = float(rng.uniform(1.0, 3.0))
        busy = i % 2 == 1
        late = (2.0 if busy else 1.0) * float(np.exp(rng.normal(0.0, 0.1)))
        rows.append(("interior", predicted, predicted * late, 30))
        loads.append(12 if busy else 1)
    out = bench.replay([_run(rows, loads)], "interior", 0.99)
    tail, load = out["tail"], out["load"]
    assert load["checks"] == tail["checks"] == out["checks"]
    assert load["coverage"] >= tail["coverage"] - 0.01
    history = np.array([(p, m, n) for (_, p, m, _), n in zip(rows, loads, strict=True)])
    quiet = {"predicted": 1.0, "load": 1}
    assert bench.load_bound(history, quiet, 0.99) < 0.75 * bench.tail_bound(history, quiet, 0.99)
