"""What a split session costs the server's host CPU, against the forward time it saves.

The capacity benchmark (bench/split_serving.py) reads the CPU seconds of each of the server's
processes per run. In its full run at 8b7178a, the planner's API server spent about 90 ms of
CPU more per split session than off's, against about 70 ms of forward time each split saved
(its saved token-layers times the pass-cost slope), on 2 cores that the API server shares
with the engine. This benchmark measures a split's cost alone, closed loop, with nothing else
running:

- one `adaptivellm serve --split-execution` on the capacity benchmark's 16-layer model;
  (`--model PATH`: that checkpoint instead, for a `--split-cost-profile` of the model an
  operator serves; the requests' token ids are drawn below 4,000, so its vocabulary must
  hold them);
- `--requests` requests drawn as the capacity pool draws them (ShareGPT lengths, seed
  `--seed`), every one from the workstation tier, `--concurrency` at a time, served as
  - `whole`: ordinary requests (the real `openai` client, `/v1/completions`), the whole
    completion in one answer, as the capacity benchmark's ordinary clients ask;
  - `streamed`: the same, streamed token by token (`stream=True`), as a chat UI asks and as a
    split session's tokens come;
  - `split@N` for each layer of `--layers-at`: split sessions at that layer, through the real
    `SplitClient` with the replay model of bench/split_serving.py (the workstation tier: its
    compute and link sleeps are milliseconds);
- each mode `--rounds` times, interleaved, so the machine's drift falls on every mode alike.

Per mode and round: CPU milliseconds per output token of the API server process, of vLLM's
engine core and of its worker (`cpu_ms_per_token`), the forward seconds per token (the
server's `adaptivellm_split_forward_seconds_total`), its forward passes (output tokens over
passes: how many of the requests' decode rows shared a pass), and wall seconds. Before the
rounds, every mode serves every request once, unmeasured (first passes, clients made, the
prompts in the prefix cache for every mode alike). The summary gives the median over rounds
and the spread (min, max), and each split mode's API-server CPU per token against `whole`'s
and `streamed`'s, and `streamed`'s against `whole`'s, in the same round (ratio and
difference). `--profile` samples the API server with py-spy
during one more run of the first split mode (`event_loop_shares`).

    python bench/split_host_cost.py                  # writes bench/results/split_host_cost.json
    python bench/split_host_cost.py --profile        # also where the API server's time goes
    python bench/split_host_cost.py --model /models/llama --out profile.json
    adaptivellm serve /models/llama --split-execution --split-cost-profile profile.json

The result is also the cost model that `adaptivellm serve --split-cost-profile` prices splits
with (adaptivellm.split_costs): it needs the whole mode, the all-client split and an interior
one (the default `--layers-at`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from split_serving import (
    RESULTS,
    TIERS,
    Bench,
    Reference,
    ReplayModel,
    counters,
    link_s,
    model_spec,
    ordinary,
    pool,
    reference_run,
    server_flags,
)

from adaptivellm.benchmark.harness import cpu_deltas, process_cpu_s
from adaptivellm.launch import adaptivellm_command, free_port, running_server
from adaptivellm.model import ensure_model
from adaptivellm.split_client.client import SplitError
from adaptivellm.split_client.planner import TOKEN_ID_BYTES

#: The split tier: its sleeps are the smallest, so a run is mostly the server's time.
TIER = "workstation"
#: Roles of the server's processes (adaptivellm.benchmark.harness.process_role) reported.
ROLES = ("api_server", "engine_core", "worker")
#: `--profile` samples a run of this many times the requests (py-spy samples 100 times a second).
PROFILE_REPEATS = 4


def run_split(bench: Bench, ref: Reference, layer: int) -> int:
    """One split session of `ref` at `layer`: its output tokens (RuntimeError on an error or
    on tokens other than the reference run's)."""
    client = bench.client(TIER)
    try:
        assert isinstance(client.model, ReplayModel)
        client.model.begin(ref)
        done = client.generate(
            ref.item.prompt, max_tokens=ref.item.max_tokens, ignore_eos=True, layer=layer
        )
        if list(done.token_ids) != ref.output:
            raise RuntimeError(f"request {ref.item.index} at layer {layer}: tokens differ")
        return len(done.token_ids)
    except SplitError as exc:
        raise RuntimeError(f"request {ref.item.index} at layer {layer}: {exc}") from exc
    finally:
        bench.release(TIER, client)


def run_whole(bench: Bench, ref: Reference) -> int:
    outcome = ordinary(bench, ref, time.perf_counter())
    if outcome.error is not None or not outcome.tokens_match:
        raise RuntimeError(f"request {ref.item.index} whole: {outcome.error or 'tokens differ'}")
    return ref.item.max_tokens


def run_streamed(bench: Bench, ref: Reference) -> int:
    """`ref` served whole and streamed token by token (`stream=True`), as a chat UI asks."""
    time.sleep(link_s(TIERS[TIER], len(ref.item.prompt) * TOKEN_ID_BYTES))
    try:
        stream = bench.openai.completions.create(
            model=bench.model, prompt=ref.item.prompt, max_tokens=ref.item.max_tokens,
            temperature=0.0, stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )  # fmt: skip
        ids = streamed_token_ids(stream)
    except openai.APIError as exc:
        raise RuntimeError(f"request {ref.item.index} streamed: {exc}") from exc
    if ids != ref.output:
        raise RuntimeError(f"request {ref.item.index} streamed: tokens differ")
    return len(ids)


def streamed_token_ids(chunks: Iterable[Any]) -> list[int]:
    """The token ids of a streamed completion, in order (each chunk's choices carry theirs
    with `return_token_ids`; a chunk without any, such as the last, adds none)."""
    ids: list[int] = []
    for chunk in chunks:
        for choice in chunk.choices:
            ids.extend(getattr(choice, "token_ids", None) or [])
    return ids


def profiled_mode(modes: list[str]) -> str:
    """The mode `--profile` samples: the first split mode."""
    return next(mode for mode in modes if mode.startswith("split@"))


#: How each mode but the split ones serves a request.
WHOLE_MODES = {"whole": run_whole, "streamed": run_streamed}


def run_mode(bench: Bench, mode: str, refs: list[Reference], concurrency: int) -> dict[str, Any]:
    """Every request of `refs` in `mode`, `concurrency` at a time: CPU and forward time."""
    before, cpu_before = counters(bench.base), process_cpu_s(bench.server_pid)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as workers:
        if mode in WHOLE_MODES:
            serve = WHOLE_MODES[mode]
            tokens = sum(workers.map(lambda r: serve(bench, r), refs))
        else:
            layer = int(mode.split("@")[1])
            tokens = sum(workers.map(lambda r: run_split(bench, r, layer), refs))
    wall = time.perf_counter() - start
    cpu = cpu_deltas(cpu_before, process_cpu_s(bench.server_pid))
    used = {k: v - before[k] for k, v in counters(bench.base).items()}
    return {
        "mode": mode,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "cpu_ms_per_token": {r: round(1000 * cpu.get(r, 0.0) / tokens, 4) for r in ROLES},
        "forward_ms_per_token": round(1000 * used["forward_s"] / tokens, 4),
        "forward_passes": used["forward_passes"],
        "saved_token_layers": used["saved_token_layers"],
    }


def profile_api_server(
    bench: Bench, mode: str, refs: list[Reference], concurrency: int, top: int, keep: Path | None
) -> dict[str, Any]:
    """py-spy's samples of the API server during a run of `mode` (PROFILE_REPEATS times the
    requests): where its event loop spent its time (`event_loop_shares`)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "stacks.txt"
        command = [spy, "record", "--pid", str(bench.server_pid), "--rate", "100", "--format",
                   "raw", "--output", str(raw)]  # fmt: skip
        sampler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(1.0)
            run = run_mode(bench, mode, refs * PROFILE_REPEATS, concurrency)
            sampler.send_signal(2)  # SIGINT: py-spy writes what it has
            _, err = sampler.communicate(timeout=60)
        finally:
            if sampler.poll() is None:
                sampler.kill()
                sampler.wait()
        if not raw.exists():
            return {"error": f"py-spy wrote nothing: {err.decode()[-500:]}", "command": command}
        if keep is not None:
            shutil.copyfile(raw, keep)
        shares = event_loop_shares(raw.read_text().splitlines(), top)
    return {"run": run, **shares, "command": shlex.join(command)}


#: The frame every stack of the API server's event loop thread holds (uvloop runs under it).
EVENT_LOOP_FRAME = "Runner.run"


def event_loop_shares(lines: list[str], top: int) -> dict[str, Any]:
    """The API server's event loop in py-spy's raw stacks (`frame;frame;... count` lines,
    outermost first): how many samples it had, and the `top` functions by the share of them
    with the function anywhere below the loop (inclusive, each counted once a stack) and as
    the first frame below it (`entry`: what the loop was running; no frame below it: the
    loop's own C code, `(event loop)`). Other threads (idle pools, monitors) are left out.
    Lines that are not stacks are skipped."""
    inclusive: Counter[str] = Counter()
    entry: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        names = [frame.split(" (")[0] for frame in stack.split(";")]
        if EVENT_LOOP_FRAME not in names:
            continue
        below = names[names.index(EVENT_LOOP_FRAME) + 1 :]
        samples = int(count)
        total += samples
        entry[below[0] if below else "(event loop)"] += samples
        for name in set(below):
            inclusive[name] += samples

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(n / total, 4)) for name, n in counter.most_common(top)]

    return {"event_loop_samples": total, "entry": shares(entry), "inclusive": shares(inclusive)}


def summarise(rounds: list[list[dict[str, Any]]], modes: list[str]) -> dict[str, Any]:
    """Median (min, max) over the rounds of each mode's figures per output token, and each split
    mode's API-server CPU against `whole`'s and `streamed`'s in the same round, and
    `streamed`'s against `whole`'s (ratio and difference; no ratio in a round where the
    baseline read 0)."""
    out: dict[str, Any] = {}
    for mode in modes:
        runs = [r for round_ in rounds for r in round_ if r["mode"] == mode]
        out[mode] = {
            "api_server_cpu_ms_per_token": _spread([_api(r) for r in runs]),
            "engine_cpu_ms_per_token": _spread(
                [sum(r["cpu_ms_per_token"][role] for role in ROLES[1:]) for r in runs]
            ),
            "forward_ms_per_token": _spread([r["forward_ms_per_token"] for r in runs]),
        }
        if all(r.get("forward_passes") for r in runs):
            tokens_per_pass = [r["tokens"] / r["forward_passes"] for r in runs]
            out[mode]["output_tokens_per_pass"] = _spread(tokens_per_pass)
    for mode in modes:
        for base in ("whole", "streamed"):
            if mode == base or base not in modes or (mode in WHOLE_MODES and base != "whole"):
                continue  # split modes against both; streamed against whole
            pairs = [(_api(_of(round_, mode)), _api(_of(round_, base))) for round_ in rounds]
            ratios = [split / served for split, served in pairs if served > 0]
            if ratios:
                out[mode][f"api_server_cpu_vs_{base}"] = _spread(ratios)
            extra = [split - served for split, served in pairs]
            out[mode][f"api_server_extra_cpu_ms_per_token_vs_{base}"] = _spread(extra)
    return out


def _of(round_: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    return next(r for r in round_ if r["mode"] == mode)


def _api(run: dict[str, Any]) -> float:
    return float(run["cpu_ms_per_token"]["api_server"])


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path,
        help="measure this checkpoint (a Llama in safetensors, as --split-execution serves "
        "it) instead of the embedded model's --layers/--hidden build: the profile for "
        "--split-cost-profile on it",
    )  # fmt: skip
    parser.add_argument("--layers", type=int, default=16, help="decoder layers of the model")
    parser.add_argument("--hidden", type=int, default=256, help="width of the model")
    parser.add_argument("--requests", type=int, default=12, help="requests per mode and round")
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers-at", type=lambda s: [int(x) for x in s.split(",")],
                        help="split layers to measure (default: N and N/2)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="py-spy the API server")
    parser.add_argument("--top", type=int, default=40, help="functions kept by --profile")
    parser.add_argument("--profile-stacks", type=Path, help="where --profile keeps py-spy's stacks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-arg", action="append", default=[])
    parser.add_argument("--out", type=Path, default=RESULTS / "split_host_cost.json")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1 or args.concurrency < 1:
        parser.error("--requests, --rounds and --concurrency must be at least 1")
    if args.model is not None:
        config = args.model / "config.json"
        if not config.is_file():
            parser.error(f"--model {args.model}: no config.json there")
        args.layers = int(json.loads(config.read_text())["num_hidden_layers"])
    layers_at = args.layers_at or [args.layers, args.layers // 2]
    if not all(0 <= k <= args.layers for k in layers_at):  # 0: served whole through the protocol
        parser.error(f"--layers-at must be in [0, {args.layers}]")
    modes = ["whole", "streamed", *(f"split@{k}" for k in layers_at)]
    torch.set_num_threads(1)
    model_path = args.model or ensure_model(model_spec(args), name="adaptivellm-deep-llama")
    # The capacity benchmark's pool, without its ordinary requests (every one may be split).
    items = [
        dataclasses.replace(item, tier=TIER)  # whole requests sleep for the same link
        for item in pool(args.requests, args.max_prompt, args.max_tokens, 0.0, args.seed)
    ]
    args.max_clients = max(8, args.concurrency)
    port = free_port()
    command = adaptivellm_command(str(model_path), port, server_flags(args, "planner"))
    log = RESULTS / "logs" / "split_host_cost.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "split_host_cost",
        "command": shlex.join(["python", "bench/split_host_cost.py", *(argv or sys.argv[1:])]),
        "server_command": shlex.join(command),
        "layers": args.layers,  # the model's (adaptivellm.split_costs reads it)
        "modes": modes,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "rounds": [],
    }
    with running_server(command, port, log) as server:
        base = server.base_url
        refs = list(reference_run(base, "split-bench", model_path, items).values())
        info = httpx.get(f"{base}/v1/split/info", timeout=30).json()
        bench = Bench(base, "split-bench", model_path, args.layers, {r.item.index: r for r in refs},
                      int(info["max_frame_bytes"]),
                      server_pid=server.proc.pid if server.proc else None)  # fmt: skip
        for mode in modes:  # warm-up, not measured (see the docstring)
            run_mode(bench, mode, refs, args.concurrency)
        for index in tqdm(range(args.rounds), desc="rounds", unit="round"):
            order = modes if index % 2 == 0 else modes[::-1]
            result["rounds"].append([run_mode(bench, m, refs, args.concurrency) for m in order])
            result["summary"] = summarise(result["rounds"], modes)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        if args.profile:
            result["profile"] = profile_api_server(
                bench, profiled_mode(modes), refs, args.concurrency, args.top, args.profile_stacks
            )
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
