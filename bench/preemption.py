"""Preemption benchmark: stock vLLM (recompute only) and AdaptiveLLM with --preemption-mode swap,
recompute and adaptive, side by side through the benchmark harness, under KV pressure, and again
with an ample KV cache (no pressure: no regression).

The default workload is the `long-prompt-pressure` scenario, a long-context mix: 16 closed-loop
clients, prompts of 717-1024 tokens that each decode 1024 tokens, over a KV cache of 8192 tokens
(4 requests at full length). vLLM 0.32 admits a request only when its whole prompt fits, so the
prompts fill the cache and their decodes overflow it; every victim then holds 700-1000 tokens of
context, which recompute must prefill again and swap copies out and back. `--scenario
long-decode` is the earlier mix (prompts of 205-512 tokens, 1024-token outputs, a 5120-token
cache): more preemptions, of shorter contexts.

How much swapping can win is bounded by the share of the run that stock vLLM spends
recomputing. The number of preemptions follows from how far the decodes overflow the cache,
not from the victims' size: about 14 per 16 requests here, whether the cache holds 8192 or 5120
tokens (one-round explorations: swap/stock 1.09 and 1.09).

All systems' servers are up at once and replay the workload in turn, round by round
(`--rounds`, default 2, in the harness's alternating order), so that drift in this machine's
speed hits every system alike; an idle vLLM server takes no CPU worth measuring. Besides each
system's pooled throughput (all its rounds), the ratios are also given per round (`paired`): a
system's round against stock's round of the same turn. With the four run one after the other,
the same AdaptiveLLM configuration read 0.90x and 1.21x stock in two runs: sequential runs drift
by about 20% here.

Under pressure a fifth system runs stock vLLM with `--max-num-seqs` as many requests as the
small KV cache holds at full length (4; 3 for long-decode), so nothing is ever preempted
(reported as `ceiling`, the name it was given before it ran). It is not a ceiling: on
long-decode it read 0.76x stock, because preempting lets more requests share the batch while
their contexts are still short.

AdaptiveLLM runs with `--fairness fcfs` here, so that vLLM's own admission and victim choice
stay and only the handling of the victims' KV cache differs from stock vLLM.

`predictor_mape` comes from the cost profile `serve` uses (made by `adaptivellm profile`), and
`oracle_agreement` is measured on that profile's measurements: the fraction of the sizes
where the mode the predictors choose is the one whose *measured* cost was lower. It is not
measured per live preemption, where only the chosen mode ever runs.

The model matters. With the embedded tiny model (`--model tiny`) recomputing a 1000-token
context costs a few milliseconds of CPU, so swapping has little to win. With the benchmarks'
larger random-weight Llama (`--model bench`, the default: 8 layers, hidden 1024, about 130M
parameters, see adaptivellm.benchmark.scenarios.BENCH_MODEL) recomputing costs what it costs on
a real model, relative to copying the KV cache. The KV cache is sized in tokens, whatever the
model's bytes per token.

    python bench/preemption.py [--quick] [--model bench|tiny|PATH] [--scenario NAME]
                                             # writes bench/results/preemption.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEMS = {
    "stock": "",
    "swap": "--preemption-mode swap --fairness fcfs",
    "recompute": "--preemption-mode recompute --fairness fcfs",
    "adaptive": "--preemption-mode adaptive --fairness fcfs",
}
#: Scenario -> (KV cache in tokens under pressure, --max-num-seqs of the no-preemption system:
#: as many requests as that cache holds at full length).
PRESSURE = {
    # Prompts of 717-1024 tokens, 1024-token outputs: 4 requests at full length (<= 2048).
    "long-prompt-pressure": (8192, 4),
    # Prompts of 205-512 tokens, 1024-token outputs: 3 x 1524 tokens <= 5120.
    "long-decode": (5120, 3),
}
SCENARIO = "long-prompt-pressure"
#: Stock vLLM with as many sequences as the small KV cache holds at full length, so that nothing
#: is ever preempted: the no-preemption baseline (reported as "ceiling"; see the docstring).
CEILING = "stock-no-preemption"
#: The no-pressure run: a KV cache that holds the whole workload (16 x 2048 tokens) and more.
AMPLE_KV_TOKENS = 50_000


def kv_bytes_per_token(model: Path) -> int:
    """KV cache bytes per token of the model folder's config (float32)."""
    config = json.loads((model / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads", heads)
    return int(config["num_hidden_layers"] * 2 * kv_heads * head_dim * 4)


def model_path(choice: str) -> Path:
    """`bench`, `tiny` or a model folder."""
    from adaptivellm.benchmark.scenarios import bench_model
    from adaptivellm.model import ensure_model

    if choice == "bench":
        return bench_model()
    return ensure_model() if choice == "tiny" else Path(choice)


def run(
    stem: str,
    vllm_args: str,
    quick: bool,
    model: Path,
    rounds: int,
    scenario: str,
    ceiling: int | None = None,
) -> dict:
    """One harness run of the four systems (and the ceiling), taking turns round by round;
    returns its report."""
    # Closed loop: 16 clients keep the server saturated, so throughput measures capacity and
    # the growing contexts overflow the small KV cache. All four servers up at once; only one
    # replays at a time, so none shares the machine's 2 cores with another's work.
    command = [sys.executable, "-m", "adaptivellm.benchmark", "--scenario", scenario,
               "--name", stem, "--vllm-args", vllm_args, "--max-servers", "5",
               "--rounds", str(rounds), "--arrival", "closed", "--concurrency", "16",
               "--model", str(model), "--served-model-name", model.name]  # fmt: skip
    for name, flags in SYSTEMS.items():
        command += ["--system", f"{name}={flags}" if flags else name]
    if ceiling:
        command += ["--system", f"{CEILING}=--max-num-seqs {ceiling}"]
    if quick:
        command.append("--quick")
    subprocess.run(command, check=True)
    return json.loads((RESULTS / f"{stem}.json").read_text())


def throughput(report: dict) -> dict[str, float]:
    """Each system's output tokens/s over all its rounds."""
    return {n: report["systems"][n]["figures"]["output_tokens_per_s"] for n in SYSTEMS}


def round_throughput(report: dict) -> dict[str, list[float]]:
    """Each system's output tokens/s per round. Every round replays the same requests with fixed
    output lengths (ignore_eos), so a round's tokens are the total over the number of rounds."""
    out = {}
    for name, system in report["systems"].items():
        durations = system["round_durations_s"]
        tokens = system["figures"]["output_tokens"] / len(durations)
        out[name] = [tokens / d for d in durations]
    return out


def paired(per_round: dict[str, list[float]], name: str, against: str) -> dict:
    """`name`'s throughput over `against`'s, round by round, and their median."""
    ratios = [a / b for a, b in zip(per_round[name], per_round[against], strict=True)]
    return {"per_round": ratios, "median": statistics.median(ratios)}


def counters(report: dict) -> dict[str, dict]:
    keep = ("vllm:num_preemptions_total", "adaptivellm_preemptions_total",
            "adaptivellm_swap_fallbacks_total", "adaptivellm_swap_blocks_total")  # fmt: skip
    return {n: {k: v for k, v in report["systems"][n]["counters"].items() if k.startswith(keep)}
            for n in SYSTEMS}  # fmt: skip


def predictor_quality(model: Path) -> dict:
    """MAPE and oracle agreement of the profile serve would load for `model` (none for the
    analytic fallback: it has no measurements)."""
    from adaptivellm.predictors.features import ModelShape
    from adaptivellm.predictors.predictor import load_predictor, oracle_agreement
    from adaptivellm.predictors.store import ProfileKey

    config = json.loads((model / "config.json").read_text())
    shape = ModelShape.from_hf_config(config, dtype="float32")
    key = ProfileKey.for_shape(shape, device="cpu", dtype="float32", model=str(model))
    predictor = load_predictor(key)
    return {"source": predictor.source, **oracle_agreement(predictor)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="bench", help="bench, tiny or a model folder")
    parser.add_argument(
        "--rounds", type=int, default=2, help="replays per system under pressure (default 2)"
    )
    parser.add_argument(
        "--no-pressure-rounds",
        type=int,
        default=1,
        help="replays per system with no pressure (default 1; bench/overhead.py measures "
        "overhead with no pressure more precisely)",
    )
    parser.add_argument(
        "--scenario",
        default=SCENARIO,
        choices=sorted(PRESSURE),
        help=f"workload (default {SCENARIO})",
    )
    args = parser.parse_args(argv)
    model = model_path(args.model)
    per_token = kv_bytes_per_token(model)
    kv_tokens, ceiling = PRESSURE[args.scenario]
    kv = f"--kv-cache-memory-bytes {kv_tokens * per_token}"
    pressure = run("preemption-pressure", kv, args.quick, model, args.rounds, args.scenario,
                   ceiling)  # fmt: skip
    kv = f"--kv-cache-memory-bytes {AMPLE_KV_TOKENS * per_token}"
    ample = run("preemption-no-pressure", kv, args.quick, model, args.no_pressure_rounds,
                args.scenario)  # fmt: skip
    tput, tput_free = throughput(pressure), throughput(ample)
    rounds, rounds_free = round_throughput(pressure), round_throughput(ample)
    best = "swap" if tput["swap"] >= tput["recompute"] else "recompute"
    quality = predictor_quality(model)
    best_static = max(tput["swap"], tput["recompute"])
    out = {
        "command": shlex.join(["python", *sys.argv]),
        "quick": args.quick,
        "model": str(model),
        "scenario": args.scenario,
        "kv_cache_tokens": {"pressure": kv_tokens, "no_pressure": AMPLE_KV_TOKENS},
        "throughput_tokens_per_s": tput,
        # The profile stores MAPE in percent; the field is a fraction.
        "predictor_mape": {k: v / 100 for k, v in quality.get("mape", {}).items()},
        "oracle_agreement": quality.get("agreement"),
        "predictor": quality,
        "ratios": {
            "adaptive_vs_stock": tput["adaptive"] / tput["stock"],
            "adaptive_vs_best_static": tput["adaptive"] / best_static,
            "no_pressure_adaptive_vs_stock": tput_free["adaptive"] / tput_free["stock"],
        },
        "ceiling": {
            "system": f"stock vLLM --max-num-seqs {ceiling}: never preempts under the same KV "
            "cache",
            "throughput_tokens_per_s": pressure["systems"][CEILING]["figures"][
                "output_tokens_per_s"
            ],
            "preemptions": pressure["systems"][CEILING]["counters"].get(
                "vllm:num_preemptions_total"
            ),
        },
        "paired": {
            "adaptive_vs_stock": paired(rounds, "adaptive", "stock"),
            "adaptive_vs_best_static": {"best_static": best, **paired(rounds, "adaptive", best)},
            "swap_vs_recompute": paired(rounds, "swap", "recompute"),
            "ceiling_vs_stock": paired(rounds, CEILING, "stock"),
            "no_pressure_adaptive_vs_stock": paired(rounds_free, "adaptive", "stock"),
            "no_pressure_recompute_vs_stock": paired(rounds_free, "recompute", "stock"),
        },
        "rounds": {"pressure": args.rounds, "no_pressure": args.no_pressure_rounds},
        "round_throughput_tokens_per_s": {"pressure": rounds, "no_pressure": rounds_free},
        "no_pressure_throughput_tokens_per_s": tput_free,
        "counters": counters(pressure),
        "reports": ["preemption-pressure.json", "preemption-no-pressure.json"],
        "targets": {
            "adaptive_vs_stock_min": 1.4,
            "adaptive_vs_best_static_min": 0.98,
            "mape_max": 0.02,
            "oracle_agreement_min": 0.95,
            "no_pressure_adaptive_vs_stock_min": 0.98,
        },
    }
    (RESULTS / "preemption.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"pooled": out["ratios"], "paired": out["paired"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
