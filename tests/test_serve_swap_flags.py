"""`adaptivellm serve` refuses flags that would replace its swap connector, with a clear
message at start-up (before: vLLM swapped in its OffloadingConnector under our module path and
the engine raised at start-up)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptivellm.serve import apply_defaults, build_parser


@pytest.fixture
def model(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


@pytest.mark.parametrize("mode", [[], ["--preemption-mode", "swap"],
                                  ["--preemption-mode", "adaptive"]])  # fmt: skip
def test_kv_offloading_size_with_swap_is_refused(model: str, mode: list[str]) -> None:
    args = build_parser().parse_args(["serve", model, "--kv-offloading-size", "4", *mode])
    with pytest.raises(SystemExit) as exc:
        apply_defaults(args, False, is_cpu=False)
    message = str(exc.value)
    assert "--kv-offloading-size" in message and "--preemption-mode recompute" in message
    assert args.kv_transfer_config is None  # nothing half-configured


def test_kv_offloading_size_with_recompute_is_vllms_offloading(model: str) -> None:
    argv = ["serve", model, "--kv-offloading-size", "4", "--preemption-mode", "recompute"]
    args = build_parser().parse_args(argv)
    apply_defaults(args, False, is_cpu=False)
    assert args.kv_offloading_size == 4 and args.kv_transfer_config is None


def test_another_kv_connector_with_swap_is_still_refused(model: str) -> None:
    argv = ["serve", model, "--kv-transfer-config", '{"kv_connector": "X", "kv_role": "kv_both"}']
    args = build_parser().parse_args(argv)
    with pytest.raises(SystemExit, match="--kv-transfer-config selects another KV connector"):
        apply_defaults(args, False, is_cpu=False)


def test_swap_mode_notes_the_division_across_tp_ranks(model: str) -> None:
    argv = ["serve", model, "--preemption-mode", "swap", "--swap-space", "2",
            "--tensor-parallel-size", "2"]  # fmt: skip
    args = build_parser().parse_args(argv)
    notes = apply_defaults(args, False, is_cpu=False).notes
    assert any("2.00 GiB (divided across tensor-parallel ranks)" in n for n in notes)
    extra = args.kv_transfer_config.kv_connector_extra_config
    assert extra["swap_space_bytes"] == 2 << 30  # the total: each of 2 ranks holds half
