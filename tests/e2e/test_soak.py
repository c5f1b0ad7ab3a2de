"""The soak and fault suite (bench/soak.py), smaller: about 200 streamed requests under KV
pressure with disconnects, aborts, mixed tenants and priorities and split sessions, then every
fault. One run for the module (its own servers, not the session server); each test checks a
target of the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support import load_bench_script

soak = load_bench_script("soak")

REQUESTS = 200
#: The run takes 3-6 minutes on 2 shared cores (two server start-ups among them).
pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = Path(tmp_path_factory.mktemp("soak"))
    argv = ["--requests", str(REQUESTS), "--out", str(folder / "soak.json"),
            "--workdir", str(folder / "work"), "--quiet", "--hang-s", "150",
            "--drain-s", "30"]  # fmt: skip
    result: dict[str, Any] = soak.run(
        soak.build_parser().parse_args(argv), "tests/e2e/test_soak.py"
    )
    print({k: v for k, v in result.items() if k not in ("faults", "errors")})
    return result


def test_every_request_ended(report: dict[str, Any]) -> None:
    assert report["requests"] == REQUESTS
    assert report["load_incomplete"] is None
    assert report["lost"] == 0, report["errors"]
    assert report["hung"] == 0, report["errors"]
    assert report["errors_5xx"] == 0, report["errors"]
    assert report["short"] == 0, report["errors"]
    ended = sum(report[k] for k in ("completed", "aborted", "disconnected", "errors_4xx"))
    assert ended == REQUESTS


def test_the_mix_happened(report: dict[str, Any]) -> None:
    """Enough clients walked away, some were aborted, split sessions ran among the ordinary
    requests, and vLLM preempted (some victims swapped)."""
    assert report["disconnected"] >= 0.1 * REQUESTS
    assert report["aborted"] > 0
    by_kind = report["outcomes_by_kind"]
    assert by_kind.get("split:completed", 0) > 0
    assert report["counters"]["preemptions_swap"] > 0


def test_nothing_leaked(report: dict[str, Any]) -> None:
    assert set(report["leaked"]) >= {"kv_blocks", "swap_bytes", "split_sessions"}
    assert not any(report["leaked"].values()), report["drain"]


def test_greedy_outputs_equal_an_unpressured_run(report: dict[str, Any]) -> None:
    assert report["greedy_compared"] >= 0.5 * REQUESTS
    assert report["greedy_mismatches"] == 0, report["mismatch_examples"]
    assert report["partial_mismatches"] == 0, report["mismatch_examples"]


def fault(report: dict[str, Any], name: str) -> dict[str, Any]:
    found = [f for f in report["faults"] if f["name"] == name]
    assert len(found) == 1, f"fault {name} did not run"
    return found[0]


@pytest.mark.parametrize("name", ["corrupt_profile", "split_client_killed", "swap_exhausted"])
def test_fault(report: dict[str, Any], name: str) -> None:
    result = fault(report, name)
    assert result["ok"], result["outcome"]


def test_engine_killed_is_reported_and_clients_get_errors(report: dict[str, Any]) -> None:
    result = fault(report, "engine_killed")
    assert result["checks"]["health_not_200"], result["outcome"]
    assert result["checks"]["in_flight_clients_errored"], result["outcome"]


def test_engine_killed_server_exits_nonzero(report: dict[str, Any]) -> None:
    """An orchestrator restarts a server that exits non-zero."""
    result = fault(report, "engine_killed")
    assert result["checks"]["exited_nonzero"], result["outcome"]
