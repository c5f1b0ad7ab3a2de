"""Copy KV cache blocks between a device and host buffers: torch only, no vLLM import.

One module does every swap copy AdaptiveLLM makes or measures: the swap connector's
(`scheduler/swap_connector.py`), the profiler's swap measurement (`predictors/profiler.py`) and
`bench/gpu_swap_copy.py`. So the swap cost the predictor learns is the cost of the code that runs.

Layout. Each KV cache tensor is one layer's, with the block dimension *asserted* by the caller
(`KVLayout`): vLLM 0.32 binds per-layer views `[B, H, N, C]` (blocks first) on every backend,
the CPU one included (`[num_blocks, kv_heads, block_size, 2 * head_dim]`); a layout with the
blocks second (`[2, num_blocks, ...]`, older flash-attention) is handled the same way. Under
kernel-block splitting (the attention kernel needs blocks smaller than the scheduler's),
vLLM's views hold `num_blocks * k` kernel blocks, kernel block `j` of scheduler block `b` at
`b * k + j`; `KVLayout.kernel_blocks_per_block = k` maps each scheduler block id to its `k`
kernel blocks. A tensor whose block dimension does not hold exactly `num_blocks * k` blocks is
refused (ValueError): it is never guessed from shapes.

Host buffers: one per layer, `[num_slots, *one block]`, slot-major, so a slot is contiguous
and consecutive slots are one memory copy; pinned when the device is CUDA.

Copies. On CUDA with a side stream (the default): the index tensors go up from pinned memory,
the side stream waits for an event recorded on the current stream (so every kernel already
queued there, which may write the blocks, comes first), gathers the blocks into a contiguous
device buffer and copies it to the pinned slots without blocking the CPU (swap-out), or copies
the slots up and scatters them into the blocks (swap-in); then the current stream waits for an
event recorded on the side stream, so nothing queued after (block zeroing, copy-on-write, the
forward pass that writes a freed block or reads a swapped-in one) runs before the copies are
done. The CPU never waits. Without a side stream on CUDA the same copies run on the current
stream and the CPU waits for each (`bench/gpu_swap_copy.py` compares the two). On any other
device the copies are plain synchronous `index_select` / `index_copy_` (exact; tested on CPU).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """Where the scheduler's blocks sit in one layer's KV cache tensor."""

    block_dim: int
    """The tensor dimension that indexes (kernel) blocks: 0 for vLLM 0.32's `[B, H, N, C]`."""
    num_blocks: int
    """Scheduler blocks (`KVCacheConfig.num_blocks`)."""
    kernel_blocks_per_block: int = 1
    """Kernel blocks per scheduler block (kernel-block splitting), 1 without splitting."""

    def __post_init__(self) -> None:
        if self.block_dim < 0 or self.num_blocks < 1 or self.kernel_blocks_per_block < 1:
            raise ValueError(f"bad KV layout {self}")

    def blocks_view(self, cache: torch.Tensor) -> torch.Tensor:
        """A view of `cache` with one scheduler block per index of dim 0 (`[num_blocks, ...]`;
        under splitting `[num_blocks, k, ...]`). ValueError when `cache` is not this layout."""
        dim, k = self.block_dim, self.kernel_blocks_per_block
        if cache.dim() <= dim or cache.shape[dim] != self.num_blocks * k:
            raise ValueError(
                f"KV cache of shape {tuple(cache.shape)} does not hold {self.num_blocks} "
                f"blocks{f' x {k} kernel blocks' if k > 1 else ''} in dimension {dim}"
            )
        view = cache.movedim(dim, 0) if dim else cache
        return view.unflatten(0, (self.num_blocks, k)) if k > 1 else view


@dataclass(frozen=True)
class CopyTiming:
    """How long one batch of copies took (device time on CUDA, wall time elsewhere)."""

    direction: str
    """'out' (device -> host) or 'in' (host -> device)."""
    blocks: int
    seconds: float


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first position, first slot, length) of each run of consecutive slots, in order."""
    runs: list[tuple[int, int, int]] = []
    for i, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            pos, first, length = runs[-1]
            runs[-1] = (pos, first, length + 1)
        else:
            runs.append((i, slot, 1))
    return runs


def copy_by_runs(
    view: torch.Tensor,
    host: torch.Tensor,
    block_ids: torch.Tensor,
    runs: list[tuple[int, int, int]],
    to_host: bool,
    non_blocking: bool = False,
) -> None:
    """The CUDA path's data movement for one layer (any device: tested on CPU). `block_ids[i]`
    pairs with the i-th slot of `runs` (`slot_runs` of the slots, in that order). Out: gather
    the blocks into one contiguous buffer on the device, then one copy per run of slots. In:
    one copy per run into a buffer on the device, then scatter it into the blocks."""
    if to_host:
        gathered = view.index_select(0, block_ids)
        for pos, first, length in runs:
            host[first : first + length].copy_(
                gathered[pos : pos + length], non_blocking=non_blocking
            )
        return
    staged = torch.empty((len(block_ids), *view.shape[1:]), dtype=view.dtype, device=view.device)
    for pos, first, length in runs:
        staged[pos : pos + length].copy_(host[first : first + length], non_blocking=non_blocking)
    view.index_copy_(0, block_ids, staged)


class KVBlockCopier:
    """Copies lists of (device block, host slot) pairs out of and back into KV caches.

    `caches[i]` is one layer's KV cache tensor with layout `layouts[i]` (or one layout for all).
    `pin_memory` and `side_stream` default to True on CUDA (False elsewhere, where they mean
    nothing). Tensors that alias the same memory (layers sharing their KV cache) must be passed
    once.
    """

    def __init__(
        self,
        caches: Sequence[torch.Tensor],
        layouts: KVLayout | Sequence[KVLayout],
        num_slots: int,
        pin_memory: bool | None = None,
        side_stream: bool | None = None,
    ) -> None:
        if isinstance(layouts, KVLayout):
            layouts = [layouts] * len(caches)
        if len(layouts) != len(caches):
            raise ValueError(f"{len(caches)} KV caches but {len(layouts)} layouts")
        if num_slots < 0:
            raise ValueError("num_slots must be >= 0")
        devices = {c.device for c in caches}
        if len(devices) > 1:
            raise ValueError(f"KV caches on several devices: {devices}")
        self.device = devices.pop() if devices else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self.pinned = self.cuda if pin_memory is None else pin_memory and self.cuda
        self.views = [layout.blocks_view(c) for c, layout in zip(caches, layouts, strict=True)]
        counts = {layout.num_blocks for layout in layouts}
        if len(counts) > 1:
            raise ValueError(f"KV caches with different block counts: {sorted(counts)}")
        self.num_blocks = counts.pop() if counts else 0
        self.num_slots = num_slots
        self.host = [
            torch.empty((num_slots, *v.shape[1:]), dtype=v.dtype, pin_memory=self.pinned)
            for v in self.views
        ]
        use_stream = self.cuda if side_stream is None else side_stream and self.cuda
        self.stream = torch.cuda.Stream(self.device) if use_stream else None
        self._pending: deque[tuple[str, int, torch.cuda.Event, torch.cuda.Event]] = deque()
        self._done: list[CopyTiming] = []

    @property
    def bytes_per_slot(self) -> int:
        """Host bytes of one slot (one block of every layer)."""
        return sum(v[0].numel() * v.element_size() for v in self.views)

    def swap_out(self, blocks: Sequence[int], slots: Sequence[int]) -> None:
        """Copy device block `blocks[i]` of every layer to host slot `slots[i]`."""
        self._copy(blocks, slots, to_host=True)

    def swap_in(self, blocks: Sequence[int], slots: Sequence[int]) -> None:
        """Copy host slot `slots[i]` of every layer into device block `blocks[i]`."""
        self._copy(blocks, slots, to_host=False)

    def synchronize(self) -> None:
        """Wait (CPU) until every copy issued so far is done."""
        if self.stream is not None:
            self.stream.synchronize()
        elif self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def completed(self) -> list[CopyTiming]:
        """Timings of the copies finished since the last call (never waits)."""
        while self._pending and self._pending[0][3].query():
            direction, blocks, start, end = self._pending.popleft()
            self._done.append(CopyTiming(direction, blocks, start.elapsed_time(end) / 1e3))
        done, self._done = self._done, []
        return done

    # --- internals ----------------------------------------------------------------------

    def _check(self, blocks: Sequence[int], slots: Sequence[int], to_host: bool) -> None:
        # Out-of-range indices must never reach a CUDA kernel (a device-side assert kills the
        # process): checked here, in Python, before anything is issued.
        if len(blocks) != len(slots):
            raise ValueError(f"{len(blocks)} blocks but {len(slots)} slots")
        if min(blocks) < 0 or max(blocks) >= self.num_blocks:
            raise IndexError(f"block ids out of range [0, {self.num_blocks}): {list(blocks)}")
        if min(slots) < 0 or max(slots) >= self.num_slots:
            raise IndexError(f"host slots out of range [0, {self.num_slots}): {list(slots)}")
        written = slots if to_host else blocks
        if len(set(written)) != len(written):
            raise ValueError(f"a {'slot' if to_host else 'block'} is written twice")

    def _copy(self, blocks: Sequence[int], slots: Sequence[int], to_host: bool) -> None:
        if not blocks and not slots:
            return
        self._check(blocks, slots, to_host)
        direction = "out" if to_host else "in"
        if not self.cuda:
            start = time.perf_counter()
            block_ids = torch.tensor(blocks, dtype=torch.long)
            slot_ids = torch.tensor(slots, dtype=torch.long)
            for view, host in zip(self.views, self.host, strict=True):
                if to_host:
                    host.index_copy_(0, slot_ids, view.index_select(0, block_ids))
                else:
                    view.index_copy_(0, block_ids, host.index_select(0, slot_ids))
            seconds = time.perf_counter() - start
            self._done.append(CopyTiming(direction, len(blocks), seconds))
            return
        # CUDA: slot order, so that consecutive slots are one memory copy each.
        pairs = sorted(zip(slots, blocks, strict=True))
        ordered_slots = [s for s, _ in pairs]
        runs = slot_runs(ordered_slots)
        ids = torch.tensor([b for _, b in pairs], dtype=torch.long)
        with self._on_side_stream(direction, len(blocks)):
            if self.pinned:
                ids = ids.pin_memory()
            block_ids = ids.to(self.device, non_blocking=self.pinned)
            non_blocking = self.stream is not None  # else the CPU waits for each copy
            for view, host in zip(self.views, self.host, strict=True):
                copy_by_runs(view, host, block_ids, runs, to_host, non_blocking)

    @contextmanager
    def _on_side_stream(self, direction: str, blocks: int) -> Iterator[None]:
        current = torch.cuda.current_stream(self.device)
        if self.stream is None:
            began = time.perf_counter()
            try:
                yield
            finally:
                current.synchronize()
            self._done.append(CopyTiming(direction, blocks, time.perf_counter() - began))
            return
        ready = torch.cuda.Event()
        ready.record(current)  # after every kernel already queued (they may write the blocks)
        self.stream.wait_event(ready)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        try:
            with torch.cuda.stream(self.stream):
                start.record(self.stream)
                yield
        finally:
            # Also after an error: whatever was issued is ordered before later work.
            end.record(self.stream)
            current.wait_event(end)  # nothing queued after touches the blocks before the copies
        self._pending.append((direction, blocks, start, end))
