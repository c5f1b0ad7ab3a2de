"""bench/step_trace.py: servers' step traces compared, on traces written by StepTrace itself
with known step costs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from adaptivellm.scheduler.step_trace import STEP_TRACE_ENV, STEP_TRACE_NAME_ENV, StepTrace
from tests.support import load_bench_script

st = load_bench_script("step_trace")

#: The true cost of a step's execution: 2 ms + 3 ms per decode + 0.05 ms per prompt token.
F, V, P = 0.002, 0.003, 0.00005


def write_trace(
    monkeypatch: pytest.MonkeyPatch, folder: Path, name: str, steps: int, slow_s: float = 0.0,
    sched_s: float = 0.0005, seed: int = 0,
) -> None:  # fmt: skip
    """A trace of `steps` steps named `name`; each step's execution costs the true cost plus
    `slow_s`, and the loop between steps 1 ms."""
    monkeypatch.setenv(STEP_TRACE_ENV, str(folder))
    monkeypatch.setenv(STEP_TRACE_NAME_ENV, name)
    trace = StepTrace.from_env({"policy": "fcfs"})
    assert trace is not None
    trace.path = trace.path.rename(folder / f"steps-{name}.jsonl")  # one file per fake server
    rng, t = random.Random(seed), 100.0
    for _ in range(steps):
        decode, prefill = rng.randint(1, 4), rng.choice([0, 0, 16, 64])
        exec_s = F + V * decode + P * prefill + slow_s
        trace.step(t, sched_s, exec_s, 0.0002, {
            "prefill": prefill, "decode": decode, "context": 100, "running": decode,
            "waiting": 0, "preempted": 0,
        })  # fmt: skip
        t += sched_s + exec_s + 0.0002 + 0.001
    trace.file.close()


def test_the_common_fit_recovers_the_step_cost_and_the_slow_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_trace(monkeypatch, tmp_path, "fcfs", 400, seed=1)
    write_trace(monkeypatch, tmp_path, "adaptivellm", 440, slow_s=0.001, sched_s=0.0015, seed=2)
    result = st.compare(st.load([tmp_path]), None)
    fit = result["fit"]
    assert fit["decode_ms"] == pytest.approx(3.0, abs=0.05)
    assert fit["prefill_ms"] == pytest.approx(0.05, abs=0.002)
    assert fit["r2"] > 0.9
    fcfs, adaptive = result["servers"]["fcfs"], result["servers"]["adaptivellm"]
    assert result["reference"] == "fcfs"
    # one server's steps took 1 ms more for the same contents: the two sit either side of the fit
    assert adaptive["excess_exec_ms"] - fcfs["excess_exec_ms"] == pytest.approx(1.0, abs=0.05)
    assert fcfs["loop_ms"] == pytest.approx(1.0, abs=0.01)
    assert fcfs["sched_ms"] == pytest.approx(0.5) and adaptive["sched_ms"] == pytest.approx(1.5)
    v = adaptive["vs_reference"]
    assert v["steps_ratio"] == pytest.approx(1.1)
    parts = sum(v[k] for k in v if k.startswith("from_"))
    assert parts == pytest.approx(v["busy_diff_s"], rel=1e-6)  # the parts add up
    assert v["from_sched_s"] == pytest.approx(440 * 0.001, rel=1e-3)
    assert "fcfs" in st.table(result) and "adaptivellm vs fcfs" in st.table(result)


def test_idle_gaps_between_rounds_are_not_busy_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_trace(monkeypatch, tmp_path, "fcfs", 50)
    path = tmp_path / "steps-fcfs.jsonl"
    lines = path.read_text().splitlines()
    late = [json.loads(x) for x in lines[1:]]
    for s in late:
        s["t"] += 30.0  # a second round, 30 s later
    path.write_text("\n".join([*lines, *(json.dumps(s) for s in late)]) + "\n")
    one = st.summarise([json.loads(x) for x in lines[1:]])
    two = st.summarise([json.loads(x) for x in lines[1:]] + late)
    assert two["busy_s"] == pytest.approx(2 * one["busy_s"], rel=0.01)


def test_servers_are_named_by_header() -> None:
    assert st.label({"name": "adaptivellm-fcfs", "policy": "fcfs"}) == "adaptivellm-fcfs"
    wt = {"policy": "weighted-turnaround", "max_step_s": 0, "fairness_preemption": False}
    assert st.label(wt) == "weighted-turnaround-nocap-nopre"
    assert st.label({"policy": "fcfs", "preemption_mode": "recompute"}) == "fcfs-recompute"


def test_same_named_servers_are_told_apart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_trace(monkeypatch, tmp_path / "a", "fcfs", 20)
    write_trace(monkeypatch, tmp_path / "b", "fcfs", 20)
    assert sorted(st.load([tmp_path / "a", tmp_path / "b"])) == ["fcfs", "fcfs#2"]


def test_bad_input_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        st.main([str(empty), "--out", str(tmp_path / "out.json")])
    assert "no steps-*.jsonl traces" in capsys.readouterr().err
    write_trace(monkeypatch, tmp_path / "t", "fcfs", 20)
    with pytest.raises(SystemExit):
        st.main([str(tmp_path / "t"), "--reference", "vtc", "--out", str(tmp_path / "o.json")])
    assert "no trace of 'vtc'" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_main_writes_the_report_with_its_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_trace(monkeypatch, tmp_path / "t", "fcfs", 30)
    write_trace(monkeypatch, tmp_path / "t", "adaptivellm", 30, seed=3)
    out = tmp_path / "r.json"
    assert st.main([str(tmp_path / "t"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("python bench/step_trace.py")
    assert set(report["servers"]) == {"fcfs", "adaptivellm"}
    source = report["source"]  # None only outside a git checkout
    assert source is None or (len(source["commit"]) == 40 and isinstance(source["dirty"], bool))
