"""Measure swap and recompute times with torch alone (never vLLM), on CPU or CUDA.

Swap. Exactly the swap connector's copy path: `adaptivellm.scheduler.kv_copy` (torch only)
over KV cache tensors in vLLM 0.32's per-layer layout, `[num_blocks, kv_heads, block_size,
2 * head_dim]` (blocks first, on every device), one per layer. A swap copies the victim's block
ids (scattered at random in the cache, as vLLM's allocator leaves them) out to host slots and
back in, for every layer: on CUDA through pinned slots with non-blocking copies on a side
stream ordered by events, elsewhere with synchronous copies. The copies are waited for after
each direction (the step that needs them waits as long); the time is out + in.

Recompute. One prefill step of the victim's `num_tokens` alone through real-size Llama decoder
layers with random weights (RMSNorm, rotary q/k, causal GQA attention through SDPA, SwiGLU MLP):
the cost its recompute adds to the later step that runs it, whose other requests are not known
when the victim is chosen, which is what the scheduler asks. At most `max_layers` layers are run
and the time is scaled to `num_layers` (every layer costs the same), which keeps profiling of
large models affordable.

Every point is timed `reps` times after a warm-up and the median is kept; a timing of a point
faster than `min_run_s` averages several runs. The timings go in rounds over all points, each
round in a seeded random order, so that bursts and drifts of load on a shared machine spread
over the grid and the median discards them instead of biasing a few points.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from adaptivellm.predictors.features import ModelShape, PreemptionFeatures, Sample
from adaptivellm.scheduler.kv_copy import KVBlockCopier, KVLayout
from adaptivellm.split_wire import TORCH_DTYPES


@dataclass(frozen=True)
class ProfileGrid:
    """The sizes to measure."""

    num_tokens: tuple[int, ...]
    """Victim sizes (tokens)."""
    block_size: int = 16
    """Tokens per KV block (vLLM's default)."""
    reps: int = 7
    """Timings per point; the median is kept."""
    min_run_s: float = 0.05
    """A point faster than this is run several times per timing (up to 64) and averaged. At
    5 ms the smallest CPU points (a few ms each) spread 15-26% from timing to timing; at 50 ms,
    4-5% (tiny model, quick grid, 15 timings a point)."""
    statistic: str = "median"
    """How a point's timings are summarised: 'median', or 'min' (the run least disturbed by
    other load: steadier on a busy shared machine, but optimistic for a loaded server)."""
    max_layers: int = 4
    """Decoder layers actually run for recompute; the time is scaled to all layers."""
    swap_num_tokens: tuple[int, ...] = ()
    """Victim sizes for swap (default: `num_tokens`, as in the standard grids). With 16 sizes
    (`BENCH_MODEL`, quick grid) swap's held-out MAPE over 20 splits was 2.97%, with 48 sizes
    1.22%."""

    def __post_init__(self) -> None:
        if self.statistic not in ("median", "min"):
            raise ValueError(f"statistic must be 'median' or 'min', got {self.statistic!r}")
        if self.reps < 1 or self.block_size < 1 or self.max_layers < 1:
            raise ValueError("reps, block_size and max_layers must be >= 1")
        if not self.num_tokens or min(self.num_tokens) < 1:
            raise ValueError("num_tokens must be a non-empty set of sizes >= 1")
        if min(self.swap_num_tokens, default=1) < 1:
            raise ValueError("swap_num_tokens must be sizes >= 1")

    @property
    def swap_sizes(self) -> tuple[int, ...]:
        """The victim sizes swap is measured at."""
        return self.swap_num_tokens or self.num_tokens

    @classmethod
    def default(cls, quick: bool = False) -> ProfileGrid:
        """The standard grid: 16 to 4096 tokens (1024 with `quick`)."""
        # Recompute and swap at the same sizes (so oracle_agreement compares at every one):
        # 82 sizes (46 quick). Recompute was measured at a third of them beside 3-5 batch
        # sizes (profile version 1); the victim alone at all of them costs about as much.
        return cls(
            num_tokens=geometric_sizes(16, 1024 if quick else 4096, 46 if quick else 82),
            reps=5 if quick else 9,
        )


def geometric_sizes(low: int, high: int, count: int) -> tuple[int, ...]:
    """`count` distinct integers from `low` to `high`, evenly spaced in log scale."""
    ratio = (high / low) ** (1 / max(count - 1, 1))
    return tuple(sorted({round(low * ratio**i) for i in range(count)}))


@dataclass(frozen=True)
class ProfileResult:
    """Samples per cost kind ('swap', 'recompute')."""

    swap: list[Sample] = field(default_factory=list)
    recompute: list[Sample] = field(default_factory=list)


def profile(
    shape: ModelShape,
    dtype: str,
    device: str,
    grid: ProfileGrid,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = None,
) -> ProfileResult:
    """Measure swap and recompute over `grid` for `shape` on `device` ('cpu' or 'cuda').

    `threads` sets torch's intra-op threads for the run (restored after): on CPU it should be
    the number of cores vLLM's worker gets, and never more than are free, since OpenMP barriers
    under oversubscription stall for milliseconds and swamp the measurement.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _profile(shape, dtype, device, grid, seed, progress)
    finally:
        torch.set_num_threads(previous)


def _profile(
    shape: ModelShape, dtype: str, device: str, grid: ProfileGrid, seed: int, progress: bool
) -> ProfileResult:
    dev = torch.device(device)
    torch_dtype = TORCH_DTYPES[dtype]
    swap_points = [
        PreemptionFeatures.for_victim(shape, n, grid.block_size) for n in grid.swap_sizes
    ]
    recompute_points = [
        PreemptionFeatures.for_victim(shape, n, grid.block_size) for n in grid.num_tokens
    ]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    total = (len(swap_points) + len(recompute_points)) * grid.reps
    bar = tqdm(total=total, disable=not progress, unit="timing")
    with torch.inference_mode():
        blocks = max(p.num_blocks for p in swap_points)
        swapper = _Swapper(shape, blocks, grid.block_size, torch_dtype, dev, rng)
        swap = _measure_all(swap_points, swapper.run, grid, rng, bar, "swap")
        del swapper
        stack = _LayerStack(shape, min(shape.num_layers, grid.max_layers), torch_dtype, dev)
        recompute = _measure_all(recompute_points, stack.run, grid, rng, bar, "recompute")
    bar.close()
    return ProfileResult(swap=swap, recompute=recompute)


def _measure_all(
    points: list[PreemptionFeatures],
    run: Callable[[PreemptionFeatures], float],
    grid: ProfileGrid,
    rng: random.Random,
    bar: tqdm,
    label: str,
) -> list[Sample]:
    # Rounds over all points rather than all runs of one point in a row: a burst of load from a
    # neighbour then spoils one run of many points, which the median discards, instead of every
    # run of one point.
    bar.set_description(label)
    inner = [_inner_runs(run, p, grid.min_run_s) for p in points]
    times: list[list[float]] = [[] for _ in points]
    order = list(range(len(points)))
    for _ in range(grid.reps):
        rng.shuffle(order)
        for i in order:
            times[i].append(sum(run(points[i]) for _ in range(inner[i])) / inner[i])
        bar.update(len(points))
    summary = min if grid.statistic == "min" else statistics.median
    return [Sample(p, summary(t)) for p, t in zip(points, times, strict=True)]


def _inner_runs(
    run: Callable[[PreemptionFeatures], float], features: PreemptionFeatures, min_run_s: float
) -> int:
    """Runs averaged into one timing, so that short points are not lost in timer jitter."""
    first = min(run(features) for _ in range(2))  # the first also warms up caches and kernels
    return max(1, min(64, math.ceil(min_run_s / max(first, 1e-7))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Swapper:
    """Per-layer KV caches in vLLM's layout, and the swap connector's copier over them."""

    def __init__(
        self,
        shape: ModelShape,
        max_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        rng: random.Random,
    ) -> None:
        self.device, self.rng = device, rng
        # Twice the largest victim, so that victims' blocks are scattered, not contiguous.
        self.total_blocks = 2 * max_blocks
        layout = (self.total_blocks, shape.num_kv_heads, block_size, 2 * shape.head_dim)
        self.caches = [
            torch.randn(layout, dtype=dtype, device=device) for _ in range(shape.num_layers)
        ]
        # Host slots for the largest victim: pinned, with a side stream, on CUDA (the defaults
        # the connector runs with).
        self.copier = KVBlockCopier(self.caches, KVLayout(0, self.total_blocks), max_blocks)

    def run(self, features: PreemptionFeatures) -> float:
        """Seconds of swap-out then swap-in of `features.num_blocks` scattered blocks."""
        ids = self.rng.sample(range(self.total_blocks), features.num_blocks)
        slots = list(range(features.num_blocks))
        _sync(self.device)
        start = time.perf_counter()
        self.copier.swap_out(ids, slots)
        self.copier.synchronize()
        self.copier.swap_in(ids, slots)
        self.copier.synchronize()
        elapsed = time.perf_counter() - start
        self.copier.completed()  # drop the copier's own timings
        return elapsed


class _LayerStack:
    """`count` Llama decoder layers of `shape` with random weights."""

    def __init__(
        self, shape: ModelShape, count: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.shape, self.count, self.device, self.dtype = shape, count, device, dtype
        self.layers = [_random_layer(shape, dtype, device) for _ in range(count)]

    def run(self, features: PreemptionFeatures) -> float:
        """Seconds of one prefill step over all `shape.num_layers` layers (scaled)."""
        s = self.shape
        lengths = [features.num_tokens]
        x = torch.randn(sum(lengths), s.hidden_size, dtype=self.dtype, device=self.device)
        rope = _rope(lengths, s.head_dim, self.dtype, self.device)
        _sync(self.device)
        start = time.perf_counter()
        for weights in self.layers:
            x = _decoder_layer(x, weights, rope, lengths, s)
        _sync(self.device)
        return (time.perf_counter() - start) * s.num_layers / self.count


def _random_layer(shape: ModelShape, dtype: torch.dtype, device: torch.device) -> dict:
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    sizes = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q)}
    sizes |= {"gate": (i, h), "up": (i, h), "down": (h, i)}
    # Small weights keep activations finite through the stack in float16.
    layer = {n: torch.randn(sz, dtype=dtype, device=device) * 0.02 for n, sz in sizes.items()}
    layer["norm1"] = torch.ones(h, dtype=dtype, device=device)
    layer["norm2"] = torch.ones(h, dtype=dtype, device=device)
    return layer


def _rope(
    lengths: Sequence[int], head_dim: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of each packed token's position within its own sequence."""
    pos = torch.cat([torch.arange(n, device=device) for n in lengths]).float()
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(pos, inv).repeat(1, 2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _decoder_layer(
    x: torch.Tensor,
    w: dict,
    rope: tuple[torch.Tensor, torch.Tensor],
    lengths: Sequence[int],
    s: ModelShape,
) -> torch.Tensor:
    t = x.shape[0]
    h = F.rms_norm(x, (s.hidden_size,), w["norm1"], eps=1e-5)
    q = _rotate(F.linear(h, w["q"]).view(t, s.num_heads, s.head_dim), *rope)
    k = _rotate(F.linear(h, w["k"]).view(t, s.num_kv_heads, s.head_dim), *rope)
    v = F.linear(h, w["v"]).view(t, s.num_kv_heads, s.head_dim)
    outs, start = [], 0
    for n in lengths:  # causal attention within each packed sequence
        qs, ks, vs = (a[start : start + n].transpose(0, 1) for a in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
        start += n
    attn = torch.cat(outs, dim=1).transpose(0, 1).reshape(t, -1)
    x = x + F.linear(attn, w["o"])
    h = F.rms_norm(x, (s.hidden_size,), w["norm2"], eps=1e-5)
    return x + F.linear(F.silu(F.linear(h, w["gate"])) * F.linear(h, w["up"]), w["down"])
