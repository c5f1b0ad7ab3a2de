"""The service-time model learned from the engine's steps (adaptivellm.scheduler.service_fit):
the fit on synthetic steps, its guards, and the scheduler learning it from timed steps."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest
from prometheus_client import REGISTRY
from vllm.v1.core.sched.output import SchedulerOutput

from adaptivellm.scheduler.config import FairnessConfig
from adaptivellm.scheduler.policies import ServiceModel
from adaptivellm.scheduler.service_fit import ServiceFit, nonnegative_normal_solve
from tests.scheduler.sim import Run, make_request, make_scheduler

PRIOR = ServiceModel()


def feed(fit: ServiceFit, c0: float, cp: float, cd: float, steps: int, seed: int = 0) -> None:
    """Steps like a server's: mostly decodes of 1-4 requests, some with a prompt chunk, with 3%
    timing noise."""
    rng = random.Random(seed)
    for _ in range(steps):
        prefill = rng.choice([0, 0, 0, rng.randint(8, 512)])
        decode = rng.randint(0 if prefill else 1, 4)
        fit.observe((c0 + cp * prefill + cd * decode) * rng.uniform(0.97, 1.03), prefill, decode)


def test_the_fit_recovers_the_step_costs() -> None:
    fit = ServiceFit(PRIOR)
    feed(fit, c0=0.012, cp=0.0018, cd=0.004, steps=600)
    assert fit.coefficients is not None
    c0, cp, cd = fit.coefficients
    assert cp == pytest.approx(0.0018, rel=0.05)
    assert c0 + cd == pytest.approx(0.016, rel=0.05)
    assert fit.model.prefill_s_per_token == pytest.approx(0.0018, rel=0.05)
    assert fit.model.decode_s_per_token == pytest.approx(0.016, rel=0.05)
    assert fit.model.overhead_s == PRIOR.overhead_s


def test_the_prior_stands_until_the_data_identify_the_model() -> None:
    fit = ServiceFit(PRIOR)
    feed(fit, 0.01, 0.002, 0.005, steps=fit.min_steps - 1)
    assert fit.model == PRIOR and fit.coefficients is None
    only_decodes = ServiceFit(PRIOR)
    for _ in range(500):
        only_decodes.observe(0.02, 0, 3)
    assert only_decodes.model == PRIOR


@pytest.mark.parametrize(
    ("seconds", "prefill", "decode"),
    [(math.nan, 10, 1), (math.inf, 10, 1), (-0.1, 10, 1), (0.5, 0, 0)],
)
def test_bad_steps_are_ignored(seconds: float, prefill: int, decode: int) -> None:
    fit = ServiceFit(PRIOR)
    fit.observe(seconds, prefill, decode)
    assert fit.steps == 0 and not fit.xtx.any()


def test_coefficients_are_never_negative() -> None:
    """Steps whose time falls with the number of decoding requests (noise, or a batch that
    runs faster): the decode coefficient is clipped to 0 rather than made negative."""
    fit = ServiceFit(PRIOR)
    rng = random.Random(1)
    for _ in range(400):
        prefill = rng.choice([0, rng.randint(8, 256)])
        decode = rng.randint(1, 4)
        fit.observe(0.05 + 0.001 * prefill - 0.002 * decode, prefill, decode)
    assert fit.coefficients is not None
    assert min(fit.coefficients) >= 0
    assert fit.coefficients[2] == 0


def test_the_fit_follows_a_change_of_speed() -> None:
    """Recent steps weigh more (half-life in steps): after the engine slows down 2x, the model
    follows."""
    fit = ServiceFit(PRIOR, half_life_steps=200)
    feed(fit, 0.01, 0.001, 0.004, steps=1000, seed=2)
    feed(fit, 0.02, 0.002, 0.008, steps=2000, seed=3)
    assert fit.model.prefill_s_per_token == pytest.approx(0.002, rel=0.05)


def test_nonnegative_solve_matches_least_squares_when_unconstrained() -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack([np.ones(50), rng.uniform(0, 100, 50), rng.uniform(0, 4, 50)])
    y = x @ np.array([0.5, 0.02, 0.3]) + rng.normal(0, 0.01, 50)
    expected = np.linalg.lstsq(x, y, rcond=None)[0]
    got = nonnegative_normal_solve(x.T @ x, x.T @ y)
    assert np.allclose(got, expected, rtol=1e-6)


def step_cost(
    out: SchedulerOutput, c0: float = 0.01, cp: float = 0.002, cd: float = 0.005
) -> float:
    """A simulated model: a fixed cost, per prompt token, per decoding request."""
    scheduler_tokens = out.num_scheduled_tokens
    prefill = sum(n for n in scheduler_tokens.values() if n > 1)
    decode = sum(1 for n in scheduler_tokens.values() if n == 1)
    return c0 + cp * prefill + cd * decode


@pytest.mark.parametrize("learn", [True, False])
def test_the_scheduler_learns_the_service_model_from_timed_steps(
    learn: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="adaptivellm.scheduler.observer")
    config = FairnessConfig(learn_service=learn)
    scheduler, clock = make_scheduler(config, num_blocks=200, max_num_seqs=4)
    run = Run(scheduler, clock, step_cost=step_cost)
    for i in range(24):
        scheduler.add_request(make_request(f"r{i}", 16 + 40 * (i % 6), 20, clock.now))
        for _ in range(6):
            run.step()
    run.until_idle()
    decode = REGISTRY.get_sample_value(
        "adaptivellm_service_model_seconds_per_token", {"term": "decode", "rank": "0"}
    )
    if learn:
        # Prompt tokens cost cp; an output token alone costs one step with one request.
        assert scheduler.service.prefill_s_per_token == pytest.approx(0.002, rel=0.1)
        assert scheduler.service.decode_s_per_token == pytest.approx(0.015, rel=0.1)
    else:
        assert scheduler.service == config.service
    assert decode == pytest.approx(scheduler.service.decode_s_per_token)
    logged = [r.getMessage() for r in caplog.records if "Service-time model" in r.getMessage()]
    assert bool(logged) is learn


def test_the_running_sums_are_the_decayed_normal_equations() -> None:
    """observe keeps X'X and X'y as plain floats; they equal the decayed sums of the outer
    products computed with numpy."""
    fit = ServiceFit(PRIOR, half_life_steps=50.0)
    rng = random.Random(3)
    xtx, xty = np.zeros((3, 3)), np.zeros(3)
    decay = 0.5 ** (1 / 50.0)
    for _ in range(300):
        prefill, decode = rng.choice([0, rng.randint(1, 300)]), rng.randint(1, 4)
        seconds = rng.uniform(0.01, 0.5)
        fit.observe(seconds, prefill, decode)
        x = np.array([1.0, prefill, decode])
        xtx, xty = decay * xtx + np.outer(x, x), decay * xty + seconds * x
    np.testing.assert_allclose(fit.xtx, xtx, rtol=1e-9)
    np.testing.assert_allclose(fit.xty, xty, rtol=1e-9)


def _exhaustive_solve(xtx: np.ndarray, xty: np.ndarray) -> np.ndarray:
    """The least non-negative least-squares solution by trying every support (no shortcut)."""
    import itertools

    best = (0.0, np.zeros(3))  # the empty support: b = 0
    for size in range(1, 4):
        for idx in map(list, itertools.combinations(range(3), size)):
            b_free = np.linalg.solve(xtx[np.ix_(idx, idx)], xty[idx])
            if (b_free < 0).any():
                continue
            b = np.zeros(3)
            b[idx] = b_free
            loss = float(b @ xtx @ b - 2 * b @ xty)
            if loss < best[0]:
                best = (loss, b)
    return best[1]


@pytest.mark.parametrize("seed", range(20))
def test_the_solver_shortcut_finds_the_exhaustive_optimum(seed: int) -> None:
    """nonnegative_normal_solve returns the unconstrained solution when it is non-negative and
    searches the supports otherwise: either way the optimum of the exhaustive search."""
    rng = np.random.default_rng(seed)
    x = np.column_stack([np.ones(40), rng.integers(0, 300, 40), rng.integers(1, 5, 40)])
    b_true = rng.uniform(-0.01, 0.01, 3)  # some signs negative: the constrained case too
    y = x @ b_true + rng.normal(0, 0.001, 40)
    xtx, xty = x.T @ x, x.T @ y
    np.testing.assert_allclose(
        nonnegative_normal_solve(xtx, xty), _exhaustive_solve(xtx, xty), atol=1e-12
    )


def test_the_solver_refuses_more_than_three_columns_and_survives_singular_systems() -> None:
    with pytest.raises(ValueError, match="1 to 3 columns"):
        nonnegative_normal_solve(np.eye(4), np.ones(4))
    with pytest.raises(ValueError, match="1 to 3 columns"):
        nonnegative_normal_solve([[1.0, 2.0]], [1.0])
    # No steps yet (all zero) and a column that never varies: no crash, coefficients >= 0.
    assert nonnegative_normal_solve(np.zeros((3, 3)), np.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    xtx = [[10.0, 10.0, 0.0], [10.0, 10.0, 0.0], [0.0, 0.0, 0.0]]  # prefill always 1, decode 0
    got = nonnegative_normal_solve(xtx, [1.0, 1.0, 0.0])
    assert (got >= 0).all() and got[0] + got[1] == pytest.approx(0.1)
