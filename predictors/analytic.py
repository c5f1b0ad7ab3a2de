"""Analytic swap and recompute costs: the fallback when no measured profile exists.

    swap_s      = 2 * swap_bytes / copy_bandwidth + 2 * num_layers * copy_call_s
    recompute_s = recompute_flops / flops_per_s + num_layers * layer_call_s

The swap moves every block of the victim out to host memory and later back (hence the 2), one
copy call per layer and direction. The recompute is one prefill of the victim's tokens, linear
layers plus causal attention (quadratic in length), see `PreemptionFeatures.recompute_flops`.

The constants are not measured: they are round numbers for a small x86 server CPU (one or two
cores of AVX-512 in float32, memcpy-class copies) and for a datacenter GPU behind PCIe 4/5.
Only their ratio decides swap-vs-recompute, and they can be off by 2-3x on a given machine:
`adaptivellm profile` measures the real costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from adaptivellm.predictors.features import PreemptionFeatures


@dataclass(frozen=True)
class AnalyticCosts:
    """Hardware constants of the analytic cost model."""

    copy_bytes_per_s: float = 5e9
    """Effective bandwidth of a gather/scatter copy of KV blocks between device and host."""
    copy_call_s: float = 10e-6
    """Fixed time per copy call (one per layer and direction): dispatch, index handling."""
    flops_per_s: float = 50e9
    """Effective dense throughput of a prefill."""
    layer_call_s: float = 50e-6
    """Fixed time per decoder layer of a forward step (kernel launches, small ops)."""

    def __post_init__(self) -> None:
        if min(self.copy_bytes_per_s, self.flops_per_s) <= 0:
            raise ValueError("bandwidth and throughput must be > 0")
        if min(self.copy_call_s, self.layer_call_s) < 0:
            raise ValueError("per-call times must be >= 0")

    @classmethod
    def for_device(cls, device: str) -> AnalyticCosts:
        """Defaults for 'cpu' (the class defaults) or 'cuda' (PCIe copies, tensor cores)."""
        if device == "cuda":
            return cls(
                copy_bytes_per_s=20e9, copy_call_s=20e-6, flops_per_s=200e12, layer_call_s=30e-6
            )
        return cls()


@dataclass(frozen=True)
class AnalyticPredictor:
    """A `CostPredictor` from `AnalyticCosts`: pure arithmetic, no profile needed."""

    costs: AnalyticCosts = AnalyticCosts()
    source: str = "analytic"

    def swap_s(self, features: PreemptionFeatures) -> float:
        """Seconds to copy the victim's blocks to host memory and back."""
        c = self.costs
        calls = 2 * features.shape.num_layers
        return 2 * features.swap_bytes / c.copy_bytes_per_s + calls * c.copy_call_s

    def recompute_s(self, features: PreemptionFeatures) -> float:
        """Seconds of the step that prefills the victim again."""
        c = self.costs
        fixed = features.shape.num_layers * c.layer_call_s
        return features.recompute_flops() / c.flops_per_s + fixed
