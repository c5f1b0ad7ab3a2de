"""Seeded, reproducible benchmark workloads: pure functions from a spec to a list of requests.

A workload is a list of `BenchRequest`s (arrival offset, prompt length, output length, tenant,
priority). Prompts are token-id lists drawn from the model's vocabulary (`prompt_token_ids`), sent
to `/v1/completions` as `prompt=[ids]`, so their length in tokens is exact on every tokenizer.

Lengths are shaped like ShareGPT: pairs sampled from `data/sharegpt_lengths.json` (package data)
(first-turn prompt / first-reply lengths of real ShareGPT conversations; provenance in that file),
scaled by `length_scale` and clipped to the context limit.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

#: Length pairs extracted from ShareGPT (see bench/workloads/extract_sharegpt_lengths.py).
SHAREGPT_LENGTHS = Path(__file__).resolve().parent / "data" / "sharegpt_lengths.json"
#: Token ids below this are left out of prompts: the embedded tokenizer's special tokens
#: (<s>, </s>, <pad>, chat markers) sit at the bottom of the vocabulary.
FIRST_PROMPT_ID = 16
ARRIVALS = ("poisson", "gamma", "closed")


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload."""

    index: int
    """Position in the workload (also seeds the prompt's token ids)."""
    arrival_s: float
    """Send time, seconds after the run starts (0 for every request of a closed loop)."""
    prompt_tokens: int
    """Prompt length in tokens."""
    max_tokens: int
    """Output length in tokens (sent with ignore_eos, so exactly this many are generated)."""
    tenant: str = "tenant-0"
    """Sent as the OpenAI `user` field."""
    priority: int = 0
    """vLLM request priority (sent only when non-zero: stock vLLM rejects it under FCFS)."""


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that determines a workload; equal specs give equal workloads."""

    num_requests: int = 100
    """Requests in the workload."""
    arrival: str = "poisson"
    """'poisson' (exponential gaps), 'gamma' (bursty, gaps with coefficient of variation `cv`)
    or 'closed' (closed loop: `concurrency` clients, each sending its next request when the
    previous one finishes)."""
    rate: float = 2.0
    """Mean arrival rate, requests per second (open loop)."""
    cv: float = 3.0
    """Coefficient of variation of the gaps under 'gamma' (1 = Poisson, larger = burstier)."""
    concurrency: int = 8
    """Clients of the closed loop (unused by an open loop, which never caps what is in
    flight)."""
    length_scale: float = 1.0
    """Factor applied to ShareGPT prompt and output lengths (small machines: < 1)."""
    fixed_prompt_tokens: int = 0
    """If > 0, every prompt has this length instead of a ShareGPT one."""
    fixed_output_tokens: int = 0
    """If > 0, every output has this length instead of a ShareGPT one."""
    max_model_len: int = 2048
    """Context limit of the server: prompt + output is clipped to fit."""
    max_output_tokens: int = 512
    """Longest output."""
    long_fraction: float = 0.0
    """Share of requests given a long prompt (long-context mix)."""
    long_prompt_range: tuple[float, float] = (0.5, 0.9)
    """Long prompt length as a fraction of max_model_len, drawn uniformly from this range."""
    tenants: int = 1
    """Number of tenants."""
    heavy_share: float = 0.0
    """Share of requests from tenant-0 (the heavy tenant); the rest split evenly among the
    others. 0: every tenant sends the same share."""
    seed: int = 0
    """Seed of every random choice."""

    def __post_init__(self) -> None:
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        if self.num_requests < 1 or self.tenants < 1:
            raise ValueError("num_requests and tenants must be >= 1")
        if self.arrival != "closed" and not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.arrival == "closed" and self.concurrency < 1:
            raise ValueError("a closed loop needs concurrency >= 1")
        if not self.cv > 0 or not self.length_scale > 0:
            raise ValueError("cv and length_scale must be > 0")
        if not 0.0 <= self.long_fraction <= 1.0 or not 0.0 <= self.heavy_share < 1.0:
            raise ValueError("long_fraction must be in [0, 1] and heavy_share in [0, 1)")
        if self.max_model_len < 16 or self.max_output_tokens < 1:
            raise ValueError("max_model_len must be >= 16 and max_output_tokens >= 1")

    def replace(self, **changes: object) -> WorkloadSpec:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Scenario:
    """A named benchmark: a workload, its --quick variant, and vLLM flags for every server."""

    name: str
    description: str
    workload: WorkloadSpec
    quick: WorkloadSpec
    server_flags: tuple[str, ...] = field(default_factory=tuple)


def poisson_gaps(n: int, rate: float, rng: random.Random) -> list[float]:
    """n exponential inter-arrival gaps of mean 1/rate."""
    return [rng.expovariate(rate) for _ in range(n)]


def gamma_gaps(n: int, rate: float, cv: float, rng: random.Random) -> list[float]:
    """n gamma inter-arrival gaps of mean 1/rate and coefficient of variation cv.

    Gamma(shape k, scale θ) has mean kθ and CV 1/sqrt(k): k = 1/cv², θ = 1/(rate k).
    """
    shape = 1.0 / (cv * cv)
    return [rng.gammavariate(shape, 1.0 / (rate * shape)) for _ in range(n)]


def arrival_times(spec: WorkloadSpec, rng: random.Random) -> list[float]:
    """Send offsets of the workload's requests; the first request goes at 0."""
    n = spec.num_requests
    if spec.arrival == "closed":
        return [0.0] * n
    gaps = (
        poisson_gaps(n, spec.rate, rng)
        if spec.arrival == "poisson"
        else (gamma_gaps(n, spec.rate, spec.cv, rng))
    )
    times, t = [], 0.0
    for gap in [0.0, *gaps[1:]]:
        t += gap
        times.append(t)
    return times


@cache
def sharegpt_pairs(path: Path = SHAREGPT_LENGTHS) -> tuple[tuple[int, int], ...]:
    """(prompt tokens, output tokens) pairs from ShareGPT."""
    doc = json.loads(path.read_text())
    return tuple((int(p), int(o)) for p, o in doc["pairs"])


def request_lengths(spec: WorkloadSpec, rng: random.Random) -> list[tuple[int, int]]:
    """(prompt, output) lengths of each request, clipped so that each fits the context."""
    pairs = sharegpt_pairs()
    out = []
    for _ in range(spec.num_requests):
        prompt, output = rng.choice(pairs)
        prompt = spec.fixed_prompt_tokens or max(4, round(prompt * spec.length_scale))
        output = spec.fixed_output_tokens or max(4, round(output * spec.length_scale))
        if rng.random() < spec.long_fraction:
            lo, hi = spec.long_prompt_range
            prompt = round(rng.uniform(lo, hi) * spec.max_model_len)
        output = min(output, spec.max_output_tokens, spec.max_model_len // 2)
        out.append((max(1, min(prompt, spec.max_model_len - output)), output))
    return out


def tenant_names(spec: WorkloadSpec) -> list[str]:
    """tenant-0 ... tenant-(n-1)."""
    return [f"tenant-{i}" for i in range(spec.tenants)]


def tenant_shares(spec: WorkloadSpec) -> list[float]:
    """Expected share of requests per tenant (tenant-0 is the heavy one when heavy_share > 0)."""
    n = spec.tenants
    if n == 1:
        return [1.0]
    if spec.heavy_share <= 0:
        return [1.0 / n] * n
    light = (1.0 - spec.heavy_share) / (n - 1)
    return [spec.heavy_share, *([light] * (n - 1))]


def build_workload(spec: WorkloadSpec) -> list[BenchRequest]:
    """The workload of `spec`: the same spec always gives the same requests."""
    # Separate streams per aspect: changing the tenant mix must not change the arrival times.
    arrivals = arrival_times(spec, random.Random(f"{spec.seed}:arrivals"))
    lengths = request_lengths(spec, random.Random(f"{spec.seed}:lengths"))
    tenants = random.Random(f"{spec.seed}:tenants").choices(
        tenant_names(spec), weights=tenant_shares(spec), k=spec.num_requests
    )
    return [
        BenchRequest(i, t, p, o, tenant)
        for i, (t, (p, o), tenant) in enumerate(zip(arrivals, lengths, tenants, strict=True))
    ]


def prompt_token_ids(request: BenchRequest, vocab_size: int, seed: int = 0) -> list[int]:
    """The prompt of `request` as token ids: random, so that no two prompts share a prefix
    (vLLM's prefix cache would otherwise serve part of them for free)."""
    rng = random.Random(f"{seed}:prompt:{request.index}:{request.prompt_tokens}")
    return [rng.randrange(FIRST_PROMPT_ID, vocab_size) for _ in range(request.prompt_tokens)]


def workload_stats(requests: list[BenchRequest]) -> dict[str, float]:
    """Summary of a workload (for reports): means, offered rate (0 for a closed loop) and
    total tokens."""
    n = len(requests)
    span = max(r.arrival_s for r in requests)
    return {
        "requests": n,
        "mean_prompt_tokens": sum(r.prompt_tokens for r in requests) / n,
        "mean_output_tokens": sum(r.max_tokens for r in requests) / n,
        "total_output_tokens": sum(r.max_tokens for r in requests),
        "arrival_span_s": span,
        "offered_rate": (n - 1) / span if span > 0 else 0.0,
    }
