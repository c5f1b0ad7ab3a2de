"""CPU defaults."""

from __future__ import annotations

import pytest

from adaptivellm import cpu


@pytest.mark.parametrize(
    ("available", "expected"),
    [
        (64 << 30, 4 << 30),  # capped at 4 GiB
        (8 << 30, 2 << 30),  # a quarter
        ((8 << 30) + 12345, 2 << 30),  # rounded down to MiB
        (100 << 20, 64 << 20),  # never below 64 MiB
    ],
)
def test_default_kv_cache_bytes(available: int, expected: int) -> None:
    assert cpu.default_kv_cache_bytes(available) == expected


def test_default_kv_cache_fits_this_machine() -> None:
    size = cpu.default_kv_cache_bytes()
    assert 64 << 20 <= size <= cpu.mem_available_bytes()
    assert size % (1 << 20) == 0


def test_amx_request_matches_cpu() -> None:
    granted = cpu.request_amx_permission()
    assert granted is (cpu.request_amx_permission())  # idempotent
    if not cpu.has_amx():
        assert granted is False


def test_plugin_register_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first register() makes the split model's architecture known to vLLM (lazily, by
    module and class name); any later one registers nothing again."""
    from vllm import ModelRegistry

    from adaptivellm.plugin import register
    from adaptivellm.split_config import ARCHITECTURE

    register()
    known = list(ModelRegistry.get_supported_archs())
    assert known.count(ARCHITECTURE) == 1
    entry = ModelRegistry.models[ARCHITECTURE]
    assert (entry.module_name, entry.class_name) == ("adaptivellm.split_model", ARCHITECTURE)  # type: ignore[attr-defined]
    calls: list[str] = []
    monkeypatch.setattr(ModelRegistry, "register_model", lambda arch, *a, **k: calls.append(arch))
    register()
    register()
    assert calls == []
    assert list(ModelRegistry.get_supported_archs()) == known
