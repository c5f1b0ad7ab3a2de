"""Patch of vLLM 0.32.0's model runner for split execution: tell the model where each token of
the batch starts.

vLLM passes a model only flat per-token tensors (ids or embeddings, positions); which request a
token belongs to is known to the model runner alone. This patch wraps
`GPUModelRunner._model_forward` (which the CPU runner inherits; vLLM documents it as the method
subclasses override "for model execution") so that, for the duration of one forward pass,
`current_start_layers()` returns each token's start layer: k for a split request's tokens, 0 for
an ordinary request's (and for padding). It is `None` when the batch holds no split request, so
ordinary batches take the model's unmodified (compiled) path.

It is installed by the split model class when vLLM instantiates it, in the worker process only,
and only when split execution is on. Touch points: `GPUModelRunner._model_forward`,
`self.input_batch.req_ids`, `self.input_batch.num_reqs`, `self.requests[id].sampling_params`,
`self.query_start_loc.np` (the per-request token offsets of the step being run).
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any, Final

import numpy as np
import torch

from adaptivellm.compat import check_vllm_version
from adaptivellm.scheduler.split_sessions import EXTRA_KEY

WRITTEN_FOR: Final = "0.32.0"
_start_layers: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "adaptivellm_split_start_layers", default=None
)
_installed = False


def current_start_layers() -> torch.Tensor | None:
    """Start layer of each token of the forward pass being run (int64, on CPU), or None."""
    return _start_layers.get()


def start_layers_for(
    layers: list[int], query_start_loc: np.ndarray, num_tokens: int
) -> torch.Tensor | None:
    """Per-token start layers from per-request k and the step's token offsets (pure)."""
    if not any(layers):
        return None
    counts = np.diff(query_start_loc[: len(layers) + 1])
    starts = np.zeros(num_tokens, dtype=np.int64)
    used = int(query_start_loc[len(layers)])
    if used > num_tokens:
        raise ValueError(f"batch layout covers {used} tokens but the input has {num_tokens}")
    starts[:used] = np.repeat(np.asarray(layers, dtype=np.int64), counts)
    return torch.from_numpy(starts)


def _request_layers(runner: Any) -> list[int]:
    layers = []
    for req_id in runner.input_batch.req_ids[: runner.input_batch.num_reqs]:
        state = runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        payload = (params.extra_args or {}).get(EXTRA_KEY) if params is not None else None
        layers.append(int(payload["layer"]) if isinstance(payload, dict) else 0)
    return layers


def install() -> None:
    """Wrap the model runner's forward call once per process; refuses other vLLM versions."""
    global _installed
    if _installed:
        return
    version = check_vllm_version()
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward

    @functools.wraps(original)
    def _model_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        tokens = embeds.shape[0] if embeds is not None else (ids.shape[0] if ids is not None else 0)
        starts = None
        if tokens and self.input_batch.num_reqs:
            starts = start_layers_for(_request_layers(self), self.query_start_loc.np, tokens)
        token = _start_layers.set(starts)
        try:
            return original(self, *args, **kwargs)
        finally:
            _start_layers.reset(token)

    GPUModelRunner._model_forward = _model_forward  # type: ignore[method-assign]
    _installed = True
    if version.split("+")[0] != WRITTEN_FOR:
        import logging

        logging.getLogger(__name__).warning(
            "split runner patch written for vLLM %s, running on %s", WRITTEN_FOR, version
        )
