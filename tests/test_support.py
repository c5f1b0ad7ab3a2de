"""The overlap check the end-to-end tests rely on (tests.support.read_live_after)."""

from __future__ import annotations

import pytest

from tests.support import MAX_READ_GAP_S, read_live_after


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
