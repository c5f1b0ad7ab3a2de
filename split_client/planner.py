"""SplitLLM placement planner: which layers of a request run on the client, which on the server.

A client with some compute can run part of a request's decoder layers itself and ship the hidden
state across the network; every layer it runs is server work saved. SplitLLM (arXiv 2410.10759)
chooses the placement per request by dynamic programming: minimise server workload while the
request's end-to-end latency stays inside its SLA.

The module has three parts, all pure functions over small frozen dataclasses and numpy (it must
never import torch or vLLM: it runs inside the client library and the server's scheduler):

1. Cost model. `build_costs` turns a `ModelShape`, a `ClientProfile`, a `ServerProfile` and a
   `Request` into a `SplitCosts`: per-layer client time, server time and server FLOPs, and the
   time to move the hidden state across each layer boundary, summed over the prefill and every
   decode step of the request.
2. Planners over a `SplitCosts`: `plan_dp` (the DP, general or prefix placement), `plan_prefix`
   (exact scan of the L+1 prefix splits), `plan_greedy`, `plan_static`, `plan_server_only`
   and `plan_brute_force` (the oracle for small layer counts). Each returns a `Plan`.
   `plan_prefix` is the serving path's default (`plan_greedy` and `plan_static` can be chosen
   with `--split-policy`, as baselines); the others feed `adaptivellm plan`, the workload study
   (`workload.py`) and bench/split_planner.py.
3. `choose_split_layer`: the k that the server uses for each split session (the client runs
   layers [0, k)); adaptivellm.split_server calls it. It is `plan_prefix`, not the DP: on costs
   from `build_costs` every layer has the same shape, so the best placement is a prefix.

See docs/split_planner.md for the cost model, the DP recurrence and the benchmark.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from adaptivellm.split_client.shapes import PRESETS as PRESETS
from adaptivellm.split_client.shapes import ModelShape

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

#: Bytes on the wire for one token id (the prompt upload and each sampled token).
TOKEN_ID_BYTES: Final = 4
#: Without an explicit step `plan_dp` uses about this many DP cells (layers x budget bins),
#: between MIN_DEFAULT_BINS and MAX_DEFAULT_BINS bins: 2,000 bins for 80 layers.
DP_CELLS: Final = 160_000
MIN_DEFAULT_BINS: Final = 1000
MAX_DEFAULT_BINS: Final = 8000
#: Refuse steps so fine that the DP table would not fit in a few hundred MB.
MAX_BUDGET_BINS: Final = 2_000_000
#: 2**16 placements: the brute-force oracle stays under a second.
BRUTE_FORCE_MAX_LAYERS: Final = 16


class Location(enum.IntEnum):
    """Where one layer runs. The integer value doubles as the index in cost arrays."""

    CLIENT = 0
    SERVER = 1


_LOCATIONS: Final = (Location.CLIENT, Location.SERVER)


class InfeasibleSLAError(ValueError):
    """No placement of the request meets its SLA; `plan` is the fastest placement found."""

    def __init__(self, plan: Plan) -> None:
        super().__init__(
            f"no placement meets the SLA of {plan.sla_s * 1e3:.1f} ms: the fastest "
            f"{plan.method} placement takes {plan.latency_s * 1e3:.1f} ms"
        )
        self.plan = plan


# --------------------------------------------------------------------------- input validation


def _check_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_real(name: str, value: object, *, positive: bool = False, finite: bool = False) -> None:
    """Reject NaN, non-numbers, negatives (or non-positives) and, if asked, infinities."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    if finite and math.isinf(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")


# --------------------------------------------------------------------------- profiles and request


@dataclass(frozen=True)
class ClientProfile:
    """One client device and its link to the server.

    Bandwidths are in bits per second; 0 means that direction cannot carry data (any placement
    that needs it takes infinitely long). `rtt_s` is the round-trip time; each one-way transfer
    pays half of it. The client runs one request alone, so decode steps are bound by reading
    the layer's weights (`mem_bytes_per_s`) rather than by FLOPs.
    """

    flops_per_s: float
    uplink_bps: float
    downlink_bps: float
    rtt_s: float
    mem_bytes_per_s: float = math.inf
    #: Fixed time per layer per forward pass (kernel launches; eager PyTorch on a laptop).
    layer_overhead_s: float = 0.0
    #: Memory the client can give the model, in bytes: each layer it runs holds its weights and
    #: its KV cache for the whole request. inf: no limit.
    memory_bytes: float = math.inf

    def __post_init__(self) -> None:
        _check_real("flops_per_s", self.flops_per_s, positive=True)
        _check_real("mem_bytes_per_s", self.mem_bytes_per_s, positive=True)
        _check_real("memory_bytes", self.memory_bytes, positive=True)
        _check_real("uplink_bps", self.uplink_bps)
        _check_real("downlink_bps", self.downlink_bps)
        _check_real("rtt_s", self.rtt_s, finite=True)
        _check_real("layer_overhead_s", self.layer_overhead_s, finite=True)


@dataclass(frozen=True)
class ServerProfile:
    """The serving GPU as one request sees it.

    Defaults are an H100 at realistic efficiency: 400 TFLOP/s dense bf16 and 2.5 TB/s of HBM
    bandwidth. A decode step is shared with `decode_batch` requests of the running batch: they
    share the weight reads but each adds its FLOPs and KV-cache reads, which is what makes a
    loaded server slow per request. Prefill runs at the full rate.
    """

    flops_per_s: float = 400e12
    mem_bytes_per_s: float = 2.5e12
    decode_batch: int = 32
    layer_overhead_s: float = 0.0
    #: Fixed time per forward pass on the serving path whatever the placement: the engine's
    #: scheduling and batching wait, the API server, framing. A live server measures it.
    step_overhead_s: float = 0.0
    #: The rate prefills actually run at (FLOP/s), where it differs from `flops_per_s`: a live
    #: server learns it from its prefills (on a CPU, prefills of a few hundred rows ran 1.8x
    #: the rate of the 256x256 product it measures at start-up). None: `flops_per_s`.
    prefill_flops_per_s: float | None = None

    def __post_init__(self) -> None:
        _check_real("flops_per_s", self.flops_per_s, positive=True)
        if self.prefill_flops_per_s is not None:
            _check_real("prefill_flops_per_s", self.prefill_flops_per_s, positive=True)
        _check_real("mem_bytes_per_s", self.mem_bytes_per_s, positive=True)
        _check_int("decode_batch", self.decode_batch)
        _check_real("layer_overhead_s", self.layer_overhead_s, finite=True)
        _check_real("step_overhead_s", self.step_overhead_s, finite=True)


@dataclass(frozen=True)
class Request:
    """One request: its prompt, how many tokens it generates, and its end-to-end latency SLA.

    The prefill produces the first output token; each further token is one decode step. The SLA
    bounds the time from the client sending the prompt to it holding the last token;
    `math.inf` means no SLA.
    """

    prompt_tokens: int
    output_tokens: int
    sla_s: float

    def __post_init__(self) -> None:
        _check_int("prompt_tokens", self.prompt_tokens)
        _check_int("output_tokens", self.output_tokens)
        _check_real("sla_s", self.sla_s, positive=True)

    @property
    def decode_steps(self) -> int:
        """Forward passes after the prefill."""
        return self.output_tokens - 1


# --------------------------------------------------------------------------- costs


@dataclass(frozen=True, eq=False)
class SplitCosts:
    """Everything a planner needs about one request, in seconds and FLOPs.

    For a placement x (x[j] = 0 client, 1 server) the latency is

        fixed_time + start_time[x[0]] + sum_j time[x[j], j]
                   + sum_{j>0} (up_time[j-1] if x[j-1] < x[j] else down_time[j-1] if x[j-1] > x[j])
                   + end_time[x[L-1]]

    and the server workload is fixed_work + sum of server_work over layers with x[j] = 1.
    A placement whose client layers need more than `client_memory_budget` bytes in all
    (`client_memory` per layer: weights plus KV cache) cannot run: its latency is inf.
    `start_time` prices bringing the input to layer 0 (the prompt starts at the client, each
    later token is sampled on the server); `end_time` prices bringing the last hidden state to
    the LM head on the server. Times may be `inf` (a link with no bandwidth), never NaN.
    """

    client_time: FloatArray
    server_time: FloatArray
    server_work: FloatArray
    #: Inner boundaries j = 1..L-1 (between layer j-1 and j): client-to-server transfer time.
    up_time: FloatArray
    #: Inner boundaries: server-to-client transfer time.
    down_time: FloatArray
    start_time: FloatArray
    end_time: FloatArray
    fixed_time: float
    fixed_work: float
    sla_s: float
    #: Bytes each layer holds on the client when it runs there (None: nothing).
    client_memory: FloatArray | None = None
    client_memory_budget: float = math.inf

    def __post_init__(self) -> None:
        n = np.asarray(self.client_time).shape[0] if np.ndim(self.client_time) == 1 else 0
        if n < 1:
            raise ValueError("client_time must be a 1-d array with at least one layer")
        if self.client_memory is None:
            object.__setattr__(self, "client_memory", np.zeros(n))
        for name, size in (
            ("client_time", n),
            ("server_time", n),
            ("server_work", n),
            ("up_time", n - 1),
            ("down_time", n - 1),
            ("start_time", 2),
            ("end_time", 2),
            ("client_memory", n),
        ):
            object.__setattr__(self, name, _frozen_array(name, getattr(self, name), size))
        if not np.all(np.isfinite(self.server_work)):
            raise ValueError("server_work must be finite")
        if not np.all(np.isfinite(self.memory)):  # _frozen_array refused NaN and < 0
            raise ValueError("client_memory must be finite")
        _check_real("client_memory_budget", self.client_memory_budget, positive=True)
        _check_real("fixed_time", self.fixed_time)
        _check_real("fixed_work", self.fixed_work, finite=True)
        _check_real("sla_s", self.sla_s, positive=True)

    @property
    def num_layers(self) -> int:
        """Number of placeable layers L."""
        return int(self.client_time.shape[0])

    @property
    def memory(self) -> FloatArray:
        """`client_memory` as an array (never None after construction)."""
        assert self.client_memory is not None
        return self.client_memory

    def max_client_layers(self) -> int | None:
        """With equal per-layer client memory, how many layers fit the budget (None: the
        layers differ). L when the budget does not bind."""
        memory = self.memory
        if math.isinf(self.client_memory_budget) or not np.any(memory):
            return self.num_layers
        if not np.all(memory == memory[0]):
            return None
        return min(self.num_layers, int(self.client_memory_budget // memory[0]))


def _frozen_array(name: str, value: Any, size: int) -> FloatArray:
    array = np.array(value, dtype=np.float64)
    if array.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {array.shape}")
    if np.isnan(array).any() or (array < 0).any():
        raise ValueError(f"{name} must be >= 0 and not NaN")
    array.flags.writeable = False
    return array


def transfer_time(num_bytes: float, bits_per_s: float, rtt_s: float) -> float:
    """One-way transfer: serialisation plus half the round trip; no bandwidth means never."""
    if bits_per_s == 0:
        return math.inf
    return num_bytes * 8.0 / bits_per_s + rtt_s / 2.0


def _roofline(flops: Any, num_bytes: Any, flops_per_s: float, bytes_per_s: float) -> Any:
    """Time of a kernel bound by either compute or memory traffic, whichever is slower."""
    return np.maximum(np.divide(flops, flops_per_s), np.divide(num_bytes, bytes_per_s))


def _repeat(count: int, seconds: float) -> float:
    # 0 * inf is NaN: a transfer that never happens costs nothing even over a dead link.
    return count * seconds if count else 0.0


@dataclass(frozen=True, eq=False)
class _LayerWork:
    """FLOPs and bytes of one layer for the prefill and for each decode step."""

    prefill_flops: float
    prefill_bytes: float
    decode_flops: FloatArray
    decode_kv_bytes: FloatArray
    weight_bytes: float


def _layer_work(shape: ModelShape, request: Request) -> _LayerWork:
    n = request.prompt_tokens
    context = n + np.arange(request.decode_steps, dtype=np.float64)
    weights = float(shape.layer_weight_bytes)
    return _LayerWork(
        prefill_flops=float(shape.layer_flops(n, 0)),
        prefill_bytes=weights + float(shape.kv_bytes(n)),
        decode_flops=np.asarray(shape.layer_flops(1, context), dtype=np.float64),
        decode_kv_bytes=np.asarray(shape.kv_bytes(context + 1), dtype=np.float64),
        weight_bytes=weights,
    )


def _client_layer_time(work: _LayerWork, client: ClientProfile) -> float:
    f, m = client.flops_per_s, client.mem_bytes_per_s
    prefill = float(_roofline(work.prefill_flops, work.prefill_bytes, f, m))
    decode = float(
        np.sum(_roofline(work.decode_flops, work.weight_bytes + work.decode_kv_bytes, f, m))
    )
    passes = 1 + work.decode_flops.shape[0]
    return prefill + decode + passes * client.layer_overhead_s


def _server_layer_time(work: _LayerWork, server: ServerProfile) -> float:
    f, m, b = server.flops_per_s, server.mem_bytes_per_s, server.decode_batch
    f_prefill = server.prefill_flops_per_s or f
    prefill = float(_roofline(work.prefill_flops, work.prefill_bytes, f_prefill, m))
    # The batch shares one read of the weights; FLOPs and KV reads scale with the batch.
    step_bytes = work.weight_bytes + b * work.decode_kv_bytes
    decode = float(np.sum(_roofline(b * work.decode_flops, step_bytes, f, m)))
    passes = 1 + work.decode_flops.shape[0]
    return prefill + decode + passes * server.layer_overhead_s


def _lm_head(shape: ModelShape, server: ServerProfile, steps: int) -> tuple[float, float]:
    """(time, FLOPs) of the LM head: the last prompt position, then one token per step."""
    flops = float(shape.lm_head_flops_per_token)
    weights = float(shape.hidden_size * shape.vocab_size * shape.dtype_bytes)
    f, m, b = server.flops_per_s, server.mem_bytes_per_s, server.decode_batch
    time = float(_roofline(flops, weights, f, m)) + steps * float(
        _roofline(b * flops, weights, f, m)
    )
    return time + (1 + steps) * server.step_overhead_s, flops * (1 + steps)


def build_costs(
    shape: ModelShape, client: ClientProfile, server: ServerProfile, request: Request
) -> SplitCosts:
    """Price every layer and boundary of `request` on `client` and `server`.

    A layer's time is its prefill plus all its decode steps. A boundary crossed by a placement
    carries the prompt's hidden states once (prompt_tokens * hidden * dtype bytes) and one
    token's hidden state per decode step, each transfer paying half the RTT. The shape must
    know its vocabulary: the LM head's time is part of every plan.
    """
    if shape.vocab_size < 1:
        raise ValueError(f"the planner needs the model's vocab_size; {shape} has none")
    work = _layer_work(shape, request)
    n, steps, hidden = request.prompt_tokens, request.decode_steps, shape.hidden_bytes_per_token
    layers = shape.num_layers

    def crossing(bits_per_s: float) -> float:
        once = transfer_time(n * hidden, bits_per_s, client.rtt_s)
        return once + _repeat(steps, transfer_time(hidden, bits_per_s, client.rtt_s))

    up, down = crossing(client.uplink_bps), crossing(client.downlink_bps)
    # Layer 0 on the server: the prompt's token ids go up once, later tokens are already there.
    # Layer 0 on the client: the prompt is already there, each sampled token must come down.
    token_down = transfer_time(TOKEN_ID_BYTES, client.downlink_bps, client.rtt_s)
    start = [
        _repeat(steps, token_down),
        transfer_time(n * TOKEN_ID_BYTES, client.uplink_bps, client.rtt_s),
    ]
    lm_time, lm_flops = _lm_head(shape, server, steps)
    return SplitCosts(
        client_time=np.full(layers, _client_layer_time(work, client)),
        server_time=np.full(layers, _server_layer_time(work, server)),
        server_work=np.full(layers, work.prefill_flops + float(np.sum(work.decode_flops))),
        up_time=np.full(layers - 1, up),
        down_time=np.full(layers - 1, down),
        start_time=np.array(start),
        end_time=np.array([up, 0.0]),
        # The last sampled token always travels to the client, whatever the placement.
        fixed_time=lm_time + token_down,
        fixed_work=lm_flops,
        sla_s=request.sla_s,
        # A client layer holds its weights and its KV cache for the whole request.
        client_memory=np.full(
            layers,
            float(shape.layer_weight_bytes) + float(shape.kv_bytes(n + request.output_tokens)),
        ),
        client_memory_budget=client.memory_bytes,
    )


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Plan:
    """A placement of every layer and what it costs.

    `feasible` is True when `latency_s` is finite and at most `sla_s`. A planner that finds no
    feasible placement returns the fastest one it knows with `feasible=False`.
    """

    method: str
    placement: tuple[Location, ...]
    server_workload: float
    latency_s: float
    sla_s: float
    feasible: bool

    @property
    def client_layers(self) -> int:
        """How many layers run on the client."""
        return sum(1 for loc in self.placement if loc is Location.CLIENT)

    @property
    def split_layer(self) -> int | None:
        """k when the client runs exactly layers [0, k) and the server the rest, else None."""
        k = self.client_layers
        prefix = all(loc is Location.CLIENT for loc in self.placement[:k])
        return k if prefix else None

    @property
    def placement_str(self) -> str:
        """One letter per layer: C client, S server."""
        return "".join("C" if loc is Location.CLIENT else "S" for loc in self.placement)


def evaluate_placements(costs: SplitCosts, on_server: BoolArray) -> tuple[FloatArray, FloatArray]:
    """Exact (latency, server workload) of each row of an (P, L) boolean placement matrix.

    Every planner scores its final answer with this one function, so all of them agree to the
    last bit on the same placement.
    """
    mask = np.asarray(on_server, dtype=bool)
    compute = np.where(mask, costs.server_time, costs.client_time).sum(axis=1)
    ups = ~mask[:, :-1] & mask[:, 1:]
    downs = mask[:, :-1] & ~mask[:, 1:]
    # np.where, not multiplication: a boundary not crossed must cost 0 even when its time is inf.
    transfers = np.where(ups, costs.up_time, 0.0).sum(axis=1)
    transfers = transfers + np.where(downs, costs.down_time, 0.0).sum(axis=1)
    edges = (
        costs.start_time[mask[:, 0].astype(np.intp)] + costs.end_time[mask[:, -1].astype(np.intp)]
    )
    latency = costs.fixed_time + edges + compute + transfers
    if not math.isinf(costs.client_memory_budget):
        held = np.where(mask, 0.0, costs.memory).sum(axis=1)
        latency = np.where(held > costs.client_memory_budget, math.inf, latency)
    work = costs.fixed_work + np.where(mask, costs.server_work, 0.0).sum(axis=1)
    return latency, work


def _meets_sla(latency: FloatArray, sla_s: float) -> BoolArray:
    """Within the SLA and possible at all: with no SLA (inf) a dead link still fails."""
    return (latency <= sla_s) & np.isfinite(latency)


def _make_plan(costs: SplitCosts, on_server: BoolArray, method: str) -> Plan:
    latency, work = evaluate_placements(costs, on_server[None, :])
    return Plan(
        method=method,
        placement=tuple(_LOCATIONS[s] for s in on_server.tolist()),
        server_workload=float(work[0]),
        latency_s=float(latency[0]),
        sla_s=costs.sla_s,
        feasible=bool(_meets_sla(latency, costs.sla_s)[0]),
    )


def _best_of(costs: SplitCosts, masks: BoolArray, method: str) -> Plan:
    """Least server workload among the feasible rows (ties: lower latency); else the fastest."""
    latency, work = evaluate_placements(costs, masks)
    feasible = np.flatnonzero(_meets_sla(latency, costs.sla_s))
    if feasible.size:
        order = np.lexsort((latency[feasible], work[feasible]))
        return _make_plan(costs, masks[feasible[order[0]]], method)
    return _make_plan(costs, masks[int(np.argmin(latency))], method)


def prefix_masks(num_layers: int) -> BoolArray:
    """Row k (k = 0..L) is the placement where the client runs layers [0, k)."""
    return np.arange(num_layers)[None, :] >= np.arange(num_layers + 1)[:, None]


def plan_server_only(costs: SplitCosts) -> Plan:
    """Every layer on the server: the baseline that split execution must beat."""
    return _make_plan(costs, np.ones(costs.num_layers, dtype=bool), "server-only")


def plan_prefix(costs: SplitCosts) -> Plan:
    """Exact best prefix placement: scores all L+1 splits k and keeps the best feasible one.

    This is what the serving protocol uses. It reaches the optimum that `plan_dp(prefix_only=
    True)` approximates, without the DP's rounding, in O(L^2) vectorised work.
    """
    return _best_of(costs, prefix_masks(costs.num_layers), "prefix")


def plan_greedy(costs: SplitCosts) -> Plan:
    """Greedy baseline: the client takes layers from the front while the SLA still holds.

    Start from server-only; move layer 0, then 1, 2, ... to the client, each time checking the
    exact latency of the resulting prefix split, and stop at the first layer that would break
    the SLA. This is the natural greedy for split inference: the client holds the prompt, so
    the front is the only place it can take work without adding transfers, each step takes the
    largest immediate workload saving, and it is what a protocol that sends "the hidden state
    after layer k" would do without a planner. (Ranking layers by workload saved per latency
    added picks the same order here, because every layer has the same shape and a layer next
    to the client's block adds no transfer.) It is myopic: when the one-off cost of shipping
    hidden states makes k = 1 miss the SLA but more client layers would earn it back (a client
    faster per layer than a loaded server), it stays at server-only; if server-only itself
    misses the SLA, it reports that placement as infeasible.
    """
    latency, _ = evaluate_placements(costs, prefix_masks(costs.num_layers))
    k = 0
    meets = _meets_sla(latency, costs.sla_s)
    while k < costs.num_layers and meets[k + 1]:
        k += 1
    return _make_plan(costs, prefix_masks(costs.num_layers)[k], "greedy")


def plan_static(costs: SplitCosts) -> Plan:
    """All-or-nothing baseline: the client runs every layer when that meets the SLA, else the
    server runs them all (reported infeasible when that misses the SLA too).

    What a deployment without a planner does: split-capable clients either take the whole
    decoder or none of it."""
    masks = prefix_masks(costs.num_layers)
    latency, _ = evaluate_placements(costs, masks[[costs.num_layers]])
    k = costs.num_layers if bool(_meets_sla(latency, costs.sla_s)[0]) else 0
    return _make_plan(costs, masks[k], "static")


def plan_brute_force(costs: SplitCosts, *, prefix_only: bool = False) -> Plan:
    """Oracle: score all 2**L placements (or the L+1 prefixes). For L <= BRUTE_FORCE_MAX_LAYERS."""
    if prefix_only:
        return _best_of(costs, prefix_masks(costs.num_layers), "brute-force-prefix")
    if costs.num_layers > BRUTE_FORCE_MAX_LAYERS:
        raise ValueError(
            f"brute force is limited to {BRUTE_FORCE_MAX_LAYERS} layers, got {costs.num_layers}"
        )
    codes = np.arange(2**costs.num_layers)[:, None]
    masks = ((codes >> np.arange(costs.num_layers)) & 1).astype(bool)
    return _best_of(costs, masks, "brute-force")


# --------------------------------------------------------------------------- dynamic program


@dataclass(frozen=True)
class _Grid:
    """The DP's view of a request: entering costs in whole latency units."""

    #: Latency units in the budget; a cost of bins + 1 units never fits.
    bins: int
    #: enter[j][x][x2]: units to arrive at layer j on x2 from layer j - 1 on x, including layer
    #: j's compute (for j = 0 both rows hold the start; the last layer includes the trip to the
    #: LM head). Plain lists: the DP loop indexes them once per layer.
    enter: list[list[list[int]]]


def _to_units(seconds: FloatArray, step: float, bins: int) -> IntArray:
    """Round times up to units of `step`; inf and anything over the budget become bins + 1."""
    if math.isinf(step):  # no SLA: every finite time fits in a budget of zero units
        return np.where(np.isfinite(seconds), 0, bins + 1).astype(np.int64)
    with np.errstate(invalid="ignore", over="ignore"):
        units = np.ceil(seconds / step)
        # Division can round down by an ulp; rounding up must guarantee units * step >= time.
        units = np.where(units * step < seconds, units + 1, units)
    return np.minimum(units, bins + 1).astype(np.int64)


def default_budget_bins(num_layers: int) -> int:
    """Bins `plan_dp` uses without an explicit step: a fixed DP size of about DP_CELLS cells.

    The loop costs a few numpy calls per layer whatever the width, so fewer layers can afford
    finer bins (less rounding loss) at the same solve time.
    """
    return min(MAX_DEFAULT_BINS, max(MIN_DEFAULT_BINS, DP_CELLS // num_layers))


def _resolve_step(
    budget: float, step_s: float | None, bins: int | None, num_layers: int
) -> tuple[float, int]:
    """(step, bins): the latency unit and how many of them the budget holds."""
    if step_s is not None and bins is not None:
        raise ValueError("give the DP either step_s or bins, not both")
    if math.isinf(budget):
        return math.inf, 0
    if step_s is not None:
        _check_real("step_s", step_s, positive=True, finite=True)
        step = float(step_s)
    else:
        if bins is not None:
            _check_int("bins", bins)
        wanted = default_budget_bins(num_layers) if bins is None else bins
        step = budget / wanted if budget > 0 else 1.0
    count = math.floor(budget / step)
    if count > MAX_BUDGET_BINS:
        raise ValueError(
            f"step_s={step!r} splits the {budget:.3g} s budget into {count} bins; "
            f"the limit is {MAX_BUDGET_BINS}"
        )
    return step, count


def _entering_times(costs: SplitCosts, prefix_only: bool) -> FloatArray:
    """(L, 2, 2) seconds to arrive at layer j on x2 from layer j - 1 on x, compute included.

    For j = 0 both rows hold the start; the last layer includes the trip to the LM head. A
    prefix placement never hands the request back from the server to the client.
    """
    compute = np.stack([costs.client_time, costs.server_time])  # (2, L)
    enter = np.zeros((costs.num_layers, 2, 2))
    enter[1:, 0, 1] = costs.up_time
    enter[1:, 1, 0] = math.inf if prefix_only else costs.down_time
    enter += compute.T[:, None, :]
    enter[0] = costs.start_time + compute[:, 0]
    enter[-1] += costs.end_time
    return enter


def _discretise(
    costs: SplitCosts,
    step_s: float | None,
    bins: int | None,
    prefix_only: bool,
    client_before: int | None = None,
) -> _Grid | None:
    enter = _entering_times(costs, prefix_only)
    if client_before is not None:  # a prefix whose memory fits: no client layer from here on
        enter[client_before:, :, 0] = math.inf
    # Every placement pays at least the cheapest way into each layer. Only the excess over
    # that floor is discretised, so the bins are spent where placements differ, and each
    # layer is rounded once (transfer and compute summed first).
    floor = enter.min(axis=(1, 2))
    budget = costs.sla_s - costs.fixed_time - float(floor.sum())
    if not budget >= 0:  # also NaN: a dead link makes a floor or fixed_time inf
        return None
    step, count = _resolve_step(budget, step_s, bins, costs.num_layers)
    excess = enter - floor[:, None, None]
    return _Grid(bins=count, enter=_to_units(excess, step, count).tolist())


def _dp_table(grid: _Grid, server_work: FloatArray) -> tuple[FloatArray, BoolArray]:
    """Forward pass. Returns the last layer's row and, per layer, which predecessor won.

    best[x][u] = least server workload of layers 0..j with layer j at x and at most u latency
    units spent. Row u of the next layer reads row u - enter of this one; the left padding of
    `width` infinities makes every shift a plain slice, so a layer costs a handful of
    vectorised numpy calls over the budget axis.
    """
    width = grid.bins + 1
    units = np.arange(width)
    cur, nxt = np.full((2, 2 * width), np.inf), np.full((2, 2 * width), np.inf)
    for x, work in ((0, 0.0), (1, float(server_work[0]))):
        cur[x, width:] = np.where(units >= grid.enter[0][0][x], work, np.inf)
    came_from_server = np.zeros((len(server_work), 2, width), dtype=bool)
    works = server_work.tolist()
    for j in range(1, len(works)):
        shift = grid.enter[j]
        for x2 in (0, 1):
            s0, s1 = min(shift[0][x2], width), min(shift[1][x2], width)
            from_client = cur[0, width - s0 : 2 * width - s0]
            from_server = cur[1, width - s1 : 2 * width - s1]
            np.less(from_server, from_client, out=came_from_server[j, x2])
            np.minimum(from_client, from_server, out=nxt[x2, width:])
        nxt[1, width:] += works[j]
        cur, nxt = nxt, cur
    return cur[:, width:], came_from_server


def _dp_solve(grid: _Grid, server_work: FloatArray) -> BoolArray | None:
    """Run the DP and backtrack to the placement (True = server), or None if nothing fits."""
    last, came_from_server = _dp_table(grid, server_work)
    x = int(np.argmin(last[:, grid.bins]))
    if math.isinf(last[x, grid.bins]):
        return None
    u, on_server = grid.bins, np.empty(len(server_work), dtype=bool)
    for j in range(len(server_work) - 1, 0, -1):
        on_server[j] = x == 1
        previous = int(came_from_server[j, x, u])
        u -= grid.enter[j][previous][x]
        x = previous
    on_server[0] = x == 1
    return on_server


def _dp_solve_capped(grid: _Grid, server_work: FloatArray, cap: int) -> BoolArray | None:
    """`_dp_solve` with at most `cap` layers on the client (equal per-layer client memory).

    The table gains a dimension, the client layers so far (0..cap): best[x][c][u]. Vectorised
    over the budget axis like `_dp_table`, looped over layers and placements.
    """
    width, layers, counts = grid.bins + 1, len(server_work), cap + 1
    units = np.arange(width)
    cur = np.full((2, counts, 2 * width), np.inf)
    if counts > 1:
        cur[0, 1, width:] = np.where(units >= grid.enter[0][0][0], 0.0, np.inf)
    cur[1, 0, width:] = np.where(units >= grid.enter[0][0][1], float(server_work[0]), np.inf)
    came_from_server = np.zeros((layers, 2, counts, width), dtype=bool)
    works = server_work.tolist()
    for j in range(1, layers):
        shift = grid.enter[j]
        nxt = np.full((2, counts, 2 * width), np.inf)
        for x2 in (0, 1):
            s0, s1 = min(shift[0][x2], width), min(shift[1][x2], width)
            from_client = cur[0, :, width - s0 : 2 * width - s0]
            from_server = cur[1, :, width - s1 : 2 * width - s1]
            better = from_server < from_client
            best = np.minimum(from_client, from_server)
            if x2 == 0:  # one more client layer: count c comes from c - 1
                nxt[0, 1:, width:] = best[:-1]
                came_from_server[j, 0, 1:] = better[:-1]
            else:
                nxt[1, :, width:] = best + works[j]
                came_from_server[j, 1] = better
        cur = nxt
    last = cur[:, :, width + grid.bins]  # the full budget's column
    index = np.unravel_index(int(np.argmin(last)), last.shape)
    x, c, u = int(index[0]), int(index[1]), grid.bins
    if math.isinf(last[x, c]):
        return None
    on_server = np.empty(layers, dtype=bool)
    for j in range(layers - 1, 0, -1):
        on_server[j] = x == 1
        previous = int(came_from_server[j, x, c, u])
        u -= grid.enter[j][previous][x]
        c -= 1 if x == 0 else 0
        x = previous
    on_server[0] = x == 1
    return on_server


def _longest_prefix_fitting(costs: SplitCosts) -> int:
    """The largest k whose client layers [0, k) fit the client's memory."""
    held = np.concatenate([[0.0], np.cumsum(costs.memory)])
    return int(np.flatnonzero(held <= costs.client_memory_budget)[-1])


def _fastest(costs: SplitCosts, prefix_only: bool) -> BoolArray:
    """Minimum-latency placement (exact two-state shortest path): the fallback answer. When
    the client's memory binds, the fastest prefix placement that fits it."""
    if prefix_only or costs.max_client_layers() != costs.num_layers:
        latency, _ = evaluate_placements(costs, prefix_masks(costs.num_layers))
        return prefix_masks(costs.num_layers)[int(np.argmin(latency))]
    time = np.stack([costs.client_time, costs.server_time])
    best = costs.start_time + time[:, 0]
    came_from = np.zeros((costs.num_layers, 2), dtype=np.intp)
    for j in range(1, costs.num_layers):
        enter = np.array(
            [[best[0], best[1] + costs.down_time[j - 1]], [best[0] + costs.up_time[j - 1], best[1]]]
        )  # enter[x2][x]: arrive at layer j on x2 from x
        came_from[j] = np.argmin(enter, axis=1)
        best = enter.min(axis=1) + time[:, j]
    x = int(np.argmin(best + costs.end_time))
    on_server = np.empty(costs.num_layers, dtype=bool)
    for j in range(costs.num_layers - 1, -1, -1):
        on_server[j], x = x == 1, int(came_from[j, x])
    return on_server


def plan_dp(
    costs: SplitCosts,
    *,
    step_s: float | None = None,
    bins: int | None = None,
    prefix_only: bool = False,
) -> Plan:
    """SplitLLM's DP: least server workload over placements that meet the SLA.

    Every placement pays at least the cheapest way into each layer; the rest of the SLA is the
    budget that placements compete for. It is cut into units of `step_s`, or into `bins`
    equal units (default `default_budget_bins(L)`). Each layer's excess entering cost
    (transfer plus compute) is rounded *up* to whole units, so a placement the DP accepts
    meets the real SLA; the price is that placements within about L units of the SLA may be
    missed (measured in bench/split_planner.py). With `prefix_only` the server never hands
    back to the client, so the answer is a split k. When the rounded DP finds nothing, the
    exact fastest placement is returned; it is marked feasible only if it meets the SLA.

    Client memory (`costs.client_memory_budget`): with prefix_only, client layers stop at the
    longest prefix that fits; otherwise the table counts client layers and allows at most as
    many as fit, which needs equal per-layer client memory (what `build_costs` prices).
    """
    method = "dp-prefix" if prefix_only else "dp"
    cap = costs.max_client_layers()
    binds = cap != costs.num_layers
    if binds and prefix_only:
        cap = _longest_prefix_fitting(costs)
    elif cap is None:
        raise ValueError(
            "plan_dp limits client memory only with equal per-layer client_memory (or "
            "prefix_only=True); use plan_brute_force for other costs"
        )
    grid = _discretise(costs, step_s, bins, prefix_only, cap if binds and prefix_only else None)
    while grid is not None:
        if binds and not prefix_only:
            assert cap is not None
            on_server = _dp_solve_capped(grid, costs.server_work, cap)
        else:
            on_server = _dp_solve(grid, costs.server_work)
        if on_server is None:
            break
        plan = _make_plan(costs, on_server, method)
        if plan.feasible:
            return plan
        # Only float rounding in the exact sum can get here (units * step >= each time holds);
        # one unit less of budget is then enough.
        grid = replace(grid, bins=grid.bins - 1) if grid.bins > 0 else None
    return _make_plan(costs, _fastest(costs, prefix_only), method)


# --------------------------------------------------------------------------- serving entry point


#: What `adaptivellm serve --split-policy` can name: how the server picks k per session.
SERVING_POLICIES: Final = {"planner": plan_prefix, "greedy": plan_greedy, "static": plan_static}


def choose_split_layer(
    shape: ModelShape,
    client: ClientProfile,
    server: ServerProfile,
    request: Request,
    policy: str = "planner",
) -> int:
    """The split k for the serving protocol: the client runs layers [0, k), the server the rest.

    With the `planner` policy, k minimises server workload among prefix splits that meet the
    SLA (k = 0 is server-only); `greedy` and `static` are the baselines `plan_greedy` and
    `plan_static`, for operators who want them and for the capacity benchmark. Raises
    `InfeasibleSLAError` (a ValueError carrying the plan) when the policy finds no placement
    that meets the SLA, and ValueError for an unknown policy.
    """
    if policy not in SERVING_POLICIES:
        raise ValueError(f"unknown split policy {policy!r}; use one of {list(SERVING_POLICIES)}")
    plan = SERVING_POLICIES[policy](build_costs(shape, client, server, request))
    if not plan.feasible:
        raise InfeasibleSLAError(plan)
    return plan.client_layers
