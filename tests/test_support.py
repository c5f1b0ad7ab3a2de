"""The overlap check the end-to-end tests rely on (tests.support.read_live_after), and the
plugin that fails a session in which a must-run test was skipped (tests.support.MustRun)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import MAX_READ_GAP_S, MustRun, read_live_after


def test_a_stream_read_steadily_is_live_until_its_last_chunk() -> None:
    reads = [0.5 + 0.01 * i for i in range(200)]  # 0.5 .. 2.49 s
    assert read_live_after(reads, 1.0) == pytest.approx(2.49 - 1.0)


def test_a_burst_after_a_pause_does_not_count() -> None:
    # Read live until 1.3 s, then nothing until the rest arrives at once at 3.0 s.
    reads = [1.0 + 0.01 * i for i in range(31)] + [3.0 + 1e-5 * i for i in range(300)]
    assert read_live_after(reads, 1.0) == pytest.approx(0.3)


def test_a_client_that_stalled_right_after_sending_read_nothing_live() -> None:
    # The CI failure's shape: sent at 0, every later chunk read 2.3 s later, in one burst.
    reads = [-0.02, -0.01, 0.0] + [2.3 + 1e-5 * i for i in range(500)]
    assert read_live_after(reads, 0.0) == 0.0


def test_pauses_up_to_the_limit_still_count_as_live() -> None:
    step = MAX_READ_GAP_S * 0.99
    reads = [step * i for i in range(1, 6)]
    assert read_live_after(reads, 0.0) == pytest.approx(5 * step)
    late = [MAX_READ_GAP_S * 1.01, MAX_READ_GAP_S * 1.02]
    assert read_live_after(late, 0.0) == 0.0


def test_a_stream_that_ended_before_the_send_has_no_live_time() -> None:
    assert read_live_after([0.1, 0.2, 0.3], 0.5) == 0.0
    assert read_live_after([], 0.5) == 0.0


# --- MustRun: a skipped must-run test fails the session ----------------------------------------

_MUST_RUN_TESTS = """
import pytest

@pytest.mark.parametrize("n", [1, 2])
def test_key(n):
    if n == 2:
        pytest.skip("timing never lined up")

def test_other():
    pytest.skip("not important")

def test_fine():
    pass

@pytest.mark.xfail(reason="known", strict=False)
def test_expected_to_fail():
    assert False
"""


def run_with_must_run(tmp_path: Path, node_ids: list[str]) -> subprocess.CompletedProcess[str]:
    """pytest on a small file of tests, with MustRun(node_ids) registered by its conftest."""
    (tmp_path / "test_some.py").write_text(_MUST_RUN_TESTS)
    (tmp_path / "conftest.py").write_text(
        "from tests.support import MustRun\n\n"
        "def pytest_configure(config):\n"
        f"    config.pluginmanager.register(MustRun({node_ids!r}), 'must-run')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "addopts=",
         "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip


def test_a_skipped_must_run_test_fails_the_session(tmp_path: Path) -> None:
    done = run_with_must_run(tmp_path, ["test_some.py::test_key"])
    assert done.returncode == 1, done.stdout
    assert "must-run tests skipped" in done.stdout
    assert "SKIPPED (must run) test_some.py::test_key[2]" in done.stdout
    assert "test_other" not in done.stdout.split("must-run tests skipped")[1]


def test_a_skipped_must_run_parametrization_named_exactly_fails_the_session(
    tmp_path: Path,
) -> None:
    assert run_with_must_run(tmp_path, ["test_some.py::test_key[2]"]).returncode == 1
    assert run_with_must_run(tmp_path, ["test_some.py::test_key[1]"]).returncode == 0


def test_skips_of_other_tests_and_expected_failures_pass(tmp_path: Path) -> None:
    done = run_with_must_run(tmp_path, ["test_some.py::test_fine", "test_some.py::test_gone"])
    assert done.returncode == 0, done.stdout
    assert "must-run" not in done.stdout
    done = run_with_must_run(tmp_path, ["test_some.py::test_expected_to_fail"])
    assert done.returncode == 0, done.stdout


def test_must_run_matches_parametrizations_of_a_test_named_without_them() -> None:
    plugin = MustRun(["a.py::t", "b.py::u[x]"])
    assert plugin.must_run("a.py::t") and plugin.must_run("a.py::t[1-2]")
    assert plugin.must_run("b.py::u[x]")
    assert not plugin.must_run("b.py::u[y]") and not plugin.must_run("a.py::tt")


def test_the_must_run_tests_exist() -> None:
    """Every MUST_RUN entry names a test the suite collects (a renamed test would silently
    drop out of the list)."""
    from tests.conftest import MUST_RUN

    root = Path(__file__).resolve().parents[1]
    for node_id in MUST_RUN:
        path, _, name = node_id.partition("::")
        source = (root / path).read_text()
        assert f"def {name.split('[')[0]}(" in source, node_id
