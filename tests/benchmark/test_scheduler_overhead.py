"""bench/scheduler_overhead.py: the scheduler's own time per step, AdaptiveLLM's and stock
vLLM's, on the fairness benchmark's workloads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support import load_bench_script

bench = load_bench_script("scheduler_overhead")


def test_run_writes_per_step_times_next_to_stock_vllm(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    # memory: files would switch this test process's metrics to multi-process mode.
    argv = ["--repeats", "2", "--num-requests", "12", "--rate", "3", "--scenarios", "sharegpt",
            "--metrics", "memory", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("python bench/scheduler_overhead.py --repeats 2")
    assert report["repeats"] == 2 and report["num_requests"] == 12
    assert report["metrics"] == "memory"
    configs = report["scenarios"]["mixed_length"]
    assert set(configs) == set(bench.CONFIGS) | set(bench.ASYNC_CONFIGS)
    stock = configs["stock"]
    assert stock["total_vs_stock"] == 1.0 and stock["added_us_per_step"] == 0.0
    for name, r in configs.items():
        assert r["steps"] > 12, name  # a prompt step and decode steps per request at least
        assert r["schedule_us_per_step"] > 0 and r["update_us_per_step"] > 0, name
        assert r["total_us_per_step"] == pytest.approx(
            r["schedule_us_per_step"] + r["update_us_per_step"]
        )
        base = configs["stock_async"] if name in bench.ASYNC_CONFIGS else stock
        assert r["total_vs_stock"] == pytest.approx(
            r["total_us_per_step"] / base["total_us_per_step"]
        )
        assert r["added_share_of_step"] == pytest.approx(
            r["added_us_per_step"] / (1e3 * r["mean_step_ms"])
        )
        assert 10 < r["mean_step_ms"] < 1000, name  # the simulator's step-cost model
    # AdaptiveLLM's fcfs is vLLM's own policy: the same workload takes the same steps.
    assert configs["fcfs"]["steps"] == stock["steps"]
    assert configs["fcfs-recompute"]["steps"] == stock["steps"]


@pytest.mark.parametrize(
    "argv",
    [["--repeats", "0"], ["--num-requests", "1"], ["--rate", "0"], ["--scenarios", "nope"],
     ["--scenarios", ","]],
)  # fmt: skip
def test_bad_arguments_are_refused(argv: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main([*argv, "--out", str(tmp_path / "x.json")])
    assert exc.value.code == 2
    assert not (tmp_path / "x.json").exists()


def test_live_workloads_replay_the_overhead_benchmark_in_a_closed_loop(tmp_path: Path) -> None:
    """light and pressure: bench/overhead.py's workloads, 24 streams at a time over a KV cache
    of 3,072 tokens, synchronous configurations only, shares of the live step."""
    out = tmp_path / "live.json"
    argv = ["--repeats", "1", "--num-requests", "10", "--scenarios", "light,pressure",
            "--metrics", "memory", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["live"]["num_requests"] == 10 * bench.LIVE_REQUESTS_FACTOR
    light, pressure = report["scenarios"]["light"], report["scenarios"]["pressure"]
    for configs in (light, pressure):
        assert set(configs) == set(bench.CONFIGS)
        for name, r in configs.items():
            assert r["added_share_of_step"] == pytest.approx(
                r["added_us_per_step"] / (1e3 * bench.LIVE_STEP_MS)
            ), name
        # vLLM's own policy and preemption: the same closed loop takes the same steps.
        assert configs["fcfs-recompute"]["steps"] == configs["stock"]["steps"]
    # 24 prompts of 124-244 tokens overflow 3,072 tokens of KV cache: requests wait; short
    # ones fit and are admitted as they come.
    assert pressure["stock"]["mean_waiting"] > 5 > light["stock"]["mean_waiting"]
    # Mostly one decode token per request a step, so more steps than requests x 8 tokens.
    assert light["stock"]["steps"] > 8


def test_a_live_replay_aborts_a_tenth_of_its_requests_part_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from adaptivellm.benchmark.simulator import StepCost
    from adaptivellm.scheduler.config import FairnessConfig

    aborted: list[str] = []
    finish = Scheduler.finish_requests

    def spy(self: Scheduler, request_ids: Any, status: Any) -> Any:
        aborted.extend(request_ids)
        return finish(self, request_ids, status)

    monkeypatch.setattr(Scheduler, "finish_requests", spy)
    timing: dict[str, float] = {}
    figures = bench.replay_live("light", FairnessConfig(policy="fcfs"), StepCost(), True,
                                timing, num_requests=200)  # fmt: skip
    assert figures["steps"] > 0 and timing["schedule_s"] > 0 and timing["update_s"] > 0
    assert 10 <= len(set(aborted)) <= 30  # about 10% of 200, each once
    assert len(aborted) == len(set(aborted))
