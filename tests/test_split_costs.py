"""The split cost model in seconds (adaptivellm.split_costs): derived from a
split_host_cost.json result, priced per token, and refused clearly when the profile is bad."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from adaptivellm.split_config import SplitConfig
from adaptivellm.split_costs import PassCosts, load_pass_costs, pass_costs_from_result

ROOT = Path(__file__).resolve().parent.parent

#: A made-up server: what the summary below would read on it.
LAYERS, HEAD, LAYER, ROW = 16, 0.3e-3, 0.6e-3, 0.2e-3
WHOLE_HOST, HOST = 0.25e-3, {8: 1.2e-3, 16: 0.9e-3}


def _pass_s(layers: int, rows: float) -> float:
    return HEAD + layers * (LAYER + ROW * rows)


def _summary(rows: dict[str, float]) -> dict[str, Any]:
    """What bench/split_host_cost.py's summary reads on the made-up server, with `rows` output
    tokens a pass per mode: forward ms per token is a pass's time over its rows."""
    layers = {"whole": LAYERS, "split@8": 8, "split@16": 0}
    host = {"whole": WHOLE_HOST, "split@8": HOST[8], "split@16": HOST[16]}
    return {
        mode: {
            "forward_ms_per_token": {"median": _pass_s(layers[mode], n) / n * 1e3},
            "output_tokens_per_pass": {"median": n},
            "api_server_cpu_ms_per_token": {"median": host[mode] * 1e3},
        }
        for mode, n in rows.items()
    }


def test_the_model_is_read_back_from_the_figures_it_would_produce() -> None:
    costs = pass_costs_from_result({"summary": _summary({"whole": 3.3, "split@8": 1.5,
                                                         "split@16": 1.1})})  # fmt: skip
    # The all-client split's pass has no layers: its time is the head's at any row count.
    assert costs.layers == LAYERS
    assert costs.head_s == pytest.approx(HEAD)
    assert costs.layer_s == pytest.approx(LAYER)
    assert costs.layer_row_s == pytest.approx(ROW)
    assert costs.whole_host_s == pytest.approx(WHOLE_HOST)
    assert costs.split_host == ((8, pytest.approx(HOST[8])), (16, pytest.approx(HOST[16])))


def test_a_split_saves_server_time_only_deep_enough_beside_requests_served_whole() -> None:
    costs = PassCosts(LAYERS, HEAD, LAYER, ROW, WHOLE_HOST, tuple(HOST.items()))
    # Beside others served whole, one more such request costs a row in their pass.
    beside = LAYERS * ROW + WHOLE_HOST
    assert costs.whole_s(3) == pytest.approx(beside)
    # Alone, it costs a pass of its own: then a split saves once the layers it takes off the
    # server pay for its host cost (one layer, 0.8 ms, does not pay the 0.95 ms more).
    assert costs.whole_s(0) == pytest.approx(_pass_s(LAYERS, 1) + WHOLE_HOST)
    assert costs.break_even_layer(0) == 2
    # A split at k runs its own pass over N - k layers, and its host cost.
    assert costs.split_s(16) == pytest.approx(HEAD + HOST[16])
    assert costs.split_s(12) == pytest.approx(HEAD + 4 * (LAYER + ROW) + (HOST[8] + HOST[16]) / 2)
    k = costs.break_even_layer(3)
    assert k is not None and 8 < k < 16
    assert costs.split_s(k) < beside <= costs.split_s(k - 1)
    assert [costs.split_saves(j, 3) for j in range(LAYERS + 1)] == [j >= k for j in range(17)]
    assert not costs.split_saves(0, 0)  # k = 0 is no split
    # A host cost above a whole request's share leaves no split worth it.
    dear = PassCosts(LAYERS, HEAD, LAYER, ROW, WHOLE_HOST, ((16, 1.0),))
    assert dear.break_even_layer(3) is None


def test_the_host_cost_interpolates_between_the_measured_splits() -> None:
    costs = PassCosts(LAYERS, HEAD, LAYER, ROW, WHOLE_HOST, ((8, 2e-3), (16, 1e-3)))
    assert costs.split_host_s(12) == pytest.approx(1.5e-3)
    assert costs.split_host_s(2) == 2e-3 and costs.split_host_s(16) == 1e-3


def test_the_config_carries_the_model_through_json() -> None:
    """`--additional-config` carries the config as JSON to the API server, which rebuilds it."""
    costs = PassCosts(LAYERS, HEAD, LAYER, ROW, WHOLE_HOST, tuple(HOST.items()), source="here")
    config = SplitConfig(pass_costs=costs)
    back = SplitConfig(**json.loads(json.dumps(config.to_dict())))
    assert back.pass_costs == costs
    assert SplitConfig(**json.loads(json.dumps(SplitConfig().to_dict()))).pass_costs is None


def test_the_committed_profile_loads() -> None:
    costs = load_pass_costs(ROOT / "bench" / "results" / "split_host_cost.json")
    assert costs.layers == 16 and "split_host_cost.py" in costs.source
    assert all(math.isfinite(v) for v in (costs.head_s, costs.layer_s, costs.layer_row_s))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "not a split_host_cost.json result"),
        ('{"summary": 3}', "not a split_host_cost.json result"),
        ('{"summary": {"whole": {}, "split@16": {}}}', "needs the whole mode"),
    ],
)
def test_a_missing_or_corrupt_profile_is_refused_naming_the_file(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "profile.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as caught:
        load_pass_costs(path)
    assert str(path) in str(caught.value)


def test_figures_the_model_cannot_use_are_refused(tmp_path: Path) -> None:
    summary = _summary({"whole": 3.3, "split@8": 1.5, "split@16": 1.1})
    summary["split@8"]["forward_ms_per_token"]["median"] = "nan"
    with pytest.raises(ValueError, match="split@8's median forward_ms_per_token is nan"):
        pass_costs_from_result({"summary": summary})
    del summary["whole"]["output_tokens_per_pass"]
    with pytest.raises(ValueError, match="whole has no median output_tokens_per_pass"):
        pass_costs_from_result({"summary": summary})
    # A result that records its model's layers needs the all-client split at that k: without
    # it, k = 16 of a 32-layer model would be read as the head.
    whole = _summary({"whole": 3.3, "split@8": 1.5, "split@16": 1.1})
    with pytest.raises(ValueError, match="needs the whole mode, an all-client split"):
        pass_costs_from_result({"layers": 32, "summary": whole})
    assert pass_costs_from_result({"layers": 16, "summary": whole}).layers == 16
    # Rows a pass too close together cannot separate a layer's per-row cost from its fixed one.
    close = _summary({"whole": 1.6, "split@8": 1.5, "split@16": 1.1})
    with pytest.raises(ValueError, match="too close"):
        pass_costs_from_result({"summary": close})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layers": 0}, "layers must be >= 1"),
        ({"head_s": -1.0}, "head_s must be a number >= 0"),
        ({"layer_row_s": math.inf}, "layer_row_s must be a number >= 0"),
        ({"split_host": ()}, "split_host needs measured k"),
        ({"split_host": ((16, 1e-3), (8, 1e-3))}, "ascending"),
        ({"split_host": ((17, 1e-3),)}, r"in \[1, 16\]"),
        ({"split_host": ((16, math.nan),)}, "seconds must be numbers >= 0"),
    ],
)
def test_a_model_with_impossible_figures_is_refused(changes: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {
        "layers": LAYERS, "head_s": HEAD, "layer_s": LAYER, "layer_row_s": ROW,
        "whole_host_s": WHOLE_HOST, "split_host": tuple(HOST.items()),
    }  # fmt: skip
    with pytest.raises(ValueError, match=message):
        PassCosts(**{**fields, **changes})
