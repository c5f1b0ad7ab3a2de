"""bench/split_whole.py's pure parts: the seeded requests, the rotated order, the upload sizes
and the summary (no server)."""

from __future__ import annotations

import types
from collections import Counter

import pytest

from tests.support import load_bench_script


@pytest.fixture(scope="module")
def bench() -> types.ModuleType:
    return load_bench_script("split_whole")


def test_requests_are_seeded_and_clipped(bench: types.ModuleType) -> None:
    a = bench.requests(50, 100, 20, seed=3)
    assert a == bench.requests(50, 100, 20, seed=3) and a != bench.requests(50, 100, 20, seed=4)
    assert all(4 <= len(p) <= 100 and 4 <= n <= 20 for p, n in a)


def test_every_mode_takes_every_place_equally_often(bench: types.ModuleType) -> None:
    places = Counter((i, mode) for r in range(3) for mode_order in [bench.rotated(r, 0)]
                     for i, mode in enumerate(mode_order))  # fmt: skip
    assert set(places.values()) == {1} and len(places) == 9
    assert all(
        sorted(bench.rotated(r, q)) == sorted(bench.MODES) for r in range(4) for q in range(4)
    )


def test_embeddings_take_hidden_size_float32_values_per_token(bench: types.ModuleType) -> None:
    assert bench.upload_bytes("embeddings", 10, 256) == 10 * 256 * 4
    assert bench.upload_bytes("ids", 10, 256) == bench.upload_bytes("ordinary", 10, 256) == 40


def _rows(latency: dict[str, list[float]], match: bool = True) -> list[dict]:
    return [
        {"round": 0, "request": i, "mode": mode, "latency_s": s, "prompt_tokens": 100,
         "max_tokens": 8, "tokens_match": match}
        for mode, values in latency.items() for i, s in enumerate(values)
    ]  # fmt: skip


def test_the_summary_pairs_each_request_with_its_ordinary_run(bench: types.ModuleType) -> None:
    rows = _rows({"ordinary": [1.0, 2.0, 4.0], "embeddings": [2.0, 4.0, 8.0],
                  "ids": [1.0, 2.2, 4.0]})  # fmt: skip
    s = bench.summarise(rows, hidden_size=256)
    assert s["median_latency_s"] == {"ordinary": 2.0, "embeddings": 4.0, "ids": 2.2}
    assert s["latency_ratio_to_ordinary"]["embeddings"]["median"] == pytest.approx(2.0)
    ids = s["latency_ratio_to_ordinary"]["ids"]
    assert ids["median"] == pytest.approx(1.0) and ids["p90"] == pytest.approx(1.08)
    assert s["tokens_match"] and s["mean_prompt_tokens"] == 100
    phone = s["upload_s_by_tier"]["phone"]
    assert phone["embeddings"] == pytest.approx(256 * phone["ids"])
    assert not bench.summarise(_rows({"ordinary": [1.0], "ids": [1.0]}, match=False), 256)[
        "tokens_match"
    ]


def test_a_partial_round_still_summarises(bench: types.ModuleType) -> None:
    s = bench.summarise(_rows({"ordinary": [1.0], "ids": [1.5]}), hidden_size=64)
    assert s["latency_ratio_to_ordinary"]["embeddings"]["n"] == 0
    assert s["latency_ratio_to_ordinary"]["ids"]["median"] == pytest.approx(1.5)
    assert s["median_latency_s"]["embeddings"] is None


def test_bad_arguments_are_refused(bench: types.ModuleType) -> None:
    for argv in (
        ["--rounds", "0"],
        ["--max-prompt", "2"],
        ["--max-prompt", "2000", "--max-tokens", "100"],
    ):
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
        assert exc.value.code == 2
