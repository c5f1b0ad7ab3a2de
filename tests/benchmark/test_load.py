"""The harness's --load: the offered rate as a multiple of a capacity measured on this machine
(saturated_rate on hand-made completion times, the flag checks, and a real probe of stock
vLLM)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import pytest

from adaptivellm.benchmark.cli import add_bench_arguments, check_load_arguments, workload_for
from adaptivellm.benchmark.harness import (
    BenchConfig,
    SystemConfig,
    measure_capacity,
    saturated_rate,
)
from adaptivellm.benchmark.scenarios import SCENARIOS
from adaptivellm.benchmark.workloads import WorkloadSpec, build_workload
from adaptivellm.model import DEFAULT_MODEL_NAME, ModelSpec, ensure_model


def test_saturated_rate_counts_completions_while_every_client_is_busy() -> None:
    # 10 requests, 2 clients: all busy until the 8th completion, at 4 s; the drain after it
    # (9th and 10th at 9 and 20 s) does not count.
    ends = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 9.0, 20.0]
    assert saturated_rate(ends, 2) == pytest.approx(8 / 4.0)
    assert saturated_rate(list(reversed(ends)), 2) == pytest.approx(2.0)  # order does not matter
    # 1 client: the 9th completion (9 s) is the last one sent while it was busy.
    assert saturated_rate(ends, 1) == pytest.approx(9 / 9.0)


@pytest.mark.parametrize(
    ("ends", "clients"),
    [([1.0, 2.0], 2), ([1.0, 2.0], 3), ([1.0, 2.0, 3.0], 0), ([0.0, 0.0, 0.0], 1)],
)
def test_saturated_rate_rejects_what_it_cannot_measure(ends: list[float], clients: int) -> None:
    with pytest.raises(ValueError):
        saturated_rate(ends, clients)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--load", "1.1", "--rate", "2"), "--load and --rate"),
        (("--load", "1.1", "--arrival", "closed"), "closed loop"),
        (("--load", "0"), "positive"),
        (("--load", "-1"), "positive"),
        (("--load", "nan"), "positive"),
        (("--load", "1.1", "--capacity-clients", "0"), "--capacity-clients"),
        (("--load", "1.1", "--num-requests", "16"), "--capacity-clients"),  # 16 clients
    ],
)
def test_bad_load_arguments_are_refused(argv: tuple[str, ...], message: str) -> None:
    args = parse("--scenario", "multi-tenant", *argv)
    with pytest.raises(SystemExit, match=message):
        check_load_arguments(args, workload_for(SCENARIOS["multi-tenant"], args))


def test_good_load_arguments_pass() -> None:
    for argv in ((), ("--load", "1.1"), ("--load", "0.5", "--capacity-clients", "4")):
        args = parse("--scenario", "multi-tenant", *argv)
        check_load_arguments(args, workload_for(SCENARIOS["multi-tenant"], args))


def test_load_keeps_the_requests_and_scales_the_gaps() -> None:
    """What _set_load relies on: the same seed at another rate gives the same requests, their
    arrival times scaled by the ratio of the rates."""
    spec = WorkloadSpec(num_requests=30, rate=2.0, tenants=3)
    slow, fast = build_workload(spec), build_workload(dataclasses.replace(spec, rate=6.0))
    for a, b in zip(slow, fast, strict=True):
        assert (a.prompt_tokens, a.max_tokens, a.tenant) == (
            b.prompt_tokens,
            b.max_tokens,
            b.tenant,
        )
        assert b.arrival_s == pytest.approx(a.arrival_s / 3.0)


def test_capacity_of_real_stock_vllm(tmp_path: Path) -> None:
    """The probe starts stock vLLM on the tiny model, saturates it with a closed loop and
    finds a finite capacity that the completion times bear out."""
    spec = WorkloadSpec(num_requests=24, rate=1.0, length_scale=0.05, max_model_len=512,
                        max_output_tokens=16)  # fmt: skip
    requests = build_workload(spec)
    system = SystemConfig("stock", "stock")
    config = BenchConfig(
        (system,), spec, str(ensure_model()), DEFAULT_MODEL_NAME, ModelSpec().vocab_size,
        ("--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
         "--max-num-seqs", "2", "--kv-cache-memory-bytes", str(64 << 20)),
        tmp_path,
    )  # fmt: skip
    stages: list[str] = []
    seen: list[object] = []
    probe = measure_capacity(config, system, requests, 4, stages.append, seen.append)
    assert (probe.system, probe.clients, probe.requests) == ("stock", 4, 24)
    assert len(seen) == 24
    assert math.isfinite(probe.capacity_req_s) and probe.capacity_req_s > 0
    # 20 requests completed while all 4 clients were busy, within the whole replay.
    assert probe.capacity_req_s >= 20 / probe.duration_s
    assert any("4 clients" in s for s in stages)
    assert (tmp_path / "stock-capacity.log").stat().st_size > 0
