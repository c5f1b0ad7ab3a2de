"""patches/engine_death: `adaptivellm serve` exits non-zero when the engine dies."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from adaptivellm.patches import engine_death


@dataclass
class FakeServer:
    should_exit: bool = False


@dataclass
class FakeEngine:
    errored: bool
    is_running: bool


def test_engine_death_is_remembered_by_both_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.entrypoints.launchers import launcher
    from vllm.entrypoints.serve.exception_handling.handlers import vllm_error

    monkeypatch.setattr(launcher, "terminate_if_errored", launcher.terminate_if_errored)
    monkeypatch.setattr(vllm_error, "terminate_if_errored", vllm_error.terminate_if_errored)
    monkeypatch.setattr(engine_death, "_died", False)
    engine_death.install()
    engine_death.install()  # idempotent: wrapped once
    wrapped = launcher.terminate_if_errored
    assert vllm_error.terminate_if_errored is wrapped
    assert not getattr(wrapped.__wrapped__, "_adaptivellm", False)  # type: ignore[attr-defined]

    healthy = FakeServer()
    wrapped(server=healthy, engine=FakeEngine(errored=False, is_running=True))
    assert not healthy.should_exit and not engine_death.engine_died()

    stopping = FakeServer(should_exit=True)  # an operator's Ctrl-C already stops it
    wrapped(server=stopping, engine=FakeEngine(errored=True, is_running=False))
    assert not engine_death.engine_died()

    dead = FakeServer()
    vllm_error.terminate_if_errored(server=dead, engine=FakeEngine(errored=True, is_running=False))
    assert dead.should_exit and engine_death.engine_died()


def test_keep_alive_on_engine_death_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.entrypoints.launchers import launcher

    monkeypatch.setattr(launcher, "terminate_if_errored", launcher.terminate_if_errored)
    monkeypatch.setattr(engine_death, "_died", False)
    monkeypatch.setenv("VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "1")
    engine_death.install()
    server = FakeServer()
    launcher.terminate_if_errored(server=server, engine=FakeEngine(errored=True, is_running=False))
    assert not server.should_exit and not engine_death.engine_died()
