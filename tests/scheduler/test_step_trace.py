"""ADAPTIVELLM_STEP_TRACE: the per-step trace file (scheduler/step_trace.py), written by the
real scheduler over the simulated engine of tests/scheduler/sim.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptivellm.scheduler.config import FairnessConfig
from adaptivellm.scheduler.step_trace import (
    STEP_TRACE_ENV,
    STEP_TRACE_NAME_ENV,
    StepTrace,
    read_trace,
)
from tests.scheduler.sim import Run, check_no_leaks, make_request, make_scheduler

HEADER = '{"header":true,"pid":1,"policy":"fcfs"}'
STEP = '{"t":1.0,"sched_s":0.001,"exec_s":0.01,"update_s":0.0005,"prefill":4,"decode":1}'


def test_off_unless_the_variable_names_a_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STEP_TRACE_ENV, raising=False)
    assert StepTrace.from_env({}) is None
    monkeypatch.setenv(STEP_TRACE_ENV, "  ")
    assert StepTrace.from_env({}) is None


def test_an_unwritable_folder_fails_at_start_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(STEP_TRACE_ENV, str(blocker / "trace"))
    with pytest.raises(OSError, match=STEP_TRACE_ENV):
        StepTrace.from_env({"policy": "fcfs"})


def test_read_trace_drops_only_a_cut_last_line(tmp_path: Path) -> None:
    path = tmp_path / "steps-1.jsonl"
    path.write_text(f"{HEADER}\n{STEP}\n{STEP}\n" + STEP[:20])
    header, steps = read_trace(path)
    assert header["policy"] == "fcfs" and len(steps) == 2
    path.write_text(f"{HEADER}\n{STEP[:20]}\n{STEP}\n")
    with pytest.raises(ValueError, match=r"steps-1.jsonl:2: not a JSON line"):
        read_trace(path)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [(f"{STEP}\n", "before the trace's header"), ("", "no header line"),
     ("[1]\n", "not a JSON object")],
)  # fmt: skip
def test_read_trace_rejects_what_is_not_a_trace(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "steps-1.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=fragment):
        read_trace(path)


def test_the_scheduler_writes_one_line_per_step(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every step the engine ran is a line, with the counts of what it scheduled, as the
    service-time fit counts them: a prompt's last token is computed with its first sampled
    token, so it counts as a decode; every output token is one request decoding in a step."""
    monkeypatch.setenv(STEP_TRACE_ENV, str(tmp_path))
    monkeypatch.setenv(STEP_TRACE_NAME_ENV, "traced")
    config = FairnessConfig(policy="weighted-turnaround")
    scheduler, clock = make_scheduler(config, num_blocks=40, max_num_seqs=2)
    prompts, outputs = [30, 70, 10], [5, 8, 3]
    for i, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
        scheduler.add_request(make_request(f"r{i}", p, o, clock.now))
    run = Run(scheduler, clock)
    steps = 0
    while scheduler.has_requests():
        run.step()
        steps += 1
    check_no_leaks(scheduler, 40)
    scheduler.observer.trace.file.flush()  # type: ignore[union-attr]
    (path,) = tmp_path.glob("steps-*.jsonl")
    header, lines = read_trace(path)
    assert header["name"] == "traced" and header["policy"] == "weighted-turnaround"
    assert header["max_num_seqs"] == 2
    assert len(lines) == steps
    assert sum(s["prefill"] for s in lines) == sum(prompts) - len(prompts)
    assert sum(s["decode"] for s in lines) == sum(outputs)
    assert all(s["running"] <= 2 and s["exec_s"] >= 0 and s["sched_s"] >= 0 for s in lines)
    ts = [s["t"] for s in lines]
    assert ts == sorted(ts)
    assert json.loads(path.read_text().splitlines()[0])["header"] is True


def test_no_trace_without_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(STEP_TRACE_ENV, raising=False)
    scheduler, clock = make_scheduler(FairnessConfig(policy="fcfs"), num_blocks=40)
    assert scheduler.observer.trace is None
    scheduler.add_request(make_request("r", 10, 3, clock.now))
    Run(scheduler, clock).until_idle()
    assert not list(tmp_path.iterdir())
