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


def _run(rows: list[tuple[str, float, float, int]]) -> list[dict]:
    return [{"kind": k, "predicted": p, "measured": m, "tokens": t} for k, p, m, t in rows]


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
        "tail": None,
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
    assert {row["kind"] for row in runs[0]} == {"interior", "client"}
    out = tmp_path / "cal.json"
    assert bench.main(["--runs", str(path), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kinds"]["interior"]["checks"] == 20 - bench.MIN_RATIOS
    assert report["kinds"]["client"]["line"]["coverage"] == 1.0
    assert report["runs"] == [str(path)] and report["command"].startswith("python bench/")
    assert out.with_suffix(".png").stat().st_size > 0
    with pytest.raises(SystemExit):
        bench.main(["--runs", str(tmp_path / "missing.json"), "--out", str(out)])
