"""The scheduler's view of the cost predictors: (num_tokens, num_blocks, batch_tokens) ->
(swap seconds, recompute seconds) for the served model on this device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CostFn = Callable[[int, int, int], tuple[float, float]]


def costs_for_vllm_config(vllm_config: Any) -> CostFn:
    """Cost function for the engine's model, device and dtype."""
    hf = vllm_config.model_config.hf_config
    layers = int(hf.num_hidden_layers)
    hidden = int(hf.hidden_size)
    kv_heads = int(getattr(hf, "num_key_value_heads", hf.num_attention_heads))
    head_dim = int(getattr(hf, "head_dim", None) or hidden // hf.num_attention_heads)
    inter = int(hf.intermediate_size)
    dtype_bytes = vllm_config.model_config.dtype.itemsize

    def costs(num_tokens: int, num_blocks: int, batch_tokens: int) -> tuple[float, float]:
        kv_bytes = 2 * layers * kv_heads * head_dim * dtype_bytes * num_tokens
        swap = 2 * (kv_bytes / 5e9 + 2e-5 * layers)
        flops = (
            2
            * num_tokens
            * layers
            * (2 * hidden * (hidden + 2 * kv_heads * head_dim) + 3 * hidden * inter)
            + 4 * layers * hidden * num_tokens**2
        )
        return swap, flops / 5e10

    return costs
