"""bench/fairness.py's aggregation of the harness reports, on hand-made reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import load_bench_script

fairness = load_bench_script("fairness")


def report(scale: float) -> dict:
    """A harness report: every system's figures, FCFS's turnaround 10 x scale."""
    figures = {
        name: {
            "mean_weighted_turnaround": 10.0 * scale / (i + 1),
            "output_tokens_per_s": 100.0 + i,
            "jain_fairness": 1.0 - 0.1 * i,
            "jain_contended": 0.5,
            "jain_windows": float(i),
            "ttft_p99_s": 30.0 + i,
        }
        for i, (name, _) in enumerate(fairness.SYSTEMS.values())
    }
    return {"systems": {name: {"figures": f} for name, f in figures.items()}}


def test_reuse_keeps_the_original_runs_command_and_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fairness, "RESULTS", tmp_path)
    for scale, scenario in enumerate(fairness.SCENARIOS.values(), start=1):
        (tmp_path / f"fairness-{scenario}.json").write_text(json.dumps(report(scale)))
    original = {"command": "python bench/fairness.py --rounds 2", "rounds": 2, "rate": 1.3,
                "max_servers": 5, "num_requests": 120, "quick": False, "max_num_seqs": 4,
                "model": "/models/bench"}  # fmt: skip
    (tmp_path / "fairness.json").write_text(json.dumps(original))

    assert fairness.main(["--reuse", "--model", "/elsewhere"]) == 0
    out = json.loads((tmp_path / "fairness.json").read_text())
    for key, value in original.items():
        assert out[key] == value, key  # not this invocation's defaults (rounds 1, ...)
    assert "--reuse" in out["aggregated_again_by"]
    # adaptive is the 4th system: turnaround 10 / 4 of FCFS's 10, throughput 103 / 100.
    ratios = out["multi_tenant"]["adaptive_vs_fcfs"]
    assert ratios["weighted_turnaround_ratio"] == pytest.approx(0.25)
    assert ratios["throughput_ratio"] == pytest.approx(1.03)
    assert out["mixed_length"]["avg_weighted_turnaround"]["fcfs"] == pytest.approx(20.0)
    assert out["jain"] == out["multi_tenant"]["jain"]  # top level: the multi-tenant mix
