"""Figures of a benchmark run, computed from per-request timings: pure functions, no I/O.

- throughput: output tokens/s and requests/s over the run (first arrival to last completion);
- TTFT, TPOT and end-to-end latency percentiles;
- weighted turnaround: turnaround / service time, where service time is the request's latency
  alone on the idle server, predicted by a calibration fit latency = a + b*prompt + c*output;
- per-tenant served tokens, and Jain's fairness index over weight-normalised service among
  the tenants backlogged through each time window (`window_fairness`);
- deltas of Prometheus counters read before and after the run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from adaptivellm.launch import metric_value
from adaptivellm.scheduler import policies
from adaptivellm.scheduler.policies import FAIRNESS_WINDOW_S
from adaptivellm.scheduler.service_fit import nonnegative_normal_solve

#: vLLM counters always read from /metrics (adaptivellm_*_total counters are found by name).
VLLM_COUNTERS = (
    "vllm:num_preemptions_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
)
#: Floor of a predicted service time, seconds: a fit may go negative for tiny requests.
MIN_SERVICE_S = 1e-3


@dataclass(frozen=True)
class RequestResult:
    """Timings of one request; all times in seconds since the run started."""

    index: int
    tenant: str
    prompt_tokens: int
    output_tokens: int
    arrival_s: float
    """When the workload says the request arrives (closed loop: when it was sent)."""
    first_token_s: float
    """When the first output token arrived (nan if none)."""
    end_s: float
    """When the response was complete (or failed)."""
    ok: bool = True
    error: str = ""
    token_times: tuple[float, ...] = field(default=(), repr=False)
    """Arrival time of each streamed output chunk (for service-over-time plots)."""

    @property
    def latency_s(self) -> float:
        """End-to-end latency (turnaround), from arrival to the last token."""
        return self.end_s - self.arrival_s

    @property
    def ttft_s(self) -> float:
        """Time to first token."""
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (nan for one-token outputs)."""
        if self.output_tokens < 2:
            return math.nan
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class CalibrationFit:
    """Solo latency model: latency = a + b * prompt_tokens + c * output_tokens (seconds)."""

    a: float
    b: float
    c: float
    r2: float
    samples: tuple[tuple[int, int, float], ...] = ()
    """(prompt tokens, output tokens, latency s) of each solo request the fit was made from."""

    def predict(self, prompt_tokens: int, output_tokens: int) -> float:
        """Predicted solo latency (never below MIN_SERVICE_S)."""
        t = self.a + self.b * prompt_tokens + self.c * output_tokens
        return max(t, MIN_SERVICE_S)


@dataclass(frozen=True)
class TenantSummary:
    """What one tenant got out of a run."""

    requests: int
    prompt_tokens: int
    output_tokens: int
    weight: float
    normalised_service: float
    """(prompt + output tokens served) / weight."""
    mean_weighted_turnaround: float


@dataclass(frozen=True)
class Summary:
    """The figures of one system over one run."""

    requests: int
    failed: int
    duration_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    mean_weighted_turnaround: float
    jain_fairness: float
    """Mean over the run's windows of Jain's index among the tenants backlogged through the
    window (1 for a window without two): see window_fairness."""
    jain_contended: float
    """The same mean over contended windows only (nan when none)."""
    jain_windows: int
    """Contended windows: at least two tenants backlogged throughout."""
    tenants: dict[str, TenantSummary] = field(default_factory=dict)

    def figures(self) -> dict[str, float]:
        """The scalar figures (everything but the per-tenant table)."""
        return {k: float(v) for k, v in asdict(self).items() if k != "tenants"}


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100, linear interpolation) of the finite values; nan if none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan
    return float(np.percentile(finite, q))


def fit_calibration(samples: Sequence[tuple[int, int, float]]) -> CalibrationFit:
    """Least-squares fit of latency = a + b*prompt + c*output to (prompt, output, latency), with
    a, b, c >= 0: a fixed overhead, a cost per prompt token and one per output token cannot be
    negative. An unconstrained fit of noisy solo latencies can give a negative intercept, which
    predicts a near-zero service time for short requests and lets a handful of them dominate
    the mean weighted turnaround (a run read stock vLLM's at 138.6 that way)."""
    if len(samples) < 3:
        raise ValueError(f"a calibration fit needs >= 3 samples, got {len(samples)}")
    x = np.array([[1.0, p, o] for p, o, _ in samples])
    y = np.array([t for _, _, t in samples])
    coef = nonnegative_normal_solve(x.T @ x, x.T @ y)
    residual = float(np.sum((y - x @ coef) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - residual / total if total > 0 else 1.0
    a, b, c = (float(v) for v in coef)
    return CalibrationFit(a, b, c, r2, tuple((int(p), int(o), float(t)) for p, o, t in samples))


@dataclass(frozen=True)
class WindowFairness:
    """Tenant fairness over the windows of a run (see window_fairness)."""

    jain: float
    """Mean over all windows, a window without two backlogged tenants counting 1.0."""
    contended_jain: float
    """Mean over the contended windows only (nan when there were none)."""
    contended_windows: int
    """Windows in which at least two tenants were backlogged throughout."""
    windows: int
    """All windows of the run."""


def window_fairness(
    results: Sequence[RequestResult],
    weights: Mapping[str, float] | None = None,
    window_s: float = FAIRNESS_WINDOW_S,
) -> WindowFairness:
    """Tenant fairness as clients see it, over windows of `window_s` seconds.

    A tenant is backlogged through a window when one of its requests arrived before the window
    and got its first token only after it: it was waiting all along, so it could have used more
    service. In a window with at least two such tenants (contended), fairness is Jain's index
    over their weight-normalised tokens received in the window (prompt tokens at the first
    token, output tokens as they stream). In any other window no tenant waited while another
    was served, which is fair (max-min fairness: a tenant that asked for less than its share got
    all it asked for): 1.0. Totals over a run cannot show fairness: once every request has
    finished, each tenant has received exactly its demand. Each window's index is the
    engine's own (scheduler.policies.backlogged_jain)."""
    weights = weights or {}
    ok = [r for r in results if r.ok]
    if not ok:
        return WindowFairness(1.0, math.nan, 0, 0)
    start, end = min(r.arrival_s for r in ok), max(r.end_s for r in ok)
    deliveries: list[tuple[float, str, float]] = []
    for r in ok:
        deliveries.append((r.first_token_s, r.tenant, float(r.prompt_tokens)))
        per_chunk = r.output_tokens / len(r.token_times) if r.token_times else 0.0
        deliveries.extend((t, r.tenant, per_chunk) for t in r.token_times)
    values = []
    windows = int((end - start) // window_s)
    for i in range(windows):
        lo, hi = start + i * window_s, start + (i + 1) * window_s
        backlogged = {r.tenant for r in ok if r.arrival_s <= lo and r.first_token_s >= hi}
        served = dict.fromkeys(backlogged, 0.0)
        for t, tenant, n in deliveries:
            if lo <= t < hi and tenant in served:
                served[tenant] += n
        # The server's Jain gauge uses the same function (None: fewer than two backlogged).
        if (jain := policies.backlogged_jain(backlogged, served, weights)) is not None:
            values.append(jain)
    overall = (sum(values) + (windows - len(values))) / windows if windows else 1.0
    return WindowFairness(overall, _mean(values), len(values), windows)


def output_timeline(results: Iterable[RequestResult], bin_s: float = 1.0) -> list[int]:
    """Output tokens delivered in each `bin_s`-second bin from time 0 (the round's start) to
    the last delivery: bin k counts the chunks that arrived in [k*bin_s, (k+1)*bin_s), each
    chunk worth its request's output tokens / its chunks. Rounded on the running sum, so the
    bins add up to the successful requests' output tokens. What a round's figures cannot show:
    when the output came (before or after the last arrival; a stall), at no cost per token."""
    if not bin_s > 0:
        raise ValueError(f"bin_s must be > 0, got {bin_s}")
    tokens: list[float] = []
    for r in results:
        if r.ok and r.token_times:
            per_chunk = r.output_tokens / len(r.token_times)
            for t in r.token_times:
                k = max(0, int(t // bin_s))
                if k >= len(tokens):
                    tokens.extend([0.0] * (k + 1 - len(tokens)))
                tokens[k] += per_chunk
    out, total, shown = [], 0.0, 0
    for x in tokens:
        total += x
        out.append(round(total) - shown)
        shown += out[-1]
    return out


def weighted_turnarounds(results: Iterable[RequestResult], fit: CalibrationFit) -> list[float]:
    """Turnaround / predicted service time of each successful request."""
    return [r.latency_s / fit.predict(r.prompt_tokens, r.output_tokens) for r in results if r.ok]


def tenant_summaries(
    results: Sequence[RequestResult],
    fit: CalibrationFit,
    weights: Mapping[str, float] | None = None,
) -> dict[str, TenantSummary]:
    """Per-tenant served tokens and turnaround (successful requests; weights default 1)."""
    weights = weights or {}
    out = {}
    for tenant in sorted({r.tenant for r in results}):
        mine = [r for r in results if r.tenant == tenant and r.ok]
        w = weights.get(tenant, 1.0)
        prompt = sum(r.prompt_tokens for r in mine)
        output = sum(r.output_tokens for r in mine)
        wt = weighted_turnarounds(mine, fit)
        out[tenant] = TenantSummary(len(mine), prompt, output, w, (prompt + output) / w, _mean(wt))
    return out


def summarise(
    results: Sequence[RequestResult],
    fit: CalibrationFit,
    weights: Mapping[str, float] | None = None,
    window_s: float = FAIRNESS_WINDOW_S,
) -> Summary:
    """The figures of one run (`window_s`: the windows of the fairness figure)."""
    ok = [r for r in results if r.ok]
    start = min((r.arrival_s for r in results), default=0.0)
    duration = max((r.end_s for r in results), default=0.0) - start
    tokens = sum(r.output_tokens for r in ok)
    tenants = tenant_summaries(results, fit, weights)
    fairness = window_fairness(results, weights, window_s)
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    return Summary(
        requests=len(results),
        failed=len(results) - len(ok),
        duration_s=duration,
        output_tokens=tokens,
        output_tokens_per_s=rate(tokens),
        requests_per_s=rate(len(ok)),
        ttft_p50_s=percentile((r.ttft_s for r in ok), 50),
        ttft_p99_s=percentile((r.ttft_s for r in ok), 99),
        tpot_p50_s=percentile((r.tpot_s for r in ok), 50),
        tpot_p99_s=percentile((r.tpot_s for r in ok), 99),
        e2e_p50_s=percentile((r.latency_s for r in ok), 50),
        e2e_p99_s=percentile((r.latency_s for r in ok), 99),
        mean_weighted_turnaround=_mean(weighted_turnarounds(ok, fit)),
        jain_fairness=fairness.jain,
        jain_contended=fairness.contended_jain,
        jain_windows=fairness.contended_windows,
        tenants=tenants,
    )


def ratios(figures: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """figure / reference figure, for every figure whose reference is finite and non-zero."""
    return {
        k: v / reference[k]
        for k, v in figures.items()
        if k in reference and math.isfinite(reference[k]) and reference[k] != 0
    }


def counter_names(exposition: str) -> list[str]:
    """vLLM's counters of interest plus every adaptivellm_*_total counter in an exposition."""
    found = set()
    for line in exposition.splitlines():
        if line.startswith("adaptivellm_"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name.endswith("_total"):
                found.add(name)
    return [*VLLM_COUNTERS, *sorted(found)]


def counter_deltas(before: str, after: str) -> dict[str, float]:
    """after - before for each counter present after the run (absent before: 0)."""
    out = {}
    for name in counter_names(after):
        end = metric_value(after, name)
        if end is not None:
            out[name] = end - (metric_value(before, name) or 0.0)
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
