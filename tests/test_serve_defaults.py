"""What `adaptivellm serve` fills in before handing the arguments to vLLM's launcher."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from adaptivellm.scheduler.scheduler import QUALNAME
from adaptivellm.serve import apply_defaults, build_parser, with_model
from adaptivellm.tenancy import ENV as TENANCY_ENV
from adaptivellm.tenancy import key_digest


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def parse(parser: argparse.ArgumentParser, *argv: str) -> argparse.Namespace:
    return parser.parse_args(["serve", *argv])


@pytest.fixture
def model(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


def test_cpu_defaults_fill_dtype_and_kv_cache(
    parser: argparse.ArgumentParser, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    args = parse(parser, model)
    notes = apply_defaults(args, False, is_cpu=True).notes
    assert args.dtype == "float32"
    assert args.kv_cache_memory_bytes > 0
    assert args.scheduler_cls == QUALNAME
    assert any("SIGILL" in n for n in notes)  # the dtype reason is logged


def test_operator_choices_win(parser: argparse.ArgumentParser, model: str) -> None:
    argv = [model, "--dtype", "bfloat16", "--kv-cache-memory-bytes", "123456789"]
    args = parse(parser, *argv)
    apply_defaults(args, False, is_cpu=True)
    assert (args.dtype, args.kv_cache_memory_bytes) == ("bfloat16", 123456789)


def test_legacy_kv_env_is_respected(
    parser: argparse.ArgumentParser, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    args = parse(parser, model)
    apply_defaults(args, False, is_cpu=True)
    assert args.kv_cache_memory_bytes is None


def test_no_cpu_defaults_and_gpu_keep_vllm_defaults(
    parser: argparse.ArgumentParser, model: str
) -> None:
    args = parse(parser, model, "--no-cpu-defaults")
    apply_defaults(args, False, is_cpu=True)
    assert (args.dtype, args.kv_cache_memory_bytes) == ("auto", None)
    args = parse(parser, model)
    apply_defaults(args, False, is_cpu=False)
    assert (args.dtype, args.kv_cache_memory_bytes) == ("auto", None)


@pytest.mark.parametrize(
    "argv",
    [["MODEL"], ["MODEL", "--port", "1"], ["--port", "1", "--model", "MODEL"],
     ["--model=MODEL"], ["--config", "c.yaml"], ["--help"], ["--help=AdaptiveLLM"]],
)  # fmt: skip
def test_named_model_or_help_is_left_alone(argv: list[str]) -> None:
    assert with_model(argv) == (argv, False)


def test_no_model_serves_the_embedded_model(
    parser: argparse.ArgumentParser, tmp_path: Path
) -> None:
    argv, embedded = with_model(["--served-model-name", "x", "--adaptivellm-cache", str(tmp_path)])
    assert embedded
    args = parse(parser, *argv)
    apply_defaults(args, embedded, is_cpu=False)
    assert Path(args.model_tag).parent == tmp_path / "models"
    assert (Path(args.model_tag) / "config.json").exists()
    assert args.served_model_name == ["x"]
    args = parse(parser, *with_model(["--adaptivellm-cache", str(tmp_path)])[0])
    apply_defaults(args, True, is_cpu=False)
    assert args.served_model_name == ["adaptivellm-tiny-llama"]


def test_custom_scheduler_is_kept(parser: argparse.ArgumentParser, model: str) -> None:
    argv = [model, "--scheduler-cls", "my.Scheduler"]
    args = parse(parser, *argv)
    apply_defaults(args, False, is_cpu=False)
    assert args.scheduler_cls == "my.Scheduler"


@pytest.mark.parametrize(("flag", "learn"), [((), True), (("--no-learn-service-time",), False)])
def test_learn_service_time_flag_reaches_the_engine_config(
    parser: argparse.ArgumentParser, model: str, flag: tuple[str, ...], learn: bool
) -> None:
    args = parse(parser, model, *flag)
    apply_defaults(args, False, is_cpu=True)
    assert args.additional_config["adaptivellm"]["fairness"]["learn_service"] is learn


def test_tenant_slack_and_step_cap_flags_reach_the_engine_config(
    parser: argparse.ArgumentParser, model: str
) -> None:
    fairness = args_fairness(parser, model)
    assert fairness["service_exponent"] == 2.0  # the default
    assert fairness["tenant_slack_tokens"] is None  # auto: from the model's length
    assert (
        args_fairness(parser, model, "--tenant-slack-tokens", "AUTO")["tenant_slack_tokens"] is None
    )
    fairness = args_fairness(
        parser, model, "--tenant-slack-tokens", "0", "--max-step-s", "0.1",
        "--service-time-exponent", "1",
    )  # fmt: skip
    assert (fairness["tenant_slack_tokens"], fairness["max_step_s"]) == (0.0, 0.1)
    assert fairness["service_exponent"] == 1.0


def args_fairness(parser: argparse.ArgumentParser, model: str, *flags: str) -> dict:
    """The fairness section of the engine config that `flags` make."""
    args = parse(parser, model, *flags)
    apply_defaults(args, False, is_cpu=True)
    return args.additional_config["adaptivellm"]["fairness"]


def test_tenant_keys_become_api_keys_and_reach_the_middleware_as_digests(
    parser: argparse.ArgumentParser, model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"tenants": {"acme": {"keys": ["k-acme"], "weight": 2},
                                            "free": {"keys": ["k-free"]}}}))  # fmt: skip
    monkeypatch.delenv(TENANCY_ENV, raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "env-operator")
    args = parse(parser, model, "--tenant-keys", str(keys), "--tenant-weights", "gold=4")
    notes = apply_defaults(args, False, is_cpu=True).notes
    assert args.api_key == ["env-operator", "k-acme", "k-free"]  # the operator's key is kept
    tenancy = json.loads(os.environ[TENANCY_ENV])
    assert tenancy["tenant_keys"] == {key_digest("k-acme"): "acme", key_digest("k-free"): "free"}
    assert "k-acme" not in os.environ[TENANCY_ENV]  # digests only
    fairness = args.additional_config["adaptivellm"]["fairness"]
    assert fairness["tenant_weights"] == {"gold": 4.0, "acme": 2.0, "free": 1.0}
    assert any("2 authenticated tenants" in n for n in notes)


def test_without_tenant_keys_tenants_are_self_declared(
    parser: argparse.ArgumentParser, model: str
) -> None:
    args = parse(parser, model, "--api-key", "op")
    notes = apply_defaults(args, False, is_cpu=True).notes
    assert args.api_key == ["op"]
    assert json.loads(os.environ[TENANCY_ENV])["tenant_keys"] is None
    assert any("self-declared tenants" in n for n in notes)
