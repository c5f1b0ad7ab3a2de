"""`python -m adaptivellm.replicas.reaper -- CMD ...`: run CMD (a replica's `adaptivellm serve`)
so that none of its processes outlives the Ray actor that started it.

The actor starts this process in a session of its own (its process group: the API server, the
engine core and the worker all stay in it) with `PR_SET_PDEATHSIG` = SIGTERM. It then:

- becomes a child subreaper (`PR_SET_CHILD_SUBREAPER`), so that a descendant orphaned by the
  API server's death is re-parented here rather than to init, and can still be killed;
- kills the whole group (and every descendant) with SIGKILL when its parent dies (SIGTERM from
  the death signal, or, should the signal be lost, a changed parent pid seen within
  `POLL_S`) and when CMD exits (orphaned engine processes included); it exits with CMD's status;
- ignores SIGINT, which the actor sends the group for a graceful stop: CMD shuts down and the
  reaper follows it;
- starts a guard (`--guard`), a child tied to it by its own death signal: Ray SIGKILLs a
  worker's direct children when the worker exits (`kill_child_processes_on_worker_exit`), which
  the reaper cannot catch, and vLLM's engine core and worker outlive a killed API server
  (checked: still alive 15 s later). The guard then kills the group.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
POLL_S = 0.5


def prctl(option: int, value: int) -> bool:
    """Linux prctl(2); False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """preexec_fn: deliver `sig` to this process when the thread that forked it exits."""
    prctl(PR_SET_PDEATHSIG, int(sig))


def kill_everything() -> None:
    """SIGKILL every descendant and this process group (this process with it)."""
    with contextlib.suppress(Exception):
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(137)


def guard(parent: int) -> int:
    """The guard: kill the process group when the reaper (its parent, pid `parent`) dies. The
    death signal is asked for after its handler is installed, then the parent checked: a
    reaper killed at any moment of the guard's start-up is noticed."""
    signal.signal(signal.SIGTERM, lambda *_: kill_group())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    while os.getppid() == parent:
        time.sleep(POLL_S)
    kill_group()
    return 0


def kill_group() -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(137)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--guard"]:
        return guard(int(argv[1]))
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m adaptivellm.replicas.reaper -- CMD ...", file=sys.stderr)
        return 2
    parent = os.getppid()
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGTERM, lambda *_: kill_everything())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    subprocess.Popen(
        [sys.executable, "-m", "adaptivellm.replicas.reaper", "--guard", str(os.getpid())]
    )
    child = subprocess.Popen(argv, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while True:
        code = child.poll()
        if code is not None:
            break
        if os.getppid() != parent:
            kill_everything()
        time.sleep(POLL_S)
    # CMD is gone: reap what it left behind (orphans were re-parented here).
    with contextlib.suppress(Exception):
        import psutil

        for orphan in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                orphan.kill()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
