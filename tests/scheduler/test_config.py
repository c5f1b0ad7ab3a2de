"""Fairness configuration and tenant weights."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest

from adaptivellm.scheduler.config import (
    AdaptiveConfig,
    FairnessConfig,
    load_tenant_weights,
    store_part,
)
from adaptivellm.scheduler.policies import TurnaroundPreemption, VTCWeights
from adaptivellm.scheduler.preemption import PreemptionConfig
from adaptivellm.split_config import SplitConfig


def test_round_trip_through_additional_config() -> None:
    config = FairnessConfig(
        policy="vtc",
        max_wait_s=5,
        tenant_weights={"gold": 2.0},
        learn_service=False,
        tenant_slack_tokens=100.0,
        max_step_s=0.5,
        service_exponent=1.5,
        preemption=TurnaroundPreemption(enabled=False, margin=3.0, max_per_request=1),
    )
    stored = {"adaptivellm": {"fairness": config.to_dict()}}
    assert AdaptiveConfig.from_additional_config(stored).fairness == config
    assert AdaptiveConfig.from_additional_config({}).fairness == FairnessConfig()


def test_every_part_is_stored_and_read_back_by_one_reader() -> None:
    """What `adaptivellm serve` stores (store_part) is what the engine and the API server read
    (AdaptiveConfig); absent parts are the defaults of an engine started without it."""
    args = Namespace(additional_config=None)
    fairness = FairnessConfig(policy="vtc", max_wait_s=7)
    preemption = PreemptionConfig("swap", swap_space_bytes=1 << 20)
    split = SplitConfig(max_sessions=3, idle_timeout_s=5.0)
    for part, value in (("fairness", fairness), ("preemption", preemption), ("split", split)):
        store_part(args, part, value)
    assert AdaptiveConfig.from_additional_config(args.additional_config) == AdaptiveConfig(
        fairness, preemption, split
    )
    for absent in (None, {}, {"adaptivellm": "not a dict"}, {"adaptivellm": {"split": 3}}):
        config = AdaptiveConfig.from_additional_config(absent)
        assert config == AdaptiveConfig()
        assert config.preemption.mode == "recompute" and config.split is None
    with pytest.raises(ValueError, match="unknown AdaptiveLLM config part"):
        store_part(args, "fairnes", fairness)
    with pytest.raises(ValueError, match="max_sessions"):  # validated on the way back too
        AdaptiveConfig.from_additional_config({"adaptivellm": {"split": {"max_sessions": 0}}})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"policy": "sjf"}, "unknown fairness policy"), ({"max_wait_s": 0}, "max_wait_s"),
     ({"tenant_weights": {"a": -1}}, "must be between 0.001 and 1000"),
     ({"strict_tenants": True}, "need tenant"),
     ({"tenant_slack_tokens": -1.0}, "tenant_slack_tokens"),
     ({"tenant_slack_tokens": float("inf")}, "tenant_slack_tokens"),
     ({"max_step_s": float("nan")}, "max_step_s"), ({"max_step_s": True}, "max_step_s"),
     ({"max_step_s": "0.5"}, "max_step_s"), ({"service_exponent": 0.5}, "between 1 and 4"),
     ({"service_exponent": float("nan")}, "between 1 and 4"),
     ({"service_exponent": "2"}, "service_exponent must be a number")],
)  # fmt: skip
def test_bad_config_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FairnessConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"margin": 0.5}, "margin"), ({"margin": float("nan")}, "margin"),
     ({"max_per_request": -1}, ">= 0"), ({"max_per_request": 1.5}, "integer"),
     ({"max_per_request": True}, "integer"), ({"candidates": 0}, ">= 1"),
     ({"candidates": 2.0}, "integer")],
)  # fmt: skip
def test_bad_preemption_rule_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TurnaroundPreemption(**kwargs)
    with pytest.raises(ValueError, match=message):
        FairnessConfig.from_dict({"preemption": kwargs})


def test_tenant_slack_is_one_full_length_request_unless_set() -> None:
    # VTC prices an output token 2, an input token 1: the costliest request of a 2048-token
    # model costs 4096.
    assert FairnessConfig().tenant_slack(2048) == 4096.0
    assert FairnessConfig(vtc=VTCWeights(1.0, 0.5)).tenant_slack(2048) == 2048.0
    assert FairnessConfig(tenant_slack_tokens=0.0).tenant_slack(2048) == 0.0
    assert FairnessConfig(tenant_slack_tokens=300).tenant_slack(2048) == 300.0


def test_weights_from_flag() -> None:
    assert load_tenant_weights("gold=2, free=0.5,") == {"gold": 2.0, "free": 0.5}


@pytest.mark.parametrize("spec", ["gold", "gold=", "=2", "gold=two", "gold=0", "gold=-1",
                                  "gold=inf"])  # fmt: skip
def test_bad_weights_flag(spec: str) -> None:
    with pytest.raises(ValueError):
        load_tenant_weights(spec)


def test_weights_from_file(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"tenants": {"gold": 3, "free": 1}}))
    assert load_tenant_weights(f"@{path}") == {"gold": 3.0, "free": 1.0}
    path.write_text(json.dumps({"gold": 3}))
    assert load_tenant_weights(f"@{path}") == {"gold": 3.0}


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
     ('{"gold": "high"}', "must be a number"), ('{"gold": true}', "must be a number"),
     ('{"": 1}', "non-empty")],
)  # fmt: skip
def test_malformed_weights_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "w.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_tenant_weights(f"@{path}")


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_tenant_weights(f"@{tmp_path}/nope.json")
