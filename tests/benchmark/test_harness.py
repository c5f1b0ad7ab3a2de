"""The harness's per-round CPU steal reading (adaptivellm.benchmark.harness), on hand-made
/proc/stat files and this machine's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptivellm.benchmark.harness import cpu_times, steal_share


def stat_file(tmp_path: Path, first_line: str) -> Path:
    path = tmp_path / "stat"
    path.write_text(first_line + "\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 5\n")
    return path


def test_cpu_times_sums_the_first_eight_fields_and_reads_steal(tmp_path: Path) -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    path = stat_file(tmp_path, "cpu  100 5 40 800 10 1 4 40 30 0")
    assert cpu_times(path) == (1000, 40)  # guest time is inside user already: not added


@pytest.mark.parametrize(
    "text", ["cpu  100 5 40 800 10 1 4", "intr 1 2 3 4 5 6 7 8 9", "cpu  1 2 x 4 5 6 7 8", ""]
)
def test_cpu_times_is_none_without_a_steal_field(tmp_path: Path, text: str) -> None:
    assert cpu_times(stat_file(tmp_path, text)) is None


def test_cpu_times_is_none_where_there_is_no_proc_stat(tmp_path: Path) -> None:
    assert cpu_times(tmp_path / "missing") is None


def test_steal_share_between_two_readings() -> None:
    assert steal_share((1000, 40), (1400, 140)) == pytest.approx(0.25)
    assert steal_share((1000, 40), (1400, 40)) == 0.0
    assert steal_share(None, (1400, 140)) is None
    assert steal_share((1000, 40), None) is None
    assert steal_share((1000, 40), (1000, 40)) is None  # no time passed


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="Linux only")
def test_this_machines_reading_is_a_share() -> None:
    before = cpu_times()
    sum(i * i for i in range(200_000))  # let a few ticks pass
    after = cpu_times()
    assert before is not None and after is not None
    assert after[0] >= before[0] and after[1] >= before[1]
    share = steal_share(before, (after[0] + 1, after[1]))
    assert share is not None and 0.0 <= share <= 1.0
