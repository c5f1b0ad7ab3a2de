"""bench/fairness_pool.py: several fairness runs pooled round by round, on hand-made reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.support import load_bench_script

pool = load_bench_script("fairness_pool")

FIELDS = ["index", "tenant", "prompt_tokens", "output_tokens", "arrival_s", "first_token_s",
          "end_s", "ok"]  # fmt: skip


def system(rounds: list[list[tuple[float, float, int]]]) -> dict:
    """A system's section: per round, its requests as (arrival, end, output tokens); requests of
    later rounds arrive after the earlier rounds ended, as in the harness."""
    rows = [
        [i, "tenant-0", 0, out, arrival, arrival, end, True]
        for r in rounds
        for i, (arrival, end, out) in enumerate(r)
    ]
    return {"request_fields": FIELDS, "requests": rows}


def report(systems: dict[str, dict]) -> dict:
    # Service time = output tokens (seconds), so a weighted turnaround = latency / tokens.
    model = {"a_s": 0.0, "b_s_per_prompt_token": 0.0, "c_s_per_output_token": 1.0, "r2": 1.0}
    return {
        "service_time_model": model,
        "workload": {"stats": {"requests": 2}},
        "command": "python bench/fairness.py --rounds 2",
        "rounds": 2,
        "systems": systems,
    }


def write_run(folder: Path, systems: dict[str, dict]) -> Path:
    folder.mkdir()
    for scenario in pool.SCENARIOS.values():
        (folder / f"fairness-{scenario}.json").write_text(json.dumps(report(systems)))
    return folder


def test_rounds_are_paired_and_pooled(tmp_path: Path) -> None:
    # stock: round 1 takes 10 s for 20 tokens, round 2 takes 10 s too.
    stock = system([[(0, 5, 10), (0, 10, 10)], [(10, 15, 10), (10, 20, 10)]])
    # adaptive: round 1 takes 8 s (faster), round 2 takes 12 s; turnarounds halve in both.
    adaptive = system([[(0, 2.5, 10), (0, 5, 10)], [(10, 12.5, 10), (10, 15, 10)]])
    adaptive["requests"][1][6] = 8.0  # round 1 ends at 8 s (latency 8)
    adaptive["requests"][3][6] = 22.0  # round 2 ends at 22 s (latency 12)
    run = write_run(tmp_path / "run", {"stock": stock, "adaptivellm": adaptive})
    out = tmp_path / "pooled.json"
    assert pool.main([str(run), str(run), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["runs"]) == 2
    section = result["scenarios"]["multi_tenant"]["adaptive"]
    tput = section["paired"]["throughput_ratio"]
    assert tput["n"] == 4  # two rounds of two runs
    assert tput["min"] == pytest.approx(10 / 12) and tput["max"] == pytest.approx(10 / 8)
    assert tput["mean"] == pytest.approx((10 / 8 + 10 / 12) / 2)
    assert section["pooled"]["throughput_ratio"] == pytest.approx(1.0)  # 20 s against 20 s
    # Weighted turnarounds: stock 0.5, 1.0 per round; adaptive 0.25 and 0.8, then 0.25 and 1.2.
    wt = section["paired"]["weighted_turnaround_ratio"]
    assert wt["min"] == pytest.approx(1.05 / 1.5) and wt["max"] == pytest.approx(1.45 / 1.5)
    assert section["pooled"]["weighted_turnaround_ratio"] == pytest.approx(2.5 / 3.0)
    assert math.isfinite(wt["sd"]) and wt["se"] == pytest.approx(wt["sd"] / 2)
    assert "priority" not in result["scenarios"]["multi_tenant"]  # no such system ran
    # Tails (last completion after the last arrival, at 0 and 10 s): 8 s and 12 s, twice.
    assert section["tail_s"]["mean"] == pytest.approx(10.0)
    assert (section["tail_s"]["min"], section["tail_s"]["max"]) == pytest.approx((8.0, 12.0))
    assert result["scenarios"]["multi_tenant"]["fcfs"]["tail_s"]["mean"] == pytest.approx(10.0)


def test_runs_with_the_a_a_control_are_also_paired_against_the_fcfs_pair(tmp_path: Path) -> None:
    # Rounds of 20 tokens: stock takes 10 s (2 tokens/s), its identical twin stock-b 12.5 s
    # (1.6), adaptive 10 s (2.0): against the pair's mean of 1.8 tokens/s, 2.0 / 1.8.
    stock = system([[(0, 5, 10), (0, 10, 10)]])
    twin = system([[(0, 5, 10), (0, 12.5, 10)]])
    adaptive = system([[(0, 2.5, 10), (0, 10, 10)]])
    for s in (stock, twin, adaptive):
        s["requests"] = s["requests"] * 2  # the same two rounds
        s["requests"][2:] = [
            [*r[:4], r[4] + 20, r[5] + 20, r[6] + 20, r[7]] for r in s["requests"][2:]
        ]
    with_control = write_run(
        tmp_path / "aa", {"stock": stock, "stock-b": twin, "adaptivellm": adaptive}
    )
    without = write_run(tmp_path / "plain", {"stock": stock, "adaptivellm": adaptive})
    out = tmp_path / "pooled.json"
    assert pool.main([str(with_control), str(without), "--out", str(out)]) == 0
    section = json.loads(out.read_text())["scenarios"]["multi_tenant"]
    pair = section["adaptive"]["paired_vs_fcfs_pair"]
    assert pair["throughput_ratio"]["n"] == 2  # only the run with the control's two rounds
    assert pair["throughput_ratio"]["mean"] == pytest.approx(2.0 / 1.8)
    assert section["adaptive"]["paired"]["throughput_ratio"]["n"] == 4
    # The A/A spread itself: stock-b against stock, 1.6 / 2.0; no pair ratio of its own.
    assert section["fcfs_b"]["paired"]["throughput_ratio"]["mean"] == pytest.approx(0.8)
    assert "paired_vs_fcfs_pair" not in section["fcfs_b"]
    assert "paired_vs_fcfs_pair" not in section["fcfs"]
    # Weighted turnarounds (latency / 10 tokens): stock 0.75, stock-b 0.875, adaptive 0.625.
    wt = pair["weighted_turnaround_ratio"]["mean"]
    assert wt == pytest.approx(0.625 / ((0.75 + 0.875) / 2))


def test_a_folder_without_a_run_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        pool.main([str(tmp_path)])
    assert "has no fairness-multi-tenant.json or fairness-sharegpt.json" in capsys.readouterr().err


def test_a_corrupt_report_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "run", {"stock": system([[(0, 1, 1), (0, 1, 1)]])})
    (run / "fairness-sharegpt.json").write_text("{not json")
    with pytest.raises(SystemExit):
        pool.main([str(run)])
    assert "is not JSON" in capsys.readouterr().err


def test_rows_that_are_not_whole_rounds_are_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "run", {"stock": system([[(0, 1, 1), (0, 1, 1), (0, 2, 1)]])})
    with pytest.raises(SystemExit):
        pool.main([str(run)])
    assert "3 request rows are not rounds of 2" in capsys.readouterr().err


def test_a_run_without_fcfs_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "run", {"adaptivellm": system([[(0, 1, 1), (0, 1, 1)]])})
    with pytest.raises(SystemExit):
        pool.main([str(run)])
    assert "every run needs stock vLLM FCFS" in capsys.readouterr().err


def test_a_follow_up_run_of_one_mix_pools_with_full_runs_and_its_steal_is_reported(
    tmp_path: Path,
) -> None:
    stock = system([[(0, 5, 10), (0, 10, 10)], [(10, 15, 10), (10, 20, 10)]])
    adaptive = system([[(0, 2.5, 10), (0, 8, 10)], [(10, 12.5, 10), (10, 20, 10)]])
    full = write_run(tmp_path / "full", {"stock": stock, "adaptivellm": adaptive})
    focus = tmp_path / "focus"  # bench/fairness.py --scenarios mixed_length --out-dir focus
    focus.mkdir()
    stolen = {**adaptive, "round_cpu_steal_share": [0.02, None]}  # harness: None = unreadable
    (focus / "fairness-sharegpt.json").write_text(
        json.dumps({**report({"stock": stock, "adaptivellm": stolen}), "command": "focus"})
    )
    out = tmp_path / "pooled.json"
    assert pool.main([str(full), str(focus), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["scenarios"] for r in result["runs"]] == [["multi_tenant", "mixed_length"],
                                                        ["mixed_length"]]  # fmt: skip
    assert result["runs"][1]["command"] == "focus"
    mixed, multi = result["scenarios"]["mixed_length"], result["scenarios"]["multi_tenant"]
    assert mixed["adaptive"]["paired"]["throughput_ratio"]["n"] == 4  # 2 rounds x 2 runs
    assert multi["adaptive"]["paired"]["throughput_ratio"]["n"] == 2  # the full run only
    # The steal share of the one round that has it; none recorded for stock.
    assert mixed["adaptive"]["cpu_steal_share"]["n"] == 1
    assert mixed["adaptive"]["cpu_steal_share"]["mean"] == pytest.approx(0.02)
    assert "cpu_steal_share" not in mixed["fcfs"] and "cpu_steal_share" not in multi["adaptive"]


def test_output_before_the_last_arrival_is_read_off_the_recorded_timeline(tmp_path: Path) -> None:
    assert pool.delivered_before([3, 4, 5, 6], 2.5) == pytest.approx(9.5)  # 3 + 4 + half of 5
    assert pool.delivered_before([3, 4], 0.0) == 0.0
    assert pool.delivered_before([3, 4], 9.0) == 7.0  # past the last delivery: all of it
    assert pool.delivered_before([3, 4], 1.0) == 3.0  # on a bin boundary: the bins before it
    assert pool.delivered_before([3, 4], -0.5) == 0.0  # before the round's start: nothing
    # Evenly spaced tokens, 10 of them from 1 s to 3 s: the first at 1 s, half the rest by 2 s.
    assert pool._interpolated(10, 1.0, 3.0, 0.5) == 0.0
    assert pool._interpolated(10, 1.0, 3.0, 1.0) == 1.0
    assert pool._interpolated(10, 1.0, 3.0, 2.0) == pytest.approx(5.5)
    assert pool._interpolated(10, 1.0, 3.0, 3.0) == 10.0
    assert pool._interpolated(1, 2.0, 2.0, 2.0) == 1.0  # one token: first == end, no division
    assert pool._interpolated(0, 1.0, 3.0, 2.0) == 0.0  # nothing to deliver
    # Rounds whose last request arrives 2.5 s in (round 2: at 12.5 s on the run's time line).
    stock = system([[(0, 2, 10), (2.5, 10, 10)], [(10, 15, 10), (12.5, 20, 10)]])
    stock["requests"][1][5] = 3.0  # round 1's second request: its first token after 2.5 s
    for row, prompt in zip(stock["requests"], (100, 200, 300, 400), strict=True):
        row[2] = prompt
    # Adaptive's round 2 starts at 10 s (its timeline's 0) but its first request arrives 1 s in.
    adaptive = system([[(0, 5, 10), (2.5, 10, 10)], [(11, 15, 10), (12.5, 20, 10)]])
    adaptive["round_output_per_s"] = [[2, 2, 2, 2, 2, 2, 2, 2, 2, 2], [4, 4, 4, 4, 4] + [0] * 5]
    adaptive["round_durations_s"] = [10.0, 10.0]
    run = write_run(tmp_path / "run", {"stock": stock, "adaptivellm": adaptive})
    out = tmp_path / "pooled.json"
    assert pool.main([str(run), "--out", str(out)]) == 0
    mixed = json.loads(out.read_text())["scenarios"]["mixed_length"]
    before = mixed["adaptive"]["output_before_last_arrival"]
    assert before["n"] == 2 and (before["min"], before["max"]) == (5.0, 10.0)
    assert "output_before_last_arrival" not in mixed["fcfs"]  # stock has no round_output_per_s
    # From the rows, by the last arrival (2.5 s in): stock's round 1 had started one request
    # and finished it (10 tokens), round 2 had started both (first token = arrival) and
    # finished none.
    started = mixed["fcfs"]["started_by_last_arrival"]
    assert (started["min"], started["max"]) == (1, 2)
    assert mixed["fcfs"]["output_finished_by_last_arrival"]["mean"] == 5.0
    # Their prompts: round 1's first (100 tokens), round 2's both (300 + 400).
    prompts = mixed["fcfs"]["prompt_started_by_last_arrival"]
    assert (prompts["min"], prompts["max"]) == (100.0, 700.0)
    # Evenly spaced tokens: round 1 had delivered request 1's 10; in round 2 request 1 was
    # half-way from its first token (10 s) to its last (15 s): 1 + 9 * 2.5 / 5, and request 2
    # had its first token just then: 1.
    interpolated = mixed["fcfs"]["output_interpolated_by_last_arrival"]
    assert (interpolated["min"], interpolated["max"]) == (6.5, 10.0)


def test_timelines_without_round_durations_are_refused(tmp_path: Path) -> None:
    stock = system([[(0, 2, 10), (2.5, 10, 10)]])
    stock["round_output_per_s"] = [[5, 5]]  # a timeline, but nothing to place it on
    with pytest.raises(ValueError, match="round durations"):
        pool.round_figures(report({"stock": stock}), "stock")
