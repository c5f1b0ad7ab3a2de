"""vLLM general plugin: runs in every vLLM process (API server, engine core, workers).

vLLM may load general plugins several times per process, so everything here is idempotent. It is
also loaded by a stock vLLM started from the same environment, so it only does what any vLLM on
this host needs and changes no behaviour: it asks Linux for AMX tile state (see adaptivellm.cpu).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def register() -> None:
    """Entry point of the `vllm.general_plugins` group."""
    _register_split_model()
    from adaptivellm.cpu import has_amx, request_amx_permission

    if has_amx() and not request_amx_permission():
        logger.warning(
            "Linux refused AMX tile state for this process: bfloat16 on CPU may die with SIGILL; "
            "serve with --dtype float32"
        )


def _register_split_model() -> None:
    """Make the split-execution model class known by name (lazily: nothing is imported until a
    server asks for it with --split-execution). Registering a new name changes nothing for
    models that do not name it."""
    from vllm import ModelRegistry

    from adaptivellm.split_config import ARCHITECTURE

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "adaptivellm.split_model:" + ARCHITECTURE)
