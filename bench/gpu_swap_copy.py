"""Bandwidth of the swap connector's copy path (`scheduler/kv_copy.py`) on one device.

Torch only: no vLLM, no install of AdaptiveLLM (kv_copy.py is imported by its path). For each
host-memory kind (pinned, pageable) and copy mode (side stream with events, as the connector
runs on CUDA; synchronous copies on the current stream, as it ran before), and for several
victim sizes, it swaps `blocks` randomly scattered KV blocks of every layer out to host slots
and back in, in vLLM 0.32's per-layer layout `[num_blocks, kv_heads, block_size,
2 * head_dim]`, and reports each direction's GB/s (bytes of the blocks moved over the time
from issue until the copies are done) and its fraction of the host link's peak. The peak is
measured first: one large contiguous copy between pinned host memory and the device, each way.

    python bench/gpu_swap_copy.py OUT.json [--device cuda] [--dtype bfloat16] [--quick]
    python bench/gpu_swap_copy.py /tmp/swap-copy.json --device cpu --quick   # smoke test

Default shape: Llama-3-8B's KV cache (32 layers, 8 KV heads, head_dim 128) with 16-token
blocks, i.e. 2 MiB per block over all layers in bfloat16 (64 KiB per layer): a tensor-parallel
rank of a larger model has the same per-layer block size. On CPU there is no link and no
stream: every "fraction of peak" there is of a large host-to-host copy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_COPY = Path(__file__).resolve().parent.parent / "scheduler" / "kv_copy.py"


def load_kv_copy() -> ModuleType:
    """scheduler/kv_copy.py by its path (it imports nothing but torch)."""
    spec = importlib.util.spec_from_file_location("kv_copy", KV_COPY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kv_copy"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Any, reps: int) -> float:
    """Median seconds of `fn()` until the device is idle, after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def link_peak(device: torch.device, nbytes: int, reps: int) -> dict[str, float]:
    """GB/s of one large contiguous copy each way (pinned host memory on CUDA)."""
    pinned = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host.fill_(1)
    h2d = timed(device, lambda: dev.copy_(host, non_blocking=pinned), reps)
    d2h = timed(device, lambda: host.copy_(dev, non_blocking=pinned), reps)
    return {"in": nbytes / h2d / 1e9, "out": nbytes / d2h / 1e9, "bytes": float(nbytes)}


def measure(
    kv_copy: ModuleType,
    caches: list[torch.Tensor],
    total_blocks: int,
    blocks: int,
    pinned: bool,
    side_stream: bool,
    reps: int,
    rng: random.Random,
) -> dict[str, float]:
    """Median seconds of swap-out and of swap-in of `blocks` scattered blocks."""
    copier = kv_copy.KVBlockCopier(
        caches,
        kv_copy.KVLayout(0, total_blocks),
        blocks,
        pin_memory=pinned,
        side_stream=side_stream,
    )
    device = caches[0].device
    slots = list(range(blocks))
    out_s, in_s = [], []
    for rep in range(reps + 1):
        ids = rng.sample(range(total_blocks), blocks)
        sync(device)
        start = time.perf_counter()
        copier.swap_out(ids, slots)
        copier.synchronize()
        middle = time.perf_counter()
        copier.swap_in(ids, slots)
        copier.synchronize()
        end = time.perf_counter()
        if rep:  # the first is a warm-up
            out_s.append(middle - start)
            in_s.append(end - middle)
    copier.completed()
    return {"out_s": statistics.median(out_s), "in_s": statistics.median(in_s)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 8, 64, 256, 1024])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--peak-mib", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks = [b for b in args.blocks if b <= 64] or [1, 8]
        args.reps, args.peak_mib = 3, min(args.peak_mib, 64)
        args.layers = min(args.layers, 8)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    kv_copy = load_kv_copy()
    rng = random.Random(0)
    torch.manual_seed(0)

    # Twice the largest victim, so that a victim's blocks are scattered.
    total_blocks = 2 * max(args.blocks)
    layout = (total_blocks, args.kv_heads, args.block_size, 2 * args.head_dim)
    caches = [torch.randn(layout, dtype=dtype, device=device) for _ in range(args.layers)]
    block_bytes = args.layers * args.kv_heads * args.block_size * 2 * args.head_dim
    block_bytes *= caches[0].element_size()
    peak = link_peak(device, args.peak_mib << 20, args.reps)

    cuda = device.type == "cuda"
    variants = (
        [(True, True), (True, False), (False, True), (False, False)] if cuda else [(False, False)]
    )
    rows = []
    for blocks in args.blocks:
        for pinned, side in variants:
            times = measure(kv_copy, caches, total_blocks, blocks, pinned, side, args.reps, rng)
            row: dict[str, Any] = {
                "blocks": blocks,
                "bytes": blocks * block_bytes,
                "host": "pinned" if pinned else "pageable",
                "mode": "side-stream" if side else "synchronous",
            }
            for direction in ("out", "in"):
                seconds = times[f"{direction}_s"]
                gbps = blocks * block_bytes / seconds / 1e9
                row[f"{direction}_s"] = seconds
                row[f"{direction}_gbps"] = gbps
                row[f"{direction}_fraction_of_peak"] = gbps / peak[direction]
            rows.append(row)
            print(
                f"{blocks:5d} blocks {row['host']:8s} {row['mode']:11s} "
                f"out {row['out_gbps']:7.2f} GB/s ({row['out_fraction_of_peak']:.0%}) "
                f"in {row['in_gbps']:7.2f} GB/s ({row['in_fraction_of_peak']:.0%})"
            )

    result = {
        "what": "swap copy bandwidth of scheduler/kv_copy.py (bench/gpu_swap_copy.py)",
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "layout": "[num_blocks, kv_heads, block_size, 2*head_dim] per layer",
        "shape": {
            "layers": args.layers,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "block_size": args.block_size,
        },
        "block_bytes_all_layers": block_bytes,
        "peak_gbps": peak,
        "reps": args.reps,
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"peak: in {peak['in']:.2f} GB/s, out {peak['out']:.2f} GB/s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
