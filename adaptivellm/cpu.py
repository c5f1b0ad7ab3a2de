"""CPU-host facts and the defaults AdaptiveLLM picks on CPU machines.

bfloat16 and AMX. On Intel CPUs with AMX (Sapphire Rapids and later), vLLM's CPU kernels run
AMX tile instructions for bfloat16. Linux keeps AMX tile state off for a process until the
process asks for it (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); the first tile
instruction of a process that never asked dies with SIGILL (exit -4), which is what vLLM's
engine did here in bfloat16. AdaptiveLLM's vLLM plugin makes that request in every vLLM process
(`request_amx_permission`), which makes bfloat16 serve. The default dtype on CPU is still
float32: it is exact, runs on every x86 CPU, and keeps greedy outputs comparable across
preemption modes; pass `--dtype bfloat16` for speed.
"""

from __future__ import annotations

import ctypes
import os
import platform
from functools import cache
from pathlib import Path

_SYS_ARCH_PRCTL = 158  # x86-64 syscall number of arch_prctl
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18

DEFAULT_CPU_DTYPE = "float32"
DTYPE_REASON = (
    "AdaptiveLLM serves in float32 on CPU unless --dtype is given: float32 is exact and works on "
    "every x86 CPU. bfloat16 uses AMX tile instructions on CPUs that have them, which Linux allows "
    "only after a per-process arch_prctl(ARCH_REQ_XCOMP_PERM) request (without it vLLM's CPU "
    "kernels die with SIGILL); AdaptiveLLM makes that request in every engine process, so "
    "--dtype bfloat16 works too."
)
#: Ceiling of the KV cache AdaptiveLLM sizes by default on CPU.
MAX_DEFAULT_KV_CACHE_BYTES = 4 << 30
#: Share of the memory available at start-up that the default KV cache may take.
DEFAULT_KV_CACHE_FRACTION = 0.25


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty off Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_amx() -> bool:
    """True when the CPU has AMX tiles."""
    return "amx_tile" in cpu_flags()


@cache
def request_amx_permission() -> bool:
    """Ask Linux for AMX tile state for this process; True when granted. Idempotent, cheap, and
    a no-op (False) on CPUs without AMX or off x86-64 Linux."""
    if platform.system() != "Linux" or platform.machine() != "x86_64" or not has_amx():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0


def mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo, or a 4 GiB guess when it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 4 << 30


def default_kv_cache_bytes(available: int | None = None) -> int:
    """KV cache size for CPU serving when the operator gave none.

    vLLM's CPU backend otherwise asks for 92% of the NUMA node and refuses to start when the page
    cache holds some of it. A quarter of the available memory, at most 4 GiB, rounded to MiB.
    """
    available = mem_available_bytes() if available is None else available
    size = min(MAX_DEFAULT_KV_CACHE_BYTES, int(available * DEFAULT_KV_CACHE_FRACTION))
    return max(64 << 20, size >> 20 << 20)


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
