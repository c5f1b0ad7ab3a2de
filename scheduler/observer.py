"""The scheduler's observer: what AdaptiveScheduler reports and decides nothing with.

One object for the engine-side metrics (adaptivellm.metrics.EngineMetrics: steps, queue waits,
served tokens per tenant, preemptions, turnaround, the learned service model), the fairness
window behind the Jain-index gauge, and the per-step trace (ADAPTIVELLM_STEP_TRACE). The
scheduler calls it at each point of a request's and a step's life; no policy reads it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from adaptivellm.metrics import EngineMetrics, observe_many
from adaptivellm.scheduler.config import FairnessConfig
from adaptivellm.scheduler.policies import (
    FAIRNESS_WINDOW_S,
    ServiceModel,
    backlogged_jain,
)
from adaptivellm.scheduler.preemption import Decision
from adaptivellm.scheduler.service_fit import ServiceFit
from adaptivellm.scheduler.step_trace import StepTrace

logger = logging.getLogger(__name__)

#: Tenants beyond this many share the metric label "other" (bounded label cardinality).
MAX_TENANT_LABELS = 64
#: The per-step metrics (steps, tokens per step, tokens per tenant, swap space) and the
#: per-request histograms (queue wait, weighted turnaround, output-length error) are written to
#: Prometheus at most this often while the engine is busy, and at once when it goes idle
#: (`flush`): in the engine core every write is a write to a multi-process file, and a step of a
#: small model on a fast device lasts a few milliseconds. A scrape sees them this late at most.
METRICS_FLUSH_S = 0.5


class EngineObserver:
    """Engine-side metrics, the fairness window and the step trace of one scheduler (one
    data-parallel rank: the gauges' `rank` label)."""

    def __init__(self, fairness: FairnessConfig, rank: str, trace: StepTrace | None) -> None:
        self.fairness = fairness
        self.rank = rank
        #: ADAPTIVELLM_STEP_TRACE's per-step trace (scheduler.step_trace); None: off.
        self.trace = trace
        #: Tokens served per tenant label, since start.
        self.served_tokens: dict[str, float] = defaultdict(float)
        #: adaptivellm_tenant_served_tokens' child per tenant label (labels() takes a lock).
        self._tenant_tokens: dict[str, Any] = {}
        #: The current fairness window: start, tenants backlogged at every step so far (None
        #: before the first step), tokens served per tenant.
        self._window: tuple[float, set[str] | None, dict[str, float]] | None = None
        self._logged_service: ServiceModel | None = None
        #: Metric values not yet written (flush): steps, tokens of each step, tokens per tenant
        #: label, queue waits, weighted turnarounds, output-length errors; when they were last
        #: written; the swap-space gauge's value.
        self._steps = 0
        self._step_tokens: list[int] = []
        self._queue_waits: list[float] = []
        self._turnarounds: list[float] = []
        self._length_errors: list[float] = []
        self._tenant_pending: dict[str, int] = {}
        self._flushed_at = time.monotonic()
        self._swap_space: float | None = None
        metrics = EngineMetrics.get()
        metrics.jain.labels(rank=rank).set(1.0)  # no tenant has waited yet
        metrics.max_queue_wait.labels(rank=rank).set(fairness.max_wait_s)

    def step(self, scheduled_tokens: int, swap_space_bytes: float | None) -> None:
        """A step was scheduled with `scheduled_tokens` tokens. Its metrics are written with the
        others at the next flush (every METRICS_FLUSH_S while busy, and when idle)."""
        if scheduled_tokens:
            self._steps += 1
            self._step_tokens.append(scheduled_tokens)
        if swap_space_bytes is not None:
            self._swap_space = swap_space_bytes
        if time.monotonic() - self._flushed_at >= METRICS_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Write the metrics gathered since the last flush: one write per counter, histogram
        bucket and tenant that moved, however many steps and requests they span."""
        self._flushed_at = time.monotonic()
        metrics = EngineMetrics.get()
        if self._steps:
            metrics.scheduler_steps.inc(self._steps)
            observe_many(metrics.step_tokens, self._step_tokens)
            self._steps, self._step_tokens = 0, []
        for histogram, values in (
            (metrics.queue_wait, self._queue_waits),
            (metrics.weighted_turnaround, self._turnarounds),
            (metrics.output_length_error, self._length_errors),
        ):
            observe_many(histogram, values)
            values.clear()
        if self._tenant_pending:
            pending, self._tenant_pending = self._tenant_pending, {}
            tenant_tokens = metrics.tenant_tokens
            for label, tokens in pending.items():
                if (child := self._tenant_tokens.get(label)) is None:
                    child = self._tenant_tokens[label] = tenant_tokens.labels(tenant=label)
                child.inc(tokens)
        if self._swap_space is not None:
            metrics.swap_space_bytes.labels(rank=self.rank).set(self._swap_space)
            self._swap_space = None

    def first_scheduled(self, waited_s: float) -> None:
        """A request was scheduled for the first time, `waited_s` after it arrived (written at
        the next flush)."""
        self._queue_waits.append(max(0.0, waited_s))

    def served(
        self,
        served: dict[str, int],
        now: float,
        waiting_tenants: Callable[[set[str] | None], set[str]],
    ) -> None:
        """This step served `served` tokens per tenant. Counts them per tenant label, and
        advances the fairness window: which tenants were left waiting by this step
        (`waiting_tenants(among)`: those of `among`, None: all, with a request waiting), and
        what each was served. A closed window sets the Jain index gauge. The per-tenant
        counters are written at the next flush."""
        pending = self._tenant_pending
        for tenant, tokens in served.items():
            label = tenant
            if label not in self.served_tokens and len(self.served_tokens) >= MAX_TENANT_LABELS:
                label = "other"
            self.served_tokens[label] += tokens
            pending[label] = pending.get(label, 0) + tokens
        if self._window is None or now - self._window[0] >= FAIRNESS_WINDOW_S:
            if self._window is not None:
                self._close_window(*self._window[1:])
            self._window = (now, None, defaultdict(float))
        start, backlogged, window_served = self._window
        if backlogged is None or backlogged:
            self._window = (start, waiting_tenants(backlogged), window_served)
        for tenant, tokens in served.items():
            window_served[tenant] += tokens

    def _close_window(self, backlogged: set[str] | None, served: dict[str, float]) -> None:
        weights = {t: self.fairness.weight_of(t) for t in backlogged or ()}
        jain = backlogged_jain(backlogged or (), served, weights)
        EngineMetrics.get().jain.labels(rank=self.rank).set(1.0 if jain is None else jain)

    def preempted(self, decision: Decision) -> None:
        """A request was preempted for lack of KV blocks, swapped or recomputed."""
        metrics = EngineMetrics.get()
        metrics.preemptions.labels(mode=decision.mode).inc()
        if decision.reason == "swap-space-full":
            metrics.swap_fallbacks.inc()

    def preempted_for_turnaround(self) -> None:
        EngineMetrics.get().turnaround_preemptions.inc()

    def finished(
        self, turnaround_s: float, service_s: float, predicted: float, actual: int
    ) -> None:
        """A request finished: its weighted turnaround (`service_s`, the service time
        predicted with its actual output length) and the output-length prediction error
        (written at the next flush)."""
        self._turnarounds.append(max(0.0, turnaround_s) / service_s)
        self._length_errors.append(abs(predicted - actual) / max(1, actual))

    def service_model(self, model: ServiceModel, fit: ServiceFit) -> None:
        """Set the gauges; log the learned model when it first appears or moves by > 25%."""
        gauge = EngineMetrics.get().service_model
        gauge.labels(term="prefill", rank=self.rank).set(model.prefill_s_per_token)
        gauge.labels(term="decode", rank=self.rank).set(model.decode_s_per_token)
        logged = self._logged_service
        if fit.coefficients is None or (
            logged is not None
            and abs(model.decode_s_per_token / logged.decode_s_per_token - 1) <= 0.25
            and abs(model.prefill_s_per_token / logged.prefill_s_per_token - 1) <= 0.25
        ):
            return
        self._logged_service = model
        logger.info(
            "Service-time model learned from %d steps: %.3g ms per prompt token, %.3g ms per "
            "output token",
            fit.steps,
            1e3 * model.prefill_s_per_token,
            1e3 * model.decode_s_per_token,
        )

    def trace_step(
        self, traced: tuple[float, float, dict[str, int]], entered: float, left: float
    ) -> None:
        """Write one step to the trace: `traced` (when schedule() was entered and returned, and
        the step's counts), and when update_from_output was entered and left."""
        if self.trace is None:
            return
        start, returned, counts = traced
        self.trace.step(start, returned - start, entered - returned, left - entered, counts)
