"""Split execution's server capacity: the highest open-loop arrival rate served within SLA.

An open-loop capacity benchmark of `adaptivellm serve --split-execution` on a deeper model than
the embedded one (`--layers`, default 16, so that splits can be interior), one server per
`--split-policy`, every request from one process:

- **Arrivals.** Poisson at each rate of `--rates` (requests/s) for `--duration` seconds, the same
  seeded sequence of requests for every policy at a rate. Every arrival gets its own client
  thread at once (a pool of `--max-clients`, as many as the server's split slots), so a
  server that falls behind pays for its queue. A request's latency counts from when its
  client started it: that is what a client on its own device sees. How late this process
  started it (`late_start_s`: the harness shares the 2 cores with the server, and its threads
  the GIL) is recorded apart, with the attainment counted from the scheduled arrival
  (`sla_attainment_from_arrival`), so a harness that fell behind shows.
- **The mix.** `--ordinary-share` of the requests come from ordinary clients (the real `openai`
  client, `/v1/completions`); the rest from split-capable clients of three tiers (`TIERS`:
  phone, laptop, workstation; each a declared `ClientSpec`), each request in one of three SLA
  classes (`SLA_CLASSES`: SLA = first_s + per_token_s x (output tokens - 1)). Prompt and
  output lengths are the benchmark package's ShareGPT pairs, clipped to `--max-prompt` and
  `--max-tokens`.
- **Replay clients.** Split requests go through the real `SplitClient` (WebSocket protocol,
  frames, resumes), with its model replaced by a replay: the layer-k hidden states of every
  request were computed once (`ClientModel.layer_states`) over the tokens of a reference run
  (the same request served whole, greedy), and instead of computing them the replay sleeps for
  what its tier's declared machine would take (the planner's own cost model: roofline time of
  k layers plus per-layer overhead) and for its link (uplink frame and token back, each with
  half the round trip). So the clients cost this 2-core machine almost nothing, and the server
  is the only thing measured. Ordinary requests sleep for their tier's link too.
- **Policies.** `off` (every client sends ordinary requests), `planner` (the server's planner
  picks k: the least server work that meets the SLA), `greedy` (the client takes layers from
  the front until the next would break the SLA) and `static` (every layer on the client when
  that meets the SLA, else none). The last three are `--split-policy` of the server; `off` and
  `planner` share a server. Named in `--policies` only: `planner-priced` (the planner on a
  server of its own with `--split-cost-profile --cost-profile`, splits priced in server
  seconds) and `planner-embeddings` (clients that send embeddings at k = 0).

For each policy and rate: SLA attainment (a request meets its SLA when it finished, with every
token, within it; errors miss), server forward-seconds per request and forward passes that mix
split and ordinary rows (the server's `adaptivellm_split_*` counters), KV block-seconds per
request (vLLM's `kv_cache_usage_perc` sampled every `KV_SAMPLE_S`, times the cache's blocks),
the chosen k, the planner's latency prediction error, and the CPU seconds each role spent
(`cpu_s_by_role`: the server's API process, vLLM's engine core, and `client`, this process
driving every client). A policy's sweep stops at the first
rate it fails. The **sustainable rate** is the highest rate reached with attainment >=
`--target` (0.99).

    python bench/split_serving.py            # writes bench/results/split_serving.json + .png
    python bench/split_serving.py --quick    # two rates, short runs: a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import platform
import queue
import re
import shlex
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import torch
from tqdm import tqdm

from adaptivellm import __version__
from adaptivellm.benchmark.harness import cpu_deltas, process_cpu_s
from adaptivellm.benchmark.workloads import sharegpt_pairs
from adaptivellm.compat import installed_vllm
from adaptivellm.launch import adaptivellm_command, free_port, metric_value, running_server
from adaptivellm.model import ModelSpec, ensure_model
from adaptivellm.split_client.client import ClientModel, SplitClient, SplitError
from adaptivellm.split_client.planner import (
    SERVING_POLICIES,
    TOKEN_ID_BYTES,
    Request,
    ServerProfile,
    _roofline,
    build_costs,
    evaluate_placements,
    prefix_masks,
    transfer_time,
)
from adaptivellm.split_client.protocol import ClientSpec
from adaptivellm.split_client.shapes import ModelShape

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
POLICIES = ("off", "planner", "greedy", "static")
#: Run only when named in --policies: the planner with replay clients that send the prompt's
#: embeddings when a session is served whole (k = 0), as clients did before `Open.prompt_ids`
#: (on the planner's server, for an A/B against `planner`).
#: `planner-priced`: the planner on a server of its own started with `--split-cost-profile
#: --cost-profile` (splits priced in server seconds; docs/split_execution.md).
#: `off-again`: off once more at the lowest rate, on a fresh server after every other policy,
#: so that a sitting measures how far the machine drifted while it ran (`drift`): policies run
#: 15-20 minutes apart on this shared machine compare only roughly.
EXTRA_POLICIES = ("planner-embeddings", "planner-priced", "off-again")
#: The policies whose clients all make ordinary requests (no split session).
ORDINARY_ONLY = ("off", "off-again")
#: How often the KV cache's usage is read from /metrics.
KV_SAMPLE_S = 0.25
#: Bytes of one float32 value on the wire (the model is float32).
WIRE_BYTES = 4

#: Split-capable client tiers. Compute and memory figures of a phone-class NPU, a laptop GPU and
#: a workstation GPU running eager PyTorch layer by layer (layer_overhead_s: the fixed cost of
#: one small layer's dozens of kernel launches); links as such clients see them.
TIERS: dict[str, ClientSpec] = {
    "phone": ClientSpec(flops_per_s=2e11, uplink_bps=50e6, downlink_bps=100e6, rtt_s=0.030,
                        mem_bytes_per_s=3e10, layer_overhead_s=4e-3),
    "laptop": ClientSpec(flops_per_s=2e12, uplink_bps=200e6, downlink_bps=500e6, rtt_s=0.010,
                         mem_bytes_per_s=1e11, layer_overhead_s=1e-3),
    "workstation": ClientSpec(flops_per_s=2e13, uplink_bps=1e9, downlink_bps=1e9, rtt_s=0.002,
                              mem_bytes_per_s=5e11, layer_overhead_s=2e-4),
}  # fmt: skip
#: The link of ordinary (not split-capable) clients.
ORDINARY_LINK = ClientSpec(flops_per_s=1e9, uplink_bps=100e6, downlink_bps=100e6, rtt_s=0.010)

#: SLA classes, (first_s, per_token_s): a request of n output tokens has
#: first_s + per_token_s * (n - 1) seconds end to end.
SLA_CLASSES: dict[str, tuple[float, float]] = {
    "tight": (0.5, 0.05),
    "standard": (1.0, 0.1),
    "relaxed": (2.0, 0.2),
}


@dataclass(frozen=True)
class Item:
    """One distinct request of the pool."""

    index: int
    prompt: list[int]
    max_tokens: int
    tier: str  # a TIERS key, or "ordinary"
    sla_class: str

    @property
    def sla_s(self) -> float:
        first, per_token = SLA_CLASSES[self.sla_class]
        return first + per_token * (self.max_tokens - 1)


@dataclass
class Reference:
    """A request served whole once: its output tokens and the hidden state entering every layer
    at every position a client sends (the prompt and every output token but the last)."""

    item: Item
    output: list[int]
    states: np.ndarray  # (layers + 1, prompt + output - 1, hidden) float32

    @property
    def ids(self) -> list[int]:
        return [*self.item.prompt, *self.output[:-1]]


def pool(n: int, max_prompt: int, max_tokens: int, ordinary_share: float, seed: int) -> list[Item]:
    """`n` seeded requests: ShareGPT (prompt, output) lengths clipped to the limits, random token
    ids, a tier (ordinary with probability `ordinary_share`, else one of TIERS) and an SLA class
    (uniform)."""
    rng = np.random.default_rng(seed)
    pairs = sharegpt_pairs()
    tiers, classes = list(TIERS), list(SLA_CLASSES)
    items = []
    for i in range(n):
        prompt_len, out_len = pairs[int(rng.integers(len(pairs)))]
        prompt = rng.integers(10, 4000, size=int(np.clip(prompt_len, 4, max_prompt))).tolist()
        ordinary = rng.random() < ordinary_share
        tier = "ordinary" if ordinary else tiers[int(rng.integers(len(tiers)))]
        sla = classes[int(rng.integers(len(classes)))]
        items.append(Item(i, prompt, int(np.clip(out_len, 4, max_tokens)), tier, sla))
    return items


def arrivals(rate: float, duration_s: float, n_items: int, seed: int) -> list[tuple[float, int]]:
    """Poisson arrivals at `rate`/s over `duration_s`: (time, pool index), seeded by the rate so
    that every policy sees the same sequence at a rate."""
    rng = np.random.default_rng([seed, int(rate * 1000)])
    out, t = [], float(rng.exponential(1 / rate))
    while t < duration_s:
        out.append((t, int(rng.integers(n_items))))
        t += float(rng.exponential(1 / rate))
    return out


def client_compute_s(shape: ModelShape, spec: ClientSpec, k: int, new: int, past: int) -> float:
    """What the planner's cost model says `spec` takes to run layers [0, k) over `new` tokens
    after `past` ones (roofline per layer plus the fixed per-layer overhead)."""
    if k == 0:
        return 0.0
    flops = float(shape.layer_flops(new, past))
    traffic = float(shape.layer_weight_bytes) + float(shape.kv_bytes(past + new))
    per_layer = float(_roofline(flops, traffic, spec.flops_per_s, spec.mem_bytes_per_s))
    return k * (per_layer + spec.layer_overhead_s)


def link_s(spec: ClientSpec, up_bytes: float) -> float:
    """One exchange over the tier's link: the frame up, a token id back, a round trip."""
    return transfer_time(up_bytes, spec.uplink_bps, spec.rtt_s) + transfer_time(
        TOKEN_ID_BYTES, spec.downlink_bps, spec.rtt_s
    )


#: The server that `decisions` prices: this CPU as the split server measures it (about 50
#: GFLOP/s float32, 20 GB/s) with a 20 ms forward pass of the 16-layer model.
OFFLINE_SERVER = ServerProfile(flops_per_s=5e10, mem_bytes_per_s=2e10, step_overhead_s=0.02)


def decisions(
    items: list[Item],
    spec: ModelSpec,
    batches: tuple[int, ...] = (1, 4, 8, 16),
    slacks: tuple[float, ...] = (1.2, 2.0),
) -> dict[str, Any]:
    """How the planner's k differs from each baseline's on this benchmark's own split requests,
    by the cost model alone (no server): at each decode batch and slack (the server plans
    against SLA / slack), the share of requests given the same k, and the server work (FLOPs)
    of the planner's choices over the baseline's. With no feasible split a policy's request is
    served whole (k = 0), as the server serves it. Measured capacity differences between
    policies that choose alike are the runs' noise, not the policies'."""
    shape = ModelShape.from_spec(spec)
    layers = spec.num_layers
    masks = prefix_masks(layers)
    same: Counter[str] = Counter()
    work: dict[str, float] = dict.fromkeys(("planner", "greedy", "static"), 0.0)
    count = 0
    for batch in batches:
        server = replace(OFFLINE_SERVER, decode_batch=batch)
        for slack in slacks:
            for item in (i for i in items if i.tier in TIERS):
                request = Request(len(item.prompt), item.max_tokens, item.sla_s / slack)
                costs = build_costs(shape, TIERS[item.tier], server, request)
                chosen = {}
                for policy in ("planner", "greedy", "static"):
                    plan = SERVING_POLICIES[policy](costs)
                    chosen[policy] = k = plan.client_layers if plan.feasible else 0
                    work[policy] += float(evaluate_placements(costs, masks[[k]])[1][0])
                same.update(p for p in ("greedy", "static") if chosen[p] == chosen["planner"])
                count += 1
    baselines = ("greedy", "static")
    return {
        "requests": count,
        "batches": list(batches),
        "slacks": list(slacks),
        "server": {
            "flops_per_s": OFFLINE_SERVER.flops_per_s,
            "mem_bytes_per_s": OFFLINE_SERVER.mem_bytes_per_s,
            "step_overhead_s": OFFLINE_SERVER.step_overhead_s,
        },
        "same_k_share": {p: same[p] / count if count else None for p in baselines},
        "planner_server_work_ratio": {
            p: work["planner"] / work[p] if work[p] else None for p in baselines
        },
    }


def sustainable_rate(attainment: dict[float, float], target: float) -> float:
    """Highest rate whose attainment, and every lower rate's, is at least `target` (0 when even
    the lowest misses it)."""
    best = 0.0
    for rate in sorted(attainment):
        if attainment[rate] < target:
            break
        best = rate
    return best


def pass_cost(runs: list[dict]) -> dict[str, Any] | None:
    """What a forward pass costs the server, fitted over the runs' counters: milliseconds a
    pass = fixed + per_token_layer x (token-layers the pass ran), least squares over each
    run's mean pass, with each run's pass time and token-layers (keys `policy@rate`). Split
    execution removes token-layers from a pass; the fixed part (vLLM's per-pass work, the LM
    head, each layer's per-call cost) it removes only where no row of the pass runs a layer.
    None with fewer than 3 runs that made passes."""
    points = [
        (run["policy"], run["rate"], c["token_layers"] / c["forward_passes"],
         1e3 * c["forward_s"] / c["forward_passes"])
        for run in runs
        if (c := run.get("counters") or {}).get("forward_passes")
    ]  # fmt: skip
    if len(points) < 3:
        return None
    x = np.array([p[2] for p in points])
    y = np.array([p[3] for p in points])
    (fixed, per_layer), *_ = np.linalg.lstsq(np.vstack([np.ones_like(x), x]).T, y, rcond=None)
    residual = y - (fixed + per_layer * x)
    spread = float(((y - y.mean()) ** 2).sum())
    return {
        "model": "ms per pass = fixed_ms + per_token_layer_ms x token-layers per pass",
        "fixed_ms": float(fixed),
        "per_token_layer_ms": float(per_layer),
        "r2": 1 - float((residual**2).sum()) / spread if spread else None,
        "runs": len(points),
        "pass_ms": {f"{policy}@{rate:g}": float(ms) for policy, rate, _, ms in points},
        "token_layers_per_pass": {f"{policy}@{rate:g}": float(t) for policy, rate, t, _ in points},
    }


class ReplayModel(ClientModel):
    """A `ClientModel` that sends the reference run's hidden states instead of computing them,
    after sleeping for what its tier's machine and link would take. `begin` sets the request
    about to be generated; `mismatches` counts steps whose token ids differ from the reference
    (the server sampled another token: the rows sent are then the reference's)."""

    def __init__(self, model_path: Path, spec: ClientSpec) -> None:
        super().__init__(model_path)
        self.spec = spec
        self.current: Reference | None = None
        self.mismatches = 0

    def begin(self, reference: Reference) -> None:
        self.current = reference

    def ensure_layers(self, k: int) -> None:
        if not 0 <= k <= self.num_layers:
            raise ValueError(f"layer {k} out of range [0, {self.num_layers}]")

    def hidden_states(self, token_ids: list[int], k: int, cache: Any) -> torch.Tensor:
        ref = self.current
        assert ref is not None, "begin() a request first"
        past = int(getattr(cache, "replay_pos", 0))
        new = len(token_ids)
        if ref.ids[past : past + new] != list(token_ids):
            self.mismatches += 1
        rows = ref.states[k, past : past + new]
        if len(rows) < new:  # past the reference (a mismatch made it longer): repeat the last
            rows = np.concatenate([rows, np.repeat(ref.states[k, -1:], new - len(rows), 0)])
        cache.replay_pos = past + new
        up = new * self.hidden_size * WIRE_BYTES
        time.sleep(client_compute_s(self.shape, self.spec, k, new, past) + link_s(self.spec, up))
        return torch.from_numpy(np.ascontiguousarray(rows))


class ReplayClient(SplitClient):
    """A `SplitClient` whose prompt, sent as token ids to a server that serves the session whole
    (k = 0), takes its tier's link time as `ReplayModel`'s frames do (no hidden states are
    computed then, so the model's sleep does not run)."""

    def _exchange_ids(
        self, connection: Any, plan: Any, replay: Any, first_wait_s: float
    ) -> Iterator[Any]:
        assert isinstance(self.model, ReplayModel)
        time.sleep(link_s(self.model.spec, len(replay.pending_ids) * TOKEN_ID_BYTES))
        yield from super()._exchange_ids(connection, plan, replay, first_wait_s)


@dataclass
class Outcome:
    """One request of one run."""

    index: int
    tier: str
    sla_class: str
    sla_s: float
    latency_s: float
    layer: int | None = None  # None: sent as an ordinary request
    predicted_s: float | None = None
    tokens_match: bool = False
    error: str | None = None
    late_start_s: float = 0.0  # how late the client pool started it (open-loop health)
    running_requests: int | None = None  # requests in flight when the server planned it

    @property
    def met(self) -> bool:
        """Finished, with every token, within the SLA from when its client started it."""
        return self.error is None and self.latency_s <= self.sla_s

    @property
    def met_from_arrival(self) -> bool:
        """The same, counted from its scheduled arrival (the harness's lateness included)."""
        return self.error is None and self.latency_s + self.late_start_s <= self.sla_s


@dataclass
class Bench:
    """Shared state of one server's runs: its URL, the model's layers, the KV cache's blocks,
    the references, and idle clients."""

    base: str
    model: str
    model_path: Path
    layers: int
    refs: dict[int, Reference]
    max_frame_bytes: int
    clients: dict[str, queue.SimpleQueue[SplitClient]] = field(default_factory=dict)
    #: The server's process (its API server; vLLM's engine core and workers are children).
    server_pid: int | None = None

    def __post_init__(self) -> None:
        self.blocks = kv_blocks(self.base)
        self.openai = openai.OpenAI(
            base_url=f"{self.base}/v1", api_key="none", max_retries=0, timeout=120
        )

    def client(self, tier: str, prompt_ids: bool = True) -> SplitClient:
        idle = self.clients.setdefault(_client_key(tier, prompt_ids), queue.SimpleQueue())
        try:
            return idle.get_nowait()
        except queue.Empty:
            client = ReplayClient(
                self.base, self.model_path, client_spec=TIERS[tier], calibrate=False,
                prompt_ids=prompt_ids,
                max_frame_bytes=self.max_frame_bytes, timeout_s=120,
            )  # fmt: skip
            client.model = ReplayModel(self.model_path, TIERS[tier])
            return client

    def release(self, tier: str, client: SplitClient) -> None:
        self.clients[_client_key(tier, client.prompt_ids)].put(client)


def _client_key(tier: str, prompt_ids: bool) -> str:
    return tier if prompt_ids else f"{tier}/embeddings"


def ordinary(bench: Bench, ref: Reference, began: float) -> Outcome:
    item = ref.item
    spec = TIERS.get(item.tier, ORDINARY_LINK)
    outcome = Outcome(item.index, item.tier, item.sla_class, item.sla_s, math.inf)
    try:
        time.sleep(link_s(spec, len(item.prompt) * TOKEN_ID_BYTES))
        out = bench.openai.completions.create(
            model=bench.model, prompt=item.prompt, max_tokens=item.max_tokens, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )  # fmt: skip
        ids = list(getattr(out.choices[0], "token_ids", None) or [])
        outcome.tokens_match = ids == ref.output
        if len(ids) != item.max_tokens:
            outcome.error = f"{len(ids)} of {item.max_tokens} tokens"
    except openai.APIError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"[:200]
    outcome.latency_s = time.perf_counter() - began
    return outcome


def split(bench: Bench, ref: Reference, began: float, prompt_ids: bool = True) -> Outcome:
    item = ref.item
    outcome = Outcome(item.index, item.tier, item.sla_class, item.sla_s, math.inf)
    client = bench.client(item.tier, prompt_ids)
    try:
        assert isinstance(client.model, ReplayModel)
        client.model.begin(ref)
        done = client.generate(
            item.prompt, max_tokens=item.max_tokens, ignore_eos=True, sla_s=item.sla_s
        )
        outcome.layer = done.layer
        outcome.predicted_s = done.plan.predicted_latency_s
        outcome.running_requests = done.plan.running_requests
        outcome.tokens_match = list(done.token_ids) == ref.output
        if len(done.token_ids) != item.max_tokens:
            outcome.error = f"{len(done.token_ids)} of {item.max_tokens} tokens"
    except SplitError as exc:
        outcome.error = f"{exc.code}: {exc}"[:200]
    finally:
        bench.release(item.tier, client)
    outcome.latency_s = time.perf_counter() - began
    return outcome


def split_embeddings(bench: Bench, ref: Reference, began: float) -> Outcome:
    """`split` by a client that sends the prompt's embeddings at k = 0 (`planner-embeddings`)."""
    return split(bench, ref, began, prompt_ids=False)


def counters(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text

    def value(name: str, labels: str = "") -> float:
        return metric_value(text, name, labels) or 0.0

    return {
        "forward_s": value("adaptivellm_split_forward_seconds_total"),
        "forward_passes": value("adaptivellm_split_forward_passes_total"),
        "mixed_passes": value("adaptivellm_split_forward_passes_total", 'batch="mixed"'),
        "token_layers": value("adaptivellm_split_token_layers_total", 'kind="computed"'),
        "saved_token_layers": value("adaptivellm_split_token_layers_total", 'kind="saved"'),
        # Sessions served whole because their split would have cost more (--split-cost-profile).
        "served_whole_cheaper": value("adaptivellm_split_served_whole_cheaper_total"),
    }


def planner_state(base: str) -> dict[str, Any]:
    """What the server's planner plans with after a run: its calibration by kind of session,
    its profile of the server (the learned prefill rate among it) and its cost profile (None
    without --split-cost-profile), from /v1/split/info."""
    info = httpx.get(f"{base}/v1/split/info", timeout=30).json()
    return {key: info.get(key) for key in ("calibration", "server_profile", "pass_costs")}


def kv_blocks(base: str) -> int:
    """Blocks of the server's KV cache (vLLM's cache_config_info)."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    found = re.search(r'vllm:cache_config_info\{[^}]*num_gpu_blocks="(\d+)"', text)
    if not found:
        raise RuntimeError("the server's /metrics has no cache_config_info num_gpu_blocks")
    return int(found.group(1))


@contextlib.contextmanager
def kv_sampler(base: str, blocks: int) -> Iterator[list[float]]:
    """Integrates the KV cache's used blocks over time while the block runs; the yielded list
    holds one number afterwards, the block-seconds."""
    stop = threading.Event()
    total = [0.0]

    def sample() -> None:
        with httpx.Client(timeout=10) as http:
            last = time.perf_counter()
            while not stop.wait(KV_SAMPLE_S):
                with contextlib.suppress(httpx.HTTPError):
                    usage = metric_value(http.get(f"{base}/metrics").text,
                                         "vllm:kv_cache_usage_perc") or 0.0  # fmt: skip
                    now = time.perf_counter()
                    total[0] += usage * blocks * (now - last)
                    last = now

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out: list[float] = []
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out.append(total[0])


def run_rate(bench: Bench, policy: str, rate: float, args: argparse.Namespace) -> dict[str, Any]:
    """One open-loop run of `policy` at `rate`: every arrival on its own pooled thread."""
    schedule = arrivals(rate, args.duration, len(bench.refs), args.seed)
    before = counters(bench.base)
    cpu_before = process_cpu_s(bench.server_pid)
    futures: list[Future[Outcome]] = []
    bar = tqdm(total=len(schedule), desc=f"{policy} @ {rate:g}/s", unit="req", leave=False)
    with (
        kv_sampler(bench.base, bench.blocks) as kv,
        ThreadPoolExecutor(args.max_clients) as workers,
    ):
        start = time.perf_counter()
        for at, index in schedule:
            time.sleep(max(0.0, start + at - time.perf_counter()))
            ref = bench.refs[index]
            is_split = policy not in ORDINARY_ONLY and ref.item.tier in TIERS
            call = split if is_split else ordinary
            if is_split and policy == "planner-embeddings":
                call = split_embeddings
            future = workers.submit(_timed, call, bench, ref, start + at)
            future.add_done_callback(lambda _: bar.update(1))
            futures.append(future)
        outcomes = [f.result() for f in futures]
        took = time.perf_counter() - start
    bar.close()
    after = counters(bench.base)
    run = summarise(bench, policy, rate, outcomes, after, before, kv[0])
    run["planner_state"] = planner_state(bench.base)
    # CPU seconds by role over the run (the API server, vLLM's engine core, and `client`: this
    # process, every client at once), and each role's share of the machine's cores.
    cpu = cpu_deltas(cpu_before, process_cpu_s(bench.server_pid))
    run["cpu_s_by_role"] = {role: round(seconds, 2) for role, seconds in sorted(cpu.items())}
    run["cpu_share_by_role"] = {
        role: round(seconds / (took * _cpus()), 3) for role, seconds in sorted(cpu.items())
    }
    return run


def _timed(call: Any, bench: Bench, ref: Reference, scheduled: float) -> Outcome:
    began = time.perf_counter()
    outcome: Outcome = call(bench, ref, began)
    outcome.late_start_s = began - scheduled
    return outcome


def summarise(
    bench: Bench,
    policy: str,
    rate: float,
    outcomes: list[Outcome],
    after: dict[str, float],
    before: dict[str, float],
    kv_block_s: float,
) -> dict[str, Any]:
    n = len(outcomes)
    used = {k: after[k] - before[k] for k in after}
    splits = [o for o in outcomes if o.layer is not None]
    interior = [o for o in splits if 0 < (o.layer or 0) < bench.layers]
    errors = [
        abs(o.predicted_s - o.latency_s) / o.latency_s
        for o in splits
        if o.predicted_s and o.error is None and o.latency_s > 0
    ]
    latencies = sorted(o.latency_s for o in outcomes if o.error is None)
    return {
        "policy": policy,
        "rate": rate,
        "requests": n,
        "sla_attainment": sum(o.met for o in outcomes) / n if n else None,
        "sla_attainment_from_arrival": (
            sum(o.met_from_arrival for o in outcomes) / n if n else None
        ),
        "late_starts_over_100ms": sum(o.late_start_s > 0.1 for o in outcomes),
        "errors": sum(o.error is not None for o in outcomes),
        "error_codes": _histogram([o.error.split(":")[0] for o in outcomes if o.error]),
        "server_seconds_per_request": used["forward_s"] / n if n else None,
        "kv_block_seconds_per_request": kv_block_s / n if n else None,
        "kv_blocks": bench.blocks,
        "mixed_pass_share": used["mixed_passes"] / used["forward_passes"]
        if used["forward_passes"]
        else 0.0,
        "split_requests": len(splits),
        "interior_split_share": len(interior) / len(splits) if splits else None,
        "chosen_layers": _histogram([o.layer for o in splits if o.layer is not None]),
        "latency_error_p50": statistics.median(errors) if errors else None,
        "latency_s": {
            "p50": _quantile(latencies, 0.5),
            "p99": _quantile(latencies, 0.99),
        },
        "token_match": sum(o.tokens_match for o in outcomes) / n if n else None,
        "max_late_start_s": max((o.late_start_s for o in outcomes), default=0.0),
        "counters": used,
        "outcomes": [{**asdict(o), "met": o.met} for o in outcomes],
    }


def _histogram(values: list[Any]) -> dict[str, int]:
    return {str(v): values.count(v) for v in sorted(set(values))}


def _quantile(values: list[float], q: float) -> float | None:
    return float(np.quantile(values, q)) if values else None


def reference_run(
    base: str, model: str, model_path: Path, items: list[Item]
) -> dict[int, Reference]:
    """Serve every request of the pool whole (greedy), then compute the hidden state entering
    every layer over its tokens: what a split client at any k sends."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
    full = ClientModel(model_path)
    refs = {}
    for item in tqdm(items, desc="reference run", unit="req"):
        out = client.completions.create(
            model=model, prompt=item.prompt, max_tokens=item.max_tokens, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )  # fmt: skip
        output = list(getattr(out.choices[0], "token_ids", None) or [])
        if len(output) != item.max_tokens:
            raise RuntimeError(f"reference run: {len(output)} of {item.max_tokens} tokens")
        ids = [*item.prompt, *output[:-1]]
        states = full.layer_states(ids).numpy().astype(np.float32)
        refs[item.index] = Reference(item, output, states)
    return refs


def sweep(bench: Bench, policy: str, args: argparse.Namespace, out: list[dict]) -> None:
    """Rising rates until one misses the target; each run is appended to `out` (and saved).
    `off-again` runs the lowest rate only (`drift`)."""
    for rate in args.rates[:1] if policy == "off-again" else args.rates:
        run = run_rate(bench, policy, rate, args)
        out.append(run)
        save(args, [*args.kept_runs, *out], partial=True)
        print(f"{policy:8s} {rate:5.2f}/s  SLA met {run['sla_attainment']:.3f} "
              f"({run['sla_attainment_from_arrival']:.3f} from arrival)  "
              f"server s/req {run['server_seconds_per_request']:.4f}  "
              f"k {run['chosen_layers']}", flush=True)  # fmt: skip
        if run["sla_attainment"] < args.target:
            return


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The benchmark's model: the embedded model's build with `--layers` layers and `--hidden`
    width (the MLP 4x as wide, 64-wide attention heads, the embedded model's 2 KV heads)."""
    if args.hidden == ModelSpec.hidden_size:
        return ModelSpec(num_layers=args.layers)  # the build every earlier run served
    return ModelSpec(
        num_layers=args.layers, hidden_size=args.hidden, num_heads=args.hidden // 64,
        intermediate_size=4 * args.hidden,
    )  # fmt: skip


def server_flags(args: argparse.Namespace, policy: str) -> list[str]:
    """The flags of the server that runs `policy` (`planner-priced`: the planner with
    `--split-cost-profile`)."""
    priced = ["--split-cost-profile", str(args.cost_profile)] if policy == "planner-priced" else []
    return [
        "--enforce-eager", "--max-model-len", "2048", "--split-execution",
        "--split-max-sessions", str(args.max_clients),
        "--split-policy", "planner" if priced or policy == "off-again" else policy, *priced,
        "--served-model-name", "split-bench", *args.server_arg,
    ]  # fmt: skip


def measure(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(1)  # the reference run's client layers share 2 cores with the server
    model_path = ensure_model(model_spec(args), name="adaptivellm-deep-llama")
    items = pool(args.pool, args.max_prompt, args.max_tokens, args.ordinary_share, args.seed)
    runs: list[dict] = []
    refs: dict[int, Reference] | None = None
    servers = {
        "planner": ("off", "planner", "planner-embeddings"),
        "planner-priced": ("planner-priced",), "greedy": ("greedy",),
        "static": ("static",), "off-again": ("off-again",),
    }  # fmt: skip
    for server_policy, policies in servers.items():
        wanted = [p for p in args.policies if p in policies]
        if not wanted:
            continue
        port = free_port()
        command = adaptivellm_command(str(model_path), port, server_flags(args, server_policy))
        args.server_commands[server_policy] = shlex.join(command)
        log = RESULTS / "logs" / f"split_serving-{server_policy}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with running_server(command, port, log) as server:
            base = server.base_url
            if refs is None:
                refs = reference_run(base, "split-bench", model_path, items)
            info = httpx.get(f"{base}/v1/split/info", timeout=30).json()
            bench = Bench(base, "split-bench", model_path, args.layers, refs,
                          int(info["max_frame_bytes"]),
                          server_pid=server.proc.pid if server.proc else None)  # fmt: skip
            kinds = (True, False) if "planner-embeddings" in wanted else (True,)
            for tier, ids in itertools.product(TIERS, kinds):  # made now, not inside a timed
                made = [bench.client(tier, ids) for _ in range(args.clients_per_tier)]
                for client in made:  # request (a tokenizer load each)
                    bench.release(tier, client)
            # Warm-up, not measured: the server's first passes, and split sessions four at a
            # time so that the planner has seen how late sessions run here (its slack).
            warm = [r for r in refs.values() if r.item.tier in TIERS][: args.warm_up]
            with ThreadPoolExecutor(4) as workers:
                started = [time.perf_counter()] * len(warm)
                list(workers.map(split, [bench] * len(warm), warm, started))
            args.warm_up_state[server_policy] = planner_state(base)
            for policy in wanted:
                sweep(bench, policy, args, runs)
    return runs


def drift(runs: list[dict]) -> dict[str, Any] | None:
    """How far the machine drifted over a sitting: `off-again`'s server forward-seconds per
    request over off's at the same rate (the first run of each). None without both."""
    firsts: dict[str, dict] = {}
    for run in runs:
        if run["policy"] in ORDINARY_ONLY:
            firsts.setdefault(run["policy"], run)
    again, off = firsts.get("off-again"), firsts.get("off")
    if again is None or off is None or again["rate"] != off["rate"]:
        return None
    first, last = off["server_seconds_per_request"], again["server_seconds_per_request"]
    return {
        "rate": off["rate"],
        "off_server_seconds_per_request": first,
        "off_again_server_seconds_per_request": last,
        "ratio": last / first if first else None,
    }


def report(args: argparse.Namespace, runs: list[dict], partial: bool) -> dict[str, Any]:
    by_policy: dict[str, dict[float, dict]] = {}
    for run in runs:
        by_policy.setdefault(run["policy"], {})[run["rate"]] = run
    rates = {
        p: sustainable_rate({r: v["sla_attainment"] for r, v in runs_.items()}, args.target)
        for p, runs_ in by_policy.items()
    }
    at_rate = {p: by_policy[p].get(rates[p]) for p in by_policy}
    # Equal load: the highest rate both off and the planner sustained.
    both = min(rates.get("off", 0.0), rates.get("planner", 0.0))
    common = sorted(r for r in by_policy.get("off", {}) if r in by_policy.get("planner", {}))
    common = [r for r in common if r <= both]
    equal = common[-1] if common else None

    def per_request(policy: str, key: str) -> float | None:
        return by_policy[policy][equal][key] if equal is not None else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    planner_runs = [by_policy["planner"][r] for r in sorted(by_policy.get("planner", {}))
                    if r <= rates.get("planner", 0)]  # fmt: skip
    errors = [
        abs(o["predicted_s"] - o["latency_s"]) / o["latency_s"]
        for run in planner_runs
        for o in run["outcomes"]
        if o["layer"] is not None and o["predicted_s"] and o["error"] is None
    ]
    planner_at = at_rate.get("planner")
    found = installed_vllm()
    return {
        "benchmark": "split_serving",
        "partial": partial,
        "command": shlex.join(["python", *sys.argv]),
        "server_commands": args.server_commands,
        # Each server's planner state after the warm-up, before its first run.
        "warm_up_state": getattr(args, "warm_up_state", {}),
        "kept_from": getattr(args, "kept_from", None),
        "sustainable_rate": {p: rates.get(p) for p in POLICIES}
        | {p: rates[p] for p in EXTRA_POLICIES if p in rates and p != "off-again"},
        # off-again's server forward-seconds per request over off's: the machine's drift.
        "drift": drift(runs),
        "sustainable_rate_ratio": {
            "planner_over_off": ratio(rates.get("planner"), rates.get("off")),
            "planner_over_greedy": ratio(rates.get("planner"), rates.get("greedy")),
            "planner_over_static": ratio(rates.get("planner"), rates.get("static")),
        },
        "equal_load_rate": equal,
        "server_seconds_per_request_ratio": ratio(
            per_request("planner", "server_seconds_per_request"),
            per_request("off", "server_seconds_per_request"),
        ),
        "kv_block_seconds_per_request_ratio": ratio(
            per_request("planner", "kv_block_seconds_per_request"),
            per_request("off", "kv_block_seconds_per_request"),
        ),
        "interior_split_share": planner_at["interior_split_share"] if planner_at else None,
        "mixed_pass_share": planner_at["mixed_pass_share"] if planner_at else None,
        "sla_attainment": {p: v["sla_attainment"] if v else None for p, v in at_rate.items()},
        "sla_attainment_from_arrival": {
            p: v.get("sla_attainment_from_arrival") if v else None for p, v in at_rate.items()
        },
        "planner_latency_error_p50": statistics.median(errors) if errors else None,
        "pass_cost": pass_cost(runs),
        "decisions": decisions(
            pool(args.pool, args.max_prompt, args.max_tokens, args.ordinary_share, args.seed),
            model_spec(args),
        ),
        "targets": {
            "server_seconds_per_request_ratio": 0.67,
            "sustainable_rate_planner_over_off": 1.5,
            "sustainable_rate_planner_over_greedy": 1.19,
            "sla_attainment": args.target,
            "planner_latency_error_p50": 0.25,
        },
        "setup": {
            "layers": args.layers,
            "hidden": args.hidden,
            "pool": args.pool,
            "duration_s": args.duration,
            "rates": args.rates,
            "ordinary_share": args.ordinary_share,
            "max_prompt": args.max_prompt,
            "max_tokens": args.max_tokens,
            "tiers": {name: asdict(spec) for name, spec in TIERS.items()},
            "ordinary_link": asdict(ORDINARY_LINK),
            "sla_classes": {
                k: {"first_s": a, "per_token_s": b} for k, (a, b) in SLA_CLASSES.items()
            },
            "kv_sample_s": KV_SAMPLE_S,
        },
        "machine": {"platform": platform.platform(), "cpus": _cpus()},
        "versions": {"adaptivellm": __version__, "vllm": found[1] if found else None},
        "runs": runs,
    }


def save(args: argparse.Namespace, runs: list[dict], partial: bool) -> dict[str, Any]:
    result = report(args, runs, partial)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(type(value))


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for policy in (*POLICIES, *EXTRA_POLICIES):
        runs = sorted((r for r in result["runs"] if r["policy"] == policy), key=lambda r: r["rate"])
        if not runs:
            continue
        rates = [r["rate"] for r in runs]
        left.plot(rates, [r["sla_attainment"] for r in runs], marker="o", label=policy)
        right.plot(rates, [r["server_seconds_per_request"] for r in runs], marker="o", label=policy)
    left.axhline(result["targets"]["sla_attainment"], color="grey", linestyle=":")
    left.set_xlabel("arrival rate (requests/s, Poisson)")
    left.set_ylabel("share of requests within SLA")
    sustained = result["sustainable_rate"].items()
    left.set_title("sustained: " + ", ".join(f"{p} {v:g}/s" for p, v in sustained if v))
    left.legend()
    right.set_xlabel("arrival rate (requests/s, Poisson)")
    right.set_ylabel("server forward-seconds per request")
    right.set_title("server compute per request")
    right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16, help="decoder layers of the model")
    parser.add_argument("--hidden", type=int, default=256,
                        help="width of the model (MLP 4x, 64-wide heads, 2 KV heads)")  # fmt: skip
    parser.add_argument("--pool", type=int, default=48, help="distinct requests")
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                        default=[1, 2, 3, 4, 6, 8, 10])  # fmt: skip
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    parser.add_argument("--warm-up", type=int, default=16, help="split requests before runs")
    parser.add_argument("--ordinary-share", type=float, default=0.25)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-clients", type=int, default=96, help="client threads")
    parser.add_argument("--clients-per-tier", type=int, default=16,
                        help="split clients made before the runs, per tier")  # fmt: skip
    parser.add_argument("--target", type=float, default=0.99, help="SLA attainment target")
    parser.add_argument("--policies", nargs="+", choices=(*POLICIES, *EXTRA_POLICIES),
                        default=list(POLICIES),
                        help="run in the order given, per server")  # fmt: skip
    parser.add_argument(
        "--cost-profile", type=Path, default=RESULTS / "split_host_cost.json",
        help="the --split-cost-profile of the planner-priced policy's server",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra `adaptivellm serve` flag (repeat)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "split_serving.json")
    parser.add_argument("--quick", action="store_true", help="8 requests, 2 rates, 8 s runs")
    parser.add_argument(
        "--keep-from", type=Path, default=None,
        help="an earlier result whose runs of the policies not in --policies are kept",
    )  # fmt: skip
    args = parser.parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so that the servers are stopped (running_server's exit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.pool, args.rates, args.duration, args.max_tokens = 8, [0.5, 1.0], 8.0, 16
        args.warm_up = 4
    if not 0 <= args.ordinary_share <= 1 or not all(r > 0 for r in args.rates):
        parser.error("--ordinary-share must be in [0, 1] and every rate > 0")
    if args.hidden < 64 or args.hidden % 64:
        parser.error(f"--hidden must be a positive multiple of 64, got {args.hidden}")
    args.rates = sorted(args.rates)
    args.server_commands, args.warm_up_state = {}, {}
    kept: list[dict] = []
    if args.keep_from is not None:
        earlier = json.loads(args.keep_from.read_text())
        kept = [r for r in earlier["runs"] if r["policy"] not in args.policies]
        args.kept_from = {
            "path": str(args.keep_from), "command": earlier.get("command"),
            "server_commands": earlier.get("server_commands"),
            "policies": sorted({r["policy"] for r in kept}),
        }  # fmt: skip
    args.kept_runs = kept
    runs = [*kept, *measure(args)]
    result = save(args, runs, partial=False)
    plot(result, args.out.with_suffix(".png"))
    keys = ("sustainable_rate", "sustainable_rate_ratio", "server_seconds_per_request_ratio",
            "interior_split_share", "mixed_pass_share", "sla_attainment",
            "planner_latency_error_p50", "drift")  # fmt: skip
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
