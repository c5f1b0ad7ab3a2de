"""The split-execution wire format, version 1: typed messages over one WebSocket.

A client that runs the first k decoder layers of a model itself talks to
`ws://HOST:PORT/v1/split/session` (the server's `--api-key` applies, as an `Authorization:
Bearer` header). One WebSocket is one generation:

    client                                   server
    Open (JSON text) ----------------------> plans k with its current load
             <------------------------------ Plan (JSON): k, model shape, limits
    prefill TensorFrame(s) (binary) -------> runs layers k..N-1 on the prompt, samples
             <------------------------------ Token (JSON)
    decode TensorFrame, 1 token (binary) --> runs layers k..N-1 on one token, samples
             <------------------------------ Token (JSON) ... until finish_reason is set
    Close (JSON, optional) ----------------> frees the session's KV cache at once

When the server runs every layer (k = 0) it decodes on its own: after the prefill it streams
every token, and the client sends no decode frames (`Plan.server_decodes`). A client that
offers it (`Open.prompt_ids`) then sends its prompt as one `Prompt` message of token ids
(`Plan.prompt_ids`), as an ordinary request would, rather than as embeddings.

The prompt's hidden states may come in several prefill frames (consecutive token ranges, in
order) when one would exceed the server's frame limit (`GET /v1/split/info`:
`max_frame_bytes`); the server starts the prefill when it holds all `prompt_tokens` rows.

Errors are an `Error` message followed by the server closing the socket; a client may close at
any time (the server then aborts the request and frees its KV cache).

Text frames are JSON objects with a `type`. Binary frames carry one hidden-state tensor:

    b"ASPL" | version (u8) | header length (u32, little endian) | header JSON | raw tensor bytes

where the header is `{"kind": "prefill"|"decode", "dtype": ..., "shape": [tokens, hidden]}` and the
raw bytes are C-ordered, little endian. The tensor is the residual stream entering layer k (for
k = 0, the token embeddings): what a Hugging Face decoder returns after layer k-1.

This module is pure Python plus numpy: the client and the server share it, neither needs torch to
validate a frame.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final, Literal

import numpy as np

from adaptivellm.split_client.planner import ClientProfile
from adaptivellm.split_client.shapes import DTYPE_BYTES

PROTOCOL_VERSION: Final = 1
MAGIC: Final = b"ASPL"
_PREFIX = struct.Struct("<4sBI")
#: Largest JSON header of a binary frame; anything longer is malformed.
MAX_HEADER_BYTES: Final = 4096

SESSION_PATH: Final = "/v1/split/session"
INFO_PATH: Final = "/v1/split/info"

FrameKind = Literal["prefill", "decode"]
ErrorCode = Literal[
    "bad_request",
    "version_mismatch",
    "bad_tensor",
    "payload_too_large",
    "too_many_sessions",
    "infeasible_sla",
    "unknown_model",
    "engine_error",
]


class ProtocolError(ValueError):
    """A message that does not follow the protocol; `code` is what the server reports."""

    def __init__(self, code: ErrorCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        #: With `too_many_sessions` and `infeasible_sla`: when to try again (seconds).
        self.retry_after_s = retry_after_s


# --------------------------------------------------------------------------- JSON messages


#: Allowed range of each field of an Open's `client` (inclusive): wide enough for any real client,
#: narrow enough that the planner's arithmetic stays finite. mem_bytes_per_s and memory_bytes may
#: be inf (no limit).
CLIENT_SPEC_RANGES: Final = {
    "flops_per_s": (0.0, 1e18),
    "uplink_bps": (0.0, 1e13),
    "downlink_bps": (0.0, 1e13),
    "rtt_s": (0.0, 60.0),
    "mem_bytes_per_s": (0.0, math.inf),
    "layer_overhead_s": (0.0, 10.0),
    "memory_bytes": (0.0, math.inf),
}
#: Largest token count, layer, SLA and sampling value an Open may carry (the server then checks
#: tokens against its context and the layer against its model).
MAX_TOKENS_FIELD: Final = 1 << 31
MAX_SLA_S: Final = 86_400.0


#: What the client declares about itself in an Open: the planner's own `ClientProfile` (one type;
#: this name is kept for the client API). The server also holds it to CLIENT_SPEC_RANGES.
ClientSpec = ClientProfile


def check_client(values: dict[str, Any]) -> None:
    """ProtocolError unless each field of a declared client is a number within
    CLIENT_SPEC_RANGES (flops_per_s and mem_bytes_per_s above 0); unknown fields are left to the
    dataclass."""
    for name, (low, high) in CLIENT_SPEC_RANGES.items():
        if name not in values:
            continue
        value = values[name]
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ProtocolError("bad_request", f"client.{name} must be a number")
        if not low <= value <= high:  # also rejects NaN
            raise ProtocolError(
                "bad_request", f"client.{name} must be between {low:g} and {high:g}"
            )
    for name in ("flops_per_s", "mem_bytes_per_s", "memory_bytes"):
        if name in values and values[name] <= 0:
            raise ProtocolError("bad_request", f"client.{name} must be > 0")


@dataclass(frozen=True)
class Sampling:
    """Sampling of each token (server side). Penalties are not offered: the server never sees
    the prompt's token ids."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise ProtocolError("bad_request", "sampling.temperature must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise ProtocolError("bad_request", "sampling.top_p must be in (0, 1]")
        if not 0 <= self.top_k <= MAX_TOKENS_FIELD:
            raise ProtocolError(
                "bad_request", f"sampling.top_k must be between 0 (off) and {MAX_TOKENS_FIELD}"
            )
        if self.seed is not None and not -(1 << 63) <= self.seed < 1 << 63:
            raise ProtocolError("bad_request", "sampling.seed must be a 64-bit integer")


def _check_token_counts(prompt_tokens: int, max_tokens: int) -> None:
    """ProtocolError unless both counts are between 1 and MAX_TOKENS_FIELD (Open and Turn)."""
    for name, value in (("prompt_tokens", prompt_tokens), ("max_tokens", max_tokens)):
        if not 1 <= value <= MAX_TOKENS_FIELD:
            raise ProtocolError("bad_request", f"{name} must be between 1 and {MAX_TOKENS_FIELD}")


@dataclass(frozen=True)
class Open:
    """First message of a session. `sla_s` bounds the end-to-end latency of the whole request
    (prompt sent to last token held); None means no SLA. `layer` forces k (tests, benchmarks);
    None lets the server's planner choose."""

    prompt_tokens: int
    max_tokens: int
    client: ClientProfile
    sla_s: float | None = None
    layer: int | None = None
    model: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    #: Keep the session after a turn finishes, for follow-up `Turn`s on the same KV cache (both
    #: sides). The server grants it for split sessions (k > 0): `Plan.multi_turn`.
    multi_turn: bool = False
    #: The client can send its prompt as token ids (`Prompt`) when the server runs every layer
    #: (k = 0), instead of their embeddings (hidden_size values per token). Sent only when set.
    prompt_ids: bool = False
    #: False: if the server serves the session whole (k = 0), it sends every token in one
    #: `Tokens` message when the session ends, not a `Token` a step (a caller that needs no
    #: token before the last: `SplitClient.generate()` without `on_token`). Sent only when
    #: False.
    stream: bool = True
    version: int = PROTOCOL_VERSION
    type: Literal["open"] = "open"

    def __post_init__(self) -> None:
        check_client(asdict(self.client))
        _check_token_counts(self.prompt_tokens, self.max_tokens)
        if self.sla_s is not None and not 0 < self.sla_s <= MAX_SLA_S:
            raise ProtocolError(
                "bad_request", f"sla_s must be > 0 and at most {MAX_SLA_S:g} (or null for no SLA)"
            )
        if self.layer is not None and not 0 <= self.layer <= MAX_TOKENS_FIELD:
            raise ProtocolError("bad_request", f"layer must be between 0 and {MAX_TOKENS_FIELD}")
        if not isinstance(self.stream, bool):
            raise ProtocolError("bad_request", "Open.stream must be true or false")


@dataclass(frozen=True)
class Plan:
    """The server's answer to `Open`: where to split and what the server expects."""

    session_id: str
    layer: int
    num_layers: int
    hidden_size: int
    dtype: str
    model: str
    max_tokens: int
    max_prompt_tokens: int
    predicted_latency_s: float | None
    sla_s: float | None
    running_requests: int
    planned_by: Literal["planner", "client"]
    #: True for k = 0: the server runs every layer, so after the prefill it decodes on its own
    #: and streams every token; the client sends no decode frames (no round trip per token).
    server_decodes: bool = False
    #: The server keeps this session after each turn and accepts a `Turn` (or `Close`) then.
    multi_turn: bool = False
    #: k = 0 and the client offered it (`Open.prompt_ids`): the prompt comes as one `Prompt`
    #: message of token ids, not as prefill frames. Sent only when set.
    prompt_ids: bool = False
    version: int = PROTOCOL_VERSION
    type: Literal["plan"] = "plan"


@dataclass(frozen=True)
class Token:
    """One sampled token. When `finish_reason` is set the session is over."""

    index: int
    token_id: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    server_step_s: float
    type: Literal["token"] = "token"


@dataclass(frozen=True)
class Tokens:
    """Every token of a session served whole (k = 0) whose `Open.stream` was False, in one
    message when the session ends: `text` is their detokenization, `server_s` the time from
    the prompt's arrival to the last token. The session is over."""

    token_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length"]
    server_s: float
    type: Literal["tokens"] = "tokens"

    def __post_init__(self) -> None:
        _check_token_ids(self.token_ids, "Tokens.token_ids")
        if not isinstance(self.text, str):
            raise ProtocolError("bad_request", "Tokens.text must be a string")
        if self.finish_reason not in ("stop", "length"):
            raise ProtocolError("bad_request", "Tokens.finish_reason must be stop or length")
        s = self.server_s
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0 <= s < math.inf:
            raise ProtocolError("bad_request", "Tokens.server_s must be a finite number >= 0")


@dataclass(frozen=True)
class Turn:
    """A follow-up turn of a multi-turn session, sent after the last turn's final token. Its
    prefill frames carry `prompt_tokens + 1` rows of hidden states at layer k: the last turn's
    final token (never fed back while that turn ran) and then the new prompt's tokens. The
    session's KV cache (server) and the client's cache of its layers are kept, so only the new
    tokens are computed."""

    prompt_tokens: int
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    type: Literal["turn"] = "turn"

    def __post_init__(self) -> None:
        _check_token_counts(self.prompt_tokens, self.max_tokens)


@dataclass(frozen=True)
class Prompt:
    """The prompt as token ids, in place of the prefill frames where the `Plan` says
    `prompt_ids` (k = 0: the server embeds them itself). A resumed session's prompt is the
    original one followed by the tokens delivered before the drop."""

    token_ids: list[int]
    type: Literal["prompt"] = "prompt"

    def __post_init__(self) -> None:
        _check_token_ids(self.token_ids, "Prompt.token_ids")


def _check_token_ids(ids: Any, name: str) -> None:
    """ProtocolError unless `ids` is a non-empty list of non-negative integer token ids."""
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_TOKENS_FIELD:
        raise ProtocolError("bad_request", f"{name} must be a non-empty list")
    if not all(type(i) is int and 0 <= i < MAX_TOKENS_FIELD for i in ids):
        raise ProtocolError("bad_request", f"{name} must hold non-negative integer token ids")


@dataclass(frozen=True)
class Close:
    """The client is done (the server frees the session now rather than at disconnect)."""

    type: Literal["close"] = "close"


@dataclass(frozen=True)
class Error:
    """Sent before the server closes the socket on a protocol or engine error."""

    code: str
    message: str
    #: With `too_many_sessions` (about how long until a slot frees) and `infeasible_sla` (until
    #: the load that makes the SLA unreachable has passed), in seconds. Sent only when set.
    retry_after_s: float | None = None
    type: Literal["error"] = "error"


Message = Open | Plan | Token | Tokens | Turn | Prompt | Close | Error
_MESSAGE_TYPES: Final[dict[str, type[Any]]] = {
    "open": Open,
    "plan": Plan,
    "token": Token,
    "tokens": Tokens,
    "turn": Turn,
    "prompt": Prompt,
    "close": Close,
    "error": Error,
}


def encode_message(message: Message) -> str:
    """JSON text of one message (NaN and infinities are refused by the JSON encoder)."""
    body = asdict(message)
    if isinstance(message, Error) and message.retry_after_s is None:
        del body["retry_after_s"]  # an error without a hint reads as before
    if isinstance(message, Open | Plan) and not message.multi_turn:
        del body["multi_turn"]  # a single-turn session reads as before (older peers too)
    if isinstance(message, Open | Plan) and not message.prompt_ids:
        del body["prompt_ids"]  # embeddings at k = 0, as before (older peers too)
    if isinstance(message, Open) and message.stream:
        del body["stream"]  # token by token at k = 0, as before (older peers too)
    client = body.get("client")
    if isinstance(client, dict):
        if math.isinf(client.get("mem_bytes_per_s", 0.0)):
            client["mem_bytes_per_s"] = None  # JSON has no infinity; None means unbounded
        if math.isinf(client.get("memory_bytes", 0.0)):
            del client["memory_bytes"]  # unbounded, as a client that predates the field says
    return json.dumps(body, allow_nan=False)


def decode_message(text: str | bytes) -> Message:
    """Parse one JSON message; any deviation raises `ProtocolError` with a reason."""
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError("bad_request", f"message is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("bad_request", "message must be a JSON object")
    kind = body.get("type")
    cls = _MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        known = ", ".join(_MESSAGE_TYPES)
        raise ProtocolError("bad_request", f"unknown message type {kind!r}; known: {known}")
    if cls is Open:
        version = body.get("version", PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                "version_mismatch",
                f"client speaks split protocol version {version!r}; this server speaks "
                f"{PROTOCOL_VERSION}",
            )
    return _build(cls, body)


def _build(cls: type[Any], body: dict[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise ProtocolError("bad_request", f"{cls.__name__}: unknown fields {unknown}")
    kwargs: dict[str, Any] = {}
    for name, value in body.items():
        if name == "client":
            if not isinstance(value, dict):
                raise ProtocolError("bad_request", "client must be an object")
            for unbounded in ("mem_bytes_per_s", "memory_bytes"):
                if unbounded in value and value[unbounded] is None:
                    value = {**value, unbounded: math.inf}
            check_client(value)
            kwargs[name] = _build(ClientProfile, value)
        elif name == "sampling":
            if not isinstance(value, dict):
                raise ProtocolError("bad_request", "sampling must be an object")
            kwargs[name] = _build(Sampling, value)
        else:
            kwargs[name] = value
    _check_types(cls, kwargs)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ProtocolError("bad_request", f"{cls.__name__}: {exc}") from None


_INT_FIELDS: Final = {
    "prompt_tokens",
    "max_tokens",
    "layer",
    "version",
    "top_k",
    "seed",
    "index",
    "token_id",
}
_FLOAT_FIELDS: Final = {
    "sla_s",
    "temperature",
    "top_p",
    "server_step_s",
    "server_s",
    "retry_after_s",
}


_BOOL_FIELDS: Final = {"ignore_eos", "server_decodes", "multi_turn", "prompt_ids", "stream"}


def _check_types(cls: type[Any], kwargs: dict[str, Any]) -> None:
    for name, value in kwargs.items():
        if value is None:
            continue
        if name in _INT_FIELDS and (not isinstance(value, int) or isinstance(value, bool)):
            raise ProtocolError("bad_request", f"{cls.__name__}.{name} must be an integer")
        if name in _FLOAT_FIELDS and (
            not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value)
        ):
            raise ProtocolError("bad_request", f"{cls.__name__}.{name} must be a number")
        if name in _BOOL_FIELDS and not isinstance(value, bool):
            raise ProtocolError("bad_request", f"{cls.__name__}.{name} must be true or false")


# --------------------------------------------------------------------------- tensor frames


@dataclass(frozen=True)
class TensorFrame:
    """One binary frame: the hidden states of `shape[0]` consecutive tokens at layer k."""

    kind: FrameKind
    dtype: str
    shape: tuple[int, int]
    payload: bytes

    @property
    def num_tokens(self) -> int:
        return self.shape[0]

    def to_numpy(self) -> np.ndarray:
        """The tensor as numpy: float32 and float16 as sent, bfloat16 widened exactly to
        float32 (numpy has no bfloat16)."""
        return decode_payload(self.payload, self.dtype, self.shape)


def encode_payload(array: np.ndarray, dtype: str) -> bytes:
    """A float array's elements as little-endian `dtype` bytes (bfloat16 rounded to nearest
    even, as torch rounds); `decode_payload` reads them back."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype} not carried; use one of {sorted(DTYPE_BYTES)}")
    if dtype == "bfloat16":
        words = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        # Round to nearest even, as torch does, then keep the high 16 bits.
        rounded = (words + 0x7FFF + ((words >> 16) & 1)) >> 16
        return rounded.astype("<u2").tobytes()
    return np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def decode_payload(payload: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """`encode_payload`'s bytes as an array of `shape`: float32 and float16 as stored,
    bfloat16 widened exactly to float32 (numpy has no bfloat16)."""
    if dtype == "bfloat16":
        words = np.frombuffer(payload, dtype="<u2").astype(np.uint32) << 16
        return words.view(np.float32).reshape(shape)
    return np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def encode_frame(kind: FrameKind, array: np.ndarray, dtype: str | None = None) -> bytes:
    """Binary frame for a (tokens, hidden) float array; `dtype` defaults to the array's."""
    if array.ndim != 2:
        raise ValueError(f"hidden states must be 2-D (tokens, hidden), got shape {array.shape}")
    dtype = dtype or str(array.dtype)
    payload = encode_payload(array, dtype)
    header = json.dumps({"kind": kind, "dtype": dtype, "shape": list(array.shape)}).encode()
    return _PREFIX.pack(MAGIC, PROTOCOL_VERSION, len(header)) + header + payload


def decode_frame(data: bytes, *, max_bytes: int) -> TensorFrame:
    """Parse and check one binary frame (size, magic, version, header, payload length)."""
    if len(data) > max_bytes:
        raise ProtocolError(
            "payload_too_large", f"frame of {len(data)} bytes exceeds the limit of {max_bytes}"
        )
    if len(data) < _PREFIX.size:
        raise ProtocolError("bad_tensor", "binary frame shorter than its fixed prefix")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("bad_tensor", "binary frame does not start with b'ASPL'")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "version_mismatch",
            f"frame of protocol version {version}; this server speaks {PROTOCOL_VERSION}",
        )
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(data):
        raise ProtocolError("bad_tensor", "binary frame header length is out of range")
    try:
        header = json.loads(data[_PREFIX.size : _PREFIX.size + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProtocolError("bad_tensor", "binary frame header is not JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_tensor", "binary frame header must be a JSON object")
    kind, dtype, shape = header.get("kind"), header.get("dtype"), header.get("shape")
    if kind not in ("prefill", "decode"):
        raise ProtocolError("bad_tensor", f"frame kind must be prefill or decode, got {kind!r}")
    if dtype not in DTYPE_BYTES:
        raise ProtocolError(
            "bad_tensor", f"dtype {dtype!r} not supported; use one of {sorted(DTYPE_BYTES)}"
        )
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise ProtocolError(
            "bad_tensor", f"shape must be [tokens, hidden] with positive sizes, got {shape!r}"
        )
    payload = data[_PREFIX.size + header_len :]
    expected = shape[0] * shape[1] * DTYPE_BYTES[dtype]
    if len(payload) != expected:
        raise ProtocolError(
            "bad_tensor",
            f"payload has {len(payload)} bytes; shape {shape} of {dtype} needs {expected}",
        )
    return TensorFrame(kind=kind, dtype=dtype, shape=(shape[0], shape[1]), payload=payload)
