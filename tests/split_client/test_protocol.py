"""Tests of the split-execution wire format (adaptivellm.split_client.protocol)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from adaptivellm.split_client.protocol import (
    MAGIC,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    ClientSpec,
    Close,
    Error,
    Message,
    Open,
    Plan,
    Prompt,
    ProtocolError,
    Sampling,
    Token,
    Tokens,
    Turn,
    decode_frame,
    decode_message,
    encode_frame,
    encode_message,
)

LIMIT = 1 << 20
SPEC = ClientSpec(flops_per_s=1e11, uplink_bps=1e8, downlink_bps=3e8, rtt_s=0.02)


def open_body(**changes: Any) -> dict[str, Any]:
    """A valid Open as a JSON object, with `changes` applied."""
    body: dict[str, Any] = json.loads(
        encode_message(Open(prompt_tokens=5, max_tokens=8, client=SPEC))
    )
    body.update(changes)
    return body


def rejected(body: dict[str, Any] | str, code: str = "bad_request") -> str:
    """Decode `body` expecting a ProtocolError of `code`; return its message."""
    text = body if isinstance(body, str) else json.dumps(body)
    with pytest.raises(ProtocolError) as info:
        decode_message(text)
    assert info.value.code == code, str(info.value)
    return str(info.value)


def frame(header: dict[str, Any] | bytes, payload: bytes, *, version: int = PROTOCOL_VERSION,
          magic: bytes = MAGIC, header_len: int | None = None) -> bytes:  # fmt: skip
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    return struct.pack("<4sBI", magic, version, length) + raw + payload


def frame_rejected(data: bytes, code: str = "bad_tensor", max_bytes: int = LIMIT) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_frame(data, max_bytes=max_bytes)
    assert info.value.code == code, str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------- JSON messages

MESSAGES: list[Message] = [
    Open(prompt_tokens=12, max_tokens=4, client=SPEC),
    Open(
        prompt_tokens=1,
        max_tokens=1,
        client=ClientSpec(
            1.5e12, 1e9, 1e9, 0.001, mem_bytes_per_s=2e10, layer_overhead_s=1e-5, memory_bytes=4e9
        ),
        sla_s=2.5,
        layer=3,
        model="tiny",
        sampling=Sampling(temperature=0.7, top_p=0.9, top_k=40, seed=7, ignore_eos=True),
    ),
    Plan(
        session_id="abc",
        layer=3,
        num_layers=6,
        hidden_size=256,
        dtype="float32",
        model="tiny",
        max_tokens=16,
        max_prompt_tokens=1024,
        predicted_latency_s=0.4,
        sla_s=None,
        running_requests=2,
        planned_by="planner",
    ),
    Token(index=0, token_id=42, text=" river", finish_reason=None, server_step_s=0.003),
    Token(index=5, token_id=1, text="", finish_reason="stop", server_step_s=0.0),
    Close(),
    Turn(prompt_tokens=5, max_tokens=8),
    Turn(prompt_tokens=1, max_tokens=1, sampling=Sampling(temperature=0.5, seed=3)),
    Open(prompt_tokens=2, max_tokens=3, client=SPEC, multi_turn=True),
    Open(prompt_tokens=2, max_tokens=3, client=SPEC, prompt_ids=True),
    Prompt([0, 7, 31999]),
    Open(prompt_tokens=2, max_tokens=3, client=SPEC, prompt_ids=True, stream=False),
    Tokens([42, 7, 1], " river bank", "length", 0.25),
    Error(code="too_many_sessions", message="busy"),
    Error(code="too_many_sessions", message="busy", retry_after_s=2.5),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: Message) -> None:
    text = encode_message(message)
    assert json.loads(text)["type"] == message.type
    assert decode_message(text) == message
    assert decode_message(text.encode()) == message


def test_unbounded_memory_bandwidth_travels_as_null() -> None:
    text = encode_message(Open(prompt_tokens=3, max_tokens=2, client=SPEC))
    assert json.loads(text)["client"]["mem_bytes_per_s"] is None
    decoded = decode_message(text)
    assert isinstance(decoded, Open) and math.isinf(decoded.client.mem_bytes_per_s)


def test_unbounded_client_memory_is_left_out_so_older_servers_accept_the_open() -> None:
    text = encode_message(Open(prompt_tokens=3, max_tokens=2, client=SPEC))
    assert "memory_bytes" not in json.loads(text)["client"]
    decoded = decode_message(text)
    assert isinstance(decoded, Open) and math.isinf(decoded.client.memory_bytes)
    limited = replace(SPEC, memory_bytes=2.5e9)
    text = encode_message(Open(prompt_tokens=3, max_tokens=2, client=limited))
    assert json.loads(text)["client"]["memory_bytes"] == 2.5e9
    null = {**open_body()["client"], "memory_bytes": None}  # null: unbounded, as for bandwidth
    decoded = decode_message(json.dumps(open_body(client=null)))
    assert isinstance(decoded, Open) and math.isinf(decoded.client.memory_bytes)


def test_single_turn_sessions_read_as_before_and_turns_are_checked() -> None:
    single = json.loads(encode_message(Open(prompt_tokens=3, max_tokens=2, client=SPEC)))
    assert "multi_turn" not in single  # an older server accepts a single-turn Open
    multi = json.loads(
        encode_message(Open(prompt_tokens=3, max_tokens=2, client=SPEC, multi_turn=True))
    )
    assert multi["multi_turn"] is True
    for body, fragment in [
        ({"type": "turn", "prompt_tokens": 0, "max_tokens": 1}, "prompt_tokens must be between"),
        ({"type": "turn", "prompt_tokens": 1, "max_tokens": 0}, "max_tokens must be between"),
        ({"type": "turn", "prompt_tokens": "2", "max_tokens": 1}, "must be an integer"),
        ({"type": "turn", "prompt_tokens": 1}, "max_tokens"),
        ({"type": "turn", "prompt_tokens": 1, "max_tokens": 1, "layer": 2}, "unknown fields"),
    ]:
        assert fragment in rejected(json.dumps(body))
    opened = {**open_body(), "multi_turn": "yes"}
    assert "multi_turn must be true or false" in rejected(json.dumps(opened))


def test_prompt_ids_are_offered_only_when_set_and_checked() -> None:
    plain = json.loads(encode_message(Open(prompt_tokens=3, max_tokens=2, client=SPEC)))
    assert "prompt_ids" not in plain  # an older server accepts an Open that does not offer them
    plan = MESSAGES[2]
    assert isinstance(plan, Plan) and "prompt_ids" not in json.loads(encode_message(plan))
    with_ids = replace(plan, layer=0, server_decodes=True, prompt_ids=True)
    assert json.loads(encode_message(with_ids))["prompt_ids"] is True
    assert decode_message(encode_message(with_ids)) == with_ids
    for body, fragment in [
        ({"type": "prompt", "token_ids": []}, "non-empty list"),
        ({"type": "prompt", "token_ids": 5}, "non-empty list"),
        ({"type": "prompt", "token_ids": [1, -1]}, "non-negative integer"),
        ({"type": "prompt", "token_ids": [1, True]}, "non-negative integer"),
        ({"type": "prompt", "token_ids": [1, 2.0]}, "non-negative integer"),
        ({"type": "prompt", "token_ids": [1, 1 << 31]}, "non-negative integer"),
        ({"type": "prompt"}, "token_ids"),
        ({"type": "prompt", "token_ids": [1], "layer": 0}, "unknown fields"),
    ]:
        assert fragment in rejected(json.dumps(body)), body
    assert "prompt_ids must be true or false" in rejected(
        json.dumps({**open_body(), "prompt_ids": 1})
    )


def test_a_whole_answer_is_asked_for_only_when_set_and_checked() -> None:
    """Open.stream False asks for a session served whole in one Tokens message; the default
    (a stream) is left out, so an older server accepts the Open. A Tokens message must carry
    token ids, a string and a finish reason: it ends the session."""
    plain = json.loads(encode_message(Open(prompt_tokens=3, max_tokens=2, client=SPEC)))
    assert "stream" not in plain
    whole = Open(prompt_tokens=3, max_tokens=2, client=SPEC, stream=False)
    assert json.loads(encode_message(whole))["stream"] is False
    assert "stream must be true or false" in rejected(json.dumps({**open_body(), "stream": 0}))
    assert "stream must be true or false" in rejected(json.dumps({**open_body(), "stream": None}))
    good = {"type": "tokens", "token_ids": [1, 2], "text": "ab", "finish_reason": "stop",
            "server_s": 0.1}  # fmt: skip
    assert decode_message(json.dumps(good)) == Tokens([1, 2], "ab", "stop", 0.1)
    for changes, fragment in [
        ({"token_ids": []}, "non-empty list"),
        ({"token_ids": [1, -2]}, "non-negative integer"),
        ({"token_ids": "12"}, "non-empty list"),
        ({"text": 3}, "text must be a string"),
        ({"finish_reason": None}, "finish_reason must be stop or length"),
        ({"finish_reason": "abort"}, "finish_reason must be stop or length"),
        ({"server_s": "slow"}, "must be a number"),
        ({"server_s": math.nan}, "must be a number"),
        ({"server_s": None}, "server_s must be a finite number >= 0"),
        ({"server_s": math.inf}, "server_s must be a finite number >= 0"),
        ({"server_s": -1.0}, "server_s must be a finite number >= 0"),
        ({"index": 0}, "unknown fields"),
    ]:
        assert fragment in rejected(json.dumps({**good, **changes})), changes


def test_an_error_without_a_retry_hint_reads_as_before() -> None:
    assert json.loads(encode_message(Error("bad_request", "x"))) == {
        "code": "bad_request", "message": "x", "type": "error",
    }  # fmt: skip
    with pytest.raises(ProtocolError, match="retry_after_s must be a number"):
        decode_message('{"type": "error", "code": "c", "message": "m", "retry_after_s": "soon"}')


def test_encoder_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode_message(Token(0, 1, "x", None, server_step_s=math.nan))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"open"', b"\xff\xfe"])
def test_non_objects_are_rejected(text: str | bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_message(text)
    assert info.value.code == "bad_request"


@pytest.mark.parametrize("kind", ["hello", None, 3])
def test_unknown_message_type(kind: Any) -> None:
    assert "unknown message type" in rejected({"type": kind})


def test_missing_type() -> None:
    assert "unknown message type" in rejected({"code": "x", "message": "y"})


def test_unknown_fields() -> None:
    assert "unknown fields ['colour']" in rejected(open_body(colour="red"))
    assert "unknown fields" in rejected({"type": "close", "now": True})
    client = {**open_body()["client"], "gpu": "yes"}
    assert "unknown fields ['gpu']" in rejected(open_body(client=client))


def test_missing_required_field() -> None:
    body = open_body()
    del body["prompt_tokens"]
    assert "Open" in rejected(body)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"prompt_tokens": "5"}, "prompt_tokens must be an integer"),
        ({"max_tokens": 2.0}, "max_tokens must be an integer"),
        ({"layer": True}, "layer must be an integer"),
        ({"sla_s": "fast"}, "sla_s must be a number"),
        ({"sla_s": False}, "sla_s must be a number"),
        ({"client": [1, 2]}, "client must be an object"),
        ({"sampling": "greedy"}, "sampling must be an object"),
        ({"sampling": {"temperature": "hot"}}, "temperature must be a number"),
        ({"sampling": {"ignore_eos": "yes"}}, "ignore_eos must be true or false"),
        ({"sampling": {"seed": 1.5}}, "seed must be an integer"),
    ],
)
def test_wrong_field_types(changes: dict[str, Any], fragment: str) -> None:
    assert fragment in rejected(open_body(**changes))


def test_wrong_client_field_types() -> None:
    client = {**open_body()["client"], "rtt_s": "20ms"}
    assert "client.rtt_s must be a number" in rejected(open_body(client=client))
    token = {"type": "token", "index": "0", "token_id": 3, "text": "a", "finish_reason": None,
             "server_step_s": 0.1}  # fmt: skip
    assert "Token.index must be an integer" in rejected(token)


def test_nan_in_json_numbers_is_rejected() -> None:
    # Python's json reads the non-standard NaN literal; the protocol must not accept it.
    text = json.dumps(open_body(sla_s=0.5)).replace("0.5", "NaN")
    assert "sla_s must be a number" in rejected(text)
    client = json.dumps(open_body()).replace('"rtt_s": 0.02', '"rtt_s": NaN')
    assert "client.rtt_s must be between 0 and 60" in rejected(client)
    sampling = json.dumps(open_body()).replace('"temperature": 0.0', '"temperature": NaN')
    assert "temperature must be a number" in rejected(sampling)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"prompt_tokens": 0}, "prompt_tokens must be between 1 and 2147483648"),
        ({"prompt_tokens": 10**30}, "prompt_tokens must be between 1 and"),
        ({"max_tokens": 0}, "max_tokens must be between 1 and"),
        ({"sla_s": 0}, "sla_s must be > 0 and at most 86400"),
        ({"sla_s": 1e308}, "sla_s must be > 0 and at most 86400"),
        ({"layer": -1}, "layer must be between 0 and"),
        ({"layer": 10**30}, "layer must be between 0 and"),
        ({"sampling": {"top_p": 0.0}}, "top_p must be in (0, 1]"),
        ({"sampling": {"top_k": -1}}, "top_k must be between 0 (off) and"),
        ({"sampling": {"seed": 1 << 64}}, "seed must be a 64-bit integer"),
        ({"sampling": {"temperature": 101}}, "temperature must be in [0, 100]"),
    ],
)
def test_out_of_range_values(changes: dict[str, Any], fragment: str) -> None:
    assert fragment in rejected(open_body(**changes))


def test_client_spec_values() -> None:
    """Each field's range is named; values the planner's arithmetic cannot take (an infinite
    round trip, zero memory bandwidth: ValueError in the planner, once an engine_error) are
    refused at the door."""
    for name, value, fragment in [
        ("flops_per_s", 0, "flops_per_s must be > 0"),
        ("flops_per_s", 1e300, "flops_per_s must be between 0 and 1e+18"),
        ("rtt_s", -1, "rtt_s must be between 0 and 60"),
        ("rtt_s", math.inf, "rtt_s must be between 0 and 60"),
        ("uplink_bps", math.inf, "uplink_bps must be between 0 and 1e+13"),
        ("mem_bytes_per_s", 0, "mem_bytes_per_s must be > 0"),
        ("layer_overhead_s", 11, "layer_overhead_s must be between 0 and 10"),
        ("memory_bytes", 0, "memory_bytes must be > 0"),
        ("memory_bytes", -5, "memory_bytes must be between 0 and inf"),
        ("memory_bytes", "4GB", "memory_bytes must be a number"),
    ]:
        client = {**open_body()["client"], name: value}
        assert fragment in rejected(json.dumps(open_body(client=client)))
    unlimited = {**open_body()["client"], "mem_bytes_per_s": math.inf}
    assert decode_message(json.dumps(open_body(client=unlimited)))


def test_open_of_another_version_is_a_version_mismatch() -> None:
    message = rejected(open_body(version=PROTOCOL_VERSION + 1), "version_mismatch")
    assert f"version {PROTOCOL_VERSION + 1}" in message
    rejected(open_body(version="1"), "version_mismatch")


# --------------------------------------------------------------------------- tensor frames


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_float32_frame_round_trips_exactly(kind: str) -> None:
    array = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32) * 100
    decoded = decode_frame(encode_frame(kind, array), max_bytes=LIMIT)  # type: ignore[arg-type]
    assert (decoded.kind, decoded.dtype, decoded.shape, decoded.num_tokens) == (
        kind,
        "float32",
        (5, 16),
        5,
    )
    np.testing.assert_array_equal(decoded.to_numpy(), array)


def test_float16_frame_round_trips() -> None:
    array = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float16)
    decoded = decode_frame(encode_frame("decode", array), max_bytes=LIMIT)
    assert decoded.dtype == "float16" and len(decoded.payload) == 3 * 8 * 2
    np.testing.assert_array_equal(decoded.to_numpy(), array)
    # A float32 array sent as float16 is rounded as numpy rounds.
    wide = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    narrowed = decode_frame(encode_frame("decode", wide, "float16"), max_bytes=LIMIT)
    np.testing.assert_array_equal(narrowed.to_numpy(), wide.astype(np.float16))


def test_bfloat16_frame_rounds_like_torch() -> None:
    rng = np.random.default_rng(3)
    array = (rng.standard_normal((4, 32)) * 10.0 ** rng.integers(-3, 4, (4, 32))).astype(np.float32)
    array[0, :3] = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0]  # ties: round to even
    decoded = decode_frame(encode_frame("prefill", array, "bfloat16"), max_bytes=LIMIT)
    assert decoded.dtype == "bfloat16" and len(decoded.payload) == 4 * 32 * 2
    expected = torch.from_numpy(array).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(decoded.to_numpy(), expected)
    # Already-bfloat16 values survive exactly.
    again = decode_frame(encode_frame("decode", expected, "bfloat16"), max_bytes=LIMIT)
    np.testing.assert_array_equal(again.to_numpy(), expected)


def test_encode_frame_refuses_bad_arrays() -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode_frame("decode", np.zeros((1, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="not carried"):
        encode_frame("decode", np.zeros((1, 2), dtype=np.float64))


GOOD_HEADER = {"kind": "decode", "dtype": "float32", "shape": [1, 4]}
GOOD_PAYLOAD = bytes(16)


def test_handmade_frame_is_accepted() -> None:
    assert decode_frame(frame(GOOD_HEADER, GOOD_PAYLOAD), max_bytes=LIMIT).shape == (1, 4)


def test_bad_magic() -> None:
    assert "ASPL" in frame_rejected(frame(GOOD_HEADER, GOOD_PAYLOAD, magic=b"XSPL"))


def test_wrong_frame_version() -> None:
    data = frame(GOOD_HEADER, GOOD_PAYLOAD, version=PROTOCOL_VERSION + 1)
    assert "version" in frame_rejected(data, "version_mismatch")


def test_frame_shorter_than_prefix() -> None:
    assert "prefix" in frame_rejected(MAGIC + b"\x01")


def test_header_too_long() -> None:
    long = {**GOOD_HEADER, "pad": "x" * MAX_HEADER_BYTES}
    assert "header length" in frame_rejected(frame(long, GOOD_PAYLOAD))
    # A declared length beyond the frame's end.
    assert "header length" in frame_rejected(frame(GOOD_HEADER, b"", header_len=200))


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (b"{nope", "not JSON"),
        (b"[1, 4]", "JSON object"),
        ({**GOOD_HEADER, "kind": "logits"}, "prefill or decode"),
        ({**GOOD_HEADER, "dtype": "float64"}, "not supported"),
        ({**GOOD_HEADER, "shape": [4]}, "shape must be"),
        ({**GOOD_HEADER, "shape": [1, 2, 2]}, "shape must be"),
        ({**GOOD_HEADER, "shape": [0, 4]}, "shape must be"),
        ({**GOOD_HEADER, "shape": [-1, -4]}, "shape must be"),
        ({**GOOD_HEADER, "shape": [True, 4]}, "shape must be"),
        ({**GOOD_HEADER, "shape": [1.0, 4]}, "shape must be"),
        ({**GOOD_HEADER, "shape": "1x4"}, "shape must be"),
    ],
)
def test_bad_headers(header: dict[str, Any] | bytes, fragment: str) -> None:
    assert fragment in frame_rejected(frame(header, GOOD_PAYLOAD))


@pytest.mark.parametrize("payload", [bytes(15), bytes(17), b""])
def test_payload_length_mismatch(payload: bytes) -> None:
    assert "needs 16" in frame_rejected(frame(GOOD_HEADER, payload))


def test_oversized_frame() -> None:
    data = encode_frame("prefill", np.zeros((64, 64), dtype=np.float32))
    message = frame_rejected(data, "payload_too_large", max_bytes=len(data) - 1)
    assert f"limit of {len(data) - 1}" in message
    assert decode_frame(data, max_bytes=len(data)).shape == (64, 64)


def test_one_client_profile_type() -> None:
    """The client declares itself with the planner's own ClientProfile; an Open holds it to the
    wire's ranges whether it is built here or decoded."""
    from adaptivellm.split_client.planner import ClientProfile

    assert ClientSpec is ClientProfile
    slow_link = ClientProfile(flops_per_s=1e11, uplink_bps=1e8, downlink_bps=1e8, rtt_s=120.0)
    with pytest.raises(ProtocolError, match=r"client\.rtt_s must be between 0 and 60"):
        Open(prompt_tokens=4, max_tokens=2, client=slow_link)
