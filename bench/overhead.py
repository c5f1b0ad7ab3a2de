"""Overhead of AdaptiveLLM with no KV pressure: stock vLLM vs `adaptivellm serve`, one run.

Both servers serve the same model with the same vLLM flags (dtype, KV cache size, eager mode),
side by side on this machine, and receive the same closed-loop workload through the real
`openai` client: `--concurrency` workers each sending completions of `--output-tokens` tokens
(ignore_eos, greedy) until `--requests` are done. Each server gets one warm-up round and
`--rounds` measured rounds. Both servers run at once and take turns round by round, so that
drift in the machine's speed (other processes on a 2-core machine) hits both alike; the figure
per system is its median round, and `median_paired_ratio` compares neighbouring rounds.
The KV cache is far larger than the workload needs, so nothing is preempted.

    python bench/overhead.py            # writes bench/results/overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from adaptivellm import __version__
from adaptivellm.benchmark.scenarios import BENCH_MODEL, BENCH_MODEL_NAME
from adaptivellm.compat import installed_vllm
from adaptivellm.cpu import cpu_count
from adaptivellm.launch import (
    STOCK_ENV,
    adaptivellm_command,
    free_port,
    running_server,
    stock_vllm_command,
)
from adaptivellm.model import DEFAULT_MODEL_NAME, ModelSpec, ensure_model

RESULTS = Path(__file__).parent / "results"
WORDS = [
    "the",
    "river",
    "city",
    "market",
    "garden",
    "window",
    "letter",
    "story",
    "music",
    "paper",
    "light",
    "night",
]


def prompts(n: int, length: int) -> list[str]:
    """n distinct prompts of about `length` words (distinct: no prefix-cache sharing)."""
    return [
        " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(length)) + f" {i}"
        for i in range(n)
    ]


async def run_round(
    base_url: str, texts: list[str], concurrency: int, max_tokens: int, served: str
) -> dict:
    """Send every prompt, `concurrency` at a time; return tokens, seconds and tokens/s."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)
    queue = list(texts)
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            prompt = queue.pop()
            out = await client.completions.create(
                model=served,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0.0,
                extra_body={"ignore_eos": True},
            )
            assert out.usage is not None
            tokens += out.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def measure(systems: dict[str, tuple[list[str], dict]], args: argparse.Namespace) -> dict:
    """Start every server at once, warm each up, then run measured rounds in turn (A B A B ...)
    so that drift in the machine's speed hits every system alike."""
    texts = prompts(args.requests, args.prompt_words)
    rounds: dict[str, list[dict]] = {name: [] for name in systems}
    with (
        contextlib.ExitStack() as stack,
        tqdm(total=len(systems) * (args.rounds + 1), unit="round") as bar,
    ):
        servers = {}
        for name, (command, env) in systems.items():
            bar.set_description(f"starting {name}")
            port = int(command[command.index("--port") + 1])
            log = RESULTS / "logs" / f"overhead-{name}.log"
            servers[name] = stack.enter_context(running_server(command, port, log, env=env))
        for i in range(args.rounds + 1):
            for name, server in servers.items():
                bar.set_description(f"{name}: {'warm-up' if i == 0 else f'round {i}'}")
                result = asyncio.run(
                    run_round(
                        server.base_url, texts, args.concurrency, args.output_tokens, args.served
                    )
                )
                if i:
                    rounds[name].append(result)
                bar.update(1)
    return {
        name: {
            "command": shlex.join(systems[name][0]),
            "rounds": rounds[name],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rounds[name]),
        }
        for name in systems
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    parser.add_argument("--model", default="tiny", help="tiny (embedded), bench or a folder")
    parser.add_argument("--serve-args", default="", help="extra flags of adaptivellm serve only")
    args = parser.parse_args(argv)

    spec, name = ModelSpec(), DEFAULT_MODEL_NAME
    if args.model == "bench":
        spec, name = BENCH_MODEL, BENCH_MODEL_NAME
    model = str(ensure_model(spec, name)) if args.model in ("tiny", "bench") else args.model
    args.served = name
    common = [
        "--served-model-name", name,
        "--dtype", "float32",
        "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes),
        "--enforce-eager",
    ]  # fmt: skip
    systems = {
        "stock": (stock_vllm_command(model, free_port(), common), STOCK_ENV),
        "adaptivellm": (
            adaptivellm_command(model, free_port(), [*common, *shlex.split(args.serve_args)]),
            {},
        ),
    }
    results = measure(systems, args)
    paired = [
        a["tokens_per_s"] / s["tokens_per_s"]
        for a, s in zip(results["adaptivellm"]["rounds"], results["stock"]["rounds"], strict=True)
    ]

    found = installed_vllm()
    report = {
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "stock_tokens_per_s": results["stock"]["tokens_per_s"],
        "adaptivellm_tokens_per_s": results["adaptivellm"]["tokens_per_s"],
        "ratio": results["adaptivellm"]["tokens_per_s"] / results["stock"]["tokens_per_s"],
        "paired_round_ratios": paired,
        "median_paired_ratio": statistics.median(paired),
        "target_ratio": 0.98,
        "workload": {k: v for k, v in vars(args).items() if k not in ("out", "served")},
        "model": {"name": name, "path": model, **spec.__dict__},
        "machine": {"platform": platform.platform(), "cpus": cpu_count(),
                    "processor": platform.processor()},
        "versions": {"adaptivellm": __version__, "vllm": found[1] if found else None},
        "systems": results,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("stock_tokens_per_s", "adaptivellm_tokens_per_s",
                                            "ratio")}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
