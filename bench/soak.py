"""Soak and fault suite: many streamed requests under KV pressure, clients that walk away, and
faults injected into the server, then checks that nothing was lost, hung or leaked.

The load (`--requests`, default 1000) runs through the real `openai` client (AsyncOpenAI,
streamed) against one `adaptivellm serve` on the embedded tiny model, started as operators
start it: a KV cache of 16 blocks of 128 tokens (`--kv-cache-memory-bytes 12 MiB`: four
requests at their longest, 512 tokens) and `--max-num-seqs 32`, with `--concurrency` (48)
requests in flight, so that vLLM preempts all the time; `--preemption-mode adaptive` (swap to
host memory or recompute, per victim) and `--fairness weighted-turnaround`, the defaults, and
`--split-execution`. Each request is drawn (seeded) from a catalogue of distinct prompts
(token ids of ASCII text, 24-384 tokens) each with its own `max_tokens` (8-128), greedy
(temperature 0) with `ignore_eos`, so a completed request has exactly `max_tokens` tokens.
Requests are mixed:

- tenants named by the `user` field or the `X-AdaptiveLLM-Tenant` header, or none, and
  priorities in [-3, 3] (`extra_body={"priority": p}`) or none;
- about 20% disconnect mid-stream (the client closes the stream after 1-3 chunks), about 7% are
  aborted (a client-side timeout of 0.05-2 s cancels the request, queued or streaming);
- about 5% are split-execution sessions (`adaptivellm.split_client.SplitClient`, k in
  {0, 1, 3, 6}; a fifth of them abandon the stream after two tokens), interleaved with the
  ordinary requests.

Every request ends as one of: completed; short (finished with fewer tokens than `max_tokens`);
disconnected or aborted (by this script); a clean error (an HTTP status, or an error the server
sent in the stream; 5xx are counted in `errors_5xx`); lost (the stream ended without a finish
reason and without an error, or the connection dropped); hung (no end within `--hang-s`).

After the load drains, `/metrics` must show no running or waiting request, no KV cache in use,
no swap space in use and no open split session (`GET /v1/split/info` agrees), within
`--drain-s`. Then each distinct prompt that the load used runs again alone (concurrency 1, no
pressure) on the same server, and every completed request (split sessions too) must equal it,
token ids and text; the tokens a disconnected or aborted request received must be a prefix.

Faults (`--faults all|none|NAME,...`), each recorded as `{name, outcome, ok}` with its checks:

- `corrupt_profile`: the main server starts with garbage in the cost-profile files it would load
  for this model (an isolated `ADAPTIVELLM_CACHE` whose `models` links to the real cache's); its
  log must say the profile cannot be used and that analytic costs are used instead, and it must
  serve (the whole load then runs on the analytic fallback);
- `split_client_killed`: on the main server after the load, `adaptivellm split-client` runs in a
  subprocess (k = 3, then k = 0), is SIGKILLed mid-decode, and its session and KV cache must be
  freed (open sessions and KV usage back to 0); a client whose session ended before the kill
  (a short k = 0 session on a fast machine) is run again, up to `KILL_ATTEMPTS` times;
- `swap_exhausted`: a second server with `--preemption-mode swap --swap-space 0.0015` (two
  host slots of one KV block each): under the same pressure (32 requests of 200-384 prompt
  tokens and four split sessions, two at a time) the victims are recomputed and counted
  (`adaptivellm_swap_fallbacks_total` and `adaptivellm_preemptions_total{mode="recompute"}` rise),
  every request completes with its greedy output, and nothing leaks;
- `engine_killed`: the engine core of a server (the second one, after `swap_exhausted`; its own
  otherwise) is SIGKILLed while 8 streams and a split session (k = 3) are in flight:
  `GET /health` must stop answering 200 within `HEALTH_LIMIT_S`, every in-flight client must
  get an error (not a hang), and the server process must exit non-zero (so that an
  orchestrator restarts it).

The JSON report (`--out`, default bench/results/soak.json) is rewritten after each phase, so an
interrupted run still leaves its data. The exit status is 1 when a target is missed: `lost`,
`hung`, `errors_5xx`, `short`, `greedy_mismatches`, `partial_mismatches` and every `leaked`
field 0, at least 10% disconnected, and every fault ok.

    python bench/soak.py                           # 1000 requests and every fault, ~15 min here
    python bench/soak.py --requests 200 --faults none --out /tmp/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
from openai._constants import DEFAULT_CONNECTION_LIMITS
from tqdm import tqdm

from adaptivellm.launch import ServerProcess, adaptivellm_command, free_port, metric_value
from adaptivellm.model import DEFAULT_MODEL_NAME, default_cache_dir, ensure_model

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
MODEL = DEFAULT_MODEL_NAME
FAULTS = ("corrupt_profile", "split_client_killed", "swap_exhausted", "engine_killed")

MAX_MODEL_LEN = 1024
#: 16 blocks of 128 tokens (6 KiB of KV per token of the tiny model): four requests at their
#: longest (384-token prompt + 128 output tokens).
KV_BYTES = 12 << 20
MAX_NUM_SEQS = 32
BASE_FLAGS = ("--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
              "--kv-cache-memory-bytes", str(KV_BYTES),
              "--max-num-seqs", str(MAX_NUM_SEQS))  # fmt: skip
MAIN_FLAGS = (*BASE_FLAGS, "--preemption-mode", "adaptive", "--swap-space", "0.25",
              "--fairness", "weighted-turnaround", "--split-execution",
              "--split-max-sessions", "8")  # fmt: skip
#: Two host slots (a block is 768 KiB): a victim of two blocks fills them, and the next ones
#: (or any larger one) find the swap space full.
FAULT_FLAGS = (*BASE_FLAGS, "--preemption-mode", "swap", "--swap-space", "0.0015",
               "--split-execution")  # fmt: skip

#: Prompt token ids are drawn from the embedded tokenizer's merges, which are ASCII text. Byte
#: tokens could end a prompt inside a UTF-8 character; vLLM's detokenizer then starts the output
#: text with the prompt's last characters (seen: an ordinary request's text began with
#: "...9992\ufffd" of its prompt), while a split session, which sends no prompt token ids, gets
#: the output tokens' text alone: the same tokens, a different text.
PROMPT_IDS = (263, 2314)
TENANTS = ("alpha", "beta", "gamma", "delta")
TENANT_HEADER = "X-AdaptiveLLM-Tenant"
SPLIT_LAYERS = (0, 1, 3, 6)
SPLIT_CLIENTS = 2
DISCONNECT_SHARE = 0.2
ABORT_SHARE = 0.07
SPLIT_SHARE = 0.05
#: The kill fault's checks: /health must stop answering 200, and every in-flight client must
#: get its error, within these many seconds; the process must exit within EXIT_LIMIT_S.
HEALTH_LIMIT_S = 5.0
CLIENT_ERROR_LIMIT_S = 30.0
#: Tries at killing a split client mid-decode before the check fails (see split_client_killed).
KILL_ATTEMPTS = 3
EXIT_LIMIT_S = 60.0

GAUGES = {
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
    "kv_usage": "vllm:kv_cache_usage_perc",
    "swap_bytes": "adaptivellm_swap_space_used_bytes",
    "split_sessions": "adaptivellm_split_sessions_open",
}
COUNTERS = {
    "preemptions": ("vllm:num_preemptions_total", ""),
    "preemptions_swap": ("adaptivellm_preemptions_total", 'mode="swap"'),
    "preemptions_recompute": ("adaptivellm_preemptions_total", 'mode="recompute"'),
    "turnaround_preemptions": ("adaptivellm_turnaround_preemptions_total", ""),
    "swap_fallbacks": ("adaptivellm_swap_fallbacks_total", ""),
    "swap_blocks_out": ("adaptivellm_swap_blocks_total", 'direction="out"'),
    "swap_blocks_in": ("adaptivellm_swap_blocks_total", 'direction="in"'),
    "internal_errors": ("adaptivellm_internal_errors_total", ""),
    "split_sessions": ("adaptivellm_split_sessions_total", ""),
    "split_sessions_disconnected": ("adaptivellm_split_sessions_total", 'outcome="disconnected"'),
    "split_errors": ("adaptivellm_split_errors_total", ""),
}


# --------------------------------------------------------------------------- the workload


@dataclass(frozen=True)
class Entry:
    """One distinct request: its prompt (token ids) and max_tokens."""

    prompt: tuple[int, ...]
    max_tokens: int

    @property
    def split_ok(self) -> bool:
        """Short enough for a split session (one round trip per token)."""
        return self.max_tokens <= 24 and len(self.prompt) <= 256


@dataclass(frozen=True)
class Plan:
    """What one request of the load does."""

    index: int
    entry: int
    kind: str  # "openai" | "split"
    action: str  # "complete" | "disconnect" | "abort"
    after: float  # chunks read before disconnecting, or seconds before aborting
    tenant: str | None = None
    tenant_via: str | None = None  # "user" | "header"
    priority: int | None = None
    layer: int = 0


@dataclass
class Outcome:
    """How one request ended, and what it received."""

    index: int
    outcome: str  # completed short disconnected aborted error_4xx error_5xx lost hung
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    error: str | None = None
    seconds: float = 0.0


def catalogue(count: int, seed: int) -> list[Entry]:
    """`count` distinct requests; the first quarter short enough for split sessions."""
    rng = random.Random(seed)
    entries: list[Entry] = []
    for i in range(count):
        short = i < max(2, count // 4)
        length = rng.randint(24, 200 if short else 384)
        tokens = rng.choice((8, 12, 16, 24) if short else (16, 32, 48, 64, 96, 128))
        prompt = tuple(rng.randint(*PROMPT_IDS) for _ in range(length))
        entries.append(Entry(prompt, tokens))
    return entries


def plans(count: int, entries: list[Entry], seed: int, split: bool = True) -> list[Plan]:
    """The load: `count` requests drawn from `entries` (see the module docstring for the mix)."""
    rng = random.Random(seed + 1)
    splittable = [i for i, e in enumerate(entries) if e.split_ok]
    out = []
    for index in range(count):
        if split and rng.random() < SPLIT_SHARE:
            action = "disconnect" if rng.random() < 0.2 else "complete"
            out.append(Plan(index, rng.choice(splittable), "split", action, 2,
                            layer=rng.choice(SPLIT_LAYERS)))  # fmt: skip
            continue
        draw = rng.random()
        if draw < DISCONNECT_SHARE:
            action, after = "disconnect", float(rng.randint(1, 3))
        elif draw < DISCONNECT_SHARE + ABORT_SHARE:
            action, after = "abort", round(rng.uniform(0.05, 2.0), 3)
        else:
            action, after = "complete", 0.0
        tenant = rng.choice((*TENANTS, None))
        via = rng.choice(("user", "header")) if tenant else None
        priority = rng.choice((None, -3, -2, -1, 0, 1, 2, 3))
        out.append(Plan(index, rng.randrange(len(entries)), "openai", action, after,
                        tenant, via, priority))  # fmt: skip
    return out


# --------------------------------------------------------------------------- clients


#: The load's HTTP client pool. No retries (max_retries=0), so a request the server drops counts
#: as lost; idle connections are dropped after 2 s, before the server's keep-alive (vLLM:
#: VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s) closes them. The openai client's default (5 s) equals it,
#: so a request sent on a connection the server is closing would read as lost.
#: (The Limits class of the HTTP library this openai version uses: httpx, or httpx2 in 3.x.)
LIMITS = type(DEFAULT_CONNECTION_LIMITS)(
    max_connections=1000, max_keepalive_connections=100, keepalive_expiry=2.0
)


def _describe(exc: BaseException) -> str:
    """The exception and its causes (an APIConnectionError says only "Connection error.")."""
    parts, seen = [], 0
    cause: BaseException | None = exc
    while cause is not None and seen < 4:
        parts.append(f"{type(cause).__name__}: {cause}")
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return " <- ".join(parts)


def _error_outcome(index: int, exc: Exception, began: float) -> Outcome:
    """A clean error (HTTP status, or an error event in the stream) or a dropped connection."""
    seconds = time.monotonic() - began
    text = _describe(exc)[:600]
    if isinstance(exc, openai.APIStatusError):
        kind = "error_5xx" if exc.status_code >= 500 else "error_4xx"
    elif isinstance(exc, openai.APIConnectionError | httpx.TransportError):
        kind = "lost"  # the connection dropped without an answer
    elif isinstance(exc, openai.APIError):  # an error event inside the stream
        code = (exc.body or {}).get("code") if isinstance(exc.body, dict) else None
        kind = "error_4xx" if isinstance(code, int) and 400 <= code < 500 else "error_5xx"
    else:
        kind = "lost"
    return Outcome(index, kind, error=text, seconds=seconds)


class Load:
    """Runs the plans against one server with `concurrency` requests in flight."""

    def __init__(
        self,
        base_url: str,
        entries: list[Entry],
        concurrency: int,
        hang_s: float,
        split_clients: list[Any] | None = None,
    ) -> None:
        self.base_url = base_url
        self.entries = entries
        self.concurrency = concurrency
        self.hang_s = hang_s
        self.split_clients = split_clients or []

    async def run(self, todo: list[Plan], progress: bool = True) -> list[Outcome]:
        client = openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1", api_key="none", max_retries=0,
            timeout=self.hang_s + 60, http_client=openai.DefaultAsyncHttpxClient(limits=LIMITS),
        )  # fmt: skip
        pool: asyncio.Queue[Any] = asyncio.Queue()
        for split_client in self.split_clients:
            pool.put_nowait(split_client)
        queue = list(reversed(todo))
        results: list[Outcome] = []
        counts: Counter[str] = Counter()
        bar = tqdm(total=len(todo), desc="soak", unit="req", disable=not progress,
                   mininterval=1.0, file=sys.stderr)  # fmt: skip

        async def worker() -> None:
            while queue:
                plan = queue.pop()
                outcome = await self.one(client, pool, plan)
                results.append(outcome)
                counts[outcome.outcome] += 1
                bar.update(1)
                bar.set_postfix(dict(counts), refresh=False)

        try:
            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        finally:
            bar.close()
            await client.close()
        return sorted(results, key=lambda o: o.index)

    async def one(
        self, client: openai.AsyncOpenAI, pool: asyncio.Queue[Any], plan: Plan
    ) -> Outcome:
        began = time.monotonic()
        try:
            if plan.kind == "split":
                return await asyncio.wait_for(self._split(pool, plan), self.hang_s)
            return await asyncio.wait_for(self._openai(client, plan), self.hang_s)
        except TimeoutError:
            return Outcome(plan.index, "hung", seconds=time.monotonic() - began)

    async def _openai(self, client: openai.AsyncOpenAI, plan: Plan) -> Outcome:
        if plan.action != "abort":
            return await self._stream(client, plan, {})
        got: dict[str, Any] = {}
        try:
            return await asyncio.wait_for(self._stream(client, plan, got), plan.after)
        except TimeoutError:  # our client-side timeout: the request is cancelled
            return Outcome(plan.index, "aborted", tokens=got.get("tokens", []),
                           seconds=plan.after)  # fmt: skip

    async def _stream(self, client: openai.AsyncOpenAI, plan: Plan, got: dict[str, Any]) -> Outcome:
        entry = self.entries[plan.entry]
        began = time.monotonic()
        extra_body: dict[str, Any] = {"ignore_eos": True, "return_token_ids": True}
        if plan.priority is not None:
            extra_body["priority"] = plan.priority
        headers = (
            {TENANT_HEADER: plan.tenant} if plan.tenant_via == "header" and plan.tenant else None
        )
        user = plan.tenant if plan.tenant_via == "user" and plan.tenant else openai.omit
        tokens: list[int] = []
        got["tokens"] = tokens
        texts: list[str] = []
        finish = None
        try:
            stream = await client.completions.create(
                model=MODEL, prompt=list(entry.prompt), max_tokens=entry.max_tokens,
                temperature=0.0, stream=True, user=user, extra_headers=headers,
                extra_body=extra_body,
            )  # fmt: skip
            try:
                chunks = 0
                async for chunk in stream:
                    for choice in chunk.choices:
                        tokens.extend(getattr(choice, "token_ids", None) or [])
                        texts.append(choice.text)
                        finish = choice.finish_reason or finish
                    chunks += 1
                    if plan.action == "disconnect" and chunks >= plan.after and finish is None:
                        return Outcome(plan.index, "disconnected", tokens, "".join(texts),
                                       seconds=time.monotonic() - began)  # fmt: skip
            finally:
                await stream.close()
        except (openai.APIError, httpx.TransportError) as exc:
            outcome = _error_outcome(plan.index, exc, began)
            outcome.tokens = tokens
            return outcome
        return _finished(plan.index, tokens, "".join(texts), finish, entry.max_tokens, began)

    async def _split(self, pool: asyncio.Queue[Any], plan: Plan) -> Outcome:
        split_client = await pool.get()
        outcome = await asyncio.to_thread(self._split_sync, split_client, plan)
        pool.put_nowait(split_client)  # not on a hang: that client may still be in use
        return outcome

    def _split_sync(self, split_client: Any, plan: Plan) -> Outcome:
        from adaptivellm.split_client.client import SplitError

        entry = self.entries[plan.entry]
        began = time.monotonic()
        try:
            if plan.action == "disconnect":
                stream = split_client.stream(list(entry.prompt), max_tokens=entry.max_tokens,
                                             ignore_eos=True, layer=plan.layer)  # fmt: skip
                texts = []
                try:
                    for chunk in stream:
                        texts.append(chunk.choices[0].text)
                        if chunk.choices[0].finish_reason is not None:
                            return Outcome(plan.index, "completed_unchecked", text="".join(texts))
                        if len(texts) >= plan.after:
                            return Outcome(plan.index, "disconnected", text="".join(texts),
                                           seconds=time.monotonic() - began)  # fmt: skip
                finally:
                    stream.close()
                return Outcome(plan.index, "lost", text="".join(texts))
            done = split_client.generate(list(entry.prompt), max_tokens=entry.max_tokens,
                                         ignore_eos=True, layer=plan.layer)  # fmt: skip
        except SplitError as exc:
            code = str(getattr(exc, "code", ""))
            kind = "error_5xx" if code in ("engine_error", "server_error") else "error_4xx"
            if code in ("connection_failed", "connection_closed"):
                kind = "lost"
            return Outcome(plan.index, kind, error=f"SplitError {code}: {exc}"[:300],
                           seconds=time.monotonic() - began)  # fmt: skip
        return _finished(plan.index, list(done.token_ids), done.text, done.finish_reason,
                         entry.max_tokens, began)  # fmt: skip


def _finished(
    index: int, tokens: list[int], text: str, finish: str | None, max_tokens: int, began: float
) -> Outcome:
    if finish is None:
        kind = "lost"  # the stream ended without a finish reason and without an error
    elif finish == "length" and len(tokens) == max_tokens:
        kind = "completed"
    else:
        kind = "short"
    return Outcome(index, kind, tokens, text, finish, seconds=time.monotonic() - began)


def make_split_clients(base_url: str, count: int) -> list[Any]:
    """Split clients of the real client library, their layers loaded and run once (first calls
    of a torch model pay one-off start-up costs). One torch thread: the server's engine spins
    its threads on the same cores."""
    import torch
    from transformers import DynamicCache

    from adaptivellm.split_client.client import SplitClient
    from adaptivellm.split_client.protocol import ClientSpec

    torch.set_num_threads(1)
    spec = ClientSpec(flops_per_s=5e10, uplink_bps=1e9, downlink_bps=1e9, rtt_s=0.001)
    clients = []
    for _ in range(count):
        client = SplitClient(base_url, ensure_model(), client_spec=spec, timeout_s=120.0)
        client.model.ensure_layers(max(SPLIT_LAYERS))
        client.model.hidden_states([5, 6, 7], max(SPLIT_LAYERS), DynamicCache())
        clients.append(client)
    return clients


# --------------------------------------------------------------------------- server side


def metrics_text(base_url: str) -> str:
    return httpx.get(f"{base_url}/metrics", timeout=30).text


def counters(text: str) -> dict[str, float]:
    return {name: metric_value(text, *spec) or 0.0 for name, spec in COUNTERS.items()}


def counter_delta(before: str, after: str) -> dict[str, float]:
    a, b = counters(before), counters(after)
    return {name: b[name] - a[name] for name in COUNTERS}


def num_blocks(text: str) -> int:
    """The KV cache's blocks, from vLLM's cache_config_info labels."""
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info{") and 'num_gpu_blocks="' in line:
            return int(line.split('num_gpu_blocks="', 1)[1].split('"', 1)[0])
    return 0


def gauges(base_url: str) -> dict[str, float]:
    text = metrics_text(base_url)
    values = {name: metric_value(text, metric) or 0.0 for name, metric in GAUGES.items()}
    values["kv_blocks"] = round(values["kv_usage"] * num_blocks(text), 3)
    if "open_sessions" in (info := split_info(base_url)):
        values["split_info_open"] = float(info["open_sessions"])
    return values


def drained(values: dict[str, float]) -> bool:
    keys = ("running", "waiting", "kv_usage", "swap_bytes", "split_sessions", "split_info_open")
    return all(values.get(k, 0.0) == 0 for k in keys)


def wait_drained(base_url: str, limit_s: float) -> tuple[dict[str, float], float]:
    """Poll the gauges until everything is back to 0 or `limit_s` passed; (gauges, seconds)."""
    began = time.monotonic()
    while True:
        values = gauges(base_url)
        if drained(values) or time.monotonic() - began > limit_s:
            return values, round(time.monotonic() - began, 2)
        time.sleep(0.5)


def leaked(values: dict[str, float]) -> dict[str, float]:
    return {
        "kv_blocks": values["kv_blocks"],
        "swap_bytes": values["swap_bytes"],
        "split_sessions": max(values["split_sessions"], values.get("split_info_open", 0.0)),
        "running_requests": values["running"],
        "waiting_requests": values["waiting"],
    }


def start_server(
    flags: tuple[str, ...], log: Path, env: dict[str, str] | None = None
) -> ServerProcess:
    port = free_port()
    server = ServerProcess(adaptivellm_command(None, port, list(flags)), port, log, env or {})
    server.start()
    return server


def log_text(server: ServerProcess) -> str:
    try:
        return server.log_path.read_text(errors="replace")
    except OSError:
        return ""


def reference_outputs(base_url: str, entries: list[Entry], wanted: set[int]) -> dict[int, Any]:
    """Each wanted entry alone on the server (one at a time): (token ids, text)."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=300)
    out: dict[int, Any] = {}
    for i in sorted(wanted):
        entry = entries[i]
        done = client.completions.create(
            model=MODEL, prompt=list(entry.prompt), max_tokens=entry.max_tokens, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )  # fmt: skip
        choice = done.choices[0]
        out[i] = (list(getattr(choice, "token_ids", None) or []), choice.text)
    client.close()
    return out


def compare(
    outcomes: list[Outcome], todo: list[Plan], refs: dict[int, Any]
) -> tuple[int, int, list[dict[str, Any]]]:
    """(completed requests that differ from the reference, partial ones whose tokens are not a
    prefix of it, up to 10 examples)."""
    full = partial = 0
    examples: list[dict[str, Any]] = []
    for outcome in outcomes:
        plan = todo[outcome.index]
        ref_tokens, ref_text = refs.get(plan.entry, (None, None))
        if ref_tokens is None:
            continue
        if outcome.outcome == "completed":
            bad = outcome.tokens != ref_tokens or outcome.text != ref_text
            full += bad
        elif outcome.outcome in ("disconnected", "aborted") and outcome.tokens:
            bad = outcome.tokens != ref_tokens[: len(outcome.tokens)]
            partial += bad
        else:
            continue
        if bad and len(examples) < 10:
            at = next((n for n, (a, b) in enumerate(zip(outcome.tokens, ref_tokens, strict=False))
                       if a != b), min(len(outcome.tokens), len(ref_tokens)))  # fmt: skip
            examples.append({"request": outcome.index, "entry": plan.entry, "kind": plan.kind,
                             "layer": plan.layer, "outcome": outcome.outcome,
                             "first_difference_at": at})  # fmt: skip
    return full, partial, examples


# --------------------------------------------------------------------------- faults


def profile_files(model_dir: Path) -> list[str]:
    """Names of the cost-profile files `serve` would load for the embedded model: every device,
    with this vLLM's version and 'none' (see adaptivellm.predictors.store)."""
    from adaptivellm.cpu import DEFAULT_CPU_DTYPE
    from adaptivellm.predictors.features import ModelShape
    from adaptivellm.predictors.store import NO_VLLM, ProfileKey

    config = json.loads((model_dir / "config.json").read_text())
    shape = ModelShape.from_hf_config(config, dtype=DEFAULT_CPU_DTYPE)
    names = []
    for device in ("cpu", "cuda"):
        key = ProfileKey.for_shape(shape, device=device, dtype=DEFAULT_CPU_DTYPE)
        for version in {key.vllm_version, NO_VLLM}:
            names.append(ProfileKey("", key.config_hash, device, key.dtype, version).file_name())
    return sorted(names)


def isolated_cache(root: Path, corrupt: bool) -> dict[str, str]:
    """An ADAPTIVELLM_CACHE whose models are the real cache's and whose profiles folder is
    empty, or (corrupt) holds garbage under the names serve looks for."""
    model_dir = ensure_model()
    cache = root / "cache"
    (cache / "profiles").mkdir(parents=True, exist_ok=True)
    if not (cache / "models").exists():
        (cache / "models").symlink_to(default_cache_dir() / "models", target_is_directory=True)
    if corrupt:
        for name in profile_files(model_dir):
            (cache / "profiles" / name).write_bytes(
                b'{"format": "adaptivellm-profile", \x00\xff garbage'
            )
    return {"ADAPTIVELLM_CACHE": str(cache)}


def check_corrupt_profile(server: ServerProcess) -> dict[str, Any]:
    """The main server started on a corrupt profile: its log says so, it falls back to the
    analytic costs, and it serves (a first request completes here; the load follows)."""
    text = log_text(server)
    said_corrupt = "Cannot use the cost profile" in text and "not readable JSON" in text
    analytic = "Using analytic swap/recompute costs instead" in text
    try:
        done = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0,
                             timeout=120).completions.create(
            model=MODEL, prompt=[11, 12, 13], max_tokens=4, temperature=0.0,
            extra_body={"ignore_eos": True})  # fmt: skip
        served = done.choices[0].finish_reason == "length"
    except openai.APIError as exc:
        served, done = False, None
        print(f"corrupt_profile: the server did not serve: {exc}", file=sys.stderr)
    line = next((ln for ln in text.splitlines() if "Cannot use the cost profile" in ln), "")
    checks = {"log_says_corrupt": said_corrupt, "analytic_fallback": analytic, "serves": served}
    return {
        "name": "corrupt_profile",
        "outcome": (
            f"log: {line.strip()[:400]!r}; served: {served}"
            if line
            else f"no message about the corrupt profile in the log; served: {served}"
        ),
        "ok": all(checks.values()),
        "checks": checks,
    }


def split_client_killed(base_url: str, workdir: Path, drain_s: float) -> dict[str, Any]:
    """SIGKILL `adaptivellm split-client` mid-decode (k = 3: the client computes each token's
    first layers; k = 0: the server decodes alone and streams), then the session and its KV
    cache must be freed."""
    cases = []
    for layer in (3, 0):
        # A k = 0 session can finish before the kill on a fast or idle machine (the server
        # decodes alone): that attempt proves nothing either way, so it is tried again.
        for attempt in range(1, KILL_ATTEMPTS + 1):
            case = _kill_split_client(base_url, workdir, layer, drain_s) | {"attempt": attempt}
            if case["checks"]["killed_mid_decode"]:
                break
        cases.append(case)
    ok = all(c["ok"] for c in cases)
    outcome = "; ".join(
        f"k={c['layer']} (attempt {c['attempt']}): killed after {c['tokens_seen']} tokens "
        f"with {c['open_before']:.0f} session(s) open; freed after {c['freed_s']} s (sessions "
        f"{c['after']['split_sessions']:.0f}, KV blocks {c['after']['kv_blocks']:g})"
        for c in cases
    )
    return {"name": "split_client_killed", "outcome": outcome, "ok": ok, "cases": cases}


def _kill_split_client(base_url: str, workdir: Path, layer: int, drain_s: float) -> dict[str, Any]:
    before = metrics_text(base_url)
    command = [sys.executable, "-m", "adaptivellm.cli", "split-client",
               "the quick brown fox jumps over the lazy dog", "--url", base_url,
               "--model-path", str(ensure_model()), "--max-tokens", str(MAX_MODEL_LEN - 32),
               "--ignore-eos",
               "--layer", str(layer), "--stream", "--timeout-s", "120"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=(workdir / f"split-client-k{layer}.log").open("wb"),
        env=env,
    )
    assert proc.stdout is not None
    seen: list[bytes] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stdout.read1(64), b"")),  # type: ignore[union-attr]
                              daemon=True)  # fmt: skip
    reader.start()
    deadline = time.monotonic() + 180
    open_before = 0.0
    # Mid-decode: the session is open and has streamed a few tokens' text.
    # The most sessions seen open while polling: on a fast machine a k = 0 session can stream
    # its first tokens between two polls, and the gauge read at the kill may lag by a scrape.
    while time.monotonic() < deadline and proc.poll() is None:
        open_before = max(open_before, open_sessions(base_url))
        if open_before >= 1 and len(b"".join(seen).split()) >= 4:
            break
        time.sleep(0.02)
    tokens_seen = len(b"".join(seen).split())
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join(timeout=10)
    after, freed_s = wait_drained(base_url, drain_s)
    delta = counter_delta(before, metrics_text(base_url))
    checks = {"killed_mid_decode": alive and open_before >= 1 and tokens_seen >= 1,
              "session_freed": after["split_sessions"] == 0
                               and after.get("split_info_open", 0) == 0,
              "kv_freed": after["kv_blocks"] == 0 and after["running"] == 0}  # fmt: skip
    return {"layer": layer, "tokens_seen": tokens_seen, "open_before": open_before,
            "freed_s": freed_s, "after": after, "session_outcomes": delta["split_sessions"],
            "checks": checks, "ok": all(checks.values())}  # fmt: skip


def split_info(base_url: str) -> dict[str, Any]:
    """`GET /v1/split/info`: among others, what the open sessions wait for (a leak's clue)."""
    with contextlib.suppress(httpx.HTTPError, ValueError):
        info = httpx.get(f"{base_url}/v1/split/info", timeout=30)
        if info.status_code == 200:
            return dict(info.json())
    return {}


def open_sessions(base_url: str) -> float:
    """Open split sessions, by the cheap `/v1/split/info` (its count and the gauge's are the
    same set), so that a short session is not missed between two polls."""
    if (info := split_info(base_url)) and "open_sessions" in info:
        return float(info["open_sessions"])
    return gauges(base_url)["split_sessions"]


def swap_exhausted(
    server: ServerProcess, entries: list[Entry], refs: dict[int, Any], hang_s: float,
    drain_s: float,
) -> dict[str, Any]:  # fmt: skip
    """Pressure on a server with two host swap slots: victims fall back to recompute, counted,
    and every request (four split sessions among them) still completes with its greedy output."""
    base = server.base_url
    big = [i for i, e in enumerate(entries) if len(e.prompt) >= 200 and e.max_tokens >= 48]
    big = big or list(range(len(entries)))
    todo = [Plan(n, big[n % len(big)], "openai", "complete", 0.0) for n in range(32)]
    # Split sessions among them, preempted (and recomputed) like the others.
    splittable = [i for i, e in enumerate(entries) if e.split_ok]
    todo += [Plan(len(todo) + n, splittable[n % len(splittable)], "split", "complete", 0.0,
                  layer=layer) for n, layer in enumerate((1, 3, 6, 0))]  # fmt: skip
    before = metrics_text(base)
    clients = make_split_clients(base, SPLIT_CLIENTS)
    load = Load(base, entries, len(todo), hang_s, clients)
    outcomes = asyncio.run(load.run(todo, progress=False))
    for client in clients:
        client.close()
    values, _ = wait_drained(base, drain_s)
    delta = counter_delta(before, metrics_text(base))
    missing = {p.entry for p in todo} - set(refs)
    refs = {**refs, **reference_outputs(base, entries, missing)} if missing else refs
    mismatches, _, _ = compare(outcomes, todo, refs)
    completed = sum(o.outcome == "completed" for o in outcomes)
    left = leaked(values)
    checks = {"all_completed": completed == len(todo),
              "fallbacks_counted": delta["swap_fallbacks"] > 0,
              "recomputed": delta["preemptions_recompute"] > 0, "greedy_equal": mismatches == 0,
              "nothing_leaked": not any(left.values())}  # fmt: skip
    outcome = (f"{completed}/{len(todo)} completed, {delta['preemptions']:.0f} preemptions "
               f"({delta['preemptions_swap']:.0f} swapped, {delta['preemptions_recompute']:.0f} "
               f"recomputed), {delta['swap_fallbacks']:.0f} swap fallbacks, {mismatches} greedy "
               f"mismatches, leaked {left}")  # fmt: skip
    return {"name": "swap_exhausted", "outcome": outcome, "ok": all(checks.values()),
            "checks": checks, "counters": delta,
            "outcomes": dict(Counter(o.outcome for o in outcomes))}  # fmt: skip


def engine_core(server: ServerProcess) -> psutil.Process | None:
    assert server.proc is not None
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child
    return None


def engine_killed(server: ServerProcess, hang_s: float) -> dict[str, Any]:
    """SIGKILL the engine core while streams are in flight: 8 ordinary ones and a split
    session (k = 3)."""
    return asyncio.run(_engine_killed(server, hang_s))


def _split_until_error(client: Any, streaming: threading.Event) -> str:
    from adaptivellm.split_client.client import SplitError

    try:
        client.generate("the quick brown fox", max_tokens=600, ignore_eos=True, layer=3,
                        on_token=lambda _: streaming.set())  # fmt: skip
    except SplitError as exc:
        return f"error_split_{exc.code}"
    finally:
        streaming.set()
    return "completed"


async def _engine_killed(server: ServerProcess, hang_s: float) -> dict[str, Any]:
    assert server.proc is not None
    base = server.base_url
    flights = 8
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0,
                                timeout=hang_s)  # fmt: skip
    streaming: set[int] = set()
    all_streaming = asyncio.Event()

    async def one(i: int) -> str:
        try:
            stream = await client.completions.create(
                model=MODEL, prompt=[20 + i] * 64, max_tokens=900, temperature=0.0, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            finish = None
            async for chunk in stream:
                streaming.add(i)
                if len(streaming) == flights:
                    all_streaming.set()
                finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
            return "completed" if finish else "lost"
        except (openai.APIError, httpx.TransportError) as exc:
            return _error_outcome(i, exc, 0.0).outcome

    split_streaming = threading.Event()
    split_client = make_split_clients(base, 1)[0]
    tasks = [asyncio.create_task(one(i)) for i in range(flights)]
    tasks.append(asyncio.create_task(asyncio.to_thread(_split_until_error, split_client,
                                                       split_streaming)))  # fmt: skip
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_streaming.wait(), 120)
    await asyncio.to_thread(split_streaming.wait, 120)
    in_flight = len(streaming) + (split_streaming.is_set() and not tasks[-1].done())
    flights += 1
    core = engine_core(server)
    if core is None:
        for task in tasks:
            task.cancel()
        return {"name": "engine_killed", "outcome": "no EngineCore process found", "ok": False}
    os.kill(core.pid, signal.SIGKILL)
    killed = time.monotonic()
    health_s: float | None = None
    async with httpx.AsyncClient(timeout=2.0) as http:
        while time.monotonic() - killed < 2 * HEALTH_LIMIT_S:
            try:
                status = (await http.get(f"{base}/health")).status_code
            except httpx.HTTPError:
                status = 0
            if status != 200:
                health_s = round(time.monotonic() - killed, 2)
                break
            await asyncio.sleep(0.1)
    done, pending = await asyncio.wait(tasks, timeout=CLIENT_ERROR_LIMIT_S)
    ends = Counter(t.result() for t in done)
    ends["hung"] += len(pending)
    for task in pending:
        task.cancel()
    clients_s = round(time.monotonic() - killed, 2)
    await client.close()
    loop = asyncio.get_running_loop()
    try:
        code: int | None = await loop.run_in_executor(None, server.proc.wait, EXIT_LIMIT_S)
    except subprocess.TimeoutExpired:
        code = None
    exit_s = round(time.monotonic() - killed, 2)
    errors = sum(n for k, n in ends.items() if k.startswith("error"))
    checks = {
        "health_not_200": health_s is not None and health_s <= HEALTH_LIMIT_S,
        # Every stream in flight ends, none hangs: with an error, or complete when its last
        # tokens had left the engine before the kill (a fresh-clone CI saw one such of 9).
        "in_flight_clients_errored": in_flight == flights
        and ends["hung"] == 0
        and errors >= 1
        and errors + ends["completed"] == flights,
        "exited_nonzero": code is not None and code != 0,
    }
    outcome = (f"killed EngineCore pid {core.pid} with {in_flight} streams in flight; /health "
               f"not 200 after {health_s} s; clients: {dict(ends)} within {clients_s} s; server "
               f"exit code {code} after {exit_s} s")  # fmt: skip
    return {"name": "engine_killed", "outcome": outcome, "ok": all(checks.values()),
            "checks": checks, "exit_code": code}  # fmt: skip


# --------------------------------------------------------------------------- the run


def parse_faults(text: str) -> list[str]:
    if text == "all":
        return list(FAULTS)
    if text == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    return names


def targets(report: dict[str, Any]) -> list[str]:
    """The targets this report misses (empty: all met)."""
    missed = [f"{k} = {report[k]}" for k in ("lost", "hung", "errors_5xx", "short",
              "greedy_mismatches", "partial_mismatches") if report.get(k)]  # fmt: skip
    missed += [f"leaked.{k} = {v}" for k, v in report.get("leaked", {}).items() if v]
    if report.get("requests", 0) and report.get("disconnected", 0) < 0.1 * report["requests"]:
        missed.append(f"disconnected = {report['disconnected']} < 10% of the requests")
    missed += [
        f"fault {f['name']}: {f['outcome']}" for f in report.get("faults", []) if not f["ok"]
    ]
    if report.get("load_incomplete"):
        missed.append(f"the run stopped early: {report['load_incomplete']}")
    return missed


def forged_tenant_figures() -> dict[str, Any]:
    """The forged-tenant attack's figure, which issue 37 reports with the soak: measured by
    bench/forged_tenants.py (its own server and load), read from its results file."""
    path = RESULTS / "forged-tenants.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"forged_tenant_jain": None, "forged_tenant_source": f"{path} not found"}
    source = f"bench/results/forged-tenants.json ({data.get('command')})"
    return {"forged_tenant_jain": data.get("forged_tenant_jain"), "forged_tenant_source": source}


class Recorder:
    """The report, written to `path` after every phase."""

    def __init__(self, path: Path, report: dict[str, Any]) -> None:
        self.path = path
        self.report = report

    def save(self) -> None:
        self.report["targets_missed"] = targets(self.report)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=1) + "\n")
        tmp.replace(self.path)

    def fault(self, result: dict[str, Any]) -> None:
        self.report["faults"].append(result)
        print(f"fault {result['name']}: {'ok' if result['ok'] else 'FAILED'}: {result['outcome']}",
              file=sys.stderr)  # fmt: skip
        self.save()


def run(
    args: argparse.Namespace, command: str, on_phase: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """The whole suite; returns the report (also written to args.out)."""
    faults = args.faults
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="adaptivellm-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    entries = catalogue(args.distinct or max(16, args.requests // 8), args.seed)
    todo = plans(args.requests, entries, args.seed)
    started = time.time()
    rec = Recorder(Path(args.out), {
        "command": command, "requests": len(todo), "completed": 0, "aborted": 0,
        "disconnected": 0, "lost": 0, "hung": 0, "errors_5xx": 0, "errors_4xx": 0, "short": 0,
        "leaked": {}, "greedy_mismatches": 0, "partial_mismatches": 0, "faults": [],
        "server_flags": list(MAIN_FLAGS), "concurrency": args.concurrency,
        "distinct_prompts": len(entries), "seed": args.seed, "workdir": str(workdir),
        "load_incomplete": "not started", **forged_tenant_figures(),
    })  # fmt: skip
    report = rec.report
    phase = on_phase or (lambda name: print(f"[soak] {name}", file=sys.stderr, flush=True))

    refs: dict[int, Any] = {}
    phase("starting the main server")
    env = isolated_cache(workdir, corrupt="corrupt_profile" in faults)
    main = start_server(MAIN_FLAGS, workdir / "main-server.log", env)
    try:
        main.wait_ready(600)
        report["main_server_log"] = str(main.log_path)
        if "corrupt_profile" in faults:
            rec.fault(check_corrupt_profile(main))
        base = main.base_url
        split_clients = make_split_clients(base, SPLIT_CLIENTS) if SPLIT_SHARE else []
        before = metrics_text(base)
        phase(f"load: {len(todo)} requests, {args.concurrency} in flight")
        began = time.monotonic()
        outcomes = asyncio.run(Load(base, entries, args.concurrency, args.hang_s,
                                    split_clients).run(todo, progress=not args.quiet))  # fmt: skip
        report["load_s"] = round(time.monotonic() - began, 1)
        counts = Counter(o.outcome for o in outcomes)
        # A split stream that finished before its planned disconnect is checked as completed
        # only by its finish reason (the stream API carries no token ids).
        counts["completed"] += counts.pop("completed_unchecked", 0)
        by_kind = Counter(f"{todo[o.index].kind}:{o.outcome}" for o in outcomes)
        report.update({
            "completed": counts["completed"], "aborted": counts["aborted"],
            "disconnected": counts["disconnected"], "lost": counts["lost"],
            "hung": counts["hung"], "errors_5xx": counts["error_5xx"],
            "errors_4xx": counts["error_4xx"], "short": counts["short"],
            "outcomes_by_kind": dict(sorted(by_kind.items())),
            "split_sessions": sum(p.kind == "split" for p in todo),
            "errors": [asdict(o) | {"tokens": len(o.tokens)} for o in outcomes
                       if o.error or o.outcome in ("lost", "hung", "short")][:20],
            "request_seconds_max": round(max((o.seconds for o in outcomes), default=0.0), 2),
            "load_incomplete": None,
        })  # fmt: skip
        rec.save()

        phase("drain and leak check")
        values, drain_s = wait_drained(base, args.drain_s)
        after = metrics_text(base)
        report.update({"leaked": {k: v for k, v in leaked(values).items()
                                  if k in ("kv_blocks", "swap_bytes", "split_sessions")},
                       "drain": {"seconds": drain_s, "gauges": values,
                                 "split_info": split_info(base)},
                       "counters": counter_delta(before, after)})  # fmt: skip
        for key in ("running_requests", "waiting_requests"):
            report["leaked"][key] = leaked(values)[key]
        rec.save()

        phase("greedy reference (each distinct prompt alone)")
        wanted = {todo[o.index].entry for o in outcomes
                  if o.outcome in ("completed", "disconnected", "aborted")}  # fmt: skip
        refs = reference_outputs(base, entries, wanted)
        full, partial, examples = compare(outcomes, todo, refs)
        report.update({"greedy_mismatches": full, "partial_mismatches": partial,
                       "greedy_compared": sum(o.outcome == "completed" for o in outcomes),
                       "mismatch_examples": examples})  # fmt: skip
        rec.save()

        if "split_client_killed" in faults:
            phase("fault: split client killed mid-decode")
            rec.fault(split_client_killed(base, workdir, args.drain_s))
        for split_client in split_clients:
            split_client.close()
        report["main_server_tracebacks"] = log_text(main).count("Traceback")
    finally:
        report["main_server_exit"] = main.stop()
        report["duration_s"] = round(time.time() - started, 1)
        rec.save()

    if "swap_exhausted" in faults or "engine_killed" in faults:
        phase("starting the fault server (two host swap slots)")
        second = start_server(
            FAULT_FLAGS, workdir / "fault-server.log", isolated_cache(workdir, False)
        )
        try:
            second.wait_ready(600)
            if "swap_exhausted" in faults:
                phase("fault: swap space exhausted")
                rec.fault(swap_exhausted(second, entries, refs, args.hang_s, args.drain_s))
            if "engine_killed" in faults:
                phase("fault: engine core SIGKILLed mid-run")
                rec.fault(engine_killed(second, args.hang_s))
        finally:
            second.stop()
    report["faults_run"] = [f["name"] for f in report["faults"]]
    report["duration_s"] = round(time.time() - started, 1)
    rec.save()
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1000, help="(default: %(default)s)")
    parser.add_argument("--out", default=str(RESULTS / "soak.json"), help="the JSON report")
    parser.add_argument(
        "--faults",
        type=parse_faults,
        default=list(FAULTS),
        help=f"all (default), none, or a comma list of {', '.join(FAULTS)}",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=48,
        help="requests in flight (default: %(default)s, more than --max-num-seqs)",
    )
    parser.add_argument(
        "--distinct",
        type=int,
        default=0,
        help="distinct prompts (default: requests / 8, at least 16)",
    )
    parser.add_argument(
        "--hang-s",
        type=float,
        default=180.0,
        help="a request not ended after this long counts as hung",
    )
    parser.add_argument(
        "--drain-s",
        type=float,
        default=60.0,
        help="how long the gauges may take to return to 0 after the load",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="server logs (default: a temp folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    report = run(args, shlex.join(["python", "bench/soak.py", *argv]))
    missed = report["targets_missed"]
    print(json.dumps({k: report[k] for k in ("requests", "completed", "aborted", "disconnected",
                      "lost", "hung", "errors_5xx", "leaked", "greedy_mismatches")}),
          file=sys.stderr)  # fmt: skip
    for line in missed:
        print(f"target missed: {line}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
