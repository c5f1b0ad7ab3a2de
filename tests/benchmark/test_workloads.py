"""Workload generators: seeded reproducibility, rates and means, tenant mix, length limits."""

from __future__ import annotations

import statistics

import pytest

from adaptivellm.benchmark.scenarios import SCENARIOS
from adaptivellm.benchmark.workloads import (
    FIRST_PROMPT_ID,
    WorkloadSpec,
    build_workload,
    gamma_gaps,
    poisson_gaps,
    prompt_token_ids,
    sharegpt_pairs,
    tenant_shares,
)


def test_same_spec_same_workload_other_seed_other_workload() -> None:
    spec = WorkloadSpec(num_requests=50, tenants=3)
    assert build_workload(spec) == build_workload(spec)
    assert build_workload(spec) != build_workload(spec.replace(seed=1))


def test_tenant_mix_does_not_move_arrivals() -> None:
    """Each aspect has its own random stream: changing tenants keeps arrivals and lengths."""
    a = build_workload(WorkloadSpec(num_requests=30))
    b = build_workload(WorkloadSpec(num_requests=30, tenants=4, heavy_share=0.5))
    assert [(r.arrival_s, r.prompt_tokens, r.max_tokens) for r in a] == [
        (r.arrival_s, r.prompt_tokens, r.max_tokens) for r in b
    ]


def test_poisson_rate_within_tolerance() -> None:
    """Mean gap 1/rate; for n = 20000 exponential gaps the standard error is 0.7%."""
    import random

    gaps = poisson_gaps(20000, 4.0, random.Random(0))
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_gaps_mean_and_cv(cv: float) -> None:
    import random

    gaps = gamma_gaps(40000, 2.0, cv, random.Random(1))
    assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.06)
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, rel=0.1)


def test_workload_arrivals_start_at_zero_and_increase() -> None:
    reqs = build_workload(WorkloadSpec(num_requests=500, rate=5.0))
    times = [r.arrival_s for r in reqs]
    assert times[0] == 0.0 and times == sorted(times)
    assert (len(times) - 1) / times[-1] == pytest.approx(5.0, rel=0.15)


def test_closed_loop_has_no_arrival_offsets() -> None:
    reqs = build_workload(WorkloadSpec(num_requests=10, arrival="closed", concurrency=2))
    assert {r.arrival_s for r in reqs} == {0.0}


def test_tenant_proportions() -> None:
    spec = WorkloadSpec(num_requests=5000, tenants=5, heavy_share=0.6)
    assert tenant_shares(spec) == pytest.approx([0.6, 0.1, 0.1, 0.1, 0.1])
    reqs = build_workload(spec)
    share = sum(r.tenant == "tenant-0" for r in reqs) / len(reqs)
    assert share == pytest.approx(0.6, abs=0.03)
    for t in range(1, 5):
        assert sum(r.tenant == f"tenant-{t}" for r in reqs) / len(reqs) == pytest.approx(
            0.1, abs=0.02
        )


def test_even_tenants_when_no_heavy_share() -> None:
    assert tenant_shares(WorkloadSpec(tenants=4)) == [0.25] * 4


def test_lengths_follow_sharegpt_and_fit_the_context() -> None:
    pairs = sharegpt_pairs()
    spec = WorkloadSpec(num_requests=3000, max_model_len=1024, max_output_tokens=300)
    reqs = build_workload(spec)
    assert all(r.prompt_tokens + r.max_tokens <= 1024 for r in reqs)
    assert all(1 <= r.max_tokens <= 300 for r in reqs)
    # The median output is far below the cap, so it is ShareGPT's median, not the clip.
    median_out = statistics.median(o for _, o in pairs)
    assert statistics.median(r.max_tokens for r in reqs) == pytest.approx(median_out, rel=0.1)


def test_length_scale_and_fixed_lengths() -> None:
    base = build_workload(WorkloadSpec(num_requests=200, max_output_tokens=10_000,
                                       max_model_len=1 << 20))  # fmt: skip
    half = build_workload(WorkloadSpec(num_requests=200, max_output_tokens=10_000,
                                       max_model_len=1 << 20, length_scale=0.5))  # fmt: skip
    ratio = sum(r.max_tokens for r in half) / sum(r.max_tokens for r in base)
    assert ratio == pytest.approx(0.5, rel=0.05)
    fixed = build_workload(WorkloadSpec(num_requests=5, fixed_prompt_tokens=7,
                                        fixed_output_tokens=9))  # fmt: skip
    assert {(r.prompt_tokens, r.max_tokens) for r in fixed} == {(7, 9)}


def test_long_context_fraction() -> None:
    spec = WorkloadSpec(num_requests=2000, max_model_len=4096, long_fraction=0.2, length_scale=0.1)
    long = [r for r in build_workload(spec) if r.prompt_tokens >= 0.5 * 4096 - 512]
    assert len(long) / 2000 == pytest.approx(0.2, abs=0.03)


def test_prompt_token_ids_exact_length_distinct_and_in_vocab() -> None:
    reqs = build_workload(WorkloadSpec(num_requests=20))
    prompts = [prompt_token_ids(r, 4096) for r in reqs]
    assert [len(p) for p in prompts] == [r.prompt_tokens for r in reqs]
    assert all(FIRST_PROMPT_ID <= i < 4096 for p in prompts for i in p)
    assert len({tuple(p[:8]) for p in prompts}) == len(prompts)
    assert prompt_token_ids(reqs[0], 4096, seed=1) != prompts[0]


@pytest.mark.parametrize(
    "bad",
    [
        {"arrival": "uniform"},
        {"rate": 0.0},
        {"num_requests": 0},
        {"heavy_share": 1.0},
        {"arrival": "closed", "concurrency": 0},
    ],
)
def test_spec_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        WorkloadSpec(**bad)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenarios_fit_their_servers(name: str) -> None:
    """Each scenario's workloads fit the --max-model-len its servers get."""
    s = SCENARIOS[name]
    limit = int(s.server_flags[s.server_flags.index("--max-model-len") + 1])
    for spec in (s.workload, s.quick):
        assert spec.max_model_len == limit
        assert all(r.prompt_tokens + r.max_tokens <= limit for r in build_workload(spec))
    assert s.quick.num_requests < s.workload.num_requests
