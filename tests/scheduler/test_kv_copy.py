"""scheduler/kv_copy.py on CPU: swap copies round-trip exactly, the block dimension is asserted,
kernel-block splitting maps scheduler blocks to their kernel blocks (checked against vLLM's own
allocation and copy-on-write copy), and bad indices are refused before any copy."""

from __future__ import annotations

import pytest
import torch

from adaptivellm.scheduler.kv_copy import KVBlockCopier, KVLayout, copy_by_runs, slot_runs

NUM_BLOCKS = 12


def caches(block_dim: int, layers: int = 3, k: int = 1) -> list[torch.Tensor]:
    """Random per-layer KV caches with the blocks in `block_dim` (k kernel blocks each)."""
    torch.manual_seed(block_dim * 10 + k)
    shape = [NUM_BLOCKS * k, 2, 16 // k, 8]  # [B, H, N, C]
    if block_dim == 1:
        shape = [2, NUM_BLOCKS * k, 16 // k, 4]  # [2, B, N, ...]: K and V first
    return [torch.randn(shape) for _ in range(layers)]


def block(cache: torch.Tensor, layout: KVLayout, b: int) -> torch.Tensor:
    return layout.blocks_view(cache)[b].clone()


@pytest.mark.parametrize("block_dim", [0, 1])
def test_swap_out_then_in_round_trips_exactly(block_dim: int) -> None:
    kv = caches(block_dim)
    layout = KVLayout(block_dim, NUM_BLOCKS)
    copier = KVBlockCopier(kv, layout, num_slots=8)
    assert not copier.pinned and copier.stream is None  # CPU: plain synchronous copies
    victim_blocks, slots = [9, 2, 5, 11], [6, 0, 1, 3]  # scattered blocks, fragmented slots
    before = [[block(c, layout, b) for b in victim_blocks] for c in kv]
    copier.swap_out(victim_blocks, slots)
    untouched = [c.clone() for c in kv]
    for c in kv:  # the blocks are reused by someone else
        layout.blocks_view(c)[victim_blocks] = -1.0
    resumed_blocks = [3, 4, 7, 8]
    copier.swap_in(resumed_blocks, slots)
    for c, old, orig in zip(kv, before, untouched, strict=True):
        for b, expect in zip(resumed_blocks, old, strict=True):
            assert torch.equal(block(c, layout, b), expect)
        others = [b for b in range(NUM_BLOCKS) if b not in resumed_blocks + victim_blocks]
        view, orig_view = layout.blocks_view(c), layout.blocks_view(orig)
        assert torch.equal(view[others], orig_view[others])  # nothing else was written
    assert [t.direction for t in copier.completed()] == ["out", "in"]
    assert copier.completed() == []
    assert copier.bytes_per_slot == 3 * kv[0].numel() * 4 // NUM_BLOCKS


def test_host_slots_are_slot_major_and_contiguous() -> None:
    kv = caches(1)
    copier = KVBlockCopier(kv, KVLayout(1, NUM_BLOCKS), num_slots=5)
    assert copier.host[0].shape == (5, 2, 16, 4) and copier.host[0][3].is_contiguous()
    copier.swap_out([4], [3])
    assert torch.equal(copier.host[0][3], kv[0][:, 4])


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((NUM_BLOCKS, 2, 16, 8), KVLayout(1, NUM_BLOCKS)),  # blocks first, said second
        ((2, NUM_BLOCKS, 16, 8), KVLayout(0, NUM_BLOCKS)),  # blocks second, said first
        ((NUM_BLOCKS, 2, 16, 8), KVLayout(0, NUM_BLOCKS, kernel_blocks_per_block=2)),
        ((2 * NUM_BLOCKS, 2, 8, 8), KVLayout(0, NUM_BLOCKS)),  # split, said unsplit
        ((16, 2, 16, 8), KVLayout(0, NUM_BLOCKS)),
    ],
)
def test_a_wrong_block_dimension_is_refused(shape: tuple[int, ...], layout: KVLayout) -> None:
    with pytest.raises(ValueError, match="does not hold"):
        KVBlockCopier([torch.zeros(shape)], layout, num_slots=2)


def test_kernel_block_splitting_moves_every_kernel_block_of_a_block() -> None:
    k = 4
    (kv,) = caches(0, layers=1, k=k)
    copier = KVBlockCopier([kv], KVLayout(0, NUM_BLOCKS, kernel_blocks_per_block=k), 3)
    assert copier.host[0].shape == (3, k, 2, 4, 8)
    original = kv.clone()
    copier.swap_out([5, 2], [2, 0])
    copier.swap_in([7, 10], [2, 0])
    for src, dst in ((5, 7), (2, 10)):
        for j in range(k):  # kernel block j of block b is b * k + j
            assert torch.equal(kv[dst * k + j], original[src * k + j])
    assert torch.equal(kv[: 7 * k], original[: 7 * k])


@pytest.mark.parametrize("kernel_block_size", [16, 8, 4])
def test_kernel_blocks_of_vllms_own_views_match_vllms_copy(kernel_block_size: int) -> None:
    """vLLM's allocate_kv_cache (the views the connector is given) under kernel-block
    splitting; a swap out of block 3 and in to block 9 equals vLLM's copy-on-write copy."""
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
    )
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache, copy_kv_cache_blocks_inplace

    from adaptivellm.scheduler.swap_connector import kv_layout

    spec = FullAttentionSpec(16, num_kv_heads=2, head_size=4, dtype=torch.float32)
    page, layers = spec.page_size_bytes, ["l0", "l1"]
    tensor = KVCacheTensor(size=2 * page * NUM_BLOCKS, layers=layers,
                           layer_stride=page * NUM_BLOCKS, block_stride=page)  # fmt: skip
    config = KVCacheConfig(NUM_BLOCKS, [tensor], [KVCacheGroupSpec(layers, spec)])
    views = allocate_kv_cache(config, torch.device("cpu"), KVCacheLayout.LBHNC, [kernel_block_size])
    for view in views.values():
        view.copy_(torch.randn(view.shape))
    k = 16 // kernel_block_size
    layouts = [kv_layout(config, name, view) for name, view in views.items()]
    assert layouts == [KVLayout(0, NUM_BLOCKS, k)] * 2
    expected = [v.clone() for v in views.values()]
    copy_kv_cache_blocks_inplace(expected, NUM_BLOCKS, [(3, 9)])  # vLLM: src 3 -> dst 9
    copier = KVBlockCopier(list(views.values()), layouts, num_slots=2)
    copier.swap_out([3], [1])
    copier.swap_in([9], [1])
    for got, want in zip(views.values(), expected, strict=True):
        assert torch.equal(got, want)


def test_kv_layout_refuses_a_view_that_does_not_match_the_spec() -> None:
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from adaptivellm.scheduler.swap_connector import kv_layout

    spec = FullAttentionSpec(16, num_kv_heads=2, head_size=4, dtype=torch.float32)
    config = KVCacheConfig(NUM_BLOCKS, [], [KVCacheGroupSpec(["l0"], spec)])
    assert kv_layout(config, "l0", torch.zeros(NUM_BLOCKS, 2, 16, 8)) == KVLayout(0, NUM_BLOCKS)
    for bad in (torch.zeros(2, NUM_BLOCKS, 16, 4, 2), torch.zeros(NUM_BLOCKS, 16, 2, 8),
                torch.zeros(NUM_BLOCKS, 2, 16, 8, dtype=torch.float16),
                torch.zeros(NUM_BLOCKS + 1, 2, 16, 8)):  # fmt: skip
        with pytest.raises(ValueError, match="refuses to swap"):
            kv_layout(config, "l0", bad)
    with pytest.raises(ValueError, match="no KV cache group"):
        kv_layout(config, "other", torch.zeros(NUM_BLOCKS, 2, 16, 8))


def test_bad_indices_are_refused_before_any_copy() -> None:
    kv = caches(0, layers=1)
    copier = KVBlockCopier(kv, KVLayout(0, NUM_BLOCKS), num_slots=4)
    host = copier.host[0].clone()
    for blocks, slots, error in (
        ([1, 2], [0], ValueError),
        ([NUM_BLOCKS], [0], IndexError),
        ([-1], [0], IndexError),
        ([1], [4], IndexError),
        ([1, 2], [3, 3], ValueError),  # one slot written twice
    ):
        with pytest.raises(error):
            copier.swap_out(blocks, slots)
    # Bytes, not values: the host slots are uninitialised and may hold NaN (NaN != NaN).
    assert torch.equal(copier.host[0].view(torch.uint8), host.view(torch.uint8))
    with pytest.raises(ValueError):
        copier.swap_in([5, 5], [0, 1])  # one block written twice
    copier.swap_out([], [])  # nothing to do
    assert copier.completed() == []


@pytest.mark.parametrize("block_dim", [0, 1])
def test_the_cuda_paths_run_copies_are_exact_on_cpu(block_dim: int) -> None:
    """The data movement of the CUDA path (gather, one copy per run of slots, scatter) run on
    CPU tensors: the same result as the CPU path."""
    (kv,) = caches(block_dim, layers=1)
    layout = KVLayout(block_dim, NUM_BLOCKS)
    view, original = layout.blocks_view(kv), layout.blocks_view(kv).clone()
    host = torch.zeros((9, *view.shape[1:]))
    pairs = sorted(zip([7, 1, 2, 8, 3], [4, 10, 0, 6, 2], strict=True))  # (slot, block)
    runs = slot_runs([s for s, _ in pairs])
    assert runs == [(0, 1, 3), (3, 7, 2)]
    ids = torch.tensor([b for _, b in pairs])
    copy_by_runs(view, host, ids, runs, to_host=True)
    for slot, b in pairs:
        assert torch.equal(host[slot], original[b])
    assert not host[[0, 4, 5, 6]].any()
    view.zero_()
    copy_by_runs(view, host, ids, runs, to_host=False)
    assert torch.equal(view[ids], original[ids])
    assert not view[[b for b in range(NUM_BLOCKS) if b not in ids.tolist()]].any()


def test_slot_runs() -> None:
    assert slot_runs([]) == []
    assert slot_runs([0, 1, 2, 5, 6, 9]) == [(0, 0, 3), (3, 5, 2), (5, 9, 1)]
    assert slot_runs([3, 2]) == [(0, 3, 1), (1, 2, 1)]


def test_caches_on_several_devices_or_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="different block counts"):
        KVBlockCopier(
            [torch.zeros(4, 1, 1, 1), torch.zeros(5, 1, 1, 1)],
            [KVLayout(0, 4), KVLayout(0, 5)],
            num_slots=1,
        )
    with pytest.raises(ValueError, match="layouts"):
        KVBlockCopier([torch.zeros(4, 1, 1, 1)], [KVLayout(0, 4)] * 2, num_slots=1)
