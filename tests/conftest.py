"""Shared fixtures. End-to-end tests share one real `adaptivellm serve` per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adaptivellm.launch import ServerProcess, adaptivellm_command, free_port
from tests.support import (
    API_KEY,
    MAX_MODEL_LEN,
    SERVED_NAMES,
    SPLIT_IDLE_TIMEOUT_S,
    SPLIT_MAX_FRAME_MB,
    SPLIT_MAX_SESSIONS,
    Server,
)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`adaptivellm serve` on the embedded model (no MODEL given), with vLLM flags passed
    through (--api-key among them) and split execution on. Eager mode: torch.compile would add
    ~40 s of start-up on 2 cores."""
    port = free_port()
    flags = ["--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
             "--served-model-name", *SERVED_NAMES, "--api-key", API_KEY,
             "--kv-cache-memory-bytes", str(256 << 20),
             "--split-execution", "--split-max-sessions", str(SPLIT_MAX_SESSIONS),
             "--split-max-frame-mb", str(SPLIT_MAX_FRAME_MB),
             "--split-idle-timeout-s", str(SPLIT_IDLE_TIMEOUT_S)]  # fmt: skip
    log = Path(tmp_path_factory.mktemp("server")) / "server.log"
    process = ServerProcess(adaptivellm_command(None, port, flags), port, log)
    process.start()
    try:
        process.wait_ready(timeout=600)
        yield Server(process.base_url, process)
    finally:
        process.stop()
