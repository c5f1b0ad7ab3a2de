"""Patch of vLLM 0.32.0's API-server launcher: remember that the engine died, so that
`adaptivellm serve` exits non-zero and an orchestrator restarts it.

When the engine-core process dies, vLLM's launcher sets `uvicorn.Server.should_exit` (from its
watchdog, every 5 s, or from the handler of the request that met the dead engine) and returns
normally: the process exits 0, which supervisors such as systemd (`Restart=on-failure`) or
Kubernetes (`restartPolicy: OnFailure`) read as a clean stop. This wraps
`terminate_if_errored` in the two modules that call it to note when it is the engine's death
that stops the server; `adaptivellm.serve.main` then returns 1. With
`VLLM_KEEP_ALIVE_ON_ENGINE_DEATH` vLLM keeps serving (its /health says 503) and nothing changes.

Touch points: `vllm.entrypoints.launchers.launcher.terminate_if_errored` (and the name the
exception handlers import from it), `uvicorn.Server.should_exit`. With several API-server
processes (`--api-server-count`), vLLM's own supervisor decides the exit status.
"""

from __future__ import annotations

import functools
from typing import Any, Final

from adaptivellm.compat import check_vllm_version

WRITTEN_FOR: Final = "0.32.0"
_died = False


def engine_died() -> bool:
    """True once the engine's death has stopped this process's API server."""
    return _died


def install() -> None:
    """Wrap terminate_if_errored where vLLM calls it (idempotent)."""
    check_vllm_version()
    from vllm.entrypoints.launchers import launcher
    from vllm.entrypoints.serve.exception_handling.handlers import vllm_error

    original = launcher.terminate_if_errored
    if getattr(original, "_adaptivellm", False):
        return

    @functools.wraps(original)
    def terminate_if_errored(server: Any, engine: Any) -> None:
        global _died
        stopping = bool(server.should_exit)
        original(server=server, engine=engine)
        if server.should_exit and not stopping:
            _died = True

    terminate_if_errored._adaptivellm = True  # type: ignore[attr-defined]
    launcher.terminate_if_errored = terminate_if_errored
    vllm_error.terminate_if_errored = terminate_if_errored
