"""No process of a replica outlives it (adaptivellm.replicas.reaper): the reaper's group dies
with the reaper, whether the reaper is told (its parent died: PDEATHSIG) or SIGKILLed itself
(as Ray does to a worker's children), in which case its guard kills the group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil


def start_reaper() -> tuple[subprocess.Popen[bytes], int]:
    """A reaper running `sleep`, in its own session; returns it and the sleep's pid."""
    reaper = subprocess.Popen(
        [sys.executable, "-m", "adaptivellm.replicas.reaper", "--", "sleep", "600"],
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sleeps = [p for p in psutil.Process(reaper.pid).children() if p.name() == "sleep"]
        guards = [p for p in psutil.Process(reaper.pid).children() if "--guard" in p.cmdline()]
        if sleeps and guards:
            return reaper, sleeps[0].pid
        time.sleep(0.05)
    raise AssertionError("the reaper did not start its command and guard")


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_sigkilled_reaper_takes_its_group_with_it() -> None:
    reaper, child = start_reaper()
    try:
        os.kill(reaper.pid, signal.SIGKILL)
        reaper.wait()
        assert gone(child), "the command outlived its reaper"
    finally:
        if not gone(child, 0):
            os.killpg(reaper.pid, signal.SIGKILL)


def test_the_reaper_kills_its_group_when_its_parent_dies() -> None:
    # A parent that starts a reaper tied to it, prints the reaper's pid and dies.
    code = (
        "import subprocess, sys\n"
        "from adaptivellm.replicas.reaper import die_with_parent\n"
        "p = subprocess.Popen([sys.executable, '-m', 'adaptivellm.replicas.reaper', '--',"
        " 'sleep', '600'], start_new_session=True, preexec_fn=die_with_parent)\n"
        "print(p.pid, flush=True)\n"
        "import time; time.sleep(1.5)\n"
    )
    parent = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    reaper = int(parent.stdout.split()[0])
    assert gone(reaper), "the reaper outlived its parent"


def test_the_reaper_exits_with_its_commands_status() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "adaptivellm.replicas.reaper", "--", sys.executable, "-c",
         "raise SystemExit(3)"],
        start_new_session=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 3
