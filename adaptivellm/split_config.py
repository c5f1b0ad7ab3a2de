"""Split-execution configuration: one frozen dataclass, carried to the API server.

`adaptivellm serve --split-execution` builds it from its flags and stores it in vLLM's
`--additional-config` under `adaptivellm.split`; the session endpoint (adaptivellm.split_server)
reads it back from the server's arguments (scheduler.config.AdaptiveConfig).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from adaptivellm.split_costs import PassCosts

SPLIT_PLUGIN_NAME = "adaptivellm-split"
#: The model class that runs each request from its own layer (adaptivellm.split_model).
ARCHITECTURE = "AdaptiveSplitLlamaForCausalLM"
#: Architectures the split model can stand in for (same weights and layer structure).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
#: uvicorn closes WebSockets on messages over 16 MiB (its ws_max_size default).
MAX_FRAME_MB = 16.0
#: `--split-policy` choices (split_client.planner.SERVING_POLICIES, without importing numpy here).
SPLIT_POLICIES = ("planner", "greedy", "static")
#: `--split-when-busy` choices (SplitConfig.when_busy).
WHEN_BUSY = ("refuse", "serve")


@dataclass(frozen=True)
class SplitConfig:
    """Limits and planner inputs of the split-execution endpoint."""

    max_sessions: int = 32
    """Split sessions open at once; more are refused with `too_many_sessions`. Each open session
    holds a sequence slot of the engine (vLLM counts sessions waiting for input as running)."""
    max_frame_mb: float = 16.0
    """Largest binary frame accepted, in MiB (at most 16: uvicorn's WebSocket message limit).
    Clients send a longer prompt's hidden states in several frames."""
    idle_timeout_s: float = 60.0
    """A session whose client sends nothing for this long is closed and its KV cache freed."""
    queue_s: float = 5.0
    """A session that finds all `max_sessions` slots taken waits this long for one, in arrival
    order; then it is refused with `too_many_sessions` and a `retry_after_s` hint. 0 refuses
    at once."""
    server_flops_per_s: float | None = None
    """Server throughput the planner assumes (FLOP/s); None measures it at start-up on CPU and
    assumes the planner's GPU default (400 TFLOP/s) elsewhere."""
    server_mem_bytes_per_s: float | None = None
    """Server memory bandwidth the planner assumes (bytes/s); None: 20 GB/s on CPU, the
    planner's GPU default (2.5 TB/s) elsewhere."""
    when_busy: str = "refuse"
    """What a session whose SLA no split meets at the current load gets, when the server idle
    would meet it and is busy (requests in flight at least half of `max_sessions`): `refuse`
    (an `infeasible_sla` error with a retry-after hint, so the load already admitted keeps its
    SLAs) or `serve` (served whole, k = 0, late). An SLA no split meets even on an idle server
    is always served whole: waiting would not help."""
    sla_target: float = 0.99
    """Share of split sessions the planner aims to keep within their SLA: it plans against the
    SLA divided by this quantile of recent measured / predicted latency ratios, extrapolated
    beyond the largest seen once 16 sessions are known (64 recent sessions cannot show a 0.99
    quantile; a plan that only just fits on paper misses as often as predictions run late).
    With fewer, the quantile of those seen times 1 + 2 / n."""
    policy: str = "planner"
    """How k is picked per session (`SPLIT_POLICIES`): `planner`, the least server work that
    meets the SLA; `greedy`, the client takes layers from the front until the next one would
    break the SLA; `static`, all layers on the client when that meets the SLA, else none."""
    calibration_stale_s: float = 60.0
    """A kind of split session (interior, all-client, served whole) of which none has finished
    for this long, while at least 16 sessions were planned, forgets how its sessions ran: it
    plans as a fresh server's kind does (interior and all-client on split sessions'
    calibration as a whole, or INITIAL_SLACK; served whole with slack 1). A kind is only
    recalibrated by its own sessions, so without this one late session among a few could
    rule the kind out, and keep it out for good. An idle server forgets nothing. 0: never
    forget."""
    pass_costs: PassCosts | None = None
    """This server's pass and host costs (`--split-cost-profile`, adaptivellm.split_costs):
    with them the planner serves a session whole, where that meets its SLA, rather than split
    it at a k whose split would take more server time per token than the session served whole.
    None: k is priced by FLOPs alone."""

    def __post_init__(self) -> None:
        if isinstance(self.pass_costs, dict):  # back from to_dict (--additional-config)
            object.__setattr__(self, "pass_costs", PassCosts.from_dict(self.pass_costs))
        if not (math.isfinite(self.sla_target) and 0.5 <= self.sla_target <= 1):
            raise ValueError(f"sla_target must be in [0.5, 1], got {self.sla_target}")
        if self.when_busy not in WHEN_BUSY:
            raise ValueError(f"when_busy must be one of {list(WHEN_BUSY)}, got {self.when_busy!r}")
        if self.policy not in SPLIT_POLICIES:
            raise ValueError(f"policy must be one of {list(SPLIT_POLICIES)}, got {self.policy!r}")
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.max_frame_mb > MAX_FRAME_MB:
            raise ValueError(
                f"max_frame_mb must be at most {MAX_FRAME_MB:g} (uvicorn's WebSocket message "
                f"limit), got {self.max_frame_mb:g}"
            )
        for name in ("max_frame_mb", "idle_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        for name in ("queue_s", "calibration_stale_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value}")
        for name in ("server_flops_per_s", "server_mem_bytes_per_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")

    @property
    def max_frame_bytes(self) -> int:
        return int(self.max_frame_mb * 2**20)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for `--additional-config`."""
        return dataclasses.asdict(self)
