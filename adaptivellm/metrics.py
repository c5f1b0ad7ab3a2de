"""AdaptiveLLM's Prometheus metrics (prefix `adaptivellm_`, beside vLLM's `vllm:`).

The scheduler, and later the KV connector, run in vLLM's engine-core process, while `/metrics`
is served by the API server process. AdaptiveLLM therefore serves in prometheus_client's
multi-process mode, vLLM's own mechanism for several API servers: every process writes its
samples to files in `PROMETHEUS_MULTIPROC_DIR`, and `/metrics` (vLLM's handler, through
`get_prometheus_registry`) aggregates them. prometheus_client picks its storage when first
imported, so `use_multiprocess_dir` must run before anything imports vLLM or prometheus_client.

Metric objects are created on first use (`EngineMetrics.get()`), in the process that records them.

Only the engine side needs the files. With one API server and a directory AdaptiveLLM made,
`serve_api_metrics_in_process` keeps the API server's own metrics (vLLM's per-token histograms,
the HTTP instrumentator, `adaptivellm_info`, split-session metrics) in memory, as stock vLLM
does, and `/metrics` adds the engine side's files to them at scrape time: a multi-process
sample is an mmap write under a lock, and vLLM observes several per token (issue #35). Engine
and worker processes switch (back) to file-backed values in `_engine_side`, before they create
a metric.
"""

from __future__ import annotations

import atexit
import bisect
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.metrics_core import Metric

PREFIX = "adaptivellm_"


def use_multiprocess_dir() -> str:
    """Point prometheus_client at a fresh multi-process directory (kept if the operator set one).

    Returns the directory. Must run before prometheus_client is imported in this process.
    """
    if existing := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return existing
    if "prometheus_client" in sys.modules:
        raise RuntimeError(
            "adaptivellm.metrics.use_multiprocess_dir() ran after prometheus_client was imported"
        )
    path = tempfile.mkdtemp(prefix="adaptivellm-prom-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    owner = os.getpid()

    def remove() -> None:
        # Only the process that made the directory removes it (forked children inherit atexit).
        if os.getpid() == owner:
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)
    return path


ENGINE_DIR_ENV = "ADAPTIVELLM_PROMETHEUS_DIR"
"""Where the engine side writes its multi-process files when the API server keeps its own
metrics in memory (serve_api_metrics_in_process)."""
_API_PID: int | None = None
"""The API server process whose metrics are in memory (None: every process writes files)."""


def serve_api_metrics_in_process() -> None:
    """In this (API server) process, keep metrics in memory, and have vLLM's `/metrics`
    expose them together with the multi-process files of the engine side. Must run before the
    API server creates its first metric, with PROMETHEUS_MULTIPROC_DIR set.

    The directory moves to ADAPTIVELLM_PROMETHEUS_DIR (children inherit it; `_engine_side`
    restores PROMETHEUS_MULTIPROC_DIR there): vLLM and its HTTP instrumentator switch to
    multi-process mode whenever they see PROMETHEUS_MULTIPROC_DIR."""
    global _API_PID
    from prometheus_client import values

    path = os.environ.pop("PROMETHEUS_MULTIPROC_DIR")
    os.environ[ENGINE_DIR_ENV] = path
    values.ValueClass = values.MutexValue
    _API_PID = os.getpid()
    import vllm.entrypoints.serve.instrumentator.metrics as vllm_metrics

    vllm_metrics.get_prometheus_registry = lambda: api_registry(path)  # type: ignore[attr-defined]


def api_registry(path: str) -> CollectorRegistry:
    """The API server's registry: the engine side's multi-process files in `path`, then this
    process's in-memory metrics (the default registry)."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    registry.register(_InProcess(REGISTRY))  # type: ignore[arg-type]
    return registry


class _InProcess:
    """A collector that yields another registry's metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()


def _engine_side() -> None:
    """Metrics of the engine core and workers go to the multi-process files, also in a process
    started by an API server that keeps its own in memory."""
    if os.getpid() == _API_PID or not (path := os.environ.get(ENGINE_DIR_ENV)):
        return
    from prometheus_client import values

    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", path)
    if values.ValueClass is values.MutexValue:
        values.ValueClass = values.MultiProcessValue()


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """Observe each of `values` in `histogram` (a histogram without labels, or one child) as
    `observe` would, with one write for the sum and one per bucket that moved: in the engine
    core each write is a write to a multi-process file. Uses prometheus_client's `_sum`,
    `_buckets` and `_upper_bounds` (unchanged since 0.4; buckets are kept non-cumulative), and
    observes one by one where a version lacks them."""
    if not values:
        return
    total = getattr(histogram, "_sum", None)
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    if total is None or buckets is None or bounds is None or len(buckets) != len(bounds):
        for value in values:
            histogram.observe(value)
        return
    counts: dict[int, int] = {}
    for value in values:  # observe() counts a value in the first bucket whose bound holds it
        if value != value:  # NaN: in the sum, in no bucket (as observe())
            continue
        i = bisect.bisect_left(bounds, value)  # < len(bounds): the last bound is +Inf
        counts[i] = counts.get(i, 0) + 1
    total.inc(sum(values))
    for i, n in counts.items():
        buckets[i].inc(n)


def publish_info(**labels: str) -> None:
    """Set `adaptivellm_info{...} 1`: versions and configuration, for dashboards and alerts."""
    from prometheus_client import Gauge

    names = sorted(labels)
    gauge = Gauge(
        f"{PREFIX}info",
        "AdaptiveLLM build and configuration (value is always 1)",
        labelnames=names,
        multiprocess_mode="max",
    )
    gauge.labels(*(labels[n] for n in names)).set(1)


@cache
def internal_errors() -> Counter:
    """`adaptivellm_internal_errors_total{where}`: errors of AdaptiveLLM's own code that were
    contained (adaptivellm.scheduler.fail_safe) instead of failing the engine or the request.
    One counter for every process (engine core, workers, API server)."""
    from prometheus_client import Counter

    _engine_side()
    return Counter(
        f"{PREFIX}internal_errors",
        "Errors in AdaptiveLLM's own code that were contained (the engine kept serving with "
        "vLLM's own behaviour for that step, or the one request concerned was failed), by where",
        labelnames=["where"],
    )


@dataclass(frozen=True)
class EngineMetrics:
    """Metrics recorded in the engine-core process."""

    scheduler_steps: Counter
    step_tokens: Histogram
    preemptions: Counter
    turnaround_preemptions: Counter
    queue_wait: Histogram
    weighted_turnaround: Histogram
    output_length_error: Histogram
    tenant_tokens: Counter
    jain: Gauge
    swap_fallbacks: Counter
    swap_space_bytes: Gauge
    swap_seconds: Histogram
    swap_blocks: Counter
    predicted_cost: Histogram
    service_model: Gauge
    max_queue_wait: Gauge

    @staticmethod
    @cache
    def get() -> EngineMetrics:
        """The process's metrics, created on first use."""
        _engine_side()
        return EngineMetrics(**_step_metrics(), **_tenant_metrics(), **_preemption_metrics())


def _step_metrics() -> dict[str, Any]:
    """Steps, queue waits and turnaround."""
    from prometheus_client import Counter, Histogram

    return dict(
        scheduler_steps=Counter(
            f"{PREFIX}scheduler_steps",
            "Engine steps that scheduled at least one token (counted in the engine core)",
        ),
        step_tokens=Histogram(
            f"{PREFIX}step_tokens",
            "Tokens scheduled in an engine step (prompt chunks and decodes; --max-step-s "
            "caps it under weighted-turnaround)",
            buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
        ),
        queue_wait=Histogram(
            f"{PREFIX}queue_wait_seconds",
            "Time from arrival to first scheduled step",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        ),
        weighted_turnaround=Histogram(
            f"{PREFIX}weighted_turnaround",
            "Turnaround / service time of finished requests (service time predicted by the "
            "fairness service model with the actual output length)",
            buckets=(1, 1.25, 1.5, 2, 3, 5, 10, 20, 50, 100, 1000),
        ),
        output_length_error=Histogram(
            f"{PREFIX}output_length_prediction_error",
            "|predicted - actual| / actual output tokens of finished requests",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
        ),
    )


def _tenant_metrics() -> dict[str, Any]:
    """Tenants and the service-time model."""
    from prometheus_client import Counter, Gauge

    return dict(
        tenant_tokens=Counter(
            f"{PREFIX}tenant_served_tokens",
            "Tokens computed for each tenant (prompt and output)",
            labelnames=["tenant"],
        ),
        jain=Gauge(
            f"{PREFIX}tenant_jain_index",
            "Jain's fairness index over the weight-normalised tokens served, in the last "
            "window of fairness_window_s, to the tenants backlogged all through it (1 when "
            "fewer than two were), per data-parallel rank (each rank schedules on its own)",
            labelnames=["rank"],
            multiprocess_mode="mostrecent",
        ),
        service_model=Gauge(
            f"{PREFIX}service_model_seconds_per_token",
            "The service-time model weighted-turnaround ranks requests with, by term "
            "(prefill: per prompt token; decode: per output token), learned from the "
            "engine's steps unless --no-learn-service-time, per data-parallel rank",
            labelnames=["term", "rank"],
            multiprocess_mode="mostrecent",
        ),
        max_queue_wait=Gauge(
            f"{PREFIX}max_queue_wait_seconds",
            "The starvation bound of weighted-turnaround (--max-queue-wait-s), per "
            "data-parallel rank: the starvation alert compares queue waits with it",
            labelnames=["rank"],
            multiprocess_mode="mostrecent",
        ),
    )


def _preemption_metrics() -> dict[str, Any]:
    """Preemptions, swap and the cost predictors."""
    from prometheus_client import Counter, Gauge, Histogram

    return dict(
        preemptions=Counter(
            f"{PREFIX}preemptions",
            "Requests preempted (for lack of KV cache blocks, or for a waiting request: "
            "adaptivellm_turnaround_preemptions), by how their KV cache was handled",
            labelnames=["mode"],
        ),
        turnaround_preemptions=Counter(
            f"{PREFIX}turnaround_preemptions",
            "Running requests preempted by weighted-turnaround for a shorter waiting request "
            "while every batch slot was taken (--fairness-preemption)",
        ),
        swap_fallbacks=Counter(
            f"{PREFIX}swap_fallbacks",
            "Victims recomputed because the swap space was full although swapping was chosen",
        ),
        swap_space_bytes=Gauge(
            f"{PREFIX}swap_space_used_bytes",
            "Host swap space holding swapped-out KV blocks, per data-parallel rank",
            labelnames=["rank"],
            multiprocess_mode="mostrecent",
        ),
        swap_seconds=Histogram(
            f"{PREFIX}swap_copy_seconds",
            "Measured time of one step's KV block copies, by direction (out: device to "
            "host at preemption; in: host to device at resume)",
            labelnames=["direction"],
            buckets=(1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1),
        ),
        swap_blocks=Counter(
            f"{PREFIX}swap_blocks",
            "KV blocks copied by the swap connector, by direction (in = swap-ins)",
            labelnames=["direction"],
        ),
        predicted_cost=Histogram(
            f"{PREFIX}predicted_preemption_cost_seconds",
            "Predicted cost of each preemption victim, by mode (swap: out and back in; "
            "recompute: prefill of the same tokens)",
            labelnames=["mode"],
            buckets=(1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.5, 1, 5),
        ),
    )


@dataclass(frozen=True)
class SplitWorkerMetrics:
    """Split-execution metrics recorded in the model's (worker) process."""

    token_layers: Counter
    forward_seconds: Counter
    forward_passes: Counter
    context_rows: Counter

    @staticmethod
    @cache
    def get() -> SplitWorkerMetrics:
        """The process's metrics, created on first use."""
        from prometheus_client import Counter

        _engine_side()
        return SplitWorkerMetrics(
            token_layers=Counter(
                f"{PREFIX}split_token_layers",
                "Decoder-layer passes over one token: computed by the server, or saved because "
                "a split client ran that layer",
                labelnames=["kind"],
            ),
            forward_seconds=Counter(
                f"{PREFIX}split_forward_seconds",
                "Wall time of the model's forward passes on a split-execution server (all "
                "requests, split or not): the server compute the split benchmark compares",
            ),
            forward_passes=Counter(
                f"{PREFIX}split_forward_passes",
                "Forward passes on a split-execution server, by batch: ordinary (no split "
                "token), split (split tokens only) or mixed (both; k = 0 counts as ordinary)",
                labelnames=["batch"],
            ),
            context_rows=Counter(
                f"{PREFIX}split_context_rows",
                "Context rows of resumed split sessions' chunks at the model runner: sent by "
                "the engine core (new rows), or held by the runner from earlier chunks (not "
                "sent again)",
                labelnames=["kind"],
            ),
        )


@dataclass(frozen=True)
class SplitServerMetrics:
    """Split-execution metrics recorded in the API server process (the session endpoint)."""

    sessions_open: Gauge
    sessions: Counter
    chosen_layer: Histogram
    step_seconds: Histogram
    errors: Counter
    sla_met: Counter
    latency_error: Histogram
    rows_skipped: Counter
    served_whole_cheaper: Counter
    calibration_forgotten: Counter

    @staticmethod
    @cache
    def get() -> SplitServerMetrics:
        """The process's metrics, created on first use."""
        from prometheus_client import Counter, Gauge, Histogram

        metrics = SplitServerMetrics(
            sessions_open=Gauge(
                f"{PREFIX}split_sessions_open",
                "Split-execution sessions open now",
                multiprocess_mode="livesum",
            ),
            sessions=Counter(
                f"{PREFIX}split_sessions",
                "Split-execution sessions opened, by how they ended",
                labelnames=["outcome"],
            ),
            chosen_layer=Histogram(
                f"{PREFIX}split_chosen_layer",
                "Split layer k of each session (the client runs layers [0, k))",
                buckets=(0, 1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 128),
            ),
            step_seconds=Histogram(
                f"{PREFIX}split_step_seconds",
                "Server time of one split step (hidden state received to token sent), by kind",
                labelnames=["kind"],
                buckets=(1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            ),
            errors=Counter(
                f"{PREFIX}split_errors",
                "Split sessions ended by an error, by protocol error code",
                labelnames=["code"],
            ),
            sla_met=Counter(
                f"{PREFIX}split_sla",
                "Finished split turns by whether the server-observed latency met the SLA: a "
                "session's first turn, or a follow-up turn of a multi-turn session (each turn "
                "is held to the session's SLA)",
                labelnames=["met", "turn"],
            ),
            latency_error=Histogram(
                f"{PREFIX}split_latency_prediction_error",
                "|predicted - measured| / measured end-to-end latency of finished split "
                "sessions (the prediction the plan told the client), by direction: over "
                "(predicted longer) or under",
                labelnames=["direction"],
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5),
            ),
            rows_skipped=Counter(
                f"{PREFIX}split_rows_skipped",
                "Prompt rows of split sessions at k = N (the client ran every layer) that the "
                "engine never received: only a chunk's last row is read there (final norm and "
                "LM head), so the others would only take attention and KV cache",
            ),
            served_whole_cheaper=Counter(
                f"{PREFIX}split_served_whole_cheaper",
                "Split sessions the planner served whole because the split it chose would have "
                "taken more server time per token than serving them whole, and whole they meet "
                "their SLA (--split-cost-profile)",
            ),
            calibration_forgotten=Counter(
                f"{PREFIX}split_calibration_forgotten",
                "Times the split planner forgot how a kind of session ran (interior, client or "
                "whole) because none of that kind finished for --split-calibration-stale-s "
                "while 16 sessions were planned: a kind its calibration had ruled out is "
                "planned again",
                labelnames=["kind"],
            ),
        )
        for kind in ("interior", "client", "whole"):  # split_server.RECORDED_KINDS, at 0 until one
            metrics.calibration_forgotten.labels(kind=kind)
        return metrics
