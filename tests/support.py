"""Types and constants shared by the tests (import as `tests.support`)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from adaptivellm.launch import ServerProcess, metric_value

#: Names the session server answers to: checks that --served-model-name passes through.
SERVED_NAMES = ("tiny", "tiny-alias")
#: Context limit of the session server: checks that --max-model-len passes through.
MAX_MODEL_LEN = 1024
#: The session server's --api-key (vLLM's flag; it guards the split WebSocket too).
API_KEY = "test-key"
#: Split-execution limits of the session server (small, so that tests can reach them).
SPLIT_MAX_SESSIONS = 4
SPLIT_MAX_FRAME_MB = 1.0
SPLIT_IDLE_TIMEOUT_S = 30.0
SPLIT_QUEUE_S = 3.0


@dataclass(frozen=True)
class Server:
    """A running server under test."""

    base_url: str
    process: ServerProcess
    names: tuple[str, ...] = SERVED_NAMES
    max_model_len: int = MAX_MODEL_LEN

    @property
    def model(self) -> str:
        return self.names[0]

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header the server's --api-key asks for."""
        return {"Authorization": f"Bearer {API_KEY}"}


async def texts_alone(
    base_url: str, bodies: Mapping[str, dict[str, Any]], headers: dict[str, str]
) -> dict[str, str]:
    """Each completion request of `bodies` (name -> JSON body) sent alone, one after the other:
    the reference outputs of tests that run the same requests contended."""
    import httpx

    async with httpx.AsyncClient(headers=headers, timeout=600) as client:
        out = {}
        for name, body in bodies.items():
            r = await client.post(f"{base_url}/v1/completions", json=body)
            r.raise_for_status()
            out[name] = r.json()["choices"][0]["text"]
        return out


def dear_cost_profile(layers: int) -> dict[str, Any]:
    """A split_host_cost.json result for a `layers`-layer model in which every split token
    costs the API server a second (`--split-cost-profile`): no split saves server time, so
    the planner serves whole every session that whole meets its SLA."""

    def mode(forward_ms: float, tokens_per_pass: float, api_ms: float) -> dict[str, Any]:
        return {
            "forward_ms_per_token": {"median": forward_ms},
            "output_tokens_per_pass": {"median": tokens_per_pass},
            "api_server_cpu_ms_per_token": {"median": api_ms},
        }

    return {
        "command": "tests.support.dear_cost_profile",
        "summary": {
            "whole": mode(5.0, 3.0, 0.3),
            f"split@{layers // 2}": mode(3.0, 1.5, 1000.0),
            f"split@{layers}": mode(0.3, 1.0, 1000.0),
        },
    }


def load_bench_script(name: str) -> ModuleType:
    """One of bench/'s scripts (not a package) as a module, e.g. load_bench_script("fairness")."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


#: How many times an end-to-end test that needs requests to overlap in the engine runs its
#: scenario before it gives up (see overlapping_attempts).
OVERLAP_ATTEMPTS = 8


#: A step of the server's step trace (scheduler.step_trace): counts and times of one step.
Step = dict[str, Any]


def trace_env(folder: Path) -> dict[str, str]:
    """Environment that makes a server write its step trace into `folder` (the overlap tests
    read their precondition from it: see overlapping_attempts)."""
    from adaptivellm.scheduler.step_trace import STEP_TRACE_ENV

    return {STEP_TRACE_ENV: str(folder)}


def trace_steps(folder: Path) -> list[Step]:
    """Every step the servers tracing into `folder` have finished so far, file by file (one
    file per engine core; the overlap tests run one)."""
    from adaptivellm.scheduler.step_trace import read_trace

    steps: list[Step] = []
    for path in sorted(folder.glob("steps-*.jsonl")):
        steps.extend(read_trace(path)[1])
    return steps


def overlapping_attempts(
    base_url: str,
    scenario: Callable[[], tuple[dict[str, str], dict[str, float]]],
    on_time: Callable[[dict[str, float], list[Step]], bool],
    reference: Mapping[str, str],
    trace: Path,
    attempts: int = OVERLAP_ATTEMPTS,
) -> tuple[dict[str, float], str, str, list[Step]]:
    """Run `scenario` (which returns the texts of its requests and when each was sent and
    finished) until `on_time` says its later requests reached the engine while the earlier
    ones still had a good part of their decode to go, at most `attempts` times; every
    attempt's texts must equal `reference`. `on_time` gets the client's times and the steps
    the server traced during the attempt (`trace`: the folder its ADAPTIVELLM_STEP_TRACE
    names, see trace_env): the engine's own record of what ran beside what, which no stall of
    the client can blur. Returns the last attempt's times, the server's /metrics before and
    after it (for metric_delta) and its steps. Fails the test when no attempt was on time: a
    test whose precondition was never met has checked nothing, and must not pass or skip
    quietly.

    The tests trigger a later request when the client has seen an earlier one stream a few
    chunks. On a 2-core machine the client and the API server can get no CPU at all for the 2 s
    the engine decodes: vLLM's engine and worker processes spin in sched_yield waiting for each
    other (measured: a separate process sleeping 20 ms at a time saw 1.3-1.9 s gaps while the
    engine decoded, and none with three busy loops but no engine). The chunks then arrive in
    one burst at the end, the trigger fires after the engine is done, and the attempt tests
    nothing. The tests therefore lower the engine processes' priority (lower_engine_priority),
    which makes such attempts rare (a CI run had the step-cap test give up after 8 of them,
    when this skipped the test instead of failing it). The precondition was first told by the
    client's own clock (read_live_after: it read the earlier streams live for long enough after
    it sent the later requests); that rejected attempts whose requests did overlap in the
    engine whenever the client stalled afterwards, and a loaded machine failed all 8. It is now
    read from the server's step trace, which records what the engine actually ran together.
    Whether a sent request was on time is told by the client's own clock: it read the
    earlier requests' streams live (read_live_after) for long enough after it was sent, whatever
    the scheduler did; each test says how long its later requests need. That the streams merely
    ended well after it on the client's clock is not enough: the client may have read their
    last part in one late burst. (A CI run had the later request sent 2.3 s before the earlier
    ones' ends were read, within 0.1 ms of each other: it may have reached the engine only after
    they were done, and the test failed.)"""
    import httpx
    import pytest

    assert attempts >= 1
    for attempt in range(attempts):
        done = len(trace_steps(trace))
        before = httpx.get(f"{base_url}/metrics").text
        texts, times = scenario()
        after = httpx.get(f"{base_url}/metrics").text
        steps = trace_steps(trace)[done:]
        assert steps, f"no step traced into {trace}: is {trace_env(trace)} set for the server?"
        assert texts == reference
        if on_time(times, steps):
            return times, before, after, steps
        print(f"attempt {attempt + 1} of {attempts}: the trigger fired too late ({times})")
    pytest.fail(
        f"precondition never met: in {attempts} attempts in a row the client got no CPU while "
        "the engine decoded, so its later requests did not reach the engine while the earlier "
        "ones ran; "
        "the test's assertions did not run (a loaded machine? rerun it alone)",
        pytrace=False,
    )


#: Niceness the overlap tests give a server's engine processes (see lower_engine_priority).
ENGINE_NICENESS = 10


def lower_engine_priority(server: ServerProcess, niceness: int = ENGINE_NICENESS) -> int:
    """Give every thread of the server's child processes (vLLM's engine core and worker: they
    spin in sched_yield while they wait for each other) a lower CPU priority, so that the API
    server (the process itself) and the test's client get the CPU when they need it and read
    the streams as they are produced. The engine still gets every cycle they leave: scheduling
    decisions and outputs do not change, only who waits on a 2-core machine. Returns how many
    threads were changed; threads the engine starts later inherit the niceness."""
    import os

    import psutil

    assert server.proc is not None, "start the server first"
    changed = 0
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            for thread in child.threads():
                os.setpriority(os.PRIO_PROCESS, thread.id, niceness)
                changed += 1
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return changed


#: The longest pause between two reads of a stream's chunks that still counts as reading it
#: live. The tiny model streams a chunk every few milliseconds; a preempted request pauses for
#: the few steps of the request that took its place.
MAX_READ_GAP_S = 0.25


def read_live_after(reads: Sequence[float], sent: float) -> float:
    """How long after `sent` the client still read a stream live: until its last chunk, or
    until the first pause of more than MAX_READ_GAP_S, counted from `sent`. `reads` are the
    client's clock at each chunk of the stream.

    A client (or API server) that got no CPU reads what the engine produced meanwhile in one
    burst when it is back: those reads say nothing of when the engine produced the chunks, so
    the live time stops at the pause. A stream that ended in the engine before `sent`, read
    late, has a live time of about 0."""
    last = sent
    for t in reads:
        if t <= sent:
            continue
        if t - last > MAX_READ_GAP_S:
            break
        last = t
    return last - sent


def metric_delta(before: str, after: str, name: str, labels: str = "") -> float:
    """How much metric `name` (a counter, or a histogram's _count/_bucket) grew between two
    /metrics expositions."""
    return (metric_value(after, name, labels) or 0.0) - (metric_value(before, name, labels) or 0.0)


class MustRun:
    """pytest plugin: a test session fails when any test of `node_ids` was skipped.

    An entry without parameters ("file.py::test") stands for every parametrization of that
    test ("file.py::test[a]", ...). A skip of one of them means that CI passed without checking
    what it says it checks (tests/conftest.py lists them in MUST_RUN; see docs/testing.md)."""

    def __init__(self, node_ids: Sequence[str]) -> None:
        self.node_ids = tuple(node_ids)
        self.skipped: list[str] = []

    def must_run(self, node_id: str) -> bool:
        return node_id in self.node_ids or node_id.split("[", 1)[0] in self.node_ids

    def pytest_runtest_logreport(self, report: Any) -> None:
        skipped = report.skipped and not hasattr(report, "wasxfail")
        if skipped and self.must_run(report.nodeid) and report.nodeid not in self.skipped:
            self.skipped.append(report.nodeid)

    def pytest_sessionfinish(self, session: Any, exitstatus: int) -> None:
        if self.skipped and session.exitstatus == 0:
            session.exitstatus = 1  # pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.skipped:
            terminalreporter.section("must-run tests skipped", sep="=", red=True, bold=True)
            for node_id in self.skipped:
                terminalreporter.line(f"SKIPPED (must run) {node_id}", red=True)
            terminalreporter.line(
                "These tests must run in CI (MUST_RUN in tests/conftest.py): the session fails."
            )
