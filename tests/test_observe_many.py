"""adaptivellm.metrics.observe_many: a batch of values lands in a histogram as observe() one by
one would put them, with one write per bucket that moved."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram

from adaptivellm.metrics import observe_many

BUCKETS = (1, 8, 16, 128, 1024)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def _pair() -> tuple[CollectorRegistry, Histogram, CollectorRegistry, Histogram]:
    one, many = CollectorRegistry(), CollectorRegistry()
    return (
        one, Histogram("h", "h", buckets=BUCKETS, registry=one),
        many, Histogram("h", "h", buckets=BUCKETS, registry=many),
    )  # fmt: skip


@pytest.mark.parametrize(
    "values",
    [
        [1, 1, 8, 9, 16, 17, 128, 1024, 1025, 5000],  # on bounds, between, past the last
        [0.5, -3.0, 7.999, 8.0, 8.001],
        [3],
        [],
    ],
)
def test_a_batch_equals_observing_one_by_one(values: list[float]) -> None:
    one, h_one, many, h_many = _pair()
    for value in values:
        h_one.observe(value)
    observe_many(h_many, values)
    assert _samples(many) == _samples(one)


def test_nan_goes_into_the_sum_and_no_bucket_as_observe_does() -> None:
    one, h_one, many, h_many = _pair()
    h_one.observe(math.nan)
    h_one.observe(4)
    observe_many(h_many, [math.nan, 4])
    got, want = _samples(many), _samples(one)
    assert math.isnan(got[("h_sum", "")]) and math.isnan(want[("h_sum", "")])
    assert {k: v for k, v in got.items() if k[0] != "h_sum"} == {
        k: v for k, v in want.items() if k[0] != "h_sum"
    }


def test_a_histogram_without_the_fields_it_uses_is_observed_one_by_one() -> None:
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, value: float) -> None:
            self.seen.append(value)

    plain = Plain()
    observe_many(plain, [3, 9, 3])  # type: ignore[arg-type]
    assert plain.seen == [3, 9, 3]
