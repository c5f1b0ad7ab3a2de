"""bench/scheduler_overhead.py: the scheduler's own time per step, AdaptiveLLM's and stock
vLLM's, on the fairness benchmark's workloads."""

from __future__ import annotations

import json
from pathlib import Path

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
