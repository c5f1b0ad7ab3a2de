"""The scheduler's view of the cost predictors: (num_tokens, num_blocks) -> (swap seconds,
recompute seconds) for the served model on this device.

Recompute is priced for the victim alone: the cost its recompute adds to the step that will run
it later, whose other requests are not known when the victim is chosen. The profiler measures
exactly that (docs/predictors.md).

The predictor is the XGBoost profile made by `adaptivellm profile` for this model shape, device,
dtype and vLLM version, or the analytic fallback (with a warning saying how to make a profile).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from adaptivellm.predictors.features import ModelShape, PreemptionFeatures
from adaptivellm.predictors.predictor import CostPredictor, load_predictor
from adaptivellm.predictors.store import ProfileKey

CostFn = Callable[[int, int], tuple[float, float]]
logger = logging.getLogger(__name__)


def predictor_for_vllm_config(vllm_config: Any) -> tuple[CostPredictor, ModelShape]:
    """The cost predictor and model shape for the engine's model, device and dtype."""
    model_config = vllm_config.model_config
    dtype = str(model_config.dtype).removeprefix("torch.")
    shape = ModelShape.from_hf_config(model_config.hf_config.to_dict(), dtype=dtype)
    device = vllm_config.device_config.device_type
    key = ProfileKey.for_shape(shape, device=device, dtype=dtype, model=str(model_config.model))
    predictor = load_predictor(key)
    logger.info("Preemption cost predictor: %s", predictor.source)
    return predictor, shape


def costs_for_vllm_config(vllm_config: Any) -> CostFn:
    """Cost function for the engine's model (the victim alone; module docstring)."""
    predictor, shape = predictor_for_vllm_config(vllm_config)
    block_size = vllm_config.cache_config.block_size

    def costs(num_tokens: int, num_blocks: int) -> tuple[float, float]:
        features = PreemptionFeatures.for_victim(
            shape, num_tokens, block_size, num_blocks=num_blocks
        )
        return predictor.swap_s(features), predictor.recompute_s(features)

    return costs
