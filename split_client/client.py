"""The split-execution client: run the first k decoder layers here, the rest on the server.

`SplitClient` speaks the protocol of `adaptivellm.split_client.protocol` to an AdaptiveLLM server
(`/v1/split/session`). Per generation it opens one WebSocket, declares what this machine can do
(`ClientSpec`), receives the server's `Plan` (the split layer k), runs the embedding and layers
[0, k) of a Llama checkpoint on the prompt, sends the hidden states, and then, for every token
the server samples, runs those layers on that one token (with its own KV cache) until the server
says the generation is finished::

    with SplitClient("http://127.0.0.1:8000", model_path) as client:
        done = client.generate("The river", max_tokens=16)
        print(done.text, done.layer, done.mean_round_trip_s)
        for chunk in client.stream("The river"):  # openai.types.Completion chunks
            print(chunk.choices[0].text, end="")

Only the tensors the client runs are read from the checkpoint (`model.embed_tokens.*` and
`model.layers.{i}.*` for i < k; never the final norm, the LM head or later layers), lazily: the
first plan decides how many layers are loaded, and a later plan with a larger k loads only the
missing ones. The client needs torch, transformers and safetensors, never vLLM. Instances are
not thread-safe: use one per thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoTokenizer, DynamicCache, LlamaConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.protocol import State
from websockets.sync.client import ClientConnection, connect

from adaptivellm.split_client import protocol
from adaptivellm.split_client.planner import ModelShape, ServerProfile, build_costs
from adaptivellm.split_client.planner import Request as PlannerRequest
from adaptivellm.split_client.protocol import (
    INFO_PATH,
    MAX_HEADER_BYTES,
    SESSION_PATH,
    ClientSpec,
    Close,
    Open,
    Plan,
    Prompt,
    Sampling,
    Token,
    Tokens,
    Turn,
)
from adaptivellm.split_client.shapes import DTYPE_BYTES, wire_dtype
from adaptivellm.split_wire import TORCH_DTYPES

if TYPE_CHECKING:
    from openai.types import Completion

logger = logging.getLogger(__name__)
#: Link figures declared when no `client_spec` is given: a fast LAN. Only the FLOP/s (and the
#: memory bandwidth) are measured; pass a `ClientSpec` to describe a slower network.
DEFAULT_UPLINK_BPS: Final = 1e9
DEFAULT_DOWNLINK_BPS: Final = 1e9
DEFAULT_RTT_S: Final = 0.001
#: Seconds to wait for the handshake and for each server message (for a session served whole
#: in one answer, this much for each token the plan allows).
DEFAULT_TIMEOUT_S: Final = 60.0
#: Refusals that say when to come back, and the longest such wait the client sits out.
BUSY_CODES: Final = ("too_many_sessions", "infeasible_sla")
MAX_BUSY_WAIT_S: Final = 30.0
#: Frame limit assumed when the server's `GET /v1/split/info` does not say (uvicorn's WebSocket
#: message limit, the most an AdaptiveLLM server accepts).
DEFAULT_MAX_FRAME_BYTES: Final = 16 << 20
#: Room for a frame's prefix and JSON header when rows are packed under the frame limit.
_FRAME_OVERHEAD: Final = 64 + MAX_HEADER_BYTES

_SCHEMES: Final = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
_CLOSE_TOO_BIG: Final = 1009
_M = TypeVar("_M", bound=nn.Module)
_T = TypeVar("_T", Plan, Token)


# --------------------------------------------------------------------------- errors


class SplitError(RuntimeError):
    """A split session failed. `code` is the server's `Error.code` (see `protocol.ErrorCode`) or
    one of the client's: `prompt_too_long`, `model_mismatch`, `protocol_error`, `timeout`, and
    those of `SplitConnectionError`. `retry_after_s`: with `too_many_sessions`, the server's
    estimate of when a slot frees; with `infeasible_sla`, of when the load that makes the SLA
    unreachable has passed (retry then, or send without an SLA to be served at once)."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


class SplitConnectionError(SplitError):
    """The session could not be opened or was cut: codes `connection_refused`,
    `connection_failed`, `unauthorized`, `not_found`, `handshake_failed`, `connection_closed`."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class StepTiming:
    """Timing of one token: the client's layers (and frame encoding), then send to reply."""

    index: int
    client_compute_s: float
    round_trip_s: float
    server_step_s: float


@dataclass(frozen=True)
class SplitCompletion:
    """One finished split generation. `text` is the server's detokenization (the concatenated
    `Token.text`s, as streamed); `to_openai()` shapes it as an `openai.types.Completion`."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    plan: Plan
    timings: list[StepTiming]
    created: int
    total_s: float
    #: Times the session was reopened after its connection dropped (`SplitClient.resumes`).
    resumes: int = 0
    #: Times the server asked to come back later and the client did (`SplitClient.busy_retries`).
    busy_retries: int = 0

    @property
    def layer(self) -> int:
        """The split layer k: the client ran layers [0, k)."""
        return self.plan.layer

    @property
    def mean_round_trip_s(self) -> float:
        """Mean send-to-token time over the tokens (NaN for none)."""
        return _mean([t.round_trip_s for t in self.timings])

    @property
    def mean_client_compute_s(self) -> float:
        """Mean time the client's layers took per step, prefill included (NaN for none)."""
        return _mean([t.client_compute_s for t in self.timings])

    def to_openai(self) -> Completion:
        """This result as the openai client's `Completion` (needs the `openai` package)."""
        types = _openai_types()
        choice = types.CompletionChoice(
            index=0, text=self.text, finish_reason=self.finish_reason or "length", logprobs=None
        )
        usage = types.CompletionUsage(
            prompt_tokens=len(self.prompt_token_ids),
            completion_tokens=len(self.token_ids),
            total_tokens=len(self.prompt_token_ids) + len(self.token_ids),
        )
        return types.Completion(
            id=_completion_id(self.plan),
            object="text_completion",
            created=self.created,
            model=self.plan.model,
            choices=[choice],
            usage=usage,
        )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _completion_id(plan: Plan) -> str:
    return f"cmpl-split-{plan.session_id}"


def _openai_types() -> Any:
    try:
        import openai.types
    except ImportError as exc:
        raise ImportError(
            "openai-shaped results need the openai package (pip install openai); "
            "generate() and its SplitCompletion work without it"
        ) from exc
    return openai.types


# --------------------------------------------------------------------------- the client's layers


class _Checkpoint:
    """Reads single tensors from a (possibly sharded) safetensors checkpoint, recording names."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise FileNotFoundError(f"no model.safetensors (or its index) in {folder}")
        self.read_names: list[str] = []

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors (each read once from its file)."""
        missing = [name for name in names if name not in self.files]
        if missing:
            raise KeyError(f"checkpoint lacks tensors {missing[:4]}")
        out: dict[str, torch.Tensor] = {}
        for path in sorted({self.files[name] for name in names}):
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    if self.files[name] == path:
                        out[name] = f.get_tensor(name)
                        self.read_names.append(name)
        return out

    def with_prefix(self, prefix: str) -> list[str]:
        """Names of the tensors under `prefix`, sorted."""
        return sorted(name for name in self.files if name.startswith(prefix))


class ClientModel:
    """The client's share of a Llama checkpoint: the embedding and decoder layers [0, k), loaded
    on demand, with no final norm. `hidden_states` returns the residual stream entering layer k
    (what a Hugging Face decoder returns after layer k-1)."""

    def __init__(self, model_path: str | Path, dtype: str = "float32") -> None:
        folder = Path(model_path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {folder}: not a model folder")
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(TORCH_DTYPES)}")
        self.config = LlamaConfig.from_pretrained(str(folder))
        if self.config.model_type != "llama":
            raise ValueError(f"{folder} holds a {self.config.model_type!r} model; need llama")
        self.config._attn_implementation = "sdpa"
        self.dtype = TORCH_DTYPES[dtype]
        self.checkpoint = _Checkpoint(folder)
        self._prefix = "model." if "model.embed_tokens.weight" in self.checkpoint.files else ""
        self.rotary = LlamaRotaryEmbedding(config=self.config)
        self.embed: nn.Embedding | None = None
        self.layers = nn.ModuleList()
        #: The planner's view of the model (what the calibration prices).
        self.shape = ModelShape.from_hf_config(folder)

    @property
    def num_layers(self) -> int:
        """Decoder layers of the whole model."""
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream."""
        return int(self.config.hidden_size)

    @property
    def tensors_read(self) -> list[str]:
        """Names of every checkpoint tensor read so far, in reading order."""
        return list(self.checkpoint.read_names)

    def ensure_layers(self, k: int) -> None:
        """Load the embedding and layers [0, k) unless already loaded."""
        if not 0 <= k <= self.num_layers:
            raise ValueError(f"layer {k} out of range [0, {self.num_layers}]")
        if self.embed is None:
            vocab, width = int(self.config.vocab_size), self.hidden_size
            self.embed = self._load("embed_tokens.", lambda: nn.Embedding(vocab, width))
        for i in range(len(self.layers), k):
            build = functools.partial(LlamaDecoderLayer, self.config, i)
            self.layers.append(self._load(f"layers.{i}.", build))

    def _load(self, prefix: str, build: Callable[[], _M]) -> _M:
        """Build a module without allocating it, then assign its tensors from the checkpoint."""
        full = self._prefix + prefix
        names = self.checkpoint.with_prefix(full)
        state = {n[len(full) :]: t.to(self.dtype) for n, t in self.checkpoint.read(names).items()}
        with torch.device("meta"):
            module = build()
        module.load_state_dict(state, strict=True, assign=True)
        return module.eval()

    def hidden_states(self, token_ids: list[int], k: int, cache: DynamicCache) -> torch.Tensor:
        """(tokens, hidden) residual stream entering layer k for `token_ids`, which follow the
        tokens already in `cache` (positions continue from there); the cache is updated."""
        return self._forward(token_ids, k, cache)[-1]

    def layer_states(self, token_ids: list[int], k: int | None = None) -> torch.Tensor:
        """(k + 1, tokens, hidden): the residual stream entering each layer 0..k (default: every
        layer, k = num_layers) for `token_ids` from position 0. What a replay of this client
        sends at any split (bench/split_serving.py precomputes it)."""
        k = self.num_layers if k is None else k
        return torch.stack(self._forward(token_ids, k, DynamicCache(), keep_all=True))

    @torch.no_grad()
    def _forward(
        self, token_ids: list[int], k: int, cache: DynamicCache, keep_all: bool = False
    ) -> list[torch.Tensor]:
        """The residual stream entering layer k (with `keep_all`, entering each layer 0..k)."""
        self.ensure_layers(k)
        assert self.embed is not None
        ids = torch.tensor([token_ids], dtype=torch.long)
        hidden = self.embed(ids)
        kept = [hidden[0]]
        if k == 0:
            return kept
        past = cache.get_seq_length()
        positions = torch.arange(past, past + len(token_ids)).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=None,
            past_key_values=cache,
            position_ids=positions,
        )
        rope = self.rotary(hidden, position_ids=positions)
        for layer in self.layers[:k]:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=rope,
            )
            kept = [*kept, hidden[0]] if keep_all else [hidden[0]]
        return kept


# --------------------------------------------------------------------------- measuring

#: Weight of each generation in the client's calibration (running mean).
CALIBRATION_WEIGHT = 0.3


def scaled_spec(spec: ClientSpec, slowdown: float) -> ClientSpec:
    """`spec` for a machine `slowdown` times slower than declared."""
    return dataclasses.replace(
        spec,
        flops_per_s=spec.flops_per_s / slowdown,
        mem_bytes_per_s=spec.mem_bytes_per_s / slowdown,
        layer_overhead_s=spec.layer_overhead_s * slowdown,
    )


def predicted_client_s(
    shape: ModelShape, spec: ClientSpec, prompt_tokens: int, done: SplitCompletion
) -> float:
    """The planner's prediction of the client's time for a finished generation."""
    request = PlannerRequest(prompt_tokens, len(done.token_ids), math.inf)
    costs = build_costs(shape, spec, ServerProfile(), request)
    # The client runs layers [0, k) for the prompt and every token but the last.
    return float(costs.client_time[: done.layer].sum())


def measure_client_spec(
    uplink_bps: float = DEFAULT_UPLINK_BPS,
    downlink_bps: float = DEFAULT_DOWNLINK_BPS,
    rtt_s: float = DEFAULT_RTT_S,
) -> ClientSpec:
    """Describe this machine: FLOP/s from a timed float32 matmul (about 50 ms), memory
    bandwidth from a timed 32 MiB copy, the fixed time of one decoder layer's forward pass
    (eager PyTorch: dozens of small kernels, which dominates a decode step of a small model),
    and the memory it has free for the model's layers (`available_memory_bytes`); the link
    figures are given, not measured."""
    return ClientSpec(
        flops_per_s=measure_flops(),
        uplink_bps=uplink_bps,
        downlink_bps=downlink_bps,
        rtt_s=rtt_s,
        mem_bytes_per_s=measure_memory_bandwidth(),
        layer_overhead_s=measure_layer_overhead(),
        memory_bytes=available_memory_bytes(),
    )


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> float:
    """Memory this machine can give the client's layers (their weights and KV cache): Linux's
    MemAvailable (what can be allocated without swapping); inf where it cannot be read."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                kib = float(line.split()[1])
                return kib * 1024 if kib > 0 else math.inf
    except (OSError, ValueError, IndexError):
        pass
    return math.inf


@torch.no_grad()
def measure_layer_overhead(repeats: int = 30) -> float:
    """Seconds of one decode step (one token) through a tiny Llama decoder layer with a KV
    cache: the per-layer cost that FLOPs and bytes do not account for. Median of `repeats`."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
        num_hidden_layers=1, vocab_size=16,
    )  # fmt: skip
    config._attn_implementation = "sdpa"  # what ClientModel runs (unset: transformers warns)
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    rotary = LlamaRotaryEmbedding(config)
    cache = DynamicCache()
    times = []
    for step in range(repeats + 1):
        hidden = torch.randn(1, 1, 64)
        positions = torch.tensor([[step]])
        began = time.perf_counter()
        layer(
            hidden,
            attention_mask=None,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            position_embeddings=rotary(hidden, position_ids=positions),
        )
        times.append(time.perf_counter() - began)
    return float(np.median(times[1:]))  # the first call pays one-off set-up


@torch.no_grad()
def measure_flops(n: int = 384, budget_s: float = 0.05) -> float:
    """float32 matmul FLOP/s of this machine (n x n by n x n, repeated for about `budget_s`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget_s or count < 2:
        torch.mm(a, b)
        count += 1
    return 2.0 * n**3 * count / elapsed


def measure_memory_bandwidth(nbytes: int = 32 << 20, repeats: int = 3) -> float:
    """Bytes/s of a large tensor copy (read plus write), best of `repeats`."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2.0 * nbytes / max(best, 1e-9)


# --------------------------------------------------------------------------- the session client


def session_url(url: str) -> str:
    """The WebSocket URL of the split session for a server base URL: `http://host:8000` (or
    `.../v1`, the openai client's base URL) -> `ws://host:8000/v1/split/session`."""
    parts = urlsplit(url)
    scheme = _SCHEMES.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"server URL must look like http://HOST:PORT, got {url!r}")
    path = parts.path.rstrip("/")
    if path.endswith(SESSION_PATH):
        path = path[: -len(SESSION_PATH)]
    elif path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urlunsplit((scheme, parts.netloc, path + SESSION_PATH, "", ""))


@dataclass(frozen=True)
class _Step:
    plan: Plan
    token: Token
    timing: StepTiming


@dataclass
class _Request:
    prompt_ids: list[int]
    open: Open
    created: int = field(default_factory=lambda: int(time.time()))
    resumes: int = 0
    busy_retries: int = 0
    started: float = field(default_factory=time.perf_counter)


@dataclass
class _Replay:
    """What a dropped session needs to go on in a new one: the layer-k inputs already sent, the
    token ids whose inputs are still to send, the client's KV cache over the sent ones, and the
    tokens delivered so far."""

    pending_ids: list[int]
    cache: DynamicCache = field(default_factory=DynamicCache)
    sent: list[np.ndarray] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)
    layer: int | None = None
    #: The first of `sent` that the next prefill carries: 0 for a new (or resumed) session,
    #: the turn's first rows for a follow-up turn of a conversation (the server holds the rest).
    prefill_from: int = 0

    @property
    def rows(self) -> int:
        """Rows the next new session's prefill carries: every one sent, and those pending."""
        return sum(len(rows) for rows in self.sent) + len(self.pending_ids)


class SplitClient:
    """Generate with an AdaptiveLLM server by split execution (module docstring for the flow).

    `url` is the server's base URL (`http://HOST:PORT`); `model_path` the same checkpoint the
    server serves (only the layers this client runs are read). `api_key` is the server's
    `--api-key`. `client_spec` declares this machine to the server's planner; None measures the
    FLOP/s and memory bandwidth on first use and declares a 1 Gbit/s, 1 ms link
    (`DEFAULT_UPLINK_BPS`, `DEFAULT_DOWNLINK_BPS`, `DEFAULT_RTT_S`). `layer` forces k for every
    generation (None: the server plans it) and `sla_s` is the default end-to-end latency SLA;
    both can be overridden per call. `dtype` is the compute dtype of the client's layers
    (frames travel in the plan's dtype). `model` names the served model (None: the default).
    A prompt whose hidden states exceed the server's frame limit goes in several prefill frames;
    `max_frame_bytes` None asks the server once (`GET /v1/split/info`, falling back to
    `DEFAULT_MAX_FRAME_BYTES` if it does not answer). `memory_bytes` is what this machine can
    give the model's layers (their weights and their KV cache for the request); the planner
    never asks for more layers than fit. None declares the spec's figure (measured:
    MemAvailable). A refusal that says when to come back (`too_many_sessions`,
    `infeasible_sla`) is waited out and retried `busy_retries` times, with what is left of the
    SLA. With `prompt_ids` (default) a session the server serves whole (k = 0) sends the
    prompt's token ids rather than its embeddings, and loads none of the model here. With
    `one_answer` (default) `generate()` without `on_token` gets such a session's tokens in one
    message at the end; False for a server older than that.

    With `calibrate` (default), each finished `generate()` compares the time this client's
    layers really took with what the planner's cost model predicts from the declared spec, and
    scales the declared FLOP/s, memory bandwidth and per-layer overhead by a running mean of
    that ratio (`calibration`); it also declares as its RTT the measured per-token time outside
    both sides' compute, when that is longer than the declared one. A client slowed by other
    work on its machine, or behind a slower link, stops promising speed it does not have, so
    the server's plans keep meeting their SLAs.
    """

    def __init__(
        self,
        url: str,
        model_path: str | Path,
        *,
        api_key: str | None = None,
        client_spec: ClientSpec | None = None,
        layer: int | None = None,
        sla_s: float | None = None,
        dtype: str = "float32",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        model: str | None = None,
        max_frame_bytes: int | None = None,
        calibrate: bool = True,
        resumes: int = 3,
        memory_bytes: float | None = None,
        busy_retries: int = 2,
        prompt_ids: bool = True,
        one_answer: bool = True,
    ) -> None:
        if memory_bytes is not None and not (memory_bytes > 0):  # also NaN
            raise ValueError(f"memory_bytes must be > 0, got {memory_bytes!r}")
        self.url = session_url(url)
        self.info_url = self.url.replace("ws", "http", 1).removesuffix(SESSION_PATH) + INFO_PATH
        self.model = ClientModel(model_path, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.api_key = api_key
        self.layer = layer
        self.sla_s = sla_s
        self.timeout_s = timeout_s
        self.served_model = model
        self._spec = client_spec
        #: Overrides the declared (or measured) memory for the model's layers; None keeps it.
        self.memory_bytes = memory_bytes
        self._max_frame_bytes = max_frame_bytes
        self._open: list[ClientConnection] = []
        self.calibrate = calibrate
        #: How many times a session whose connection drops is reopened (0: never).
        self.resumes = resumes
        #: How many times a refusal with a retry-after hint is waited out and retried (0: never).
        self.busy_retries = busy_retries
        #: Offer to send the prompt as token ids when the server runs every layer (k = 0), as
        #: an ordinary request does, instead of their embeddings (Open.prompt_ids). False for a
        #: server older than the field (it refuses an Open that names it).
        self.prompt_ids = prompt_ids
        #: `generate()` without `on_token` asks for a session the server serves whole (k = 0)
        #: in one message at the end (Open.stream false), not a message a token. False for a
        #: server older than the field (it refuses an Open that names it).
        self.one_answer = one_answer
        #: Running mean of (measured / predicted) time of this client's layers; 1 = as declared.
        self.calibration = 1.0
        #: Running mean of the per-token time outside both sides' compute (round trip minus the
        #: server's step): the link and the I/O of both ends, as this client sees them.
        self.measured_rtt_s: float | None = None

    @property
    def client_spec(self) -> ClientSpec:
        """What this client declares to the planner: given or measured once, then scaled by
        `calibration`."""
        if self._spec is None:
            self._spec = measure_client_spec()
        spec = scaled_spec(self._spec, self.calibration)
        if self.memory_bytes is not None:
            spec = dataclasses.replace(spec, memory_bytes=self.memory_bytes)
        if self.measured_rtt_s is not None and self.measured_rtt_s > spec.rtt_s:
            spec = dataclasses.replace(spec, rtt_s=self.measured_rtt_s)
        return spec

    def _calibrate(self, done: SplitCompletion) -> None:
        """Fold one generation's measured client time into `calibration`, and its per-token time
        outside both sides' compute into `measured_rtt_s`."""
        if not self.calibrate or done.layer == 0 or not done.token_ids:
            return
        gaps = [t.round_trip_s - t.server_step_s for t in done.timings[1:]]
        if gaps:
            gap = max(0.0, float(np.median(gaps)))
            previous = self.measured_rtt_s if self.measured_rtt_s is not None else gap
            self.measured_rtt_s = previous + CALIBRATION_WEIGHT * (gap - previous)
        measured = sum(t.client_compute_s for t in done.timings)
        predicted = predicted_client_s(
            self.model.shape, self.client_spec, len(done.prompt_token_ids), done
        )
        if predicted > 0 and math.isfinite(measured / predicted):
            ratio = self.calibration * measured / predicted
            self.calibration += CALIBRATION_WEIGHT * (ratio - self.calibration)

    def info(self) -> dict[str, Any]:
        """The server's `GET /v1/split/info`: model, layers, dtype and limits such as
        `max_frame_bytes`. Raises `SplitConnectionError` (or `SplitError`) on failure."""
        request = urllib.request.Request(self.info_url, headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            exc.close()  # its open response would hold the connection
            raise _status_error(exc.code, self.info_url, self.api_key) from None
        except (urllib.error.URLError, OSError) as exc:
            raise SplitConnectionError(
                "connection_failed", f"cannot read {self.info_url}: {exc}"
            ) from None
        except ValueError:
            raise SplitError("protocol_error", f"{self.info_url} did not answer JSON") from None
        if not isinstance(body, dict):
            raise SplitError("protocol_error", f"{self.info_url} did not answer a JSON object")
        return body

    @property
    def max_frame_bytes(self) -> int:
        """Largest binary frame the server accepts (asked once, see the class docstring)."""
        if self._max_frame_bytes is None:
            try:
                limit = self.info().get("max_frame_bytes", DEFAULT_MAX_FRAME_BYTES)
            except SplitError:
                limit = DEFAULT_MAX_FRAME_BYTES
            ok = isinstance(limit, int) and limit > _FRAME_OVERHEAD
            self._max_frame_bytes = limit if ok else DEFAULT_MAX_FRAME_BYTES
        return self._max_frame_bytes

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt: strings are tokenized as vLLM does for completions (with the
        tokenizer's special tokens); id lists are checked against the vocabulary."""
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = [int(i) for i in prompt]
        vocab = int(self.model.config.vocab_size)
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        return ids

    def generate(
        self,
        prompt: str | list[int],
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        ignore_eos: bool = False,
        layer: int | None = None,
        sla_s: float | None = None,
        on_token: Callable[[Token], None] | None = None,
    ) -> SplitCompletion:
        """Generate up to `max_tokens` tokens; `on_token` sees each token as it arrives.
        `layer` and `sla_s` override the instance defaults. Raises `SplitError`. Without
        `on_token`, a session the server serves whole (k = 0) comes back in one message at the
        end, as an ordinary request's answer does (`Open.stream`)."""
        sampling = Sampling(temperature, top_p, top_k, seed, ignore_eos)
        stream = on_token is not None or not self.one_answer
        request = self._request(prompt, max_tokens, sampling, layer, sla_s, stream=stream)
        start = time.perf_counter()
        steps: list[_Step] = []
        with contextlib.closing(self._steps(request)) as session:
            for step in session:
                steps.append(step)
                if on_token is not None:
                    on_token(step.token)
        done = _completion(request, steps, time.perf_counter() - start)
        self._calibrate(done)
        return done

    def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> SplitCompletion:
        """`generate` on a conversation: `messages` (`{"role": ..., "content": ...}`, as the
        openai client sends them) go through the model's chat template with the assistant's
        turn opened, as vLLM's `/v1/chat/completions` does, so greedy output equals the server's
        chat completion. Keyword arguments are `generate`'s."""
        return self.generate(self.chat_prompt(messages), **kwargs)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` through the model's chat template (ValueError if the
        messages are malformed or the model has no template)."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content} objects")
        for m in messages:
            if not (
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                raise ValueError(f"each message needs a string role and content, got {m!r}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the model has no chat template; use generate() with a prompt")
        # As vLLM's chat endpoint: the template rendered to text, then tokenized without
        # adding special tokens (the template writes its own).
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        ids = self.tokenizer(str(text), add_special_tokens=False)["input_ids"]
        return self.encode([int(i) for i in ids])

    def stream(
        self,
        prompt: str | list[int],
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        ignore_eos: bool = False,
        layer: int | None = None,
        sla_s: float | None = None,
    ) -> Generator[Completion, None, None]:
        """Like `generate`, as the openai client's streamed `Completion` chunks: one per token,
        `choices[0].text` the token's text, `finish_reason` set on the last. Needs `openai`.
        The session opens at the first `next()`; `close()` on the generator (or on the client)
        before the end ends the session, and the server frees it."""
        types = _openai_types()
        sampling = Sampling(temperature, top_p, top_k, seed, ignore_eos)
        request = self._request(prompt, max_tokens, sampling, layer, sla_s)
        return (_chunk(types, request, step) for step in self._steps(request))

    def conversation(
        self, *, layer: int | None = None, sla_s: float | None = None
    ) -> SplitConversation:
        """A multi-turn session (`SplitConversation`): each `send` or `chat` is a turn, and the
        conversation's KV cache stays on both sides between turns. `layer` and `sla_s` as in
        `generate`; the first turn's plan sets k for the whole conversation, and `sla_s` holds
        for each turn (the server counts every turn against it on /metrics)."""
        return SplitConversation(self, layer=layer, sla_s=sla_s)

    def close(self) -> None:
        """End the sessions still open (abandoned streams); the loaded layers stay cached."""
        while self._open:
            _hang_up(self._open.pop())

    def __enter__(self) -> SplitClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------- one session

    def _request(
        self,
        prompt: str | list[int],
        max_tokens: int,
        sampling: Sampling,
        layer: int | None,
        sla_s: float | None,
        *,
        stream: bool = True,
    ) -> _Request:
        ids = self.encode(prompt)
        message = Open(
            prompt_tokens=len(ids),
            max_tokens=max_tokens,
            client=self.client_spec,
            sla_s=self.sla_s if sla_s is None else sla_s,
            layer=self.layer if layer is None else layer,
            model=self.served_model,
            sampling=sampling,
            prompt_ids=self.prompt_ids,
            stream=stream,
        )
        return _Request(ids, message)

    def _steps(self, request: _Request) -> Generator[_Step, None, None]:
        """The session's tokens. If its connection drops (not an error the server sent), a new
        session goes on from there, at the same k: the client replays the layer-k inputs it
        has sent, then the last token's (as Petals' client replays after a server failure).
        Greedy output is the same as without the drop."""
        replay = _Replay(pending_ids=list(request.prompt_ids))
        while True:
            try:
                yield from self._session(request, replay)
                return
            except SplitConnectionError:
                if request.resumes >= self.resumes or replay.layer is None:
                    raise
                request.resumes += 1
                logger.warning(
                    "split session dropped after %d tokens; resuming (%d of %d)",
                    len(replay.delivered), request.resumes, self.resumes,
                )  # fmt: skip
                time.sleep(min(2.0, 0.25 * 2**request.resumes))
            except SplitError as exc:
                if replay.layer is not None or not self._come_back_later(request, exc):
                    raise

    def _come_back_later(self, request: _Request, exc: SplitError) -> bool:
        """After a refusal that says when to come back (`too_many_sessions`,
        `infeasible_sla`), wait that long and let the caller try again, `busy_retries` times;
        an SLA shrinks by the time spent, and is not retried once nothing of it would be left.
        Returns False to raise the refusal."""
        if exc.code not in BUSY_CODES or exc.retry_after_s is None:
            return False
        if request.busy_retries >= self.busy_retries:
            return False
        wait = min(exc.retry_after_s, MAX_BUSY_WAIT_S)
        opened = request.open
        if opened.sla_s is not None:
            left = opened.sla_s - (time.perf_counter() - request.started) - wait
            if left <= 0:
                return False
            # The retry asks for what will be left of the SLA (its clock started at the call).
            request.open = dataclasses.replace(opened, sla_s=left)
        request.busy_retries += 1
        logger.info("split server busy (%s); retrying in %.1f s (%d of %d)",
                    exc.code, wait, request.busy_retries, self.busy_retries)  # fmt: skip
        time.sleep(wait)
        return True

    def _session(self, request: _Request, replay: _Replay) -> Iterator[_Step]:
        """One connection's share of the session (all of it, unless the connection drops)."""
        opened = request.open
        if replay.layer is not None:  # a resumed session runs at the k it ran at
            opened = dataclasses.replace(opened, layer=replay.layer)
        if replay.delivered:
            opened = dataclasses.replace(
                opened,
                prompt_tokens=len(request.prompt_ids) + len(replay.delivered),
                max_tokens=opened.max_tokens - len(replay.delivered),
            )
        connection, plan = self._start(opened, [*request.prompt_ids, *replay.delivered])
        try:
            _check_resumed_layer(plan, replay)
            replay.layer = plan.layer
            offset = len(replay.delivered)
            for step in self._exchange(connection, plan, replay, one_answer=not opened.stream):
                yield _shifted(step, offset)
        finally:
            if connection in self._open:
                self._open.remove(connection)
                _hang_up(connection)

    def _start(self, opened: Open, context: list[int]) -> tuple[ClientConnection, Plan]:
        """A new session: connect, send `opened`, and return the connection (in `_open`; the
        caller hangs it up) with the server's Plan, checked against this model and `context`
        (the token ids the session's prompt carries), once the client's layers of the plan are
        loaded (none when the prompt goes up as token ids). On any failure the connection is
        hung up."""
        connection = self._connect()
        self._open.append(connection)
        try:
            _send(connection, protocol.encode_message(opened), self.timeout_s)
            plan = self._check_plan(
                _expect(connection, Plan, self.timeout_s), _Request(context, opened)
            )
            if not plan.prompt_ids:
                self.model.ensure_layers(plan.layer)
            return connection, plan
        except BaseException:
            self._open.remove(connection)
            _hang_up(connection)
            raise

    def _exchange(
        self, connection: ClientConnection, plan: Plan, replay: _Replay, one_answer: bool = False
    ) -> Iterator[_Step]:
        """The session's tokens on `connection`. With `one_answer` (`Open.stream` false) the
        server may keep every token of a session it serves whole for one message at the end,
        so that wait is `timeout_s` a token of the plan's, not `timeout_s`."""
        first_wait_s = self.timeout_s * (plan.max_tokens if one_answer else 1)
        if plan.prompt_ids:
            yield from self._exchange_ids(connection, plan, replay, first_wait_s)
            return
        wire = wire_dtype(plan.dtype)
        row_bytes = plan.hidden_size * DTYPE_BYTES[wire]
        rows = max(1, (self.max_frame_bytes - _FRAME_OVERHEAD) // row_bytes)
        kind: protocol.FrameKind = "prefill"
        for _ in range(plan.max_tokens):
            start = time.perf_counter()
            if replay.pending_ids:  # empty when a drop came after they were sent
                fresh = self.model.hidden_states(replay.pending_ids, plan.layer, replay.cache)
                replay.sent.append(fresh.float().numpy())
                replay.pending_ids = []
            # A new session's prefill replays every row sent before (a resumed session).
            if kind == "prefill":
                hidden = np.concatenate(replay.sent[replay.prefill_from :])
            else:
                hidden = replay.sent[-1]
            frames = [
                protocol.encode_frame(kind, hidden[i : i + rows], wire)
                for i in range(0, len(hidden), rows)
            ]
            sent = time.perf_counter()
            for frame in frames:
                _send(connection, frame, self.timeout_s)
            if plan.server_decodes:  # k = 0: perhaps the whole answer at once (Open.stream)
                first = _expect_token(connection, plan, first_wait_s, sent - start)
                if isinstance(first, list):
                    for step in first:
                        replay.delivered.append(step.token.token_id)
                        yield step
                    return
                token = first.token
            else:
                token = _expect(connection, Token, self.timeout_s)
            timing = StepTiming(
                token.index, sent - start, time.perf_counter() - sent, token.server_step_s
            )
            replay.delivered.append(token.token_id)
            yield _Step(plan, token, timing)
            if token.finish_reason is not None:
                return
            if plan.server_decodes:  # k = 0: the server streams the rest, nothing to send
                replay.pending_ids = [token.token_id]  # the server's inputs, for a resume
                for step in _server_stream(connection, plan, self.timeout_s):
                    replay.delivered.append(step.token.token_id)
                    replay.pending_ids.append(step.token.token_id)
                    yield step
                return
            kind, replay.pending_ids = "decode", [token.token_id]
        raise SplitError(
            "protocol_error", f"the server sent {plan.max_tokens} tokens without finishing"
        )

    def _exchange_ids(
        self, connection: ClientConnection, plan: Plan, replay: _Replay, first_wait_s: float
    ) -> Iterator[_Step]:
        """k = 0 with `Plan.prompt_ids`: the prompt goes up as token ids, and the server decodes
        on its own. `replay.pending_ids` stays every id the server's inputs hold (the prompt,
        then each token delivered), so a resumed session sends them all, as ids or, where its
        plan asks for embeddings, as those."""
        if replay.sent:  # embeddings went up before; a plan for ids cannot go on from them
            raise SplitError(
                "protocol_error", "the server asked for token ids in a session that sent embeddings"
            )
        start = time.perf_counter()
        _send(connection, protocol.encode_message(Prompt(list(replay.pending_ids))), self.timeout_s)
        first = _expect_token(connection, plan, first_wait_s, time.perf_counter() - start)
        steps: Iterable[_Step]
        if isinstance(first, list):  # the whole answer at once (Open.stream False)
            steps = first
        elif first.token.finish_reason:
            steps = [first]
        else:
            steps = itertools.chain([first], _server_stream(connection, plan, self.timeout_s))
        for step in steps:
            replay.delivered.append(step.token.token_id)
            replay.pending_ids.append(step.token.token_id)
            yield step

    def _check_plan(self, plan: Plan, request: _Request) -> Plan:
        model = self.model
        if (plan.num_layers, plan.hidden_size) != (model.num_layers, model.hidden_size):
            raise SplitError(
                "model_mismatch",
                f"the server's model has {plan.num_layers} layers of width {plan.hidden_size}; "
                f"{model.num_layers} of width {model.hidden_size} here: use the same checkpoint",
            )
        if not 0 <= plan.layer <= plan.num_layers:
            raise SplitError("protocol_error", f"plan layer {plan.layer} is out of range")
        if len(request.prompt_ids) > plan.max_prompt_tokens:
            raise SplitError(
                "prompt_too_long",
                f"the prompt has {len(request.prompt_ids)} tokens; the server accepts at most "
                f"{plan.max_prompt_tokens}",
            )
        return plan

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _connect(self) -> ClientConnection:
        try:
            return connect(
                self.url,
                additional_headers=self._headers(),
                open_timeout=self.timeout_s,
                compression=None,
                legacy=True,  # a plain connection; `with connect()` does not fit a stream
            )
        except InvalidStatus as exc:
            raise _status_error(exc.response.status_code, self.url, self.api_key) from None
        except ConnectionRefusedError:
            raise SplitConnectionError(
                "connection_refused",
                f"connection refused by {self.url}: is the server running on that port?",
            ) from None
        except TimeoutError:
            raise SplitError(
                "timeout", f"no handshake from {self.url} in {self.timeout_s:g} s"
            ) from None
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            raise SplitConnectionError(
                "connection_failed", f"cannot open {self.url}: {exc}"
            ) from None


def _check_resumed_layer(plan: Plan, replay: _Replay) -> None:
    """A resumed session must run at the k its inputs were computed for."""
    if replay.layer is not None and plan.layer != replay.layer:
        raise SplitError(
            "protocol_error", f"resumed at layer {plan.layer}; the session ran at {replay.layer}"
        )


def _shifted(step: _Step, offset: int) -> _Step:
    """`step` of a resumed session, numbered after the `offset` tokens delivered before."""
    if not offset:
        return step
    index = offset + step.token.index
    token = dataclasses.replace(step.token, index=index)
    return _Step(step.plan, token, dataclasses.replace(step.timing, index=index))


class SplitConversation:
    """A multi-turn split session (`SplitClient.conversation()`).

    Each `send` is a turn: its prompt follows everything said so far. The first turn opens a
    session that asks the server to keep it (`Open.multi_turn`); the server grants that for
    split sessions (k > 0). Then the server keeps the conversation's KV cache and this client
    keeps its cache of layers [0, k), and a later turn sends a `Turn` and the hidden states of
    its new tokens only (the last reply's final token first: it was never fed back). Where
    the server does not keep the session (k = 0, an idle timeout, a refused turn, a restart),
    the next turn opens a new session with the whole conversation as its prompt: the output is
    the same, only the reuse is lost. `sessions` counts the sessions opened and
    `reused_tokens` the tokens a turn did not send again. A session whose connection drops
    mid-turn is resumed as `generate` resumes (up to `SplitClient.resumes` times): a new
    session at the same k, whose prefill replays the layer-k inputs of the whole conversation
    (the client keeps them), goes on with the turn and keeps serving later turns;
    `SplitCompletion.resumes` counts it. A server older than `Open.multi_turn` refuses it
    (`bad_request`, unknown field): use `generate` per turn there.
    """

    def __init__(self, client: SplitClient, *, layer: int | None, sla_s: float | None) -> None:
        self.client = client
        self.layer = layer
        self.sla_s = sla_s
        #: Every token of the conversation so far: each turn's prompt and reply.
        self.history: list[int] = []
        self.sessions = 0
        self.reused_tokens = 0
        self._connection: ClientConnection | None = None
        self._plan: Plan | None = None
        self._replay: _Replay | None = None

    def send(
        self,
        prompt: str | list[int],
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        ignore_eos: bool = False,
        on_token: Callable[[Token], None] | None = None,
    ) -> SplitCompletion:
        """One turn: `prompt` (text is tokenized as `generate` does, special tokens
        included; pass ids to control them) after the conversation so far. Raises
        `SplitError`."""
        ids = self.client.encode(prompt)
        sampling = Sampling(temperature, top_p, top_k, seed, ignore_eos)
        request = self.client._request(ids, max_tokens, sampling, self.layer, self.sla_s)
        start = time.perf_counter()
        steps: list[_Step] = []

        def take(step: _Step) -> None:
            steps.append(step)
            if on_token is not None:
                on_token(step.token)

        try:
            self._turn(ids, request, take, steps)
        except BaseException:
            self._end()
            raise
        self.history += ids + [step.token.token_id for step in steps]
        done = _completion(request, steps, time.perf_counter() - start)
        self.client._calibrate(done)
        return done

    def _turn(
        self, ids: list[int], request: _Request, take: Callable[[_Step], None], steps: list[_Step]
    ) -> None:
        """One turn's tokens (`take` appends each to `steps`): a follow-up on the kept session,
        or a new session carrying the whole conversation; a connection that drops once the
        turn's first token has come is resumed."""
        try:
            if self._connection is None or not self._follow_up_or_end(ids, request, take, steps):
                self._open(self.history + ids, request.open, take)
        except SplitConnectionError as exc:
            if not steps:
                raise
            self._resume(request, take, exc)  # dropped mid-turn

    def _follow_up_or_end(
        self, ids: list[int], request: _Request, take: Callable[[_Step], None], steps: list[_Step]
    ) -> bool:
        """The turn as a follow-up on the kept session. False, with the session ended, when the
        server let it go before the turn's first token (an idle timeout, a restart): the turn
        then starts over in a new session."""
        try:
            self._follow_up(ids, request.open, take)
        except SplitConnectionError:
            if steps:
                raise
            self._end()
            return False
        return True

    def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> SplitCompletion:
        """A turn of a chat: `messages` is the whole conversation (as the openai client sends
        it), rendered with the chat template as `SplitClient.chat` does. When the conversation
        so far is a prefix of the rendering, only the rest is sent; otherwise (the template
        renders a reply differently from the tokens generated) the conversation starts over
        with the rendering. Keyword arguments are `send`'s."""
        ids = self.client.chat_prompt(messages)
        if (
            self.history
            and ids[: len(self.history)] == self.history
            and len(ids) > len(self.history)
        ):
            return self.send(ids[len(self.history) :], **kwargs)
        self.close()
        self.history = []
        return self.send(ids, **kwargs)

    def close(self) -> None:
        """End the session (the server frees its KV cache); the history stays."""
        self._end()

    def __enter__(self) -> SplitConversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, context: list[int], opened: Open, take: Callable[[_Step], None]) -> None:
        client = self.client
        opened = dataclasses.replace(opened, prompt_tokens=len(context), multi_turn=True)
        self.sessions += 1
        connection, plan = client._start(opened, context)
        self._connection = connection
        self._plan = plan
        self._replay = replay = _Replay(pending_ids=list(context), layer=plan.layer)
        for step in client._exchange(connection, plan, replay):
            take(step)
        if not plan.multi_turn:
            self._end()

    def _resume(self, request: _Request, take: Callable[[_Step], None], exc: Exception) -> None:
        """Go on with a turn whose connection dropped (`exc`) in a new session at the same k,
        replaying the conversation's layer-k inputs; raises the last drop once
        `SplitClient.resumes` are spent."""
        client, error = self.client, exc
        while self._replay is not None and request.resumes < client.resumes:
            request.resumes += 1
            logger.warning(
                "split conversation dropped after %d tokens of a turn; resuming (%d of %d)",
                len(self._replay.delivered), request.resumes, client.resumes,
            )  # fmt: skip
            self._hang_up()
            time.sleep(min(2.0, 0.25 * 2**request.resumes))
            try:
                self._reopen(request, take)
                return
            except SplitConnectionError as again:
                error = again
        raise error

    def _reopen(self, request: _Request, take: Callable[[_Step], None]) -> None:
        """A new session that replays every layer-k input of the conversation, then finishes
        the turn (the tokens still to come)."""
        client, replay = self.client, self._replay
        assert replay is not None
        opened = dataclasses.replace(
            request.open,
            prompt_tokens=replay.rows,
            max_tokens=request.open.max_tokens - len(replay.delivered),
            layer=replay.layer,
            multi_turn=True,
        )
        self.sessions += 1
        context = self.history + request.prompt_ids + replay.delivered
        connection, plan = client._start(opened, context)
        self._connection = connection
        _check_resumed_layer(plan, replay)
        self._plan, replay.prefill_from = plan, 0
        offset = len(replay.delivered)
        for step in client._exchange(connection, plan, replay):
            take(_shifted(step, offset))
        if not plan.multi_turn:
            self._end()

    def _follow_up(self, ids: list[int], opened: Open, take: Callable[[_Step], None]) -> None:
        assert self._connection is not None and self._plan is not None
        replay = self._replay
        assert replay is not None and replay.delivered
        turn = Turn(prompt_tokens=len(ids), max_tokens=opened.max_tokens, sampling=opened.sampling)
        _send(self._connection, protocol.encode_message(turn), self.client.timeout_s)
        # The last reply's final token was never fed back: it goes first, then the new prompt.
        # The rows sent before stay (a resumed session replays them); the server holds them.
        replay.pending_ids, replay.prefill_from = [replay.delivered[-1], *ids], len(replay.sent)
        replay.delivered = []
        plan = dataclasses.replace(self._plan, max_tokens=opened.max_tokens)
        for step in self.client._exchange(self._connection, plan, replay):
            take(step)
        self.reused_tokens += len(self.history) - 1  # not if it dropped: a resume sends them

    def _end(self) -> None:
        self._hang_up()
        self._plan = self._replay = None

    def _hang_up(self) -> None:
        """Close the session's connection (the replay stays, for a resume)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            if connection in self.client._open:
                self.client._open.remove(connection)
            _hang_up(connection)


def _status_error(status: int, url: str, api_key: str | None) -> SplitConnectionError:
    if status in (401, 403) and api_key is None:
        return SplitConnectionError(
            "unauthorized",
            f"{url} answered HTTP {status}: the server requires --api-key; pass api_key=...",
        )
    if status in (401, 403):
        return SplitConnectionError(
            "unauthorized", f"{url} answered HTTP {status}: the server rejected the api_key"
        )
    if status == 404:
        return SplitConnectionError(
            "not_found",
            f"{url} answered HTTP 404: the server does not offer split execution "
            "(is it `adaptivellm serve` with split execution enabled?)",
        )
    return SplitConnectionError("handshake_failed", f"{url} refused the WebSocket: HTTP {status}")


def _closed_error(exc: ConnectionClosed) -> SplitConnectionError:
    close = exc.rcvd
    if close is not None and close.code == _CLOSE_TOO_BIG:
        detail = "a frame was larger than the server accepts"
    elif close is not None:
        detail = f"close code {close.code}" + (f": {close.reason}" if close.reason else "")
    else:
        detail = "no close frame"
    return SplitConnectionError(
        "connection_closed", f"the server closed the session before it finished ({detail})"
    )


def _server_stream(connection: ClientConnection, plan: Plan, timeout_s: float) -> Iterator[_Step]:
    """Tokens the server decodes on its own (k = 0), until the one with a finish reason."""
    for _ in range(plan.max_tokens - 1):
        start = time.perf_counter()
        token = _expect(connection, Token, timeout_s)
        timing = StepTiming(token.index, 0.0, time.perf_counter() - start, token.server_step_s)
        yield _Step(plan, token, timing)
        if token.finish_reason is not None:
            return
    raise SplitError(
        "protocol_error", f"the server sent {plan.max_tokens} tokens without finishing"
    )


def _expect_token(
    connection: ClientConnection, plan: Plan, timeout_s: float, send_s: float
) -> _Step | list[_Step]:
    """A session served whole (k = 0): the first `Token`, as a step, or a `Tokens` answer, as
    the steps of its tokens (the first step carries the wait and the server's time)."""
    start = time.perf_counter()
    message = _next_message(connection, timeout_s)
    if not isinstance(message, Token | Tokens):
        raise SplitError(
            "protocol_error", f"expected a token from the server, got {message.type!r}"
        )
    waited_s = time.perf_counter() - start
    if isinstance(message, Token):
        timing = StepTiming(message.index, send_s, waited_s, message.server_step_s)
        return _Step(plan, message, timing)
    ids = message.token_ids
    if len(ids) > plan.max_tokens:
        raise SplitError(
            "protocol_error",
            f"the server sent {len(ids)} tokens; the plan allows {plan.max_tokens}",
        )
    last = len(ids) - 1
    return [
        _Step(
            plan,
            Token(
                i,
                token_id,
                message.text if i == last else "",
                message.finish_reason if i == last else None,
                message.server_s if i == 0 else 0.0,
            ),
            StepTiming(0, send_s, waited_s, message.server_s)
            if i == 0
            else StepTiming(i, 0.0, 0.0, 0.0),
        )
        for i, token_id in enumerate(ids)
    ]


def _send(connection: ClientConnection, data: str | bytes, timeout_s: float) -> None:
    """Send one message; if the server has closed, raise the `Error` it sent before, if any."""
    try:
        connection.send(data)
    except ConnectionClosed as exc:
        closed = _closed_error(exc)
    else:
        return
    _expect(connection, Token, timeout_s)  # raises the server's Error, or connection_closed
    raise closed


def _expect(connection: ClientConnection, cls: type[_T], timeout_s: float) -> _T:
    """The next server message, which must be a `cls`; an `Error` raises `SplitError`."""
    message = _next_message(connection, timeout_s)
    if not isinstance(message, cls):
        raise SplitError(
            "protocol_error", f"expected {cls.__name__} from the server, got {message.type!r}"
        )
    return message


def _next_message(connection: ClientConnection, timeout_s: float) -> protocol.Message:
    """The next server message; an `Error` raises `SplitError`."""
    try:
        data = connection.recv(timeout=timeout_s)
    except ConnectionClosed as exc:
        raise _closed_error(exc) from None
    except TimeoutError:
        raise SplitError("timeout", f"no reply from the server in {timeout_s:g} s") from None
    if isinstance(data, bytes):
        raise SplitError("protocol_error", "the server sent a binary frame; expected JSON")
    try:
        message = protocol.decode_message(data)
    except protocol.ProtocolError as exc:
        raise SplitError("protocol_error", f"bad message from the server: {exc}") from None
    if isinstance(message, protocol.Error):
        raise SplitError(message.code, message.message, message.retry_after_s)
    return message


def _hang_up(connection: ClientConnection) -> None:
    """Send `Close` if the socket is still open, then close it (errors are moot by now)."""
    with contextlib.suppress(ConnectionClosed, OSError):
        if connection.state is State.OPEN:
            connection.send(protocol.encode_message(Close()))
    with contextlib.suppress(OSError):
        connection.close()


def _completion(request: _Request, steps: list[_Step], total_s: float) -> SplitCompletion:
    tokens = [step.token for step in steps]
    return SplitCompletion(
        prompt_token_ids=request.prompt_ids,
        token_ids=[t.token_id for t in tokens],
        text="".join(t.text for t in tokens),
        finish_reason=tokens[-1].finish_reason,
        plan=steps[0].plan,
        timings=[step.timing for step in steps],
        created=request.created,
        total_s=total_s,
        resumes=request.resumes,
        busy_retries=request.busy_retries,
    )


def _chunk(types: Any, request: _Request, step: _Step) -> Completion:
    choice = types.CompletionChoice.model_construct(
        index=0, text=step.token.text, finish_reason=step.token.finish_reason, logprobs=None
    )
    chunk: Completion = types.Completion.model_construct(
        id=_completion_id(step.plan),
        object="text_completion",
        created=request.created,
        model=step.plan.model,
        choices=[choice],
    )
    return chunk
