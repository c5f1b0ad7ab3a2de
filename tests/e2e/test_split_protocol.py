"""Split execution through the real server, at the wire level: every bad input is a clear
protocol error, and none of them costs other requests anything."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from adaptivellm.launch import metric_value
from adaptivellm.split_client.protocol import (
    PROTOCOL_VERSION,
    SESSION_PATH,
    ClientSpec,
    Close,
    Error,
    Open,
    Plan,
    Prompt,
    Sampling,
    Token,
    Tokens,
    decode_message,
    encode_frame,
    encode_message,
)
from tests.support import (
    API_KEY,
    SPLIT_IDLE_TIMEOUT_S,
    SPLIT_MAX_FRAME_MB,
    SPLIT_MAX_SESSIONS,
    SPLIT_QUEUE_S,
    Server,
)

HIDDEN = 256  # the embedded model's hidden size
CLIENT = ClientSpec(flops_per_s=1e10, uplink_bps=1e9, downlink_bps=1e9, rtt_s=0.001)
rng = np.random.default_rng(0)


def ws_url(server: Server) -> str:
    return server.base_url.replace("http://", "ws://") + SESSION_PATH


@contextmanager
def session(server: Server, **headers: str) -> Iterator[ClientConnection]:
    auth = {"Authorization": f"Bearer {API_KEY}", **headers}
    with connect(ws_url(server), additional_headers=auth, open_timeout=30) as ws:
        yield ws


def open_session(ws: ClientConnection, prompt_tokens: int = 8, **fields: Any) -> Plan:
    fields.setdefault("max_tokens", 4)
    ws.send(encode_message(Open(prompt_tokens=prompt_tokens, client=CLIENT, **fields)))
    plan = decode_message(ws.recv(timeout=60))
    assert isinstance(plan, Plan), plan
    return plan


def expect_error(ws: ClientConnection, code: str) -> Error:
    """The server's Error message, then the close."""
    message = decode_message(ws.recv(timeout=60))
    assert isinstance(message, Error), message
    assert message.code == code, message
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=30)
    return message


def hidden(tokens: int) -> np.ndarray:
    return rng.standard_normal((tokens, HIDDEN)).astype(np.float32)


def metrics(server: Server) -> str:
    return httpx.get(f"{server.base_url}/metrics", timeout=30).text


def still_serves(server: Server) -> None:
    """An ordinary request right after: the bad session cost the server nothing."""
    client = openai.OpenAI(base_url=server.api_url, api_key=API_KEY, max_retries=0, timeout=120)
    out = client.completions.create(model=server.model, prompt="still serving", max_tokens=3,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    assert out.usage is not None and out.usage.completion_tokens == 3


def wait_idle(server: Server, timeout: float = 30.0) -> str:
    """Metrics once the engine holds no request (KV cache freed)."""
    deadline = time.monotonic() + timeout
    while True:
        text = metrics(server)
        running = metric_value(text, "vllm:num_requests_running") or 0.0
        waiting = metric_value(text, "vllm:num_requests_waiting") or 0.0
        usage = metric_value(text, "vllm:kv_cache_usage_perc") or 0.0
        if running == 0 and waiting == 0 and usage == 0:
            return text
        assert time.monotonic() < deadline, f"engine not idle: {running=} {waiting=} {usage=}"
        time.sleep(0.5)


def test_info_describes_the_model(server: Server) -> None:
    r = httpx.get(f"{server.base_url}/v1/split/info", headers=server.headers, timeout=30)
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["num_layers"] == 6 and info["hidden_size"] == HIDDEN
    assert info["protocol_version"] == PROTOCOL_VERSION
    assert info["max_sessions"] == SPLIT_MAX_SESSIONS
    assert info["policy"] == "planner"  # --split-policy's default reaches the endpoint


def test_unauthenticated_client_is_refused(server: Server) -> None:
    with pytest.raises(InvalidStatus) as err, connect(ws_url(server), open_timeout=30):
        pass
    assert err.value.response.status_code in (401, 403)
    wrong = {"Authorization": "Bearer wrong"}
    with pytest.raises(InvalidStatus), connect(ws_url(server), additional_headers=wrong):
        pass


def test_planner_chooses_k_with_load_and_sla(fresh_server: Server) -> None:
    """A fast client with a loose SLA gets work moved to it; a very slow client gets k = 0.
    On a server of its own: the shared one's planner has calibrated itself on the earlier
    tests' sessions, and two fresh-clone CIs had it serve this session whole (at 84bee25 an
    all-client slack of 865 read off 4 sessions; at 58524cb the calibration was not kept):
    what the planner should decide after those sessions is not this test's question."""
    with session(fresh_server) as ws:
        plan = open_session(ws, prompt_tokens=64, max_tokens=8, sla_s=60.0)
        assert plan.planned_by == "planner" and 0 <= plan.layer <= plan.num_layers
        auth = {"Authorization": f"Bearer {API_KEY}"}
        info = httpx.get(f"{fresh_server.base_url}/v1/split/info", headers=auth, timeout=30).json()
        assert plan.layer > 0, (plan, info["calibration"], info["server_profile"])
        assert plan.predicted_latency_s is not None and plan.predicted_latency_s <= 60.0
    slow = ClientSpec(flops_per_s=1e3, uplink_bps=1e3, downlink_bps=1e3, rtt_s=0.5)
    with session(fresh_server) as ws:
        ws.send(encode_message(Open(prompt_tokens=64, max_tokens=8, client=slow, sla_s=1.0)))
        plan = decode_message(ws.recv(timeout=60))
        assert isinstance(plan, Plan) and plan.layer == 0


def test_a_cost_profile_serves_whole_what_a_split_would_make_dearer(priced_server: Server) -> None:
    """With `--split-cost-profile` (one in which no split saves server time), the session the
    planner would split for a fast client with a loose SLA (the test above) is served whole,
    and the whole session runs; /v1/split/info shows the profile, /metrics counts it."""
    name = "adaptivellm_split_served_whole_cheaper_total"
    before = metric_value(metrics(priced_server), name) or 0.0
    with session(priced_server) as ws:
        plan = open_session(ws, prompt_tokens=8, max_tokens=4, sla_s=60.0)
        assert (plan.layer, plan.planned_by, plan.server_decodes) == (0, "planner", True)
        ws.send(encode_frame("prefill", hidden(8)))  # k = 0: the prompt's embeddings
        tokens = [decode_message(ws.recv(timeout=120)) for _ in range(4)]
        assert [t.index for t in tokens] == [0, 1, 2, 3] and tokens[-1].finish_reason
    auth = {"Authorization": f"Bearer {API_KEY}"}
    info = httpx.get(f"{priced_server.base_url}/v1/split/info", headers=auth, timeout=30).json()
    costs = info.get("pass_costs") or {}
    assert costs.get("break_even_layer", 0) is None, info
    assert costs["layers"] == plan.num_layers
    assert metric_value(metrics(priced_server), name) == before + 1


@pytest.mark.parametrize(
    ("frame", "code", "fragment"),
    [
        (lambda: encode_frame("prefill", hidden(8)[:, :128]), "bad_tensor", "8, 256]"),
        (lambda: encode_frame("prefill", hidden(9)), "bad_tensor", "8, 256]"),
        (lambda: encode_frame("prefill", hidden(8).astype(np.float64)), "bad_tensor", "dtype"),
        (lambda: _with_value(np.nan), "bad_tensor", "NaN"),
        (lambda: _with_value(np.inf), "bad_tensor", "NaN or infinite"),
        (lambda: encode_frame("decode", hidden(8)), "bad_tensor", "expected a prefill"),
        (lambda: b"GIF89a" + bytes(100), "bad_tensor", "ASPL"),
        (lambda: _retagged_version(PROTOCOL_VERSION + 1), "version_mismatch", "version"),
        (lambda: encode_message(Open(prompt_tokens=1, max_tokens=1, client=CLIENT)),
         "bad_request", "expected a prefill"),
    ],
)  # fmt: skip
def test_bad_prefill_is_a_clear_error(server: Server, frame: Any, code: str, fragment: str) -> None:
    with session(server) as ws:
        open_session(ws)
        try:
            payload = frame()
        except ValueError:  # float64 is refused by the client-side encoder: forge the frame
            payload = _forged_dtype("float64")
        ws.send(payload)
        error = expect_error(ws, code)
        assert fragment in error.message
    still_serves(server)


def _with_value(value: float) -> bytes:
    array = hidden(8)
    array[3, 7] = value
    return encode_frame("prefill", array)


def _retagged_version(version: int) -> bytes:
    frame = bytearray(encode_frame("prefill", hidden(8)))
    frame[4] = version
    return bytes(frame)


def _forged_dtype(dtype: str) -> bytes:
    header = json.dumps({"kind": "prefill", "dtype": dtype, "shape": [8, HIDDEN]}).encode()
    payload = hidden(8).astype(np.float64).tobytes()
    return struct.pack("<4sBI", b"ASPL", PROTOCOL_VERSION, len(header)) + header + payload


def test_a_session_served_whole_takes_its_prompt_as_token_ids(server: Server) -> None:
    """k = 0 with Open.prompt_ids: the Plan asks for a Prompt of token ids, and the server
    streams the tokens an ordinary greedy request gives. Without the offer (an older client),
    or at k > 0, the plan asks for frames as before."""
    ids = [5, 17, 200, 3, 99, 41, 8, 250]
    client = openai.OpenAI(base_url=server.api_url, api_key=API_KEY, max_retries=0, timeout=120)
    expected = client.completions.create(
        model=server.model, prompt=ids, max_tokens=6, temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ).choices[0].token_ids  # fmt: skip
    with session(server) as ws:
        plan = open_session(ws, max_tokens=6, layer=0, prompt_ids=True,
                            sampling=Sampling(ignore_eos=True))  # fmt: skip
        assert plan.prompt_ids and plan.server_decodes
        ws.send(encode_message(Prompt(ids)))
        tokens = [decode_message(ws.recv(timeout=60)) for _ in range(6)]
    assert all(isinstance(t, Token) for t in tokens)
    assert [t.token_id for t in tokens] == expected  # type: ignore[union-attr]
    assert tokens[-1].finish_reason == "length"  # type: ignore[union-attr]
    for fields in ({"layer": 0}, {"layer": 3, "prompt_ids": True}):
        with session(server) as ws:
            assert not open_session(ws, **fields).prompt_ids


def test_a_session_served_whole_without_a_stream_gets_one_answer(server: Server) -> None:
    """k = 0 with Open.stream False: the server sends every token in one Tokens message at the
    end, the tokens and text of the same ordinary greedy request, and ends the session."""
    ids = [5, 17, 200, 3, 99, 41, 8, 250]
    client = openai.OpenAI(base_url=server.api_url, api_key=API_KEY, max_retries=0, timeout=120)
    expected = client.completions.create(
        model=server.model, prompt=ids, max_tokens=6, temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ).choices[0]  # fmt: skip
    with session(server) as ws:
        plan = open_session(ws, max_tokens=6, layer=0, prompt_ids=True, stream=False,
                            sampling=Sampling(ignore_eos=True))  # fmt: skip
        assert plan.prompt_ids and plan.server_decodes
        ws.send(encode_message(Prompt(ids)))
        answer = decode_message(ws.recv(timeout=60))
        assert isinstance(answer, Tokens), answer
        with pytest.raises(ConnectionClosed):  # nothing after it: the session is over
            ws.recv(timeout=30)
    assert answer.token_ids == expected.token_ids  # type: ignore[attr-defined]
    assert answer.text == expected.text and answer.finish_reason == "length"
    assert answer.server_s > 0


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        (lambda: encode_message(Prompt([1, 2, 3])), "has 3 token ids; the Open said 8"),
        (lambda: encode_message(Prompt([1] * 7 + [10**6])), "outside the vocabulary"),
        (lambda: '{"type": "prompt", "token_ids": [1, 2, -3, 4, 5, 6, 7, 8]}', "non-negative"),
        (lambda: '{"type": "prompt", "token_ids": [1.5, 2, 3, 4, 5, 6, 7, 8]}', "integer"),
        (lambda: '{"type": "prompt", "token_ids": "12345678"}', "non-empty list"),
        (lambda: encode_frame("prefill", hidden(8)), "got a frame"),
        (lambda: encode_message(Open(prompt_tokens=1, max_tokens=1, client=CLIENT)),
         "expected a prompt"),
    ],
)  # fmt: skip
def test_bad_prompt_ids_are_a_clear_error(server: Server, message: Any, fragment: str) -> None:
    with session(server) as ws:
        assert open_session(ws, layer=0, prompt_ids=True).prompt_ids
        ws.send(message())
        error = expect_error(ws, "bad_request")
        assert fragment in error.message, error.message
    wait_idle(server)
    still_serves(server)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ('{"type": "open", "version": 99, "prompt_tokens": 4, "max_tokens": 2, '
         '"client": {"flops_per_s": 1, "uplink_bps": 1, "downlink_bps": 1, "rtt_s": 0}}',
         "version_mismatch"),
        ("not json", "bad_request"),
        ('{"type": "open", "prompt_tokens": 4}', "bad_request"),
        ('{"type": "open", "prompt_tokens": 4, "max_tokens": 2, "model": "other", '
         '"client": {"flops_per_s": 1, "uplink_bps": 1, "downlink_bps": 1, "rtt_s": 0}}',
         "unknown_model"),
        ('{"type": "open", "prompt_tokens": 1020, "max_tokens": 10, '
         '"client": {"flops_per_s": 1, "uplink_bps": 1, "downlink_bps": 1, "rtt_s": 0}}',
         "bad_request"),
        ('{"type": "open", "prompt_tokens": 4, "max_tokens": 2, "layer": 7, '
         '"client": {"flops_per_s": 1, "uplink_bps": 1, "downlink_bps": 1, "rtt_s": 0}}',
         "bad_request"),
    ],
)  # fmt: skip
def test_bad_open_is_a_clear_error(server: Server, message: str, code: str) -> None:
    with session(server) as ws:
        ws.send(message)
        expect_error(ws, code)


def test_oversized_frame_is_refused(server: Server) -> None:
    tokens = int(SPLIT_MAX_FRAME_MB * 2**20 / (HIDDEN * 4)) + 8
    with session(server) as ws:
        open_session(ws, prompt_tokens=tokens - 20, max_tokens=1)
        ws.send(encode_frame("prefill", hidden(tokens)))
        error = expect_error(ws, "payload_too_large")
        assert "exceeds" in error.message
    still_serves(server)


def test_too_many_sessions_are_refused_and_slots_come_back(server: Server) -> None:
    """A session that finds every slot taken waits up to --split-queue-s for one, then is
    refused with a retry hint; the slots come back when the sessions end."""
    with session(server) as first, session(server) as second, session(server) as third:
        held = [first, second, third]
        with session(server) as fourth:
            held.append(fourth)
            for ws in held:
                open_session(ws)
            began = time.monotonic()
            with session(server) as extra:
                extra.send(encode_message(Open(prompt_tokens=8, max_tokens=4, client=CLIENT)))
                error = expect_error(extra, "too_many_sessions")
                assert str(SPLIT_MAX_SESSIONS) in error.message
                assert error.retry_after_s is not None and error.retry_after_s >= 1.0
                assert time.monotonic() - began >= SPLIT_QUEUE_S - 0.5  # it queued first
    with session(server) as again:  # the slots were given back
        open_session(again)


def test_a_queued_session_gets_the_next_free_slot(server: Server) -> None:
    with ExitStack() as stack:
        held = [stack.enter_context(session(server)) for _ in range(SPLIT_MAX_SESSIONS)]
        for ws in held:
            open_session(ws)
        with session(server) as queued:
            queued.send(encode_message(Open(prompt_tokens=8, max_tokens=4, client=CLIENT)))
            time.sleep(0.5)
            info = httpx.get(f"{server.base_url}/v1/split/info", headers=server.headers)
            assert info.json()["queued_sessions"] == 1, info.json()
            held[0].send(encode_message(Close()))  # a slot frees within the queue's wait
            plan = decode_message(queued.recv(timeout=60))
            assert isinstance(plan, Plan), plan


def test_disconnect_mid_decode_frees_the_kv_cache(server: Server) -> None:
    before = metrics(server)
    outcome = 'outcome="disconnected"'
    disconnected = metric_value(before, "adaptivellm_split_sessions_total", outcome)
    with session(server) as ws:
        plan = open_session(ws, prompt_tokens=200, max_tokens=50, layer=3)
        assert plan.layer == 3
        ws.send(encode_frame("prefill", hidden(200)))
        first = decode_message(ws.recv(timeout=60))
        assert isinstance(first, Token) and first.finish_reason is None
        ws.send(encode_frame("decode", hidden(1)))
        assert isinstance(decode_message(ws.recv(timeout=60)), Token)
        # The session now holds 201 tokens of KV cache; vanish without a Close.
    after = wait_idle(server)
    now = metric_value(after, "adaptivellm_split_sessions_total", outcome)
    assert (now or 0) == (disconnected or 0) + 1
    still_serves(server)


def test_silent_client_is_timed_out(server: Server) -> None:
    with session(server) as ws:
        open_session(ws, prompt_tokens=16, max_tokens=8, layer=2)
        ws.send(encode_frame("prefill", hidden(16)))
        assert isinstance(decode_message(ws.recv(timeout=60)), Token)
        began = time.monotonic()
        time.sleep(1.0)
        # /v1/split/info says what the open session waits for, and how long it has waited.
        info = httpx.get(f"{server.base_url}/v1/split/info", headers=server.headers, timeout=30)
        assert info.json()["sessions_waiting_for"] == {"client": 1}, info.json()
        assert 1.0 <= info.json()["longest_wait_s"] < SPLIT_IDLE_TIMEOUT_S
        error = expect_error(ws, "bad_request")  # sends nothing more
        assert "no message" in error.message
        assert time.monotonic() - began >= SPLIT_IDLE_TIMEOUT_S - 1
    wait_idle(server)
