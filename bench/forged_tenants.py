"""Forged-tenant attack: can one tenant take the service by naming itself many tenants?

Tenants a, b and c run 12, 6 and 2 closed-loop request streams (equal weights) against one
`adaptivellm serve` (weighted-turnaround, `--max-num-seqs 4`, so that requests queue in the
engine where fairness decides). Three phases, in this order on the same server (with
`--fresh-server`, each on a newly started one, so that no phase inherits the fairness counters
of the one before: what the e2e test's short phases need):

- `honest`: every tenant names itself (`user`), authenticated with an operator key
  (`--api-key`), which may declare tenants;
- `forged_declared`: the same, but a's 12 streams each name a made-up tenant (a-0 ... a-11):
  with self-declared tenants, a becomes 12 tenants and takes most of the service;
- `forged_keyed`: every tenant authenticates with its own key from `--tenant-keys`, and a's
  streams still send the 12 made-up names in `user`: the tenant comes from the key, so a is
  one tenant again.

Each phase reports every tenant's share of the tokens served (prompt and output, counted from
the `usage` of the requests that finished in the measured window, after a warm-up) and Jain's
index over the three tenants' shares (1 = equal). The target (issue 37) is a Jain index of at
least 0.9 in `forged_keyed`: the key file leaves honest tenants their fair share.

    python bench/forged_tenants.py                 # writes bench/results/forged-tenants.json
    python bench/forged_tenants.py --phase-s 12 --warmup-s 3 --fresh-server   # the e2e test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptivellm.launch import ServerProcess, adaptivellm_command, free_port
from adaptivellm.scheduler.policies import jain_index

RESULTS = Path(__file__).resolve().parent / "results"
STREAMS = {"a": 12, "b": 6, "c": 2}
OPERATOR_KEY = "operator-key"
KEYS = {tenant: f"key-{tenant}-0123456789abcdef" for tenant in STREAMS}
PHASES = ("honest", "forged_declared", "forged_keyed")
TARGET_JAIN = 0.9


@dataclass(frozen=True)
class Finished:
    """One finished request: whose stream sent it, when it finished, tokens served."""

    owner: str
    at: float
    tokens: int


def key_file(folder: Path) -> Path:
    """Each tenant's key, weight 1."""
    path = folder / "tenant-keys.json"
    tenants = {t: {"keys": [key], "weight": 1} for t, key in KEYS.items()}
    path.write_text(json.dumps({"tenants": tenants}))
    return path


def identity(phase: str, owner: str, stream: int) -> tuple[str, str]:
    """(API key, `user` field) a stream sends in `phase`."""
    forged = owner == "a" and phase != "honest"
    user = f"a-{stream}" if forged else owner
    return (KEYS[owner] if phase == "forged_keyed" else OPERATOR_KEY), user


async def stream(
    base_url: str, phase: str, owner: str, index: int, until: float, args: argparse.Namespace,
    done: list[Finished],
) -> None:  # fmt: skip
    """A closed loop: one request at a time until `until`."""
    import openai

    key, user = identity(phase, owner, index)
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0,
                                timeout=300)  # fmt: skip
    prompt = f"Stream {owner}{index} asks about the weather in city number {index}."
    try:
        while time.monotonic() < until:
            out = await client.completions.create(
                model="tiny", prompt=prompt, max_tokens=args.max_tokens, temperature=0,
                user=user, extra_body={"ignore_eos": True},
            )  # fmt: skip
            assert out.usage is not None
            done.append(Finished(owner, time.monotonic(), out.usage.total_tokens))
    finally:
        await client.close()


async def run_phase(base_url: str, phase: str, args: argparse.Namespace) -> dict[str, Any]:
    """All streams of one phase; shares over the window after the warm-up."""
    done: list[Finished] = []
    start = time.monotonic()
    until = start + args.warmup_s + args.phase_s
    await asyncio.gather(*(
        stream(base_url, phase, owner, i, until, args, done)
        for owner, count in STREAMS.items() for i in range(count)
    ))  # fmt: skip
    window = (start + args.warmup_s, until)
    tokens: dict[str, int] = defaultdict(int)
    requests: dict[str, int] = defaultdict(int)
    for f in done:
        if window[0] <= f.at <= window[1]:
            tokens[f.owner] += f.tokens
            requests[f.owner] += 1
    total = sum(tokens.values()) or 1
    shares = {t: tokens[t] / total for t in STREAMS}
    return {
        "shares": shares,
        "tokens": {t: tokens[t] for t in STREAMS},
        "requests": {t: requests[t] for t in STREAMS},
        "jain": jain_index(shares.values()),
        "window_s": args.phase_s,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, run the phases in order, return the report."""
    with tempfile.TemporaryDirectory(prefix="forged-tenants-") as tmp:
        folder = Path(tmp)
        flags = ["--enforce-eager", "--max-model-len", "512", "--served-model-name", "tiny",
                 "--kv-cache-memory-bytes", str(256 << 20),
                 "--max-num-seqs", str(args.max_num_seqs),
                 "--api-key", OPERATOR_KEY, "--tenant-keys", str(key_file(folder))]  # fmt: skip
        phases = {}
        # One server for every phase, or (--fresh-server) a new one for each: then no phase
        # inherits the fairness counters of the one before (a short phase is mostly transient).
        groups = [[p] for p in PHASES] if args.fresh_server else [list(PHASES)]
        for group in groups:
            port = free_port()
            log = folder / f"server-{group[0]}.log"
            server = ServerProcess(adaptivellm_command(None, port, flags), port, log)
            server.start()
            try:
                server.wait_ready(timeout=600)
                for phase in group:
                    phases[phase] = asyncio.run(run_phase(server.base_url, phase, args))
                    print(phase, json.dumps(phases[phase]), flush=True)
            finally:
                server.stop()
    keyed = phases["forged_keyed"]["jain"]
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "streams": STREAMS,
        "max_num_seqs": args.max_num_seqs,
        "max_tokens": args.max_tokens,
        "phases": phases,
        "forged_tenant_jain": keyed,
        "target_jain": TARGET_JAIN,
        "met": keyed >= TARGET_JAIN,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase-s", type=float, default=40.0, help="measured seconds a phase")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="unmeasured start a phase")
    parser.add_argument("--fresh-server", action="store_true",
                        help="run each phase on a newly started server")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS / "forged-tenants.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"forged_tenant_jain {report['forged_tenant_jain']:.3f} (target >= {TARGET_JAIN})")
    return 0 if report["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
