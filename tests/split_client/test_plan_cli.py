"""Tests of `adaptivellm plan`, driven through add_plan_arguments / run_plan."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from adaptivellm.split_client.plan_cli import (
    EXIT_BAD_INPUT,
    EXIT_INFEASIBLE,
    EXIT_OK,
    add_plan_arguments,
    run_plan,
)


def plan(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="adaptivellm plan")
    add_plan_arguments(parser)
    code = run_plan(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_table_shows_every_layer_and_the_split(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = plan(["gpt2", "--sla-ms", "3000", "--rtt-ms", "10"], capsys)
    assert code == EXIT_OK and err == ""
    rows = [line for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert len(rows) == 12
    assert "split layer k = " in out
    for method in ("server-only", "greedy", "prefix", "dp"):
        assert any(line.startswith(method) for line in out.splitlines())


def test_json_output_matches_the_table_choice(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["llama3-8b", "--sla-ms", "8000", "--output-tokens", "64", "--json"]
    code, out, _ = plan(argv, capsys)
    report = json.loads(out)
    assert code == EXIT_OK
    assert report["num_layers"] == len(report["layers"]) == 32
    k = report["split_layer"]
    assert isinstance(k, int) and 0 < k <= 32
    assert report["plans"]["prefix"]["placement"] == "C" * k + "S" * (32 - k)
    assert [row["prefix"] for row in report["layers"]].count("client") == k
    assert report["plans"]["dp"]["meets_sla"] is True
    assert report["plans"]["dp"]["latency_ms"] <= 8000
    only = report["plans"]["server-only"]
    assert report["plans"]["dp"]["server_gflop"] < only["server_gflop"]


def test_unreachable_sla_exits_nonzero_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = plan(["llama3-8b", "--sla-ms", "50"], capsys)
    assert code == EXIT_INFEASIBLE
    assert "no placement meets the SLA of 50 ms" in err
    assert "split layer k" not in out


def test_unreachable_sla_in_json_has_no_split(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = plan(["gpt2", "--sla-ms", "1", "--json"], capsys)
    assert code == EXIT_INFEASIBLE
    assert json.loads(out)["split_layer"] is None


def test_dead_uplink_gives_json_without_infinities(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = plan(["gpt2", "--sla-ms", "1000", "--uplink-mbps", "0", "--json"], capsys)
    report = json.loads(out)  # strict JSON: no Infinity literals
    assert code == EXIT_INFEASIBLE
    assert report["plans"]["dp"]["latency_ms"] is None


def test_bad_input_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = plan(["gpt2", "--sla-ms", "1000", "--downlink-mbps", "-5"], capsys)
    assert code == EXIT_BAD_INPUT
    assert "downlink_bps must be >= 0" in err
    code, _, err = plan(["gpt-5", "--sla-ms", "1000"], capsys)
    assert code == EXIT_BAD_INPUT and "unknown model preset" in err


def test_model_path_reads_a_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "num_hidden_layers": 5,
        "vocab_size": 1000,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, _ = plan(["--model-path", str(tmp_path), "--sla-ms", "5000", "--json"], capsys)
    assert code == EXIT_OK
    assert json.loads(out)["num_layers"] == 5


def test_step_ms_is_used_by_the_dp(capsys: pytest.CaptureFixture[str]) -> None:
    """A step as large as the SLA leaves no room for anything but what rounds to zero."""
    _, out, _ = plan(["gpt2", "--sla-ms", "3000", "--step-ms", "3000", "--json"], capsys)
    coarse = json.loads(out)["plans"]["dp"]
    _, out, _ = plan(["gpt2", "--sla-ms", "3000", "--json"], capsys)
    fine = json.loads(out)["plans"]["dp"]
    assert coarse["client_layers"] < fine["client_layers"]
    code, _, err = plan(["gpt2", "--sla-ms", "3000", "--step-ms", "-1"], capsys)
    assert code == EXIT_BAD_INPUT and "step_s" in err
