"""The swap connector's GPU-facing rules, checked on CPU: host slots per tensor-parallel rank,
KV cache views from vLLM's own allocator (kernel-block splitting included) asserted and copied
exactly, unsupported configurations refused at start-up, and swap-outs cut before blocks that
Model Runner V2 zeroes or fills by copy-on-write ahead of handle_preemptions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.config import KVTransferConfig, ParallelConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.core.kv_cache_utils import KVCacheBlockCopy
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
)

from adaptivellm.scheduler import swap_connector as sc
from adaptivellm.scheduler.kv_copy import KVLayout
from adaptivellm.scheduler.swap_connector import (
    AdaptiveSwapConnector,
    BlockCopy,
    SwapMetadata,
    bytes_per_block,
    swap_slots,
)
from tests.scheduler.sim import make_request

NUM_BLOCKS, LAYERS = 20, ["model.layers.0.attn", "model.layers.1.attn"]
SPEC = FullAttentionSpec(16, num_kv_heads=2, head_size=8, dtype=torch.float32)
PAGE = SPEC.page_size_bytes  # 16 tokens x 2 heads x (8 + 8) x 4 bytes = 2 KiB


def kv_cache_config(groups: int = 1) -> KVCacheConfig:
    """Two layers, layer-outermost, as vLLM 0.32's allocator lays them out."""
    tensor = KVCacheTensor(size=len(LAYERS) * PAGE * NUM_BLOCKS, layers=LAYERS,
                           layer_stride=PAGE * NUM_BLOCKS, block_stride=PAGE)  # fmt: skip
    specs = [KVCacheGroupSpec(LAYERS, SPEC)]
    specs += [KVCacheGroupSpec([f"extra{i}"], SPEC) for i in range(groups - 1)]
    return KVCacheConfig(NUM_BLOCKS, [tensor], specs)


def vllm_config(swap_bytes: int, tp: int = 1, pp: int = 1) -> VllmConfig:
    return VllmConfig(
        parallel_config=ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp),
        kv_transfer_config=KVTransferConfig(
            kv_connector=sc.CLASS_NAME,
            kv_connector_module_path=sc.QUALNAME,
            kv_role="kv_both",
            kv_connector_extra_config={sc.SWAP_BYTES_KEY: swap_bytes},
        ),
    )


def connector(
    swap_bytes: int, tp: int = 1, role: KVConnectorRole = KVConnectorRole.WORKER
) -> AdaptiveSwapConnector:
    return AdaptiveSwapConnector(vllm_config(swap_bytes, tp), role, kv_cache_config())


def vllm_views(config: KVCacheConfig, kernel_block_size: int = 16) -> dict[str, torch.Tensor]:
    """The per-layer views vLLM's workers hand to register_kv_caches, filled at random."""
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    views = allocate_kv_cache(config, torch.device("cpu"), KVCacheLayout.LBHNC, [kernel_block_size])
    for view in views.values():
        view.copy_(torch.randn(view.shape))
    return views


def test_a_host_slot_holds_one_block_of_every_layer_of_one_rank() -> None:
    assert bytes_per_block(kv_cache_config()) == len(LAYERS) * PAGE
    # vLLM 0.32's KVCacheTensor.size is the whole shared allocation: one tensor per layer
    # sharing it must not count it twice.
    shared = [KVCacheTensor(size=len(LAYERS) * PAGE * NUM_BLOCKS, layers=[name],
                            layer_stride=0, block_stride=PAGE) for name in LAYERS]  # fmt: skip
    config = KVCacheConfig(NUM_BLOCKS, shared, [KVCacheGroupSpec(LAYERS, SPEC)])
    assert bytes_per_block(config) == len(LAYERS) * PAGE


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_swap_space_is_divided_across_tensor_parallel_ranks(tp: int) -> None:
    total = 64 * len(LAYERS) * PAGE  # 64 slots' worth in all
    worker = connector(total, tp)
    scheduler = connector(total, tp, KVConnectorRole.SCHEDULER)
    assert worker.num_slots == scheduler.num_slots == 64 // tp
    assert scheduler.space.num_slots == 64 // tp
    assert swap_slots(vllm_config(total, tp), kv_cache_config()) == 64 // tp
    worker.register_kv_caches(vllm_views(kv_cache_config()))
    host_bytes = sum(h.numel() * h.element_size() for h in worker.host_caches.values())
    assert host_bytes == (64 // tp) * len(LAYERS) * PAGE <= total // tp


def test_worker_round_trip_through_vllms_views_with_kernel_block_splitting() -> None:
    config = kv_cache_config()
    worker = AdaptiveSwapConnector(vllm_config(8 * len(LAYERS) * PAGE),
                                   KVConnectorRole.WORKER, config)  # fmt: skip
    views = vllm_views(config, kernel_block_size=4)  # 4 kernel blocks per block
    worker.register_kv_caches(views)
    assert set(worker.layouts.values()) == {KVLayout(0, NUM_BLOCKS, 4)}
    original = {n: v.clone() for n, v in views.items()}
    worker.handle_preemptions(SwapMetadata(swap_outs=[BlockCopy("r", (3, 17), (5, 0))]))
    for view in views.values():
        view.zero_()  # the freed blocks are reused and overwritten
    worker.bind_connector_metadata(SwapMetadata(swap_ins=[BlockCopy("r", (8, 1), (5, 0))]))
    worker.start_load_kv(None)  # type: ignore[arg-type]
    assert worker.get_block_ids_with_load_errors() == set()
    for name, view in views.items():
        for src, dst in ((3, 8), (17, 1)):
            assert torch.equal(view[dst * 4 : dst * 4 + 4], original[name][src * 4 : src * 4 + 4])
        assert not view[4 * 9 :].any() and not view[8:32].any()
    assert worker.errors.counts == {}


def test_layers_sharing_a_kv_cache_are_copied_once() -> None:
    config = kv_cache_config()
    views = vllm_views(config)
    views["model.layers.2.attn"] = views[LAYERS[0]]  # cross-layer KV sharing aliases the view
    worker = AdaptiveSwapConnector(vllm_config(4 * len(LAYERS) * PAGE),
                                   KVConnectorRole.WORKER, config)  # fmt: skip
    worker.register_kv_caches(views)
    assert list(worker.device_caches) == LAYERS


def test_an_unexpected_layout_is_refused_at_registration() -> None:
    worker = connector(4 * len(LAYERS) * PAGE)
    blocks_second = {name: torch.zeros(2, NUM_BLOCKS, 16, 2, 8) for name in LAYERS}
    with pytest.raises(ValueError, match="refuses to swap"):
        worker.register_kv_caches(blocks_second)


def test_unsupported_configurations_are_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match="one KV cache group"):
        AdaptiveSwapConnector(vllm_config(1 << 20), KVConnectorRole.SCHEDULER, kv_cache_config(2))


def test_pipeline_parallel_is_refused() -> None:
    config = SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=2))
    with pytest.raises(ValueError, match="pipeline parallelism"):
        sc.check_supported(config, kv_cache_config())  # type: ignore[arg-type]


def step_output(zero: list[int] | None = None, cow: list[tuple[int, int]] | None = None) -> object:
    copies = [KVCacheBlockCopy(src, dst) for src, dst in cow] if cow else None
    return SimpleNamespace(
        new_block_ids_to_zero=zero, kv_cache_block_copies=copies, has_sync_kv_loads=False
    )


def planned(scheduler: AdaptiveSwapConnector, rid: str, blocks: list[int]) -> None:
    request = make_request(rid, 16 * len(blocks) + 8, 4, 0.0)
    assert scheduler.swap_out(request, blocks, 16 * len(blocks))


def test_swap_outs_are_cut_before_blocks_reused_by_zeroing_or_copy_on_write() -> None:
    scheduler = connector(16 * len(LAYERS) * PAGE, role=KVConnectorRole.SCHEDULER)
    planned(scheduler, "a", [5, 6, 7])  # block 6 is zeroed for a new request: keep 5 only
    planned(scheduler, "b", [9, 10])  # block 9 is a copy-on-write target: nothing kept
    planned(scheduler, "c", [11, 12])  # untouched
    meta = scheduler.build_connector_meta(step_output(zero=[6, 1], cow=[(2, 9)]))  # type: ignore[arg-type]
    assert isinstance(meta, SwapMetadata)
    assert [(c.request_id, c.device_blocks) for c in meta.swap_outs] == [
        ("a", (5,)), ("c", (11, 12)),
    ]  # fmt: skip
    a, c = scheduler.space.get("a"), scheduler.space.get("c")
    assert a is not None and a.num_tokens == 16 and len(a.slots) == 1
    assert c is not None and c.num_tokens == 32 and len(c.slots) == 2
    assert scheduler.space.get("b") is None  # b is recomputed
    assert scheduler.space.used == 3
    scheduler.space.check_integrity()


def test_without_reuse_the_swap_outs_are_unchanged_and_swap_ins_are_sync_loads() -> None:
    scheduler = connector(16 * len(LAYERS) * PAGE, role=KVConnectorRole.SCHEDULER)
    planned(scheduler, "a", [5, 6, 7])
    out = step_output()
    meta = scheduler.build_connector_meta(out)  # type: ignore[arg-type]
    assert isinstance(meta, SwapMetadata)
    assert [c.device_blocks for c in meta.swap_outs] == [(5, 6, 7)]
    assert out.has_sync_kv_loads is False  # type: ignore[attr-defined]
    scheduler._ins.append(BlockCopy("a", (1, 2, 3), (0, 1, 2)))
    scheduler.build_connector_meta(out)  # type: ignore[arg-type]
    assert out.has_sync_kv_loads is True  # type: ignore[attr-defined]


def test_a_failing_reuse_check_drops_the_swap_outs(monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler = connector(16 * len(LAYERS) * PAGE, role=KVConnectorRole.SCHEDULER)
    planned(scheduler, "a", [5, 6, 7])

    def boom(*args: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(scheduler, "_cut_before_reuse", boom)
    meta = scheduler.build_connector_meta(step_output(zero=[6]))  # type: ignore[arg-type]
    assert isinstance(meta, SwapMetadata) and meta.swap_outs == []
    assert scheduler.space.get("a") is None and scheduler.space.used == 0
    assert scheduler.errors.counts == {"swap_reuse_cut": 1}
