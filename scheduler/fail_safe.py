"""Fail-safe hooks: AdaptiveLLM code that runs inside vLLM's engine loop must never kill it.

vLLM declares the engine dead on any exception raised in its engine-core loop, and every later
request then fails. AdaptiveLLM's own work there (policy ordering, victim choice, fairness
preemption, accounting, cost predictors, connector bookkeeping, metrics) is an optimisation on
top of vLLM's behaviour, so an error in it is contained where it happens:

    with errors.guard("order"):           # suppresses the exception...
        self.running[:] = self._order(...)  # ...and the step keeps vLLM's own order

Each error is counted in `adaptivellm_internal_errors_total{where}` and logged: the first one
of each `where` with its traceback and the request id when known, later ones at most once a
minute per `where` as one line with the number seen since. Only `Exception`s are caught:
KeyboardInterrupt and SystemExit still stop the process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import TracebackType

logger = logging.getLogger(__name__)

#: Seconds between two log lines of the same `where` after its first error.
QUIET_S = 60.0
#: Every `where` of AdaptiveLLM's engine-side code (docs/safety.md says what each falls back
#: to). Their series start at 0 when the scheduler starts (`initialise_series`), so that a
#: dashboard and an alert see the metric before the first error.
WHERES = (
    "accounting", "cost_predictor", "finish_accounting", "finish_failed", "metrics",
    "order_running", "order_waiting", "preemption_mode", "service_fit", "split_chunk",
    "split_new_rows", "split_session", "step_budget", "step_trace", "swap_in_copy", "swap_match",
    "swap_out_copy", "swap_release", "swap_reuse_cut", "track", "turnaround_preemption",
)  # fmt: skip


def initialise_series() -> None:
    """Create adaptivellm_internal_errors_total{where} at 0 for every where in WHERES."""
    from adaptivellm.metrics import internal_errors

    counter = internal_errors()
    for where in WHERES:
        counter.labels(where=where)


class InternalErrors:
    """Counts, logs and contains errors of AdaptiveLLM's engine-side code."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.counts: dict[str, int] = {}
        self._clock = clock
        self._last_log: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def guard(self, where: str, request_id: str | None = None) -> Guard:
        """A context manager that records and suppresses an `Exception` raised in its body."""
        return Guard(self, where, request_id)

    def record(self, where: str, exc: BaseException, request_id: str | None = None) -> None:
        """Count and log one error (never raises)."""
        self.counts[where] = self.counts.get(where, 0) + 1
        try:
            from adaptivellm.metrics import internal_errors

            internal_errors().labels(where=where).inc()
        except Exception:  # the metric must not turn one error into two
            logger.debug("could not count an internal error", exc_info=True)
        about = f" (request {request_id})" if request_id is not None else ""
        now = self._clock()
        last = self._last_log.get(where)
        if last is None:
            self._last_log[where] = now
            logger.error(
                "AdaptiveLLM internal error in %s%s; vLLM's own behaviour is used instead and "
                "the engine keeps serving (counted in adaptivellm_internal_errors_total)",
                where,
                about,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
        elif now - last >= QUIET_S:
            self._last_log[where] = now
            more = self._unlogged.pop(where, 0)
            logger.error(
                "AdaptiveLLM internal error in %s%s: %r (%d more since the last line)",
                where,
                about,
                exc,
                more,
            )
        else:
            self._unlogged[where] = self._unlogged.get(where, 0) + 1


class Guard:
    """See InternalErrors.guard."""

    __slots__ = ("errors", "request_id", "where")

    def __init__(self, errors: InternalErrors, where: str, request_id: str | None) -> None:
        self.errors = errors
        self.where = where
        self.request_id = request_id

    def __enter__(self) -> Guard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        self.errors.record(self.where, exc, self.request_id)
        return True
