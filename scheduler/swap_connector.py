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
- worker side: `handle_preemptions` copies swapped-out blocks device -> host; `start_load_kv`
  copies swap-ins host -> device before the forward pass. The copies are `kv_copy`'s (torch
  only, also what the profiler measures): on CUDA pinned host buffers and non-blocking copies on
  a side stream, ordered with CUDA events after the work already queued and before anything
  queued later; plain synchronous copies elsewhere. The block dimension is asserted against
  the KV cache spec (vLLM 0.32 binds `[B, H, N, C]` views, blocks first, on every backend;
  under kernel-block splitting B is `num_blocks * k` and each block id maps to its k kernel
  blocks); any other layout is refused at start-up.

Ordering (docs/swap.md). vLLM's V1 runner calls `handle_preemptions` first in a step. Model
Runner V2 first zeroes newly allocated blocks (mixed-precision or Mamba caches only) and runs
prefix-cache copy-on-write copies, which may write a block a victim freed in the same step,
and only then calls `handle_preemptions`. `build_connector_meta` sees both lists, so a
swap-out is cut before the first such block (the tokens from there on are recomputed, on
either runner): no swap-out reads a block after it was reused.

Host memory: `--swap-space` is the total over tensor-parallel ranks; each rank's worker holds
`swap_space / tensor_parallel_size` and the scheduler plans with the slots of one rank (every
rank holds the same number of slots, each its own shard of a block).

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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from adaptivellm.scheduler.fail_safe import InternalErrors
from adaptivellm.scheduler.kv_copy import KVBlockCopier, KVLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheSpec
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

    def truncate(self, request_id: str, num_blocks: int, num_tokens: int) -> int:
        """Keep only the request's first `num_blocks` slots (and at most `num_tokens` tokens);
        frees the others (all of them when `num_blocks` is 0). Returns how many were freed."""
        kv = self.swapped.get(request_id)
        if kv is None or num_blocks >= len(kv.slots):
            return 0
        if num_blocks <= 0:
            return self.release(request_id)
        self.free.extend(kv.slots[num_blocks:])
        self.swapped[request_id] = SwappedKV(kv.slots[:num_blocks], min(kv.num_tokens, num_tokens))
        return len(kv.slots) - num_blocks

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


def layer_spec(kv_cache_config: KVCacheConfig, layer_name: str) -> KVCacheSpec | None:
    """The KV cache spec of one layer (None when no group holds it)."""
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    for group in kv_cache_config.kv_cache_groups:
        if layer_name in group.layer_names:
            spec = group.kv_cache_spec
            if isinstance(spec, UniformTypeKVCacheSpecs):
                return spec.kv_cache_specs.get(layer_name)
            return spec
    return None


def bytes_per_block(kv_cache_config: KVCacheConfig) -> int:
    """Bytes of one KV block over all of this rank's layers: what one host slot holds (each
    layer's page, padding included, so never less than the copy). vLLM 0.32's KVCacheTensor
    `size` is the whole backing allocation, shared by every tensor, so it cannot be summed.
    A config without KV tensors (scheduler-only tests) counts one byte per block."""
    total = 0
    for tensor in kv_cache_config.kv_cache_tensors:
        spec = layer_spec(kv_cache_config, tensor.layers[0]) if tensor.layers else None
        if spec is None:  # not expected: count the whole allocation, never too little
            total += tensor.size // max(1, kv_cache_config.num_blocks)
        else:
            total += len(tensor.layers) * spec.page_size_bytes
    return max(1, total)


def rank_swap_bytes(vllm_config: VllmConfig) -> int:
    """Host swap bytes of one tensor-parallel rank: `--swap-space` is the total over them."""
    transfer = vllm_config.kv_transfer_config
    extra = (transfer.kv_connector_extra_config or {}) if transfer else {}
    tp = max(1, vllm_config.parallel_config.tensor_parallel_size)
    return int(extra.get(SWAP_BYTES_KEY, 0)) // tp


def swap_slots(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> int:
    """Host slots per rank: the same on the scheduler and on every worker (each TP rank's KV
    cache config has the same shapes, each holding its own shard of the heads)."""
    return rank_swap_bytes(vllm_config) // bytes_per_block(kv_cache_config)


def check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
    """Refuse, at start-up, configurations the swap connector would serve wrong."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) > 1:
        raise ValueError(
            f"AdaptiveLLM's swap connector supports models with one KV cache group; this one "
            f"has {len(groups)} (hybrid, sliding-window or draft-model layers). Use "
            "--preemption-mode recompute."
        )
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError(
            "AdaptiveLLM's swap connector does not support pipeline parallelism (stages hold "
            "different layers, so their host slots would differ). Use --preemption-mode "
            "recompute."
        )


def kv_layout(kv_cache_config: KVCacheConfig, layer_name: str, cache: torch.Tensor) -> KVLayout:
    """The asserted layout of one layer's KV cache view: vLLM 0.32 binds `[B, H, N, C]` views
    (`allocate_kv_cache`, every backend), B being `num_blocks * k` under kernel-block splitting
    with kernel block j of block b at `b * k + j`. The view must match what vLLM computes from
    the layer's spec for that k (`compute_layer_kv_cache_shape_bytes`), else ValueError."""
    from vllm.v1.kv_cache_interface import compute_layer_kv_cache_shape_bytes

    spec = layer_spec(kv_cache_config, layer_name)
    num_blocks = kv_cache_config.num_blocks
    shape = tuple(cache.shape)

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"AdaptiveLLM's swap connector: KV cache of layer {layer_name} has shape {shape} "
            f"({cache.dtype}), {why}; it cannot tell which dimension holds the {num_blocks} "
            "blocks, and refuses to swap rather than copy the wrong data. Use "
            "--preemption-mode recompute."
        )

    if spec is None or not hasattr(spec, "block_size"):
        raise refuse("and no KV cache group holds the layer")
    if cache.dim() != 4 or shape[0] % num_blocks:
        raise refuse("not vLLM 0.32's [blocks, heads, tokens, content] view")
    k = shape[0] // num_blocks
    if spec.block_size % k:
        raise refuse(f"whose {k} kernel blocks per block do not divide {spec.block_size} tokens")
    expected = tuple(compute_layer_kv_cache_shape_bytes(spec, num_blocks, spec.block_size // k))
    actual = (*shape[:3], shape[3] * cache.element_size())
    if actual != expected:
        raise refuse(f"where the spec gives {expected} (last dimension in bytes)")
    return KVLayout(block_dim=0, num_blocks=num_blocks, kernel_blocks_per_block=k)


class AdaptiveSwapConnector(KVConnectorBase_V1):
    """See the module docstring."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        check_supported(vllm_config, kv_cache_config)
        groups = kv_cache_config.kv_cache_groups
        spec_block = getattr(groups[0].kv_cache_spec, "block_size", None) if groups else None
        self.block_size = spec_block or vllm_config.cache_config.block_size
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
        self.layouts: dict[str, KVLayout] = {}
        self.copier: KVBlockCopier | None = None
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
        outs = self._outs
        try:
            outs = self._cut_before_reuse(outs, scheduler_output)
        except Exception as exc:  # uncut copies could read reused blocks: recompute instead
            self.errors.record("swap_reuse_cut", exc)
            for copy in outs:
                self.space.release(copy.request_id)
            outs = []
        meta = SwapMetadata(swap_outs=outs, swap_ins=self._ins)
        if meta.swap_ins:
            # The swap-ins feed this step's forward pass: both runners start loads flagged so
            # before it (vLLM flags a resumed request with connector tokens; made sure here).
            scheduler_output.has_sync_kv_loads = True
        self._outs, self._ins = [], []
        for rid in self._consumed:
            self.space.release(rid)
        self._consumed = []
        return meta

    def _cut_before_reuse(
        self, outs: list[BlockCopy], scheduler_output: SchedulerOutput
    ) -> list[BlockCopy]:
        """Cut each swap-out before the first block that this step zeroes or fills by
        copy-on-write: Model Runner V2 does both before `handle_preemptions`, so such a block
        (freed by the victim, reused this step) no longer holds the victim's KV when copied.
        The host copy keeps the blocks before it; the rest of the victim is recomputed."""
        reused = set(scheduler_output.new_block_ids_to_zero or ())
        reused.update(c.dst_block_id for c in scheduler_output.kv_cache_block_copies or ())
        if not reused or not outs:
            return outs
        kept = []
        for copy in outs:
            cut = next(
                (i for i, b in enumerate(copy.device_blocks) if b in reused),
                len(copy.device_blocks),
            )
            if cut < len(copy.device_blocks):
                self.space.truncate(copy.request_id, cut, cut * self.block_size)
                copy = BlockCopy(copy.request_id, copy.device_blocks[:cut], copy.host_slots[:cut])
            if copy.device_blocks:
                kept.append(copy)
        return kept

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self.release(request.request_id)
        return False, None

    # --- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Assert each layer's layout (ValueError at start-up when it is not the expected one)
        and allocate this rank's host slots."""
        seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
        names, caches, layouts = [], [], []
        for name, cache in kv_caches.items():
            key = (cache.data_ptr(), tuple(cache.shape), tuple(cache.stride()))
            if key in seen:  # a layer that shares another layer's KV cache: copied once
                continue
            seen.add(key)
            layouts.append(kv_layout(self._kv_cache_config, name, cache))
            names.append(name)
            caches.append(cache)
        self.copier = KVBlockCopier(caches, layouts, self.num_slots)
        for i, name in enumerate(names):
            self.device_caches[name] = caches[i]
            self.host_caches[name] = self.copier.host[i]
            self.layouts[name] = layouts[i]

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
        self._observe_copy_times()
        return errors

    def _copy(self, copies: list[BlockCopy], to_host: bool) -> None:
        if self.copier is None:
            raise RuntimeError("no KV caches registered")
        blocks = [b for copy in copies for b in copy.device_blocks]
        slots = [s for copy in copies for s in copy.host_slots]
        if to_host:
            self.copier.swap_out(blocks, slots)
        else:
            self.copier.swap_in(blocks, slots)
        self._observe_copy_times()

    def _observe_copy_times(self) -> None:
        """Swap metrics for the copies finished so far (on CUDA, timed by events)."""
        if self.copier is None:
            return
        with self.errors.guard("metrics"):
            from adaptivellm.metrics import EngineMetrics

            metrics = EngineMetrics.get()
            for timing in self.copier.completed():
                metrics.swap_seconds.labels(direction=timing.direction).observe(timing.seconds)
                metrics.swap_blocks.labels(direction=timing.direction).inc(timing.blocks)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # The current stream already waits for the swap-in copies (an event in start_load_kv),
        # so every layer's kernels run after them, CUDA graphs included.
        return None

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
