"""Learn the service-time model from the engine's own steps.

weighted-turnaround ranks requests by their predicted service time S (their latency alone on
the idle server, `ServiceModel`). Its default coefficients are a guess; the real ones depend on
the model, the device and the batch. This fit learns them while serving, from every step the
scheduler times (model execution, between `schedule` and `update_from_output`):

    step seconds = c0 + c_prefill * prompt tokens in the step + c_decode * decoding requests

by least squares with coefficients >= 0, over an exponentially weighted window of recent steps
(`half_life_steps`). Alone on an idle server a request costs one step for its prompt and one
per further output token, so

    S = c_prefill * prompt + (c0 + c_decode) * output

(`ServiceModel(overhead_s, prefill_s_per_token=c_prefill, decode_s_per_token=c0 + c_decode)`,
with the configured overhead). Until the window holds `min_steps` steps, with both steps that
prefill and steps that only decode, the configured model stands. Pure Python and numpy: no vLLM.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from adaptivellm.scheduler.policies import ServiceModel


@dataclass
class ServiceFit:
    """Running least-squares fit of step time on (1, prefill tokens, decoding requests).

    `observe` runs on the engine core's critical path every step, so the decayed sums are kept
    as plain floats (the six distinct entries of X'X and the three of X'y): a few microseconds a
    step where numpy's small-array calls took about ten. `xtx` and `xty` build the arrays for
    the fit."""

    prior: ServiceModel
    half_life_steps: float = 2000.0
    min_steps: int = 50
    refit_every: int = 25
    steps: int = 0
    prefill_steps: int = 0
    decode_only_steps: int = 0
    coefficients: tuple[float, float, float] | None = None
    """(c0, c_prefill, c_decode) of the last fit, None before the first."""
    model: ServiceModel = field(init=False)
    #: Decayed sums of 1, p, d, p*p, p*d, d*d, y, p*y, d*y (p prefill tokens, d decoding
    #: requests, y step seconds).
    _sums: list[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.model = self.prior
        self._decay = 0.5 ** (1.0 / self.half_life_steps)
        self._sums = [0.0] * 9

    @property
    def xtx(self) -> np.ndarray:
        """X'X of the decayed window, X's rows (1, prefill tokens, decoding requests)."""
        return np.array(self._xtx_rows())

    def _xtx_rows(self) -> list[list[float]]:
        n, p, d, pp, pd, dd = self._sums[:6]
        return [[n, p, d], [p, pp, pd], [d, pd, dd]]

    @property
    def xty(self) -> np.ndarray:
        """X'y of the decayed window, y the step seconds."""
        return np.array(self._sums[6:])

    def observe(self, seconds: float, prefill_tokens: int, decode_requests: int) -> None:
        """One executed step: its duration and what it computed. Non-finite or negative
        durations and empty steps are ignored."""
        if not (math.isfinite(seconds) and seconds >= 0) or prefill_tokens + decode_requests <= 0:
            return
        p, d, y, k = float(prefill_tokens), float(decode_requests), seconds, self._decay
        terms = (1.0, p, d, p * p, p * d, d * d, y, p * y, d * y)
        self._sums = [k * s + t for s, t in zip(self._sums, terms, strict=True)]
        self.steps += 1
        if prefill_tokens > 0:
            self.prefill_steps += 1
        else:
            self.decode_only_steps += 1
        if self.steps >= self.min_steps and self.steps % self.refit_every == 0:
            self.refit()

    def refit(self) -> None:
        """Solve the fit and update `model` (kept when the data cannot identify it yet)."""
        if self.prefill_steps < 5 or self.decode_only_steps < 5:
            return
        c0, c_prefill, c_decode = (
            float(v) for v in nonnegative_normal_solve(self._xtx_rows(), self._sums[6:])
        )
        if c_prefill <= 0 or c0 + c_decode <= 0:
            return
        self.coefficients = (c0, c_prefill, c_decode)
        self.model = replace(
            self.prior, prefill_s_per_token=c_prefill, decode_s_per_token=c0 + c_decode
        )


@dataclass
class InFlight:
    """A step scheduled and not yet back: for the service-time fit and the step trace."""

    output: Any
    """Its SchedulerOutput (steps are matched by identity)."""
    scheduled: float
    """The scheduler's step_timer() when schedule() returned."""
    prefill: int
    decode: int
    traced: tuple[float, float, dict[str, int]] | None = None
    """For the step trace: when schedule() was entered and returned, and the step's counts."""


class ServiceTimes:
    """The service-time model requests are ranked with (the fit's when `learn`, else the
    configured `prior`), and the steps in flight it is learned from: one under synchronous
    scheduling, two under async scheduling (update_from_output(N) comes after
    schedule(N + 1)), each keyed by its SchedulerOutput."""

    def __init__(self, prior: ServiceModel, learn: bool) -> None:
        self.prior = prior
        self.learn = learn
        self.fit = ServiceFit(prior)
        self.in_flight: deque[InFlight] = deque()
        #: When the last step's output came back: a step runs from when it was scheduled or
        #: when the step before it finished, whichever is later.
        self.last_done = -math.inf

    @property
    def model(self) -> ServiceModel:
        return self.fit.model if self.learn else self.prior

    def done(self, output: Any) -> InFlight | None:
        """The in-flight step whose output this is, removed with any older one (steps
        finish in order; an older one left over had no output). None if it is not known."""
        while self.in_flight:
            step = self.in_flight.popleft()
            if step.output is output:
                return step
        return None

    def observe(self, step: InFlight, done: float) -> bool:
        """`step` came back at `done`: fit its duration. True when the model changed. Under
        async scheduling the step was scheduled while the one before it ran: it ran from when
        that one finished."""
        started = max(step.scheduled, self.last_done)
        self.last_done = done
        before = self.fit.model
        self.fit.observe(done - started, step.prefill, step.decode)
        return self.fit.model is not before


def nonnegative_normal_solve(
    xtx: np.ndarray | Sequence[Sequence[float]], xty: np.ndarray | Sequence[float]
) -> np.ndarray:
    """argmin ||X b - y||^2 subject to b >= 0, from the normal equations (X'X, X'y) of at most
    three columns: every subset of free coefficients is tried (2^n - 1 small solves) and the
    feasible one of least residual kept (exact).

    Plain Python floats and Cramer's rule, not numpy: the service fit refits on the engine
    core's critical path, and on systems this small numpy's per-call overhead (det, solve, abs,
    max for each of up to seven subsets) is most of the cost."""
    a = xtx.tolist() if isinstance(xtx, np.ndarray) else [[float(v) for v in r] for r in xtx]
    b = xty.tolist() if isinstance(xty, np.ndarray) else [float(v) for v in xty]
    n = len(b)
    if not 1 <= n <= 3 or len(a) != n or any(len(row) != n for row in a):
        raise ValueError(f"normal equations of 1 to 3 columns expected, got {n}")
    # The unconstrained solution, when non-negative, is the constrained one too (the problem
    # is convex): the usual case, one solve instead of 2^n - 1.
    full = _solve(a, b)
    if full is not None and min(full) >= 0:
        return np.array(full)
    best: tuple[float, list[float]] | None = None
    for size in range(1, n + 1):
        for idx in itertools.combinations(range(n), size):
            b_free = _solve([[a[i][j] for j in idx] for i in idx], [b[i] for i in idx])
            if b_free is None or min(b_free) < 0:
                continue
            coef = [0.0] * n
            for i, v in zip(idx, b_free, strict=True):
                coef[i] = v
            # ||Xb - y||^2 up to the constant y'y.
            loss = sum(coef[i] * a[i][j] * coef[j] for i in idx for j in idx) - 2 * sum(
                coef[i] * b[i] for i in idx
            )
            if best is None or loss < best[0]:
                best = (loss, coef)
    return np.array(best[1] if best is not None else [0.0] * n)


def _det(m: list[list[float]]) -> float:
    """Determinant of a 1 x 1 to 3 x 3 matrix."""
    if len(m) == 1:
        return m[0][0]
    if len(m) == 2:
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]
    (a, b, c), (d, e, f), (g, h, i) = m
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """x with a x = b (at most 3 x 3), by Cramer's rule; None when `a` is numerically
    singular: |det a| < 1e-12 * max(1, max |a_ij|) ** n."""
    n = len(b)
    det = _det(a)
    if abs(det) < 1e-12 * max(1.0, max(abs(v) for row in a for v in row)) ** n:
        return None
    return [
        _det([[b[r] if c == k else a[r][c] for c in range(n)] for r in range(n)]) / det
        for k in range(n)
    ]
