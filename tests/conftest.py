"""Shared fixtures. End-to-end tests share one real `adaptivellm serve` per test session."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import Phase, settings

from adaptivellm.launch import ServerProcess, adaptivellm_command, free_port
from adaptivellm.model import ensure_model
from tests.support import (
    API_KEY,
    MAX_MODEL_LEN,
    SERVED_NAMES,
    SPLIT_IDLE_TIMEOUT_S,
    SPLIT_MAX_FRAME_MB,
    SPLIT_MAX_SESSIONS,
    SPLIT_QUEUE_S,
    MustRun,
    Server,
    dear_cost_profile,
)

#: Tests whose skip fails the session (tests.support.MustRun): the end-to-end checks that once
#: skipped quietly when the machine was too busy, and the DP's exact check. An id without
#: parameters covers all of its parametrizations.
MUST_RUN = (
    "tests/e2e/test_fairness_preemption.py"
    "::test_short_request_preempts_a_long_one_outputs_unchanged",
    "tests/e2e/test_step_cap.py::test_long_prompts_are_prefilled_in_small_steps_outputs_unchanged",
    "tests/split_client/test_planner.py"
    "::test_dp_prefix_and_brute_force_equal_plain_enumeration_on_seeded_instances",
)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(MustRun(MUST_RUN), "adaptivellm-must-run")


# A profile for bench/mutation.py (`--hypothesis-profile mutation`): a failing example is not
# shrunk (a mutant only needs to fail, and shrinking one can take a minute), and nothing is
# stored between runs.
settings.register_profile(
    "mutation", phases=[Phase.explicit, Phase.reuse, Phase.generate], database=None
)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`adaptivellm serve` on the embedded model (no MODEL given), with vLLM flags passed
    through (--api-key among them) and split execution on. Eager mode: torch.compile would add
    ~40 s of start-up on 2 cores."""
    yield from _split_server(tmp_path_factory)


@pytest.fixture
def fresh_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The same server as `server`, started for one test and stopped after it (an idle vLLM
    server beside the shared one would take CPU from the tests after it): its split planner
    has seen no session yet. The planner calibrates itself on the sessions it has served, and
    on the shared server those are earlier tests' (late, stalled, dropped on purpose): a test
    of what the planner decides for an ordinary session needs a server that has not learned
    from them."""
    yield from _split_server(tmp_path_factory)


@pytest.fixture
def priced_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`fresh_server` started with `--split-cost-profile`: a profile in which no split saves
    server time (tests.support.dear_cost_profile, for the embedded model's layers)."""
    config = json.loads((ensure_model() / "config.json").read_text())
    profile = Path(tmp_path_factory.mktemp("profile")) / "split_host_cost.json"
    profile.write_text(json.dumps(dear_cost_profile(int(config["num_hidden_layers"]))))
    yield from _split_server(tmp_path_factory, "--split-cost-profile", str(profile))


def _split_server(tmp_path_factory: pytest.TempPathFactory, *extra: str) -> Iterator[Server]:
    port = free_port()
    flags = ["--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
             "--served-model-name", *SERVED_NAMES, "--api-key", API_KEY,
             "--kv-cache-memory-bytes", str(256 << 20),
             "--split-execution", "--split-max-sessions", str(SPLIT_MAX_SESSIONS),
             "--split-max-frame-mb", str(SPLIT_MAX_FRAME_MB),
             "--split-idle-timeout-s", str(SPLIT_IDLE_TIMEOUT_S),
             "--split-queue-s", str(SPLIT_QUEUE_S), *extra]  # fmt: skip
    log = Path(tmp_path_factory.mktemp("server")) / "server.log"
    process = ServerProcess(adaptivellm_command(None, port, flags), port, log)
    process.start()
    try:
        process.wait_ready(timeout=600)
        yield Server(process.base_url, process)
    finally:
        process.stop()
