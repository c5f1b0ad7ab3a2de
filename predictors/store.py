"""Versioned profile files: measured samples and trained cost models, keyed by what they measured.

A profile is one JSON file under `<adaptivellm cache>/profiles/` (see `profile_path`):

    {"format": "adaptivellm-profile", "version": 2,
     "key": {"model", "config_hash", "device", "dtype", "vllm_version"},
     "shape": {ModelShape fields}, "created": ISO time, "command": how it was made,
     "grid": {profiler settings}, "threads": int | null,
     "costs": {"swap" | "recompute": {"coefficients", "booster_json", "mape",
                                       "baseline_mape", "n_train", "n_test"}},
     "samples": {"swap" | "recompute": [{num_tokens, num_blocks, block_size, seconds}, ...]}}

Version 1 also measured recompute beside other batch tokens, a feature the scheduler never
asked with; its files are refused (make the profile again).

`booster_json` is XGBoost's own JSON model text (`Booster.save_raw("json")`). A profile matches
a key when the shape hash, device, dtype and vLLM version agree; the model name is a label (two
checkpoints of one shape cost the same). A profile measured without vLLM installed (vLLM version
"none", e.g. on a GPU machine with torch only) matches any vLLM version: the torch backend does
not depend on it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adaptivellm.predictors.features import ModelShape, PreemptionFeatures, Sample
from adaptivellm.predictors.train import KINDS, FittedCost

logger = logging.getLogger(__name__)

FORMAT = "adaptivellm-profile"
#: Bump when the file layout or the meaning of a field changes; older files are then refused.
PROFILE_VERSION = 2
#: The vLLM version of a profile measured with vLLM absent.
NO_VLLM = "none"


class ProfileError(RuntimeError):
    """A profile file is missing, unreadable, corrupt, of another format version or key."""


@dataclass(frozen=True)
class ProfileKey:
    """What a profile measured: which model shape, on which device, in which dtype, under which
    vLLM."""

    model: str
    """Human-readable model name (a label; not matched)."""
    config_hash: str
    """`ModelShape.config_hash()` of the model."""
    device: str
    """'cpu' or 'cuda'."""
    dtype: str
    """'float32', 'bfloat16' or 'float16'."""
    vllm_version: str = NO_VLLM
    """Installed vLLM version when profiled, or 'none'."""

    @classmethod
    def for_shape(
        cls,
        shape: ModelShape,
        device: str,
        dtype: str,
        model: str = "",
        vllm_version: str | None = None,
    ) -> ProfileKey:
        """Key for `shape`; `vllm_version` defaults to the installed vLLM (read from package
        metadata, without importing vLLM), or 'none'."""
        if vllm_version is None:
            from adaptivellm.compat import installed_vllm

            found = installed_vllm()
            vllm_version = found[1] if found else NO_VLLM
        return cls(model, shape.config_hash(), device, dtype, vllm_version)

    def matches(self, other: ProfileKey) -> bool:
        """True when a profile keyed `other` may serve requests keyed `self`."""
        return (
            self.config_hash == other.config_hash
            and self.device == other.device
            and self.dtype == other.dtype
            and other.vllm_version in (self.vllm_version, NO_VLLM)
        )

    def file_name(self) -> str:
        """File name of the profile under the profiles folder."""
        return f"{self.config_hash}-{self.device}-{self.dtype}-vllm-{self.vllm_version}.json"


@dataclass(frozen=True)
class Profile:
    """A loaded profile: key, shape, trained costs, and the samples they were trained on."""

    key: ProfileKey
    shape: ModelShape
    costs: dict[str, FittedCost]
    """Trained cost per kind ('swap', 'recompute')."""
    samples: dict[str, list[Sample]]
    """Measured samples per kind."""
    meta: dict[str, Any] = field(default_factory=dict)
    """created, command, grid, threads: how the profile was made (informational)."""


def profiles_dir(cache: Path | None = None) -> Path:
    """`<adaptivellm cache>/profiles`."""
    from adaptivellm.model import default_cache_dir

    return (cache or default_cache_dir()) / "profiles"


def profile_path(key: ProfileKey, directory: Path | None = None) -> Path:
    """Where the profile of `key` is stored."""
    return (directory or profiles_dir()) / key.file_name()


def save_profile(profile: Profile, path: Path | None = None) -> Path:
    """Write `profile` (atomically) to `path`, by default its place in the store; return it."""
    path = path or profile_path(profile.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_json(profile), indent=1, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def load_profile(path: Path, expect: ProfileKey | None = None) -> Profile:
    """Read the profile at `path`; ProfileError if missing, corrupt, of another format version,
    or (with `expect`) measured for a key that does not match."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ProfileError(f"no profile at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"profile {path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ProfileError(f"{path} is not an AdaptiveLLM profile")
    if data.get("version") != PROFILE_VERSION:
        raise ProfileError(
            f"profile {path} has format version {data.get('version')!r}, this AdaptiveLLM reads "
            f"version {PROFILE_VERSION}: measure again with `adaptivellm profile`"
        )
    try:
        profile = from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"profile {path} is corrupt ({type(exc).__name__}: {exc})") from None
    if expect is not None and not expect.matches(profile.key):
        raise ProfileError(f"profile {path} was measured for {profile.key}, not {expect}")
    return profile


def find_profile(key: ProfileKey, directory: Path | None = None) -> Profile | None:
    """The stored profile matching `key` (same vLLM version first, then one measured without
    vLLM), or None when there is none. A corrupt candidate raises ProfileError."""
    for candidate in (key, ProfileKey(key.model, key.config_hash, key.device, key.dtype)):
        path = profile_path(candidate, directory)
        if path.exists():
            return load_profile(path, expect=key)
    return None


def to_json(profile: Profile) -> dict[str, Any]:
    """The JSON document of `profile`."""
    return {
        "format": FORMAT,
        "version": PROFILE_VERSION,
        "key": asdict(profile.key),
        "shape": asdict(profile.shape),
        "costs": {kind: asdict(cost) for kind, cost in profile.costs.items()},
        "samples": {
            kind: [{**s.features.as_dict(), "seconds": s.seconds} for s in samples]
            for kind, samples in profile.samples.items()
        },
        **profile.meta,
    }


def from_json(data: dict[str, Any]) -> Profile:
    """Inverse of `to_json` (KeyError/TypeError/ValueError on malformed input)."""
    shape = ModelShape(**data["shape"])
    costs = {kind: _cost(data["costs"][kind]) for kind in KINDS}
    samples = {kind: [_sample(shape, s) for s in data["samples"][kind]] for kind in KINDS}
    known = {"format", "version", "key", "shape", "costs", "samples"}
    meta = {k: v for k, v in data.items() if k not in known}
    return Profile(ProfileKey(**data["key"]), shape, costs, samples, meta)


def _cost(data: dict[str, Any]) -> FittedCost:
    cost = FittedCost(**{**data, "coefficients": tuple(data["coefficients"])})
    cost.booster()  # validates the embedded model now rather than at the first preemption
    return cost


def _sample(shape: ModelShape, data: dict[str, Any]) -> Sample:
    features = PreemptionFeatures(
        num_tokens=data["num_tokens"],
        num_blocks=data["num_blocks"],
        block_size=data["block_size"],
        shape=shape,
    )
    return Sample(features, float(data["seconds"]))
