"""The harness's per-round CPU readings (adaptivellm.benchmark.harness): steal, on hand-made
/proc/stat files and this machine's own; CPU time by process role, on real child processes
(the real server's processes: tests/benchmark/test_harness_e2e.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from adaptivellm.benchmark.harness import (
    cpu_deltas,
    cpu_times,
    process_cpu_s,
    process_role,
    steal_share,
)
from adaptivellm.benchmark.report import cpu_per_token


def stat_file(tmp_path: Path, first_line: str) -> Path:
    path = tmp_path / "stat"
    path.write_text(first_line + "\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 5\n")
    return path


def test_cpu_times_sums_the_first_eight_fields_and_reads_steal(tmp_path: Path) -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    path = stat_file(tmp_path, "cpu  100 5 40 800 10 1 4 40 30 0")
    assert cpu_times(path) == (1000, 40)  # guest time is inside user already: not added


@pytest.mark.parametrize(
    "text", ["cpu  100 5 40 800 10 1 4", "intr 1 2 3 4 5 6 7 8 9", "cpu  1 2 x 4 5 6 7 8", ""]
)
def test_cpu_times_is_none_without_a_steal_field(tmp_path: Path, text: str) -> None:
    assert cpu_times(stat_file(tmp_path, text)) is None


def test_cpu_times_is_none_where_there_is_no_proc_stat(tmp_path: Path) -> None:
    assert cpu_times(tmp_path / "missing") is None


def test_steal_share_between_two_readings() -> None:
    assert steal_share((1000, 40), (1400, 140)) == pytest.approx(0.25)
    assert steal_share((1000, 40), (1400, 40)) == 0.0
    assert steal_share(None, (1400, 140)) is None
    assert steal_share((1000, 40), None) is None
    assert steal_share((1000, 40), (1000, 40)) is None  # no time passed


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="Linux only")
def test_this_machines_reading_is_a_share() -> None:
    before = cpu_times()
    sum(i * i for i in range(200_000))  # let a few ticks pass
    after = cpu_times()
    assert before is not None and after is not None
    assert after[0] >= before[0] and after[1] >= before[1]
    share = steal_share(before, (after[0] + 1, after[1]))
    assert share is not None and 0.0 <= share <= 1.0


@pytest.mark.parametrize(
    ("title", "is_root", "role"),
    [
        ("VLLM::EngineCore_DP0", False, "engine_core"),
        ("VLLM::Worker_TP0 ", False, "worker"),
        ("VLLM::APIServer_0", False, "api_server"),
        ("/usr/bin/python -m adaptivellm serve", True, "api_server"),
        ("python -c from multiprocessing.resource_tracker import main", False, "other"),
        # A child's arguments are not its title: only the first word names a role.
        ("python -m worker EngineCore", False, "other"),
        ("", False, "other"),
    ],
)
def test_process_role_reads_vllms_titles(title: str, is_root: bool, role: str) -> None:
    assert process_role(title, is_root) == role


BUSY = (
    "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    "time.sleep(30)\n"
)


def test_cpu_by_role_counts_a_busy_child_and_not_an_idle_one() -> None:
    """A parent with two children, one that burns 0.3 s of CPU and one that sleeps: the parent
    reads as the API server, the children as `other`, and the burnt time is found."""
    code = (
        "import subprocess, sys, time\n"
        f"busy = subprocess.Popen([sys.executable, '-c', {BUSY!r}])\n"
        "idle = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
        "print('up', flush=True)\n"
        "time.sleep(30)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "up"
        before = process_cpu_s(parent.pid)
        roles = sorted(role for _, role in before)
        assert roles == ["api_server", "client", "other", "other"], before
        # The busy child burns its 0.3 s meanwhile (it started just before); on a loaded
        # machine that takes longer, so wait for it (up to 30 s) rather than a fixed time.
        deadline = time.monotonic() + 30.0
        while True:
            time.sleep(0.5)
            spent = cpu_deltas(before, process_cpu_s(parent.pid))
            if spent["other"] > 0.25 or time.monotonic() > deadline:
                break
        time.sleep(0.5)  # a busy child past its 0.3 s burns no more
        spent = cpu_deltas(before, process_cpu_s(parent.pid))
        assert 0.1 < spent["other"] < 0.5, spent
        assert spent["api_server"] < 0.1, spent
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
        parent.wait()


def test_cpu_of_a_gone_root_is_the_client_alone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert [role for _, role in process_cpu_s(proc.pid)] == ["client"]
    assert [role for _, role in process_cpu_s(None)] == ["client"]


def test_cpu_deltas_sum_by_role_and_count_new_processes_from_zero() -> None:
    before = {(1, "api_server"): 2.0, (2, "engine_core"): 10.0, (9, "other"): 1.0}
    after = {(1, "api_server"): 2.5, (2, "engine_core"): 13.0, (3, "other"): 0.25,
             (4, "other"): 0.5}  # fmt: skip
    assert cpu_deltas(before, after) == {"api_server": 0.5, "engine_core": 3.0, "other": 0.75}
    # A pid reused by another role is a new process; a clock never runs back.
    assert cpu_deltas({(1, "other"): 5.0}, {(1, "api_server"): 1.0}) == {"api_server": 1.0}
    assert cpu_deltas({(1, "other"): 5.0}, {(1, "other"): 4.0}) == {"other": 0.0}


def test_cpu_per_token_over_rounds() -> None:
    rounds = [{"api_server": 1.0, "engine_core": 3.0, "client": 0.5},
              {"api_server": 1.0, "engine_core": 5.0, "client": 0.5}]  # fmt: skip
    out = cpu_per_token(rounds, {"output_tokens": 1000.0})
    assert out == {"api_server": 2.0, "client": 1.0, "engine_core": 8.0, "total": 10.0}
    assert cpu_per_token([], {"output_tokens": 1000.0}) == {}
    assert cpu_per_token(rounds, {"output_tokens": 0.0}) == {}
    assert cpu_per_token(rounds, {}) == {}


def test_replay_round_records_each_rounds_timeline_from_its_own_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rounds through `_replay_round`, the server's side (replay, scrape, CPU readers) made
    by hand: each round's timeline counts from that round's start, while its rows are laid
    after the earlier rounds on one time line."""
    from adaptivellm.benchmark import harness
    from adaptivellm.benchmark.metrics import RequestResult
    from adaptivellm.benchmark.workloads import WorkloadSpec
    from adaptivellm.launch import ServerProcess

    # Round 0: 4 tokens at 0.5-2.0 s; round 1: 2 tokens at 0.2 and 3.4 s.
    rounds = [
        [RequestResult(0, "a", 10, 4, 0.0, 0.5, 2.0, True, "", (0.5, 1.0, 1.5, 2.0))],
        [RequestResult(0, "a", 10, 2, 0.0, 0.2, 3.4, True, "", (0.2, 3.4))],
    ]
    monkeypatch.setattr(harness, "replay_sync", lambda *args: rounds.pop(0))
    monkeypatch.setattr(harness, "scrape_metrics", lambda url: "")
    monkeypatch.setattr(harness, "cpu_times", lambda: None)
    monkeypatch.setattr(harness, "process_cpu_s", lambda root: {})
    system = harness.SystemConfig("adaptivellm", "adaptivellm")
    config = harness.BenchConfig((system,), WorkloadSpec(num_requests=1), "m", "m", 100, (),
                                 tmp_path)  # fmt: skip
    run = harness.SystemRun(system, ["adaptivellm", "serve"], {})
    server = ServerProcess(["true"], 8000, tmp_path / "log")
    for round_ in range(2):
        harness._replay_round(config, run, server, [], round_, None)
    assert run.round_output_per_s == [[1, 2, 1], [1, 0, 0, 1]]
    assert run.round_durations_s == [2.0, 3.4]
    assert [r.arrival_s for r in run.results] == [0.0, 2.0]  # round 1 laid after round 0
    assert run.results[1].token_times == (2.2, 5.4)
