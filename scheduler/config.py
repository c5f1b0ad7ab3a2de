"""AdaptiveLLM's configuration as it travels to the engine core and the API server, and the
fairness part of it.

`adaptivellm serve` builds each part from its flags (`FairnessConfig`, the swap-or-recompute
`PreemptionConfig`, the split endpoint's `SplitConfig`) and stores it in vLLM's
`--additional-config` under `adaptivellm.<part>` (`store_part`); the scheduler in the
engine-core process and the split endpoint in the API server read them back with one reader,
`AdaptiveConfig.from_additional_config`. No I/O here except `load_tenant_weights`, which reads
the operator's weights file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptivellm.jsonfile import read_json
from adaptivellm.scheduler.policies import (
    POLICIES,
    ServiceModel,
    TurnaroundPreemption,
    VTCWeights,
)
from adaptivellm.scheduler.preemption import PreemptionConfig
from adaptivellm.split_config import SplitConfig

ADDITIONAL_CONFIG_KEY = "adaptivellm"
DEFAULT_TENANT = "default"
#: Longest tenant name (the API answers 400 to a longer one; the engine truncates).
MAX_TENANT_LEN = 128
#: Range of a tenant's weight (--tenant-weights, --tenant-keys) and of a request's
#: `vllm_xargs.weight`.
WEIGHT_RANGE = (1e-3, 1e3)
#: Priorities AdaptiveLLM's own policies accept (lower = more important); each step scales the
#: weight by 2: a request of priority p weighs 2**-p times as much.
PRIORITY_RANGE = (-20, 20)
#: Range the engine clamps a request's effective weight to (tenant weight x request weight x
#: 2**-priority), whatever reaches it: policy arithmetic never sees 0, inf or NaN.
EFFECTIVE_WEIGHT_RANGE = (1e-9, 1e9)


def effective_weight(tenant_weight: float, request_weight: object, priority: object) -> float:
    """tenant_weight x request_weight x 2**-priority, clamped to EFFECTIVE_WEIGHT_RANGE, the
    priority to PRIORITY_RANGE first. Values that are not finite numbers count as their default
    (weight 1, priority 0): the API rejects them, and this is the engine's second line."""
    low, high = PRIORITY_RANGE
    p = finite_or(priority, 0.0)
    w = finite_or(request_weight, 1.0)
    weight = finite_or(tenant_weight, 1.0) * (w if w > 0 else 1.0) * 2.0 ** -min(high, max(low, p))
    return min(EFFECTIVE_WEIGHT_RANGE[1], max(EFFECTIVE_WEIGHT_RANGE[0], weight))


def finite_or(value: object, default: float) -> float:
    """`value` as a finite float, else `default` (None, strings, bools, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return default
    return number if math.isfinite(number) else default


@dataclass(frozen=True)
class FairnessConfig:
    """How waiting requests are admitted and which running request is preempted."""

    policy: str = "weighted-turnaround"
    """fcfs | priority (vLLM's own policies) | vtc | weighted-turnaround."""
    max_wait_s: float = 60.0
    """Starvation bound: a request waiting this long goes ahead of all non-starved requests."""
    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    """Weight per tenant (default 1): a tenant of weight 2 is entitled to twice the service."""
    strict_tenants: bool = False
    """Reject requests naming a tenant that is not in tenant_weights."""
    service: ServiceModel = field(default_factory=ServiceModel)
    """Predicts a request's latency alone on the idle server (weighted-turnaround's S); the
    prior of the learned model when learn_service is on."""
    learn_service: bool = True
    """Learn the service model's per-token costs from the engine's steps (service_fit)."""
    vtc: VTCWeights = field(default_factory=VTCWeights)
    """Token costs of the VTC counter."""
    preemption: TurnaroundPreemption = field(default_factory=TurnaroundPreemption)
    """When weighted-turnaround preempts a running request for a waiting one."""
    tenant_slack_tokens: float | None = None
    """weighted-turnaround: a request of a tenant ahead of the least-served one may still go
    first when its predicted cost would leave its tenant's counter at most this many counter
    units (VTC-weighted tokens / weight) above the least (policies.order_by_turnaround).
    None (the default): the cost of one request at the model's full length
    (`auto_tenant_slack`), so the counters stay within VTC's own bound."""
    max_step_s: float = 0.5
    """weighted-turnaround: cap each step's scheduled tokens at about this many seconds of
    prefill (by the service model), so a request arriving during a long prompt's prefill waits
    about one short step, not the whole prefill. 0 = vLLM's token budget unchanged."""
    service_exponent: float = 2.0
    """weighted-turnaround ranks waiting requests by weight * (waited + S) / S ** this
    (policies.turnaround_key): 1 = highest response ratio next, 2 = Smith's rule with
    response-ratio aging; larger favours short requests more. Between 1 and 4."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown fairness policy {self.policy!r}; choose from {POLICIES}")
        if not (math.isfinite(self.max_wait_s) and self.max_wait_s > 0):
            raise ValueError(f"max_wait_s must be a positive number, got {self.max_wait_s}")
        check_weights(self.tenant_weights)
        numbers = {"max_step_s": self.max_step_s}
        if self.tenant_slack_tokens is not None:  # None: auto_tenant_slack
            numbers["tenant_slack_tokens"] = self.tenant_slack_tokens
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        exponent = self.service_exponent
        if isinstance(exponent, bool) or not isinstance(exponent, int | float):
            raise ValueError(f"service_exponent must be a number, got {exponent!r}")
        if not 1 <= exponent <= 4:  # also rejects NaN
            raise ValueError(f"service_exponent must be between 1 and 4, got {exponent}")
        if self.strict_tenants and not self.tenant_weights:
            raise ValueError("strict tenants need tenant weights (the list of known tenants)")

    def tenant_slack(self, max_model_len: int) -> float:
        """The tenant slack in counter units: the configured one, or auto_tenant_slack."""
        if self.tenant_slack_tokens is not None:
            return float(self.tenant_slack_tokens)
        return auto_tenant_slack(max_model_len, self.vtc)

    def weight_of(self, tenant: str) -> float:
        """The tenant's weight (1 for tenants not listed)."""
        return float(self.tenant_weights.get(tenant, 1.0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for `--additional-config`."""
        out = dataclasses.asdict(self)
        out["tenant_weights"] = dict(self.tenant_weights)
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> FairnessConfig:
        """Inverse of to_dict."""
        data = dict(data)
        service = ServiceModel(**data.pop("service", {}))
        vtc = VTCWeights(**data.pop("vtc", {}))
        preemption = TurnaroundPreemption(**data.pop("preemption", {}))
        return FairnessConfig(service=service, vtc=vtc, preemption=preemption, **data)


def _parts(additional: Any) -> Mapping[str, Any]:
    section = additional.get(ADDITIONAL_CONFIG_KEY) if isinstance(additional, Mapping) else None
    return section if isinstance(section, Mapping) else {}


@dataclass(frozen=True)
class AdaptiveConfig:
    """Everything `adaptivellm serve` carries in vLLM's additional_config: read in one place."""

    fairness: FairnessConfig = field(default_factory=FairnessConfig)
    #: Absent: stock vLLM's recompute (an engine started without `adaptivellm serve`).
    preemption: PreemptionConfig = field(default_factory=lambda: PreemptionConfig("recompute"))
    #: None: split execution is off.
    split: SplitConfig | None = None

    @staticmethod
    def from_additional_config(additional: Any) -> AdaptiveConfig:
        """Each part `store_part` stored, validated by its dataclass; defaults where absent."""
        parts = _parts(additional)
        fairness, preemption, split = (parts.get(k) for k in ("fairness", "preemption", "split"))
        return AdaptiveConfig(
            fairness=FairnessConfig.from_dict(fairness if isinstance(fairness, Mapping) else {}),
            preemption=PreemptionConfig(**preemption)
            if isinstance(preemption, Mapping)
            else PreemptionConfig("recompute"),
            split=SplitConfig(**split) if isinstance(split, Mapping) else None,
        )


def store_part(args: Any, part: str, value: Any) -> None:
    """Put one part (a config dataclass) into `args.additional_config` (vLLM's
    `--additional-config`) under `adaptivellm.<part>`, for AdaptiveConfig to read back."""
    if part not in {f.name for f in dataclasses.fields(AdaptiveConfig)}:
        raise ValueError(f"unknown AdaptiveLLM config part {part!r}")
    if not isinstance(args.additional_config, dict):
        args.additional_config = {}
    section = args.additional_config.setdefault(ADDITIONAL_CONFIG_KEY, {})
    section[part] = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)


def auto_tenant_slack(max_model_len: int, costs: VTCWeights) -> float:
    """The default tenant slack: the VTC cost U of the costliest request the model can take
    (`max_model_len` tokens, all priced at the dearer of the input and output token costs).
    VTC itself (Sheng et al., OSDI 2024) keeps two backlogged tenants' counters within 2U of
    each other; the slack keeps them within slack + one request's cost, hence within 2U too,
    while a heavy tenant's short requests need not wait behind a light tenant's long ones."""
    return float(max_model_len) * max(costs.input_token, costs.output_token)


def check_weights(weights: Mapping[str, Any]) -> None:
    """Tenant names are non-empty strings of at most MAX_TENANT_LEN characters, weights
    numbers in WEIGHT_RANGE."""
    low, high = WEIGHT_RANGE
    for tenant, weight in weights.items():
        if not isinstance(tenant, str) or not tenant.strip() or len(tenant) > MAX_TENANT_LEN:
            raise ValueError(
                f"tenant names must be non-empty strings of at most {MAX_TENANT_LEN} "
                f"characters, got {tenant!r}"
            )
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"weight of tenant {tenant!r} must be a number, got {weight!r}")
        if not low <= weight <= high:  # also rejects NaN
            raise ValueError(
                f"weight of tenant {tenant!r} must be between {low:g} and {high:g}, got {weight!r}"
            )


def load_tenant_weights(spec: str) -> dict[str, float]:
    """Parse `--tenant-weights`: `name=weight,...`, or `@FILE` with a JSON object
    `{"name": weight, ...}` (optionally under a top-level "tenants" key)."""
    if spec.startswith("@"):
        path = Path(spec[1:]).expanduser()
        data = read_json(path, "tenant weights file")
        if isinstance(data, dict) and isinstance(data.get("tenants"), dict):
            data = data["tenants"]
        if not isinstance(data, dict):
            raise ValueError(f'tenant weights file {path} must hold a JSON object {{"name": w}}')
        check_weights(data)
        return {t: float(w) for t, w in data.items()}
    weights: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not name.strip() or math.isnan(weight):
            raise ValueError(f"bad tenant weight {item!r}: expected name=weight, e.g. gold=2")
        weights[name.strip()] = weight
    check_weights(weights)
    return weights
