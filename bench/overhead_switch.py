"""Why bench/overhead.py cannot resolve 2% on a 2-core machine: light-phase collapses (issue #35).

bench/overhead.py pairs stock vLLM with a configuration, both up at once, and drives each in
turn with its `light` then its `pressure` workload. Its A/A control (two stock servers) spreads
0.64-1.75 round to round. This script shows where that spread comes from, with stock vLLM only:
it drives the same workloads through one or two identical stock servers and records every
drive's throughput, the slowest first token, and the CPU seconds of each server's processes by
role (API server, engine core, worker). A drive is **collapsed** when its tokens/s is under half
the median of that workload's drives.

    python bench/overhead_switch.py --servers 2                  # alternate two stock servers
    python bench/overhead_switch.py --servers 2 --freeze-other   # SIGSTOP the idle one
    python bench/overhead_switch.py --servers 1                  # one server, same drives
    # -> bench/results/overhead-switch.json (each mode is merged in under its own key)

Each mode runs `--rounds` rounds; a round drives every server with `light` then `pressure`.
`--pause S` waits S seconds before each drive (vLLM's shared-memory queue spins for 1 s after
its last read; a pause longer than that rules the idle server's spin out). The JSON is rewritten
after every drive.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from adaptivellm.model import DEFAULT_MODEL_NAME

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import (  # bench/ is a folder of scripts, not a package
    RESULTS,
    WORKLOADS,
    Setup,
    drive,
    group_cpu_by_role,
    workload,
)


def mode_name(args: argparse.Namespace) -> str:
    name = f"servers{args.servers}"
    if args.freeze_other:
        name += "-freeze"
    if args.pause:
        name += f"-pause{args.pause:g}"
    return name


def collapses(drives: list[dict], threshold: float = 0.5) -> dict:
    """Per workload: median tokens/s, and the drives under `threshold` x that median, split by
    what ran just before them (the same server or the other one)."""
    out = {}
    for wl in WORKLOADS:
        rows = [d for d in drives if d["workload"] == wl]
        if not rows:
            continue
        median = statistics.median(d["tokens_per_s"] for d in rows)
        low = [d for d in rows if d["tokens_per_s"] < threshold * median]
        out[wl] = {
            "drives": len(rows),
            "median_tokens_per_s": median,
            "collapsed": len(low),
            "collapsed_after_other_server": sum(1 for d in low if d["after_other_server"]),
            "drives_after_other_server": sum(1 for d in rows if d["after_other_server"]),
            "min_tokens_per_s": min(d["tokens_per_s"] for d in rows),
            "max_tokens_per_s": max(d["tokens_per_s"] for d in rows),
        }
    return out


def run(args: argparse.Namespace) -> int:
    if args.servers < 1 or args.rounds < 1 or args.pause < 0:
        raise SystemExit("--servers and --rounds must be at least 1, --pause at least 0")
    if args.freeze_other and args.servers < 2:
        raise SystemExit("--freeze-other needs --servers 2")
    setup = Setup(argparse.Namespace(kv_tokens=args.kv_tokens))
    out: Path = args.out
    report = json.loads(out.read_text()) if out.exists() else {}
    mode = mode_name(args)
    entry: dict = {
        "command": shlex.join(["python", *sys.argv]),
        "requests_per_drive": args.requests,
        "concurrency": args.concurrency,
        "drives": [],
    }
    report[mode] = entry
    names = ["A", "B"][: args.servers]
    with contextlib.ExitStack() as stack, tqdm(total=args.rounds * len(names) * 2) as bar:
        servers = {}
        for name in names:
            bar.set_description(f"starting {name}")
            servers[name] = setup.start(stack, f"switch-{name}", None)[0]
        last = None
        for i in range(args.rounds):
            for name in names:
                for wl, shape in WORKLOADS.items():
                    bar.set_description(f"round {i} {name} {wl}")
                    if args.pause:
                        time.sleep(args.pause)
                    others = [servers[n] for n in names if n != name]
                    before = {n: group_cpu_by_role(s.proc.pid) for n, s in servers.items()}
                    reqs = workload(args.requests, i, aborts=args.aborts, **shape)  # type: ignore[arg-type]
                    if args.freeze_other:
                        for o in others:
                            os.killpg(o.proc.pid, signal.SIGSTOP)
                    try:
                        res = asyncio.run(
                            drive(servers[name].base_url, args.served, reqs, args.concurrency)
                        )
                    finally:
                        for o in others if args.freeze_other else ():
                            os.killpg(o.proc.pid, signal.SIGCONT)
                    cpu = {}
                    for n, s in servers.items():
                        after = group_cpu_by_role(s.proc.pid)
                        cpu[n] = {r: round(c - before[n].get(r, 0.0), 2) for r, c in after.items()}
                    entry["drives"].append(
                        {
                            "round": i,
                            "server": name,
                            "workload": wl,
                            "after_other_server": last is not None and last != name,
                            **res,
                            "cpu_s": cpu,
                        }
                    )
                    last = name
                    entry["collapses"] = collapses(entry["drives"])
                    out.write_text(json.dumps(report, indent=2) + "\n")
                    bar.update(1)
    print(json.dumps(entry["collapses"], indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=2, choices=(1, 2))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=60, help="per drive")
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--aborts", type=float, default=0.1)
    parser.add_argument("--kv-tokens", type=int, default=3072)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds before each drive")
    parser.add_argument("--freeze-other", action="store_true", help="SIGSTOP the idle server")
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead-switch.json")
    args = parser.parse_args(argv)
    args.served = DEFAULT_MODEL_NAME
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
