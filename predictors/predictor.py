"""Cost predictors the scheduler asks, per preemption victim: swap or recompute, in seconds.

    shape = ModelShape.from_hf_config(config_json_dict, dtype="float32")
    predictor = load_predictor(ProfileKey.for_shape(shape, "cpu", "float32", model="name"))
    f = PreemptionFeatures.for_victim(shape, num_tokens, block_size, num_blocks=num_blocks)
    predictor.swap_s(f), predictor.recompute_s(f)

`load_predictor` uses the stored profile of the key (XGBoost models measured on this machine),
and falls back to `AnalyticPredictor` with a warning when there is none or it is corrupt.
Predictions are pure functions of (profile, features).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from adaptivellm.predictors.analytic import AnalyticCosts, AnalyticPredictor
from adaptivellm.predictors.features import PreemptionFeatures
from adaptivellm.predictors.store import (
    Profile,
    ProfileError,
    ProfileKey,
    find_profile,
    load_profile,
    profile_path,
)

if TYPE_CHECKING:
    import xgboost

logger = logging.getLogger(__name__)


class CostPredictor(Protocol):
    """Predicted seconds of the two ways to handle a preempted request."""

    @property
    def source(self) -> str:
        """Where the predictions come from ('analytic' or 'profile:<path>')."""
        ...

    def swap_s(self, features: PreemptionFeatures) -> float:
        """Seconds to copy the victim's KV blocks to host memory and back."""
        ...

    def recompute_s(self, features: PreemptionFeatures) -> float:
        """Seconds of the step that prefills the victim again."""
        ...


@dataclass(frozen=True)
class ProfilePredictor:
    """A `CostPredictor` from a measured profile's XGBoost cost models."""

    profile: Profile
    source: str = "profile"
    _boosters: dict[str, xgboost.Booster] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Boosters parsed once: loading the JSON model takes far longer than a prediction.
        boosters = {kind: cost.booster() for kind, cost in self.profile.costs.items()}
        object.__setattr__(self, "_boosters", boosters)

    def swap_s(self, features: PreemptionFeatures) -> float:
        """Seconds to copy the victim's KV blocks to host memory and back."""
        return self._predict("swap", features)

    def recompute_s(self, features: PreemptionFeatures) -> float:
        """Seconds of the step that prefills the victim again."""
        return self._predict("recompute", features)

    def _predict(self, kind: str, features: PreemptionFeatures) -> float:
        from adaptivellm.predictors.train import predict_seconds

        cost = self.profile.costs[kind]
        booster = self._boosters[kind]
        return float(predict_seconds(kind, cost.coefficients, booster, [features])[0])


def load_predictor(
    key: ProfileKey, directory: Path | None = None, path: Path | None = None
) -> CostPredictor:
    """The predictor for `key`: from the profile at `path`, else the stored one matching `key`
    (in `directory`, default the cache's profiles folder), else analytic with a warning saying
    how to make a profile. A corrupt or mismatched profile also falls back, with a warning that
    says so."""
    try:
        profile = load_profile(path, expect=key) if path else find_profile(key, directory)
    except ProfileError as exc:
        logger.warning(
            "Cannot use the cost profile: %s. Using analytic swap/recompute costs instead; "
            "measure a new profile with `%s`.",
            exc,
            profile_command(key),
        )
        return analytic_predictor(key)
    if profile is None:
        logger.warning(
            "No cost profile for %s (%s, %s, vLLM %s) in %s. Using analytic swap/recompute "
            "costs, which can be off by 2-3x on this machine; measure one with `%s`.",
            key.model or key.config_hash,
            key.device,
            key.dtype,
            key.vllm_version,
            profile_path(key, directory).parent,
            profile_command(key),
        )
        return analytic_predictor(key)
    where = path or profile_path(profile.key, directory)
    return ProfilePredictor(profile, source=f"profile:{where}")


def analytic_predictor(key: ProfileKey) -> AnalyticPredictor:
    """The analytic fallback for the key's device."""
    return AnalyticPredictor(AnalyticCosts.for_device(key.device))


def profile_command(key: ProfileKey) -> str:
    """The command that measures a profile for `key`."""
    from adaptivellm.model import DEFAULT_MODEL_NAME

    if key.model == DEFAULT_MODEL_NAME:
        model = ""  # the embedded model is the command's default
    else:
        model = f" {key.model}" if "/" in key.model else " MODEL"
    return f"adaptivellm profile{model} --device {key.device} --dtype {key.dtype}"


def oracle_agreement(predictor: CostPredictor) -> dict[str, Any]:
    """How often the predictors pick the mode whose measured cost was lower, over the sizes a
    profile measured both costs at, plus the profile's
    held-out MAPEs. Empty for the analytic fallback, which has no measurements."""
    if not isinstance(predictor, ProfilePredictor):
        return {"mape": {}, "agreement": None, "pairs": 0}
    profile = predictor.profile
    swap = {s.features.num_tokens: s for s in profile.samples["swap"]}
    recompute = {s.features.num_tokens: s for s in profile.samples["recompute"]}
    sizes = sorted(set(swap) & set(recompute))
    agree = 0
    for n in sizes:
        features = swap[n].features
        predicted_swap = predictor.swap_s(features) < predictor.recompute_s(features)
        agree += predicted_swap == (swap[n].seconds < recompute[n].seconds)
    return {
        "mape": {kind: cost.mape for kind, cost in profile.costs.items()},
        "agreement": agree / len(sizes) if sizes else None,
        "pairs": len(sizes),
    }
