"""Cross-check the harness's load generator against guidellm, a load generator nobody here wrote.

One `adaptivellm serve` (eager mode) receives the same closed-loop scenario from
both tools in alternating rounds: `--concurrency` clients, `--requests` completions of
`--prompt-tokens` prompt and `--output-tokens` output tokens (ignore_eos). Each tool reports
output tokens/s (total output tokens / time from first send to last completion) and TTFT; the
medians over rounds must agree within 10%.

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
    if not args.guidellm.exists():
        print(f"SKIPPED: guidellm not found at {args.guidellm}; install it as this file's "
              "docstring says, or pass --guidellm PATH")  # fmt: skip
        return 0

    model = {"bench": bench_model, "tiny": ensure_model}.get(args.model, lambda: args.model)()
    model = str(model)
    port = free_port()
    flags = ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
             "--kv-cache-memory-bytes", str(512 << 20)]  # fmt: skip
    command = adaptivellm_command(model, port, flags)
    rounds: dict[str, list[dict[str, float]]] = {"harness": [], "guidellm": []}
    with running_server(command, port, RESULTS / "logs" / "crosscheck-server.log") as server:
        target = Target(server.base_url, model, 4096)
        harness_round(target, argparse.Namespace(**{**vars(args), "requests": 8}), seed=99)
        for i in range(args.rounds):  # alternate, so that drift hits both tools alike
            rounds["harness"].append(harness_round(target, args, seed=i))
            figures, gcmd = guidellm_round(target, args)
            rounds["guidellm"].append(figures)
            print(f"round {i + 1}: harness {rounds['harness'][-1]}\n         guidellm {figures}")

    def med(tool: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[tool])

    ratio_tps = med("harness", "output_tokens_per_s") / med("guidellm", "output_tokens_per_s")
    ratio_ttft = med("harness", "ttft_mean_ms") / med("guidellm", "ttft_mean_ms")
    report = {
        "command": shlex.join(["python", "bench/crosscheck.py", *(argv or sys.argv[1:])]),
        "external_tool": "guidellm 0.8.1 (openai_http backend, /v1/completions, streaming)",
        "external_command": gcmd,
        "server_command": shlex.join(command),
        "scenario": {k: v for k, v in vars(args).items() if k not in ("out", "guidellm")},
        "model": model,
        "harness_tokens_per_s": med("harness", "output_tokens_per_s"),
        "external_tokens_per_s": med("guidellm", "output_tokens_per_s"),
        "tokens_per_s_ratio": ratio_tps,
        "paired_round_ratios": [
            h["output_tokens_per_s"] / g["output_tokens_per_s"]
            for h, g in zip(rounds["harness"], rounds["guidellm"], strict=True)
        ],
        "harness_ttft_mean_ms": med("harness", "ttft_mean_ms"),
        "external_ttft_mean_ms": med("guidellm", "ttft_mean_ms"),
        "harness_ttft_p50_ms": med("harness", "ttft_p50_ms"),
        "external_ttft_p50_ms": med("guidellm", "ttft_p50_ms"),
        "ttft_mean_ratio": ratio_ttft,
        "tolerance": TOLERANCE,
        "agree": abs(ratio_tps - 1) <= TOLERANCE and abs(ratio_ttft - 1) <= TOLERANCE,
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
