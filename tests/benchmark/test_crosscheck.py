"""bench/crosscheck.py's readers of the external tools' reports, on hand-made reports."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.support import load_bench_script

crosscheck = load_bench_script("crosscheck")


def test_vllm_bench_figures_the_harness_way_failed_requests_left_out() -> None:
    doc = {
        "start_times": [10.0, 10.5, 11.0],
        "latencies": [2.0, 3.5, 1.0],
        "ttfts": [0.2, 0.4, 9.0],
        "output_lens": [64, 64, 0],
        "errors": ["", "", "timeout"],
        "output_throughput": 30.0,
    }
    figures = crosscheck.vllm_bench_figures(doc)
    # 128 tokens from the first start (10.0) to the last end (14.0).
    assert figures["output_tokens_per_s"] == pytest.approx(32.0)
    assert figures["ttft_mean_ms"] == pytest.approx(300.0)
    assert figures["ttft_p50_ms"] == pytest.approx(300.0)
    assert figures["failed"] == 1
    assert figures["reported_output_tokens_per_s"] == 30.0


def test_guidellm_figures_from_its_per_request_records() -> None:
    def req(start: float, end: float, tokens: int) -> dict:
        return {"info": {"timings": {"request_start": start, "request_end": end}},
                "output_metrics": {"text_tokens": tokens}}  # fmt: skip

    doc = {"benchmarks": [{
        "requests": {"successful": [req(0.0, 2.0, 10), req(1.0, 4.0, 30)], "errored": [{}]},
        "metrics": {"time_to_first_token_ms": {"successful": {"mean": 50.0, "median": 40.0}},
                    "output_tokens_per_second": {"successful": {"mean": 9.0}}},
    }]}  # fmt: skip
    figures = crosscheck.guidellm_figures(doc)
    assert figures["output_tokens_per_s"] == pytest.approx(10.0)
    assert (figures["ttft_mean_ms"], figures["ttft_p50_ms"], figures["failed"]) == (50.0, 40.0, 1)


def test_vllm_bench_command_matches_the_scenario() -> None:
    import argparse

    from adaptivellm.benchmark.client import Target

    args = argparse.Namespace(prompt_tokens=128, output_tokens=64, requests=64, concurrency=4)
    cmd = crosscheck.vllm_bench_command(Target("http://h:1", "m", 10), args, Path("/tmp/x"), 3)
    pairs = dict(itertools.pairwise(cmd))
    assert pairs["--random-input-len"] == "128" and pairs["--random-output-len"] == "64"
    assert pairs["--max-concurrency"] == "4" and pairs["--num-prompts"] == "64"
    assert pairs["--random-range-ratio"] == "0" and "--ignore-eos" in cmd
