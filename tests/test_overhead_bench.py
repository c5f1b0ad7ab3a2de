"""bench/overhead.py's pure helpers: the seeded workload, the spread, the py-spy table and the
engine-step timer's patch (no server)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def overhead() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("bench_overhead", ROOT / "bench" / "overhead.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_overhead"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_workload_is_seeded_distinct_and_aborts_about_a_tenth(overhead: types.ModuleType) -> None:
    a = overhead.workload(400, 3, (4, 16), (8, 128), 0.1)
    assert a == overhead.workload(400, 3, (4, 16), (8, 128), 0.1)
    assert len({r.prompt for r in a}) == 400
    assert all(8 <= r.max_tokens <= 128 for r in a)
    aborted = [r for r in a if r.abort_after is not None]
    assert 20 <= len(aborted) <= 60
    assert all(1 <= r.abort_after < r.max_tokens for r in aborted)


def test_summary_quantiles(overhead: types.ModuleType) -> None:
    s = overhead.summary([1.0, 0.9, 1.1, 0.95, 1.05])
    assert s["median"] == 1.0
    assert s["p10"] == pytest.approx(0.92)
    assert s["p90"] == pytest.approx(1.08)
    assert overhead.summary([0.97])["p10"] == 0.97


def test_group_cpu_counts_every_process_of_the_group_and_no_other(
    overhead: types.ModuleType,
) -> None:
    """A process group of a parent and a child, each burning 0.5 s of CPU and then waiting:
    both are counted (the per-token CPU ratio's input), more than either alone could be; this
    test process, outside the group, is not."""
    burn = (
        "import sys, time\nt = time.process_time()\n"
        "while time.process_time() - t < 0.5: pass\nsys.stdin.read()\n"
    )
    code = (
        "import subprocess, sys\n"
        f"child = subprocess.Popen([sys.executable, '-c', {burn!r}])\n"
        f"exec({burn!r})\n"
        "child.wait()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while overhead.group_cpu_s(proc.pid) < 1.0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 1.0 <= overhead.group_cpu_s(proc.pid) < 3.0
        by_role = overhead.group_cpu_by_role(proc.pid)
        assert "api" in by_role and len(by_role) == 2  # the leader, and the child by its name
        assert min(by_role.values()) >= 0.4  # each burned 0.5 s
        assert overhead.group_cpu_s(2**22 + 12345) == 0.0  # no such group
    finally:
        proc.communicate(b"", timeout=60)


def test_top_table_counts_self_and_inclusive(overhead: types.ModuleType, tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text("main;a;b 3\nmain;a 1\nmain;c 4\n")
    table = overhead.top_table(raw, 5)
    assert "total samples: 8" in table
    assert " 50.00  c" in table  # self
    assert "100.00  main" in table  # inclusive


def test_step_timer_counts_only_steps_that_ran_the_model(
    overhead: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAPTIVELLM_STEP_TIMER", str(tmp_path))
    namespace: dict = {"__name__": "steptimer"}
    exec(compile(overhead.STEP_TIMER, "sitecustomize.py", "exec"), namespace)
    try:

        class Scheduler:
            def schedule(self) -> str:
                time.sleep(0.0002)
                return "out"

            def update_from_output(self, out: str) -> str:
                return out + "!"

        class EngineCore:
            def __init__(self) -> None:
                self.scheduler = Scheduler()

            def step(self, ran: bool) -> tuple[dict, bool]:
                return {"out": self.scheduler.update_from_output(self.scheduler.schedule())}, ran

        module = types.SimpleNamespace(EngineCore=EngineCore)
        namespace["_patch"](module)
        core = EngineCore()
        for i in range(600):
            assert core.step(i % 2 == 0) == ({"out": "out!"}, i % 2 == 0)
        (written,) = tmp_path.glob("*.json")
        state = json.loads(written.read_text())
        assert state["steps"] == 256
        # Every schedule() call is timed (600 by the time of the 512th step, 511 at the 256th):
        # at least 0.2 ms each.
        assert state["sched_ns"] >= 511 * 200_000
        times = overhead.step_us(tmp_path)
        assert times["steps"] == 256 and times["scheduler_us"] >= 0.2 * 511 / 256 * 1e3
        assert not hasattr(Scheduler, "_step_timer")  # the instance was timed, not the class
        # A window: only the steps written after `since` (bench/overhead.py pairs each
        # configuration's rounds with stock's over the same window).
        since = overhead.step_totals(tmp_path)
        assert since[0] == 256 and since[2] == state["sched_ns"]
        assert overhead.step_us(tmp_path, since) is None  # nothing new written yet
        for i in range(600):
            core.step(i % 2 == 0)
        window = overhead.step_us(tmp_path, since)
        assert window["steps"] == 512 - 256  # the file was rewritten at the 512th step
        assert window["scheduler_us"] >= 0.2 * 512 / 256 * 1e3
    finally:
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_Hook"]


def test_switch_counts_collapsed_drives_per_workload() -> None:
    spec = importlib.util.spec_from_file_location(
        "bench_overhead_switch", ROOT / "bench" / "overhead_switch.py"
    )
    assert spec is not None and spec.loader is not None
    switch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(switch)

    def drive(wl: str, tps: float, after_other: bool) -> dict:
        return {"workload": wl, "tokens_per_s": tps, "after_other_server": after_other}

    drives = [
        drive("light", 1000, False),
        drive("light", 900, True),
        drive("light", 300, True),  # under half the median (900): collapsed
        drive("light", 460, False),  # just above half: not
        drive("pressure", 500, False),
    ]
    out = switch.collapses(drives)
    assert out["light"]["drives"] == 4 and out["light"]["collapsed"] == 1
    assert out["light"]["collapsed_after_other_server"] == 1
    assert out["light"]["drives_after_other_server"] == 2
    assert out["light"]["min_tokens_per_s"] == 300
    assert out["pressure"]["collapsed"] == 0
    assert (
        switch.mode_name(types.SimpleNamespace(servers=2, freeze_other=True, pause=2.0))
        == "servers2-freeze-pause2"
    )


def test_paired_steps_subtract_stock_over_the_same_window(overhead: types.ModuleType) -> None:
    mine = {"steps": 512, "us": 13000.0, "scheduler_us": 400.0}
    stock = {"steps": 768, "us": 12800.0, "scheduler_us": 310.0}
    paired = overhead.paired_steps({"default": mine, "stock": stock}, "default")
    assert paired == {"config": mine, "stock": stock, "scheduler_us_added": 90.0}
    # A server that has not written a window yet: no difference, not an error.
    assert (
        overhead.paired_steps({"default": None, "stock": stock}, "default")["scheduler_us_added"]
        is None
    )
