"""bench/fairness_sim.py: workloads replayed through the real scheduler on a simulated clock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptivellm.benchmark.workloads import BenchRequest
from adaptivellm.scheduler.config import FairnessConfig
from tests.support import load_bench_script

sim = load_bench_script("fairness_sim")


def test_step_cost_model() -> None:
    cost = sim.StepCost(decode_step_ms=10.0, decode_token_ms=2.0, prefill_token_ms=1.0)
    assert cost.step_s(decodes=3, prefill_tokens=100) == pytest.approx((10 + 6 + 100) / 1e3)
    # Alone: the prefill step samples the first token, then one decode step per further token.
    assert cost.alone_s(100, 5) == pytest.approx(0.110 + 4 * 0.012)


def burst() -> list[BenchRequest]:
    """A long request, then four short ones just after it, for one batch slot."""
    long = BenchRequest(0, 0.0, 16, 200)
    return [long, *(BenchRequest(i, 0.05 * i, 16, 4) for i in range(1, 5))]


def test_weighted_turnaround_serves_the_short_requests_before_the_long_one() -> None:
    cost = sim.StepCost()
    fcfs = sim.replay(burst(), FairnessConfig(policy="fcfs"), cost, max_num_seqs=1)
    adaptive = sim.replay(burst(), FairnessConfig(), cost, max_num_seqs=1)
    # FCFS makes every short request wait for the 200-token one; weighted-turnaround preempts
    # it for them (its turnaround preemption) and the same work ends at about the same time.
    assert adaptive["avg_weighted_turnaround"] < 0.5 * fcfs["avg_weighted_turnaround"]
    assert adaptive["throughput_tokens_per_s"] == pytest.approx(
        fcfs["throughput_tokens_per_s"], rel=0.05
    )
    assert fcfs["jain"] == 1.0  # a single tenant


def test_run_writes_a_report_with_the_spread_over_seeds(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    argv = ["--seeds", "2", "--num-requests", "16", "--rate", "3", "--jobs", "1",
            "--scenarios", "sharegpt", "--variants", "default,vtc", "--out", str(out)]  # fmt: skip
    assert sim.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("python bench/fairness_sim.py --seeds 2")
    assert set(report["scenarios"]) == {"mixed_length"}
    section = report["scenarios"]["mixed_length"]
    assert section["seeds"] == [0, 1]
    assert set(section["variants"]) == {"fcfs", "default", "vtc"}
    fcfs = section["variants"]["fcfs"]
    assert fcfs["avg_weighted_turnaround_vs_fcfs"] == {"mean": 1.0, "min": 1.0, "max": 1.0}
    default = section["variants"]["default"]
    ratios = default["per_seed"]["avg_weighted_turnaround_vs_fcfs"]
    assert len(ratios) == 2
    assert default["avg_weighted_turnaround_vs_fcfs"]["mean"] == pytest.approx(sum(ratios) / 2)
    # With one tenant VTC is FCFS.
    assert section["variants"]["vtc"]["avg_weighted_turnaround_vs_fcfs"]["mean"] == 1.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "default,nope"], "unknown variant(s) nope"),
        (["--scenarios", "bursty"], "unknown scenario(s)"),
        (["--seeds", "0"], "--seeds and --jobs must be >= 1"),
    ],
)
def test_bad_arguments_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        sim.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
