"""Swap preempted requests' KV blocks to host memory and back: a vLLM V1 KV connector.

Stock vLLM V1 can only recompute a preempted request. With this connector (selected by
`adaptivellm serve --preemption-mode swap|adaptive` through `--kv-transfer-config`):

- scheduler side (engine core): when AdaptiveScheduler decides to swap a victim, it calls
  `swap_out(request, block_ids, num_tokens)` *before* vLLM frees the blocks; host slots come from
  `HostSwapSpace` (check-then-do: `can_swap_out` / `swap_out` / `take` / `release`). When the
  request is scheduled again, `get_num_new_matched_tokens` reports the swapped tokens as already
  computed (beyond any local prefix-cache hit), and `update_state_after_alloc` plans the copy
  back into the blocks vLLM allocated. `request_finished` frees the host copy of a request that
  finished or was aborted while swapped out.
- worker side: `handle_preemptions` (which vLLM runs before a step can overwrite freed blocks)
  copies swapped-out blocks device -> host; `start_load_kv` copies swap-ins host -> device before
  the forward pass. Host buffers are pinned on CUDA; layouts with the block dimension first (CPU:
  `[num_blocks, kv_heads, block_size, 2*head_dim]`) or second (CUDA flash-attention:
  `[2, num_blocks, ...]`) are handled.

A victim's computed tokens are swapped up to the end of its last, partly filled block (vLLM
accepts a connector hit that ends inside a block; the unfilled slots of the copy are overwritten
as the request goes on), but never the last token of a request, which vLLM must compute to
sample. With the CPU backend's 128-token blocks, swapping only whole blocks left up to 127
tokens per victim to recompute.

Failures never reach vLLM's engine loop (scheduler.fail_safe): a scheduler-side error drops
the request's host copy (it is recomputed); a copy that fails on the worker marks its host slots
bad, and a swap-in from a bad slot, or one whose copy fails, reports its device blocks through
`get_block_ids_with_load_errors`, which vLLM recomputes (`adaptivellm serve` sets
`kv_load_failure_policy` to `recompute`). A lost swap is a recompute, never wrong output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from adaptivellm.scheduler.fail_safe import InternalErrors

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

#: `kv_connector_extra_config` key: host swap space in bytes.
SWAP_BYTES_KEY = "swap_space_bytes"
QUALNAME = "adaptivellm.scheduler.swap_connector"
CLASS_NAME = "AdaptiveSwapConnector"


@dataclass(frozen=True)
class BlockCopy:
    """Copy `device_blocks[i]` <-> `host_slots[i]` for one request."""

    request_id: str
    device_blocks: tuple[int, ...]
    host_slots: tuple[int, ...]


@dataclass
class SwapMetadata(KVConnectorMetadata):
    """What the workers copy this step."""

    swap_outs: list[BlockCopy] = field(default_factory=list)
    swap_ins: list[BlockCopy] = field(default_factory=list)


@dataclass(frozen=True)
class SwappedKV:
    """A request's KV held in host slots: slot i holds its block i."""

    slots: tuple[int, ...]
    num_tokens: int


class HostSwapSpace:
    """Accounting of host swap slots (one slot holds one KV block of every layer). Plain
    Python, no tensors: the scheduler decides, the workers copy."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.free: list[int] = list(range(num_slots - 1, -1, -1))
        self.swapped: dict[str, SwappedKV] = {}

    def can_swap_out(self, num_blocks: int) -> bool:
        """True when `num_blocks` free slots exist."""
        return 0 < num_blocks <= len(self.free)

    def swap_out(self, request_id: str, num_blocks: int, num_tokens: int) -> SwappedKV:
        """Reserve slots for a request's first `num_blocks` blocks (call can_swap_out first)."""
        if request_id in self.swapped or not self.can_swap_out(num_blocks):
            raise RuntimeError(f"cannot swap out {request_id}: {num_blocks} blocks")
        slots = tuple(self.free.pop() for _ in range(num_blocks))
        self.swapped[request_id] = SwappedKV(slots, num_tokens)
        return self.swapped[request_id]

    def get(self, request_id: str) -> SwappedKV | None:
        """The request's host copy, if any."""
        return self.swapped.get(request_id)

    def release(self, request_id: str) -> int:
        """Free the request's slots (swapped in, finished or aborted); returns how many."""
        kv = self.swapped.pop(request_id, None)
        if kv is None:
            return 0
        self.free.extend(kv.slots)
        return len(kv.slots)

    @property
    def used(self) -> int:
        """Slots in use."""
        return self.num_slots - len(self.free)

    def check_integrity(self) -> None:
        """Free + used slots == total, and no slot is held twice."""
        held = [s for kv in self.swapped.values() for s in kv.slots]
        assert len(held) == len(set(held)), "a host slot is held twice"
        assert not set(held) & set(self.free), "a held slot is also free"
        assert len(held) + len(self.free) == self.num_slots, "host slots leaked"


def bytes_per_block(kv_cache_config: KVCacheConfig) -> int:
    """Bytes of one KV block over all layers."""
    total = sum(t.size for t in kv_cache_config.kv_cache_tensors)
    return max(1, total // max(1, kv_cache_config.num_blocks))


def swap_slots(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> int:
    """Host slots that fit in the configured swap space."""
    transfer = vllm_config.kv_transfer_config
    extra = (transfer.kv_connector_extra_config or {}) if transfer else {}
    return int(extra.get(SWAP_BYTES_KEY, 0)) // bytes_per_block(kv_cache_config)


class AdaptiveSwapConnector(KVConnectorBase_V1):
    """See the module docstring."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        self.bytes_per_block = bytes_per_block(kv_cache_config)
        self.num_slots = swap_slots(vllm_config, kv_cache_config)
        # Scheduler side.
        self.space = HostSwapSpace(self.num_slots)
        self._outs: list[BlockCopy] = []
        self._ins: list[BlockCopy] = []
        self._load_from: dict[str, int] = {}
        self._consumed: list[str] = []
        # Worker side.
        self.device_caches: dict[str, torch.Tensor] = {}
        self.host_caches: dict[str, torch.Tensor] = {}
        self.block_dims: dict[str, int] = {}
        #: Host slots whose swap-out copy failed: a swap-in from them is a load error.
        self.bad_slots: set[int] = set()
        #: Device blocks whose swap-in failed this step (get_block_ids_with_load_errors).
        self.load_errors: set[int] = set()
        self.errors = InternalErrors()

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a lost swap is a recompute, never an error

    # --- scheduler side: called by AdaptiveScheduler --------------------------------------

    def swappable_tokens(self, request: Request, num_computed_tokens: int) -> int:
        """Computed tokens worth swapping: all of them but the request's last token."""
        return max(0, min(num_computed_tokens, request.num_tokens - 1))

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks holding `num_tokens` tokens (the last one possibly part-filled)."""
        return -(-num_tokens // self.block_size)

    def swap_out(self, request: Request, block_ids: list[int], num_tokens: int) -> bool:
        """Plan copying the blocks of the victim's first `num_tokens` tokens to host; False when
        the swap space is full (the caller recomputes instead)."""
        if self.space.get(request.request_id) is not None:
            return False  # its previous copy is being restored this very step
        num_blocks = self.blocks_for(num_tokens)
        if not 0 < num_blocks <= len(block_ids) or not self.space.can_swap_out(num_blocks):
            return False
        kv = self.space.swap_out(request.request_id, num_blocks, num_tokens)
        self._outs.append(BlockCopy(request.request_id, tuple(block_ids[:num_blocks]), kv.slots))
        return True

    def release(self, request_id: str) -> int:
        """Drop a request's host copy (finished or aborted while swapped)."""
        self._load_from.pop(request_id, None)
        return self.space.release(request_id)

    # --- scheduler side: vLLM's connector API ---------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        try:
            return self._matched_tokens(request, num_computed_tokens)
        except Exception as exc:  # the request is recomputed instead
            self.errors.record("swap_match", exc, request.request_id)
            self.release(request.request_id)
            return 0, False

    def _matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        kv = self.space.get(request.request_id)
        if kv is None:
            return 0, False
        loadable = min(kv.num_tokens, request.num_tokens - 1)
        if loadable <= num_computed_tokens:
            return 0, False
        self._load_from[request.request_id] = num_computed_tokens
        return loadable - num_computed_tokens, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        rid = request.request_id
        local = self._load_from.pop(rid, None)
        kv = self.space.get(rid)
        if kv is None:
            return
        if num_external_tokens and local is not None:
            first = local // self.block_size
            last = self.blocks_for(local + num_external_tokens)
            device = tuple(blocks.get_block_ids()[0][first:last])
            slots = tuple(kv.slots[first:last])
            if len(device) != len(slots):  # never expected: the worker reports a load error
                slots = ()
            self._ins.append(BlockCopy(rid, device, slots))
        # The host copy is consumed: copied back this step, or superseded by the prefix cache.
        # Its slots are freed only once this step's metadata is built: the worker runs a step's
        # swap-outs before its swap-ins, so a slot reused in the same step would be overwritten
        # before it is read.
        self._consumed.append(rid)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = SwapMetadata(swap_outs=self._outs, swap_ins=self._ins)
        self._outs, self._ins = [], []
        for rid in self._consumed:
            self.space.release(rid)
        self._consumed = []
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self.release(request.request_id)
        return False, None

    # --- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        num_blocks = self._kv_cache_config.num_blocks
        for name, cache in kv_caches.items():
            dim = 0 if cache.shape[0] == num_blocks else 1
            shape = list(cache.shape)
            shape[dim] = max(1, self.num_slots)
            pin = cache.device.type == "cuda"
            self.host_caches[name] = torch.empty(shape, dtype=cache.dtype, pin_memory=pin)
            self.device_caches[name] = cache
            self.block_dims[name] = dim

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if not isinstance(kv_connector_metadata, SwapMetadata):
            return
        outs = kv_connector_metadata.swap_outs
        if not outs:
            return
        slots = {s for copy in outs for s in copy.host_slots}
        try:
            self._copy(outs, to_host=True)
        except Exception as exc:  # these host copies are garbage: their swap-ins recompute
            self.errors.record("swap_out_copy", exc)
            self.bad_slots |= slots
        else:
            self.bad_slots -= slots

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, SwapMetadata) or not meta.swap_ins:
            return
        good = []
        for copy in meta.swap_ins:
            if not copy.host_slots or self.bad_slots.intersection(copy.host_slots):
                self.load_errors.update(copy.device_blocks)
            else:
                good.append(copy)
        try:
            if good:
                self._copy(good, to_host=False)
        except Exception as exc:  # vLLM recomputes the blocks reported as load errors
            self.errors.record("swap_in_copy", exc)
            self.load_errors.update(b for copy in good for b in copy.device_blocks)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self.load_errors = self.load_errors, set()
        return errors

    def _copy(self, copies: list[BlockCopy], to_host: bool) -> None:
        from adaptivellm.metrics import EngineMetrics

        start = time.perf_counter()
        for name, device in self.device_caches.items():
            host, dim = self.host_caches[name], self.block_dims[name]
            for copy in copies:
                blocks = torch.tensor(copy.device_blocks, device=device.device)
                slots = torch.tensor(copy.host_slots)
                if to_host:
                    host.index_copy_(dim, slots, device.index_select(dim, blocks).to("cpu"))
                else:
                    device.index_copy_(dim, blocks, host.index_select(dim, slots).to(device.device))
        if any(d.device.type == "cuda" for d in self.device_caches.values()):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        direction = "out" if to_host else "in"
        with self.errors.guard("metrics"):
            metrics = EngineMetrics.get()
            metrics.swap_seconds.labels(direction=direction).observe(seconds)
            metrics.swap_blocks.labels(direction=direction).inc(
                sum(len(c.device_blocks) for c in copies)
            )

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are synchronous, done in start_load_kv

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return None  # nothing is saved during the forward pass

    def wait_for_save(self) -> None:
        return None
