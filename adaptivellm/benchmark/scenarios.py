"""The named benchmark scenarios: workload, --quick workload and vLLM flags for every server.

Sizes suit the embedded tiny model on a 2-core CPU machine (about 600 output tokens/s at batch
8): full runs take a few minutes per system, --quick runs well under one.
"""

from __future__ import annotations

from pathlib import Path

from adaptivellm.benchmark.workloads import Scenario, WorkloadSpec
from adaptivellm.model import ModelSpec, ensure_model

MiB = 1 << 20

#: A larger random-weight Llama (8 layers, hidden 1024, about 130M parameters) for benchmarks
#: whose figures need the engine to be the bottleneck. With the embedded 6-layer model on a
#: 2-core machine the HTTP front end and the load generator are (measured at 6 requests/s: mean
#: queue time in the engine 0.29 s, mean TTFT at the client 2.1 s), as they never are on a
#: production GPU server.
BENCH_MODEL = ModelSpec(
    num_layers=8, hidden_size=1024, num_heads=16, num_kv_heads=4, intermediate_size=4096
)
BENCH_MODEL_NAME = "adaptivellm-bench-llama"
#: The fairness benchmark's mixes (bench/fairness.py, fairness_pool.py, fairness_sim.py):
#: fairness.json's keys -> the scenarios below.
FAIRNESS_SCENARIOS = {"multi_tenant": "multi-tenant", "mixed_length": "sharegpt"}
#: The fairness benchmark's systems (bench/fairness.py runs them; bench/fairness_pool.py pools
#: their runs): report key -> (harness system name, extra serve flags), in the harness's turn
#: order, the two stock FCFS servers at its ends. adaptive_hrrn (plain HRRN) is in earlier runs'
#: reports only; bench/fairness.py no longer runs it.
FAIRNESS_SYSTEMS: dict[str, tuple[str, str]] = {
    "fcfs": ("stock", ""),
    "priority": ("stock-priority", "--scheduling-policy priority"),
    "vtc": ("adaptivellm-vtc", "--fairness vtc"),
    "adaptive": ("adaptivellm", "--fairness weighted-turnaround"),
    "adaptive_hrrn": (
        "adaptivellm-hrrn",
        "--fairness weighted-turnaround --service-time-exponent 1",
    ),
    "adaptive_e3c3": (
        "adaptivellm-e3c3",
        "--fairness weighted-turnaround --service-time-exponent 3 "
        "--fairness-preemption-candidates 3",
    ),
    "fcfs_b": ("stock-b", ""),
}


def bench_model() -> Path:
    """Folder of BENCH_MODEL, built into the model cache on first use (about 10 s, 0.5 GB)."""
    return ensure_model(BENCH_MODEL, BENCH_MODEL_NAME)


_SHAREGPT = WorkloadSpec(
    num_requests=150, arrival="poisson", rate=3.0, length_scale=0.5, max_output_tokens=256
)
_SHAREGPT_QUICK = _SHAREGPT.replace(num_requests=40, length_scale=0.25)


_LONG_DECODE = WorkloadSpec(
    num_requests=48,
    arrival="closed",
    concurrency=16,
    max_model_len=2048,
    long_fraction=1.0,
    long_prompt_range=(0.1, 0.25),
    fixed_output_tokens=1024,
    max_output_tokens=1024,
)


#: Long prompts that still grow: a victim holds a long context, so recomputing it is costly.
_LONG_PROMPT_PRESSURE = _LONG_DECODE.replace(num_requests=32, long_prompt_range=(0.35, 0.5))


def _flags(max_model_len: int, kv_bytes: int, *extra: str) -> tuple[str, ...]:
    return ("--max-model-len", str(max_model_len), "--kv-cache-memory-bytes", str(kv_bytes), *extra)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "sharegpt",
            "Poisson arrivals, ShareGPT-shaped lengths, ample KV cache",
            _SHAREGPT,
            _SHAREGPT_QUICK,
            _flags(2048, 512 * MiB),
        ),
        Scenario(
            "bursty",
            "gamma arrivals (CV 3), ShareGPT-shaped lengths, ample KV cache",
            _SHAREGPT.replace(arrival="gamma", cv=3.0),
            _SHAREGPT_QUICK.replace(arrival="gamma", cv=3.0),
            _flags(2048, 512 * MiB),
        ),
        Scenario(
            "long-context",
            "20% of prompts take 50-90% of a 4096-token context, the rest ShareGPT-shaped",
            _SHAREGPT.replace(num_requests=80, rate=1.0, max_model_len=4096, long_fraction=0.2),
            _SHAREGPT_QUICK.replace(
                num_requests=24, rate=1.0, max_model_len=4096, long_fraction=0.2
            ),
            _flags(4096, 512 * MiB),
        ),
        Scenario(
            "multi-tenant",
            "one heavy tenant (60% of requests) and four light ones, Poisson arrivals",
            _SHAREGPT.replace(tenants=5, heavy_share=0.6),
            _SHAREGPT_QUICK.replace(tenants=5, heavy_share=0.6),
            _flags(2048, 512 * MiB),
        ),
        Scenario(
            "kv-pressure",
            "closed loop of 24 clients over a KV cache of ~2000 tokens: preemption happens",
            _SHAREGPT.replace(
                num_requests=120, arrival="closed", concurrency=24, max_model_len=1024
            ),
            _SHAREGPT_QUICK.replace(
                num_requests=48,
                arrival="closed",
                concurrency=24,
                max_model_len=1024,
                length_scale=0.5,
            ),
            # 12 MiB holds ~2000 tokens of the tiny model (6 layers x 2 x 2 KV heads x 64 x 4 B
            # = 6 KiB per token): more than one max-length request, far less than 24 in flight.
            _flags(1024, 12 * MiB, "--max-num-seqs", "64"),
        ),
        Scenario(
            "long-decode",
            "closed loop of 16 clients, prompts 10-25% of a 2048-token context and "
            "1024-token outputs, over a KV cache of ~5000 tokens: admitted requests outgrow "
            "the cache while they decode, so running requests are preempted with long contexts",
            _LONG_DECODE,
            _LONG_DECODE.replace(num_requests=16),
            # 30 MiB holds ~5100 tokens of the tiny model (6 KiB per token): about 4 of the 16
            # requests at full length.
            _flags(2048, 30 * MiB, "--max-num-seqs", "16"),
        ),
        Scenario(
            "long-prompt-pressure",
            "closed loop of 16 clients, prompts 35-50% of a 2048-token context and 1024-token "
            "outputs, over a KV cache of ~8000 tokens: the prompts fill the cache, their "
            "decodes overflow it, and every victim holds a long context (700-1000 tokens)",
            _LONG_PROMPT_PRESSURE,
            _LONG_PROMPT_PRESSURE.replace(num_requests=16),
            # 48 MiB holds 8192 tokens of the tiny model: 4 requests at full length.
            _flags(2048, 48 * MiB, "--max-num-seqs", "16"),
        ),
    )
}
