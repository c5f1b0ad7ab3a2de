"""Split execution served end to end: the same request mix all-ordinary, then by split clients.

One `adaptivellm serve --split-execution` server (embedded model). The mix: `--requests`
requests with ShareGPT-shaped prompt lengths (the benchmark package's ShareGPT lengths, seeded,
clipped to `--max-prompt`), `--max-tokens` greedy output tokens each (ignore_eos), sent by
`--concurrency` closed-loop workers.

1. all ordinary: the real `openai` client, `/v1/completions` with the token ids;
2. split mix: the same requests by `SplitClient`s (one per worker, the real client library),
   each declaring this machine as measured by the client (`measure_client_spec`, then
   calibrated by the client from its own measured layer times). Each request carries an
   end-to-end SLA of first_s + per_token_s x (max_tokens - 1) seconds from one of three
   classes in turn (`SLA_CLASSES`: tight, medium and loose interactive budgets). The server's
   planner picks k per request within its SLA, at the server's current load.

Server compute is read from the server's own counters (`/metrics` deltas over each run): the
wall time of the model's forward passes (`adaptivellm_split_forward_seconds_total`) and the
decoder-layer passes over tokens (`adaptivellm_split_token_layers_total{kind="computed"}`).
Clients and server share this machine's cores, so client compute slows the server's forward
passes in run 2: the measured ratio is pessimistic for split. Greedy outputs of the two runs
are compared token for token.

    python bench/split_serving.py            # writes bench/results/split_serving.json + .png
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import queue
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
from tqdm import tqdm

from adaptivellm import __version__
from adaptivellm.benchmark.workloads import SHAREGPT_LENGTHS
from adaptivellm.compat import installed_vllm
from adaptivellm.launch import adaptivellm_command, free_port, metric_value, running_server
from adaptivellm.model import ensure_model
from adaptivellm.split_client.client import measure_client_spec

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
LENGTHS = SHAREGPT_LENGTHS


#: SLA classes, (first_s, per_token_s): the SLA of a request of n tokens is
#: first_s + per_token_s * (n - 1). Interactive is 10 tokens/s (faster than people read),
#: relaxed 5 tokens/s. `--sla-class NAME=FIRST+PER_TOKEN` (repeated) replaces them.
SLA_CLASSES: dict[str, tuple[float, float]] = {
    "interactive": (1.0, 0.1),
    "relaxed": (2.0, 0.2),
}


def parse_sla_class(text: str) -> tuple[str, tuple[float, float]]:
    """'tight=0.3+0.02' -> ('tight', (0.3, 0.02))."""
    try:
        name, _, budget = text.partition("=")
        first, _, per_token = budget.partition("+")
        return name, (float(first), float(per_token))
    except ValueError:
        raise SystemExit(f"--sla-class {text!r}: expected NAME=FIRST+PER_TOKEN") from None


def sla_class(item: Item) -> str:
    return list(SLA_CLASSES)[item.index % len(SLA_CLASSES)]


def sla_of(item: Item) -> float:
    first, per_token = SLA_CLASSES[sla_class(item)]
    return first + per_token * (item.max_tokens - 1)


@dataclass(frozen=True)
class Item:
    """One request of the mix."""

    index: int
    prompt: list[int]
    max_tokens: int


def workload(n: int, max_prompt: int, max_tokens: int, seed: int) -> list[Item]:
    """Seeded requests: ShareGPT prompt lengths, random token ids."""
    rng = np.random.default_rng(seed)
    pairs = json.loads(LENGTHS.read_text())["pairs"]
    picks = rng.choice(len(pairs), size=n)
    items = []
    for i, pick in enumerate(picks):
        length = int(min(max(4, pairs[pick][0]), max_prompt))
        prompt = rng.integers(10, 4000, size=length).tolist()
        items.append(Item(i, prompt, max_tokens))
    return items


def run_pool(
    items: list[Item], workers: int, make: Callable[[], Any], call: Callable[..., dict], label: str
) -> tuple[list[dict], float]:
    """Closed loop: `workers` threads, each with its own client from `make()`."""
    todo: queue.Queue[Item] = queue.Queue()
    for item in items:
        todo.put(item)
    results: list[dict] = []
    lock = threading.Lock()
    bar = tqdm(total=len(items), desc=label, unit="req")

    def worker() -> None:
        client = make()
        while True:
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            result = call(client, item)
            with lock:
                results.append(result)
                bar.update(1)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    return sorted(results, key=lambda r: r["index"]), time.perf_counter() - began


_CLIENT: Any = None


def _init_split_worker(base: str, model_path: str, spec: dict[str, float]) -> None:
    """Each split client is its own process, as on its own device (no shared GIL)."""
    import torch

    from adaptivellm.split_client.client import SplitClient
    from adaptivellm.split_client.protocol import ClientSpec

    torch.set_num_threads(1)  # the clients share this machine's cores with the server
    global _CLIENT
    _CLIENT = SplitClient(base, model_path, client_spec=ClientSpec(**spec), timeout_s=300)


def _split_task(item: Item, sla_s: float) -> dict:
    began = time.perf_counter()
    out = _CLIENT.generate(item.prompt, max_tokens=item.max_tokens, ignore_eos=True, sla_s=sla_s)
    latency = time.perf_counter() - began
    predicted = out.plan.predicted_latency_s
    return {
        "index": item.index,
        "latency_s": latency,
        "token_ids": out.token_ids,
        "layer": out.layer,
        "predicted_latency_s": predicted,
        "prediction_error": (predicted - latency) / latency if predicted is not None else None,
        "sla_s": sla_s,
        "sla_class": sla_class(item),
        "met_sla": latency <= sla_s,
        "client_compute_s": sum(t.client_compute_s for t in out.timings),
        "client_calibration": _CLIENT.calibration,
    }


def split_pool(workers: int, base: str, model_path: str, spec: dict[str, float]) -> Any:
    """`workers` client processes; each keeps its client (and its calibration) for the run."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        workers, mp.get_context("spawn"), initializer=_init_split_worker,
        initargs=(base, model_path, spec),
    )  # fmt: skip


def run_split(pool: Any, items: list[Item], label: str) -> tuple[list[dict], float]:
    """Closed loop over the pool's client processes."""
    from concurrent.futures import as_completed

    began = time.perf_counter()
    futures = [pool.submit(_split_task, item, sla_of(item)) for item in items]
    results = [f.result() for f in tqdm(as_completed(futures), total=len(items), desc=label)]
    return sorted(results, key=lambda r: r["index"]), time.perf_counter() - began


def counters(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {
        "forward_s": metric_value(text, "adaptivellm_split_forward_seconds_total") or 0.0,
        "token_layers": metric_value(
            text, "adaptivellm_split_token_layers_total", 'kind="computed"'
        )
        or 0.0,
        "saved_token_layers": metric_value(
            text, "adaptivellm_split_token_layers_total", 'kind="saved"'
        )
        or 0.0,
        "forward_passes": metric_value(text, "adaptivellm_split_forward_passes_total") or 0.0,
        "mixed_passes": metric_value(
            text, "adaptivellm_split_forward_passes_total", 'batch="mixed"'
        )
        or 0.0,
    }


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def ordinary_call(base_url: str, model: str) -> Callable[..., dict]:
    def call(client: openai.OpenAI, item: Item) -> dict:
        began = time.perf_counter()
        out = client.completions.create(
            model=model,
            prompt=item.prompt,
            max_tokens=item.max_tokens,
            temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        latency = time.perf_counter() - began
        choice = out.choices[0]
        ids = getattr(choice, "token_ids", None) or []
        return {"index": item.index, "latency_s": latency, "token_ids": list(ids)}

    return call


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # the clients share 2 cores with the server
    spec = measure_client_spec()  # what every client declares: this machine, honestly
    model_path = ensure_model()
    items = workload(args.requests, args.max_prompt, args.max_tokens, args.seed)
    port = free_port()
    flags = ["--enforce-eager", "--max-model-len", "2048", "--split-execution",
             "--split-max-sessions", str(args.concurrency * 2)]  # fmt: skip
    command = adaptivellm_command(None, port, flags)
    log = RESULTS / "logs" / "split_serving.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(running_server(command, port, log))
        base = server.base_url
        model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]

        def make_openai() -> openai.OpenAI:
            return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)

        warm = items[: args.concurrency]
        run_pool(warm, args.concurrency, make_openai, ordinary_call(base, model), "warm-up")
        pool = stack.enter_context(
            split_pool(args.concurrency, base, str(model_path), dataclasses.asdict(spec))
        )
        run_split(pool, warm * 3, "warm-up split")  # each client calibrates itself

        before = counters(base)
        ordinary, ordinary_wall = run_pool(
            items, args.concurrency, make_openai, ordinary_call(base, model), "all ordinary"
        )
        middle = counters(base)
        split, split_wall = run_split(pool, items, "split mix")
        after = counters(base)
    result = report(args, command, items, ordinary, split, ordinary_wall, split_wall,
                    delta(middle, before), delta(after, middle))  # fmt: skip
    result["client_spec"] = dataclasses.asdict(spec)
    return result


def report(
    args: argparse.Namespace,
    command: list[str],
    items: list[Item],
    ordinary: list[dict],
    split: list[dict],
    ordinary_wall: float,
    split_wall: float,
    ordinary_counters: dict[str, float],
    split_counters: dict[str, float],
) -> dict[str, Any]:
    n = len(items)
    per_request = {
        "ordinary": {k: v / n for k, v in ordinary_counters.items()},
        "split": {k: v / n for k, v in split_counters.items()},
    }
    matches = [o["token_ids"] == s["token_ids"] for o, s in zip(ordinary, split, strict=True)]
    layers = [s["layer"] for s in split]
    found = installed_vllm()
    return {
        "benchmark": "split_serving",
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "server_command": shlex.join(command),
        "server_compute_per_request_ratio": _ratio(
            per_request["split"]["forward_s"], per_request["ordinary"]["forward_s"]
        ),
        "server_token_layers_per_request_ratio": _ratio(
            per_request["split"]["token_layers"], per_request["ordinary"]["token_layers"]
        ),
        "throughput_ratio": _ratio(n / split_wall, n / ordinary_wall),
        "sla_attainment": sum(s["met_sla"] for s in split) / n,
        "greedy_token_match": sum(matches) / n,
        "targets": {"server_compute_per_request_ratio": 0.6, "sla_attainment": 0.99},
        "requests": n,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "sla_classes": {k: {"first_s": a, "per_token_s": b} for k, (a, b) in SLA_CLASSES.items()},
        "sla_attainment_by_class": {
            name: _mean([s["met_sla"] for s in split if s["sla_class"] == name])
            for name in SLA_CLASSES
        },
        "layers_by_class": {
            name: [s["layer"] for s in split if s["sla_class"] == name] for name in SLA_CLASSES
        },
        "chosen_layers": {str(k): layers.count(k) for k in sorted(set(layers))},
        "mean_layer": statistics.fmean(layers),
        "throughput_requests_per_s": {"ordinary": n / ordinary_wall, "split": n / split_wall},
        # Fraction of the run the server spent in forward passes: in a closed loop the split
        # run's requests/s is bound by the clients' round trips, not by the server.
        "server_busy_fraction": {
            "ordinary": ordinary_counters["forward_s"] / ordinary_wall,
            "split": split_counters["forward_s"] / split_wall,
        },
        "latency_s": {
            "ordinary_mean": statistics.fmean(o["latency_s"] for o in ordinary),
            "split_mean": statistics.fmean(s["latency_s"] for s in split),
        },
        "per_request_server": per_request,
        "split_requests": split,
        "ordinary_latencies_s": [o["latency_s"] for o in ordinary],
        "machine": {"platform": platform.platform(), "cpus": _cpus()},
        "versions": {"adaptivellm": __version__, "vllm": found[1] if found else None},
    }


def _mean(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    layers = result["chosen_layers"]
    left.bar(list(layers), list(layers.values()), color="tab:blue")
    left.set_xlabel("split layer k chosen by the planner (client runs [0, k))")
    left.set_ylabel("requests")
    left.set_title("k per request")
    ordinary = sorted(result["ordinary_latencies_s"])
    split = sorted(s["latency_s"] for s in result["split_requests"])
    for values, label in ((ordinary, "all ordinary"), (split, "split mix")):
        right.plot(values, np.linspace(0, 1, len(values)), label=label)
    right.set_xlabel("end-to-end latency (s)")
    right.set_ylabel("fraction of requests")
    right.set_title(
        f"compute/request x{result['server_compute_per_request_ratio']:.2f}, "
        f"SLA met {result['sla_attainment']:.0%}"
    )
    right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "split_serving.json")
    parser.add_argument("--quick", action="store_true", help="12 requests, 16 tokens")
    parser.add_argument(
        "--sla-class", action="append", default=None, metavar="NAME=FIRST+PER_TOKEN",
        help="SLA classes the requests take in turn, e.g. tight=0.3+0.02 (seconds)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.sla_class:
        SLA_CLASSES.clear()
        SLA_CLASSES.update(parse_sla_class(text) for text in args.sla_class)
    if args.quick:
        args.requests, args.max_tokens = 12, 16
    result = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    keys = (
        "server_compute_per_request_ratio",
        "server_token_layers_per_request_ratio",
        "throughput_ratio",
        "sla_attainment",
        "greedy_token_match",
        "chosen_layers",
    )
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    return 0 if all(math.isfinite(result[k] or math.nan) for k in keys[:4]) else 1


if __name__ == "__main__":
    sys.exit(main())
