"""The report's round-by-round ratios and their spread, on hand-made sections."""

from __future__ import annotations

import math
from typing import Any

from adaptivellm.benchmark.report import markdown_table, round_ratios, round_throughputs


def section(tokens_per_round: list[int], durations: list[float]) -> dict[str, Any]:
    # Spread each round's tokens over its seconds; the sum is what counts.
    bins = [[n // 2, n - n // 2] for n in tokens_per_round]
    return {"round_output_per_s": bins, "round_durations_s": durations}


def report(rounds: int, ours: dict[str, Any], stock: dict[str, Any]) -> dict[str, Any]:
    figures = {"output_tokens_per_s": 10.0, "requests_per_s": 1.0}
    systems = {
        "stock": {"figures": figures, "counters": {}, **stock},
        "adaptivellm": {
            "figures": figures,
            "counters": {},
            "ratios_to_stock": {"output_tokens_per_s": 1.0},
            "round_ratios_to_stock": round_ratios(ours, stock),
            **ours,
        },
    }
    return {"rounds": rounds, "systems": systems}


def test_round_throughputs_are_tokens_over_duration() -> None:
    assert round_throughputs(section([100, 300], [10.0, 20.0])) == [10.0, 15.0]
    assert math.isnan(round_throughputs(section([5], [0.0]))[0])


def test_round_ratios_pair_round_i_with_the_reference_round_i() -> None:
    stock = section([100, 100, 100], [10.0, 10.0, 10.0])
    ours = section([90, 120, 100], [10.0, 10.0, 10.0])
    r = round_ratios(ours, stock)
    assert r["output_tokens_per_s"] == [0.9, 1.2, 1.0]
    assert (r["median"], r["min"], r["max"], r["comparable"]) == (1.0, 0.9, 1.2, True)


def test_one_round_is_flagged_not_comparable_in_the_json_and_the_table() -> None:
    stock, ours = section([100], [10.0]), section([81], [10.0])
    r = round_ratios(ours, stock)
    assert r["comparable"] is False and r["output_tokens_per_s"] == [0.81]
    table = markdown_table(report(1, ours, stock))
    assert "One round" in table and "not comparable" in table
    assert "[rounds" not in table


def test_several_rounds_show_the_spread_in_the_table() -> None:
    stock = section([100, 100, 100], [10.0, 10.0, 10.0])
    ours = section([81, 106, 110], [10.0, 10.0, 10.0])
    table = markdown_table(report(3, ours, stock))
    assert "[rounds 0.81-1.10]" in table
    assert "One round" not in table


def test_rounds_with_no_tokens_or_no_time_are_left_out() -> None:
    stock = section([100, 0], [10.0, 10.0])
    ours = section([100, 50], [10.0, 0.0])
    assert round_ratios(ours, stock) == {
        "output_tokens_per_s": [1.0],
        "median": 1.0,
        "min": 1.0,
        "max": 1.0,
        "comparable": False,
    }
