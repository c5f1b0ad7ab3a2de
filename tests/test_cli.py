"""The `adaptivellm` command line, run as a user runs it (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adaptivellm import __version__


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "adaptivellm.cli", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_version_names_both_versions() -> None:
    out = run("--version")
    assert out.returncode == 0
    assert f"adaptivellm {__version__}" in out.stdout
    assert "0.32.0" in out.stdout


def test_serve_help_has_vllm_flags_and_adaptivellm_group() -> None:
    out = run("serve", "--help")
    assert out.returncode == 0, out.stderr
    assert "adaptivellm serve [model_tag]" in out.stdout
    assert "AdaptiveLLM" in out.stdout  # our group in the section list
    assert "ModelConfig" in out.stdout  # vLLM's groups
    detail = run("serve", "--help=AdaptiveLLM")
    assert "--no-cpu-defaults" in detail.stdout


def test_unknown_flag_is_a_usage_error() -> None:
    out = run("serve", "--no-such-flag", "3")
    assert out.returncode == 2
    assert "--no-such-flag" in out.stderr


@pytest.mark.parametrize("model", ["/nonexistent/model", "./no/such/dir"])
def test_nonexistent_model_path_fails_fast_and_clearly(model: str) -> None:
    out = run("serve", model, "--port", "0")
    assert out.returncode != 0
    assert f"model path {model!r} does not exist" in out.stderr


def test_folder_without_config_is_not_a_model(tmp_path: Path) -> None:
    out = run("serve", str(tmp_path))
    assert out.returncode != 0
    assert "no config.json" in out.stderr


def test_make_model_builds_the_requested_shape(tmp_path: Path) -> None:
    out = run("make-model", "--layers", "3", "--hidden-size", "64", "--heads", "2",
              "--kv-heads", "1", "--vocab-size", "700", "--cache", str(tmp_path))  # fmt: skip
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path.parent == tmp_path / "models"
    config = json.loads((path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        3,
        64,
        700,
    )


def test_make_model_rejects_bad_shape(tmp_path: Path) -> None:
    out = run("make-model", "--hidden-size", "64", "--heads", "4", "--cache", str(tmp_path))
    assert out.returncode == 2
    assert "head_dim" in out.stderr
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--tenant-weights", "gold=lots"], "bad tenant weight"),
     (["--tenant-weights", "@/nonexistent.json"], "cannot read tenant weights file"),
     (["--scheduling-policy", "priority", "--fairness", "vtc"], "conflicts"),
     (["--strict-tenants"], "need tenant weights"),
     (["--max-queue-wait-s", "-1"], "max_wait_s"),
     (["--fairness-preemption-margin", "0.5"], "preemption margin"),
     (["--tenant-slack-tokens", "-5"], "tenant_slack_tokens"),
     (["--tenant-slack-tokens", "lots"], "expected a number or 'auto'"),
     (["--max-step-s", "nan"], "max_step_s"),
     (["--service-time-exponent", "5"], "service_exponent must be between 1 and 4"),
     (["--fairness-preemption-candidates", "0"], "candidates must be >= 1"),
     (["--tenant-keys", "/nonexistent.json"], "cannot read tenant key file"),
     (["--tenant-weights", "gold=5000"], "must be between 0.001 and 1000")],
)  # fmt: skip
def test_bad_fairness_flags_fail_before_the_engine_starts(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    (tmp_path / "config.json").write_text("{}")
    out = run("serve", str(tmp_path), *flags)
    assert out.returncode != 0
    assert message in out.stderr


def test_malformed_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "w.json"
    weights.write_text('{"gold": "high"}')
    out = run("serve", str(tmp_path), "--tenant-weights", f"@{weights}")
    assert out.returncode != 0
    assert "weight of tenant 'gold' must be a number" in out.stderr


def test_tenant_keys_that_disagree_with_tenant_weights_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"tenants": {"gold": {"keys": ["k-gold"], "weight": 3}}}))
    out = run("serve", str(tmp_path), "--tenant-keys", str(keys), "--tenant-weights", "gold=2")
    assert out.returncode != 0
    assert "weighs 2 in --tenant-weights but 3 in --tenant-keys" in out.stderr
