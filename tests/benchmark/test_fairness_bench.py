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
    # The A/A control: fcfs_b is the last system (turnaround 10 / 6, throughput 105).
    pair = out["multi_tenant"]["adaptive_vs_fcfs_pair"]
    assert pair["throughput_ratio"] == pytest.approx(103 / ((100 + 105) / 2))
    assert pair["weighted_turnaround_ratio"] == pytest.approx(2.5 / ((10 + 10 / 6) / 2))
    assert out["multi_tenant"]["fcfs_b_vs_fcfs"]["throughput_ratio"] == pytest.approx(1.05)
    assert "fcfs_b_vs_fcfs_pair" not in out["multi_tenant"]


def test_reports_without_the_control_or_e3c3_have_no_pair_ratios(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fairness, "RESULTS", tmp_path)
    for scale, scenario in enumerate(fairness.SCENARIOS.values(), start=1):
        r = report(scale)
        del r["systems"]["stock-b"], r["systems"]["adaptivellm-e3c3"]  # an earlier run's
        (tmp_path / f"fairness-{scenario}.json").write_text(json.dumps(r))
    (tmp_path / "fairness.json").write_text(json.dumps({"command": "python bench/fairness.py"}))

    assert fairness.main(["--reuse"]) == 0
    section = json.loads((tmp_path / "fairness.json").read_text())["multi_tenant"]
    assert set(section["throughput_tokens_per_s"]) == {"fcfs", "priority", "vtc", "adaptive"}
    assert section["adaptive_vs_fcfs"]["throughput_ratio"] == pytest.approx(1.03)
    assert not [k for k in section if k.endswith("_pair") or k.startswith(("fcfs_b", "adaptive_e"))]


def test_the_fcfs_servers_take_the_ends_of_the_turn_and_e3c3_is_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    commands: list[list[str]] = []
    monkeypatch.setattr(fairness, "RESULTS", tmp_path)
    monkeypatch.setattr(fairness.subprocess, "run", lambda c, check: commands.append(c))
    (tmp_path / "fairness-x.json").write_text("{}")
    args = argparse.Namespace(max_num_seqs=4, max_servers=6, rounds=2, model="/m", quick=False,
                              num_requests=120, rate=None, load=1.1, e3c3=False,
                              out_dir=tmp_path, systems=tuple(fairness.SYSTEMS),
                              round_order="reverse")  # fmt: skip
    for e3c3 in (False, True):
        args.e3c3 = e3c3
        fairness.run_scenario("x", "fairness-x", args)
    systems = [[c[i + 1].split("=")[0] for i, a in enumerate(c) if a == "--system"]
               for c in commands]  # fmt: skip
    assert systems[0] == ["stock", "stock-priority", "adaptivellm-vtc", "adaptivellm", "stock-b"]
    assert systems[1] == [*systems[0][:4], "adaptivellm-e3c3", "stock-b"]


def test_a_follow_up_run_of_one_mix_and_three_systems_goes_to_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "focus"
    commands: list[list[str]] = []

    def harness(command: list[str], check: bool) -> None:
        commands.append(command)
        stem = command[command.index("--name") + 1]
        keep = {a.split("=")[0] for i, a in enumerate(command) if command[i - 1] == "--system"}
        r = report(2.0)  # as the mixed-length report of the first test
        r["systems"] = {n: s for n, s in r["systems"].items() if n in keep}
        (Path(command[command.index("--out-dir") + 1]) / f"{stem}.json").write_text(json.dumps(r))

    monkeypatch.setattr(fairness, "RESULTS", tmp_path / "canonical")
    monkeypatch.setattr(fairness.subprocess, "run", harness)
    argv = ["--scenarios", "mixed_length", "--systems", "fcfs,adaptive,fcfs_b", "--rounds", "8",
            "--round-order", "rotate", "--model", "/m", "--out-dir", str(out_dir)]  # fmt: skip
    assert fairness.main(argv) == 0

    (command,) = commands  # one mix only
    assert command[command.index("--scenario") + 1] == "sharegpt"
    assert command[command.index("--round-order") + 1] == "rotate"
    systems = [c.split("=")[0] for i, c in enumerate(command) if command[i - 1] == "--system"]
    assert systems == ["stock", "adaptivellm", "stock-b"]  # the FCFS pair still at the ends
    out = json.loads((out_dir / "fairness.json").read_text())
    assert not (tmp_path / "canonical").exists()  # the canonical results are left alone
    assert set(out["scenarios"]) == {"mixed_length"} and "multi_tenant" not in out
    assert "jain" not in out  # the top-level fields are the multi-tenant mix's only
    section = out["mixed_length"]
    assert set(section["throughput_tokens_per_s"]) == {"fcfs", "adaptive", "fcfs_b"}
    assert section["adaptive_vs_fcfs_pair"]["throughput_ratio"] == pytest.approx(
        103 / ((100 + 105) / 2)
    )
    assert "--out-dir" in out["command"] and out["rounds"] == 8
    assert out["round_order"] == "rotate"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--systems", "adaptive,vtc"], "fcfs is required"),
        (["--systems", "fcfs,hrrn"], "unknown system(s) hrrn"),
        (["--systems", ","], "unknown system(s) (none given)"),
        (["--scenarios", "sharegpt"], "unknown mix(es) sharegpt; known: multi_tenant,"),
        (["--systems", "fcfs,adaptive", "--e3c3"], "--systems leaves out"),
    ],
)
def test_bad_subsets_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        fairness.main([*argv, "--model", "/m"])
    assert message in capsys.readouterr().err


def test_reuse_of_a_folder_without_reports_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        fairness.main(["--reuse", "--model", "/m", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--reuse:" in err and "fairness-multi-tenant.json" in err
