"""Metric computations on hand-made request timings."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from adaptivellm.benchmark.metrics import (
    MIN_SERVICE_S,
    CalibrationFit,
    RequestResult,
    counter_deltas,
    fit_calibration,
    output_timeline,
    percentile,
    ratios,
    summarise,
    weighted_turnarounds,
    window_fairness,
)
from adaptivellm.benchmark.plots import service_over_time
from adaptivellm.scheduler.policies import jain_index

#: Service time = 0.1 + 0.001 * prompt + 0.01 * output.
FIT = CalibrationFit(a=0.1, b=0.001, c=0.01, r2=1.0)


def result(index: int = 0, tenant: str = "a", prompt: int = 100, output: int = 10,
           arrival: float = 0.0, first: float = 0.5, end: float = 1.4,
           ok: bool = True) -> RequestResult:  # fmt: skip
    times = tuple(first + (end - first) * i / max(1, output - 1) for i in range(output))
    return RequestResult(index, tenant, prompt, output, arrival, first, end, ok, "", times)


def test_request_timings() -> None:
    r = result(arrival=1.0, first=1.5, end=2.4, output=10)
    assert r.latency_s == pytest.approx(1.4)
    assert r.ttft_s == pytest.approx(0.5)
    assert r.tpot_s == pytest.approx(0.1)  # 0.9 s over 9 tokens after the first
    assert math.isnan(result(output=1).tpot_s)


def test_weighted_turnaround() -> None:
    """Service of (100, 10) = 0.1 + 0.1 + 0.1 = 0.3 s; turnaround 1.2 s -> 4.0.
    Service of (0, 0) would be 0.1 s; the failed request is left out."""
    rs = [
        result(prompt=100, output=10, end=1.2),
        result(prompt=0, output=0, end=0.3),
        result(ok=False, end=99.0),
    ]
    assert weighted_turnarounds(rs, FIT) == pytest.approx([4.0, 3.0])


def test_service_time_floor() -> None:
    fit = CalibrationFit(a=-1.0, b=0.0, c=0.0, r2=1.0)
    assert fit.predict(10, 10) == MIN_SERVICE_S


def test_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0, math.nan, 1.0], 50) == 2.0  # nan ignored
    assert math.isnan(percentile([], 50))


def test_ratios_skip_zero_and_missing_reference() -> None:
    got = ratios({"x": 2.0, "y": 1.0, "z": 5.0, "w": 1.0}, {"x": 4.0, "y": 0.0, "w": math.nan})
    assert got == {"x": 0.5}


def test_calibration_fit_recovers_coefficients() -> None:
    samples = [(p, o, 0.05 + 0.0002 * p + 0.004 * o) for p in (16, 256, 1536) for o in (8, 64)]
    fit = fit_calibration(samples)
    assert (fit.a, fit.b, fit.c) == pytest.approx((0.05, 0.0002, 0.004), rel=1e-6)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.predict(100, 10) == pytest.approx(0.05 + 0.02 + 0.04)
    assert len(fit.samples) == 6


def test_calibration_fit_with_noise_and_too_few_samples() -> None:
    noisy = [(16, 8, 0.10), (16, 64, 0.40), (512, 8, 0.22), (512, 64, 0.51)]
    fit = fit_calibration(noisy)
    assert 0 < fit.r2 < 1 and fit.c > 0
    with pytest.raises(ValueError):
        fit_calibration(noisy[:2])


def test_calibration_fit_never_has_a_negative_coefficient() -> None:
    # The stock calibration of a real run: unconstrained least squares gives a = -0.155 s, so
    # a request of 16 prompt and 2 output tokens would be predicted at the 1 ms floor.
    samples = [(16, 8, 0.193), (16, 64, 1.926), (256, 8, 0.740), (256, 64, 2.417),
               (1536, 8, 3.513), (1536, 64, 5.544), (16, 8, 0.284), (16, 64, 2.015),
               (256, 8, 0.608), (256, 64, 1.846), (1536, 8, 3.057), (1536, 64, 5.138)]  # fmt: skip
    fit = fit_calibration(samples)
    assert min(fit.a, fit.b, fit.c) >= 0
    assert fit.predict(16, 2) > 0.05
    assert fit.r2 > 0.9

    # Its residual is the smallest among non-negative fits: nudging a coefficient makes it worse.
    def sse(a: float, b: float, c: float) -> float:
        return sum((a + b * p + c * o - t) ** 2 for p, o, t in samples)

    best = sse(fit.a, fit.b, fit.c)
    for da, db, dc in [(0.01, 0, 0), (0, 1e-5, 0), (0, -1e-5, 0), (0, 0, 1e-4), (0, 0, -1e-4)]:
        assert sse(max(0.0, fit.a + da), fit.b + db, fit.c + dc) >= best


def test_summarise() -> None:
    """Two tenants; run from 0 to 4 s; 30 output tokens over 4 s; one failure."""
    rs = [
        result(0, "a", 100, 10, arrival=0.0, first=0.5, end=1.4),
        result(1, "a", 100, 10, arrival=1.0, first=1.5, end=2.4),
        result(2, "b", 200, 10, arrival=2.0, first=2.5, end=4.0),
        result(3, "b", 200, 10, arrival=2.0, first=math.nan, end=2.1, ok=False),
    ]
    s = summarise(rs, FIT, weights={"b": 2.0})
    assert (s.requests, s.failed, s.output_tokens) == (4, 1, 30)
    assert s.duration_s == pytest.approx(4.0)
    assert s.output_tokens_per_s == pytest.approx(7.5)
    assert s.requests_per_s == pytest.approx(0.75)
    assert s.ttft_p50_s == pytest.approx(0.5)
    assert s.e2e_p50_s == pytest.approx(1.4)
    assert s.tenants["a"].normalised_service == 220
    assert s.tenants["b"].normalised_service == 105  # 210 tokens / weight 2
    # No tenant waited all through a 5-second window while another was served.
    assert (s.jain_fairness, s.jain_windows) == (1.0, 0)
    # Turnarounds 1.4/0.3, 1.4/0.3, 2.0/0.4.
    assert s.mean_weighted_turnaround == pytest.approx((1.4 / 0.3 * 2 + 2.0 / 0.4) / 3)
    assert set(s.figures()) >= {"output_tokens_per_s", "ttft_p99_s", "jain_fairness"}


def test_counter_deltas() -> None:
    before = 'vllm:num_preemptions_total{model_name="m"} 3.0\nadaptivellm_x_total 1\n'
    after = (
        "# HELP vllm:num_preemptions_total x\n"
        'vllm:num_preemptions_total{model_name="m"} 10.0\n'
        "vllm:prompt_tokens_total 500\n"
        'adaptivellm_x_total{mode="swap"} 4\nadaptivellm_x_total{mode="recompute"} 2\n'
        "adaptivellm_new_total 7\nadaptivellm_gauge 9\n"
    )
    assert counter_deltas(before, after) == {
        "vllm:num_preemptions_total": 7.0,
        "vllm:prompt_tokens_total": 500.0,
        "adaptivellm_new_total": 7.0,
        "adaptivellm_x_total": 5.0,
    }


def test_service_over_time_is_cumulative_per_tenant() -> None:
    rs = [result(0, "a", 100, 4, first=1.0, end=2.0), result(1, "b", 50, 2, first=0.5, end=0.7)]
    curves = service_over_time(rs)
    times, cumulative = curves["a"]
    assert times == sorted(times) and cumulative[-1] == pytest.approx(104)
    assert curves["b"][1][-1] == pytest.approx(52)


def test_output_timeline_bins_each_chunk_by_its_second() -> None:
    # 10 tokens as 10 chunks from 0.5 s to 2.3 s (0.2 s apart), 3 tokens in 3 chunks at 2.5 s
    # on; a failed request delivers nothing.
    rs = [result(0, output=10, first=0.5, end=2.3), result(1, output=3, first=2.5, end=2.9),
          result(2, output=50, first=0.0, end=9.0, ok=False)]  # fmt: skip
    assert output_timeline(rs) == [3, 5, 5]
    assert output_timeline(rs, bin_s=2.0) == [8, 5]
    assert output_timeline([]) == []
    # Chunks of several tokens: 7 tokens in 2 chunks (3.5 each) are rounded on the running sum,
    # so the bins still add up to the tokens.
    two = RequestResult(0, "a", 10, 7, 0.0, 0.2, 1.2, True, "", (0.2, 1.2))
    assert output_timeline([two]) == [4, 3] and sum(output_timeline([two, *rs])) == 20


def test_output_timeline_rejects_a_bad_bin() -> None:
    with pytest.raises(ValueError, match="bin_s"):
        output_timeline([result()], bin_s=0.0)


def test_backlogged_jain_over_windows() -> None:
    """Windows of 1 s. a and b both wait all through [1, 2) (a2 and b1 arrived at 0.5 and see
    their first token after 2); in it a receives a1's 10 prompt and 4 output tokens, b nothing."""
    a1 = RequestResult(0, "a", 10, 4, 0.0, 1.2, 1.8, True, "", (1.2, 1.4, 1.6, 1.8))
    a2 = RequestResult(1, "a", 1, 1, 0.5, 2.5, 2.5, True, "", (2.5,))
    b1 = RequestResult(2, "b", 1, 1, 0.5, 2.6, 2.6, True, "", (2.6,))
    # [0, 1): only a is backlogged through it -- fair (1.0). [1, 2): 0.5. Run: 2 windows.
    f = window_fairness([a1, a2, b1], window_s=1.0)
    assert (f.contended_jain, f.contended_windows, f.windows) == (pytest.approx(0.5), 1, 2)
    assert f.jain == pytest.approx(0.75)
    # b also receives 14 tokens in [1, 2): even. b2 also makes b and a wait through [0, 1),
    # in which nobody is served: even too.
    b2 = RequestResult(3, "b", 13, 1, 0.0, 1.5, 1.5, True, "", (1.5,))
    f = window_fairness([a1, a2, b1, b2], window_s=1.0)
    assert (f.jain, f.contended_windows) == (pytest.approx(1.0), 2)
    # b weighs 2: entitled to twice a's share, it got the same.
    f = window_fairness([a1, a2, b1, b2], {"b": 2.0}, window_s=1.0)
    assert f.jain == pytest.approx((1.0 + jain_index([14.0, 7.0])) / 2)
    # Failed requests are not service; no successful request: trivially fair.
    f = window_fairness([result(ok=False)])
    assert (f.jain, f.contended_windows, f.windows) == (1.0, 0, 0)


def test_rounds_alternate_direction_so_positions_balance() -> None:
    from adaptivellm.benchmark.harness import round_order

    names = ["stock", "a", "b", "c"]
    orders = [round_order(names, r) for r in range(4)]
    assert orders[0] == names and orders[1] == names[::-1] and orders[2] == names
    # Over an even number of rounds every system's mean position is the same.
    assert len({sum(o.index(n) for o in orders) for n in names}) == 1


def test_rotated_rounds_give_every_place_once_and_no_replay_twice_in_a_row() -> None:
    from adaptivellm.benchmark.harness import round_order

    names = ["stock", "adaptivellm", "stock-b"]
    orders = [round_order(names, r, "rotate") for r in range(7)]
    assert orders[:3] == [names, names[1:] + names[:1], names[2:] + names[:2]]
    assert orders[3:6] == orders[:3]
    for n in names:  # every place once in every 3 rounds
        assert sorted(o.index(n) for o in orders[:3]) == [0, 1, 2]
    turn = [n for o in orders for n in o]
    assert all(a != b for a, b in itertools.pairwise(turn))
    # Over a cycle every system waits the same numbers of other replays between its own...
    assert len({gaps(turn, n) for n in names}) == 1
    # ... where with reversal the middle one always waits 2 and the ends 0 or 4.
    reverse = [n for o in (round_order(names, r) for r in range(6)) for n in o]
    assert gaps(reverse, "adaptivellm") == (3, 3, 3, 3, 3)
    assert gaps(reverse, "stock") == (1, 1, 5, 5, 5)


def gaps(turn: list[str], name: str) -> tuple[int, ...]:
    """The distances between `name`'s replays in `turn`, sorted."""
    at = [k for k, m in enumerate(turn) if m == name]
    return tuple(sorted(j - i for i, j in itertools.pairwise(at)))


def test_an_unknown_round_order_is_an_error() -> None:
    from adaptivellm.benchmark.harness import round_order

    with pytest.raises(ValueError, match="expected one of reverse, rotate"):
        round_order(["a", "b"], 1, "shuffle")
    assert round_order([], 3, "rotate") == []


def test_source_revision_names_the_commit_and_a_dirty_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    from adaptivellm.benchmark.report import source_revision

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert source_revision(tmp_path) is None  # not a git checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.txt").write_text("one\n")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    assert source_revision(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "new.txt").write_text("untracked files do not count\n")
    assert source_revision(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "f.txt").write_text("two\n")
    assert source_revision(tmp_path) == {"commit": head, "dirty": True}
