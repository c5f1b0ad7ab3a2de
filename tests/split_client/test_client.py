"""Tests of the split-execution client without a vLLM server.

The client's partial model is checked against Hugging Face's full model, and whole sessions run
against `FakeSplitServer`: an in-process WebSocket server that speaks the protocol and runs
layers k..N-1 of the real Hugging Face model (recomputing the whole sequence every step, so it
also checks the client's KV cache), with greedy sampling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from openai.types import Completion
from transformers import AutoTokenizer, DynamicCache, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

from adaptivellm.model import ensure_model
from adaptivellm.split_client import protocol
from adaptivellm.split_client.client import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_RTT_S,
    DEFAULT_UPLINK_BPS,
    ClientModel,
    SplitClient,
    SplitConnectionError,
    SplitError,
    _expect_token,
    available_memory_bytes,
    session_url,
)
from adaptivellm.split_client.client_cli import add_split_client_arguments, run_split_client
from adaptivellm.split_client.protocol import ClientSpec, Close, Open, Plan, Sampling, Token

NUM_LAYERS = 6
PROMPT = "The quiet river carries light to the city"
SPEC = ClientSpec(flops_per_s=1e11, uplink_bps=1e9, downlink_bps=1e9, rtt_s=0.001)
IDS = [5, 17, 300, 42, 9, 1000, 77, 12, 640, 3, 250, 31]


@pytest.fixture(scope="module")
def model_path() -> Path:
    return ensure_model()


@pytest.fixture(scope="module")
def hf_model(model_path: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(model_path).eval()


@pytest.fixture(scope="module")
def client_model(model_path: Path) -> ClientModel:
    return ClientModel(model_path)


# --------------------------------------------------------------------------- the fake server


@dataclass
class Behaviour:
    """How the fake server departs from a correct one."""

    error_on_open: protocol.Error | None = None
    error_opens: int = 1 << 30  # how many opens get error_on_open (the rest are served)
    error_after_plan: protocol.Error | None = None
    close_after_prefill: bool = False
    silent: bool = False
    api_key: str | None = None
    status: int | None = None
    default_layer: int = 2
    max_prompt_tokens: int = 1024
    plan_changes: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] | None = None  # GET /v1/split/info answers 404 when None


class FakeSplitServer:
    """The protocol's server side, on a thread, with the real model doing layers k..N-1."""

    def __init__(self, model: LlamaForCausalLM, tokenizer: Any, behaviour: Behaviour) -> None:
        self.model, self.tokenizer, self.behaviour = model, tokenizer, behaviour
        self.opens: list[Open] = []
        self.frames: list[protocol.TensorFrame] = []
        self.closes = 0
        self.failures: list[BaseException] = []
        self._finished = threading.Semaphore(0)
        self.server: Server = serve(
            self._handle, "127.0.0.1", 0, process_request=self._check_request, compression=None
        )
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.socket.getsockname()[1]}"

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        status = self.behaviour.status
        key = self.behaviour.api_key
        if status is None and key and request.headers.get("Authorization") != f"Bearer {key}":
            status = 401
        info = self.behaviour.info
        if status is None and request.path == protocol.INFO_PATH and info is not None:
            return connection.respond(200, json.dumps(info))
        if status is None and request.path != protocol.SESSION_PATH:
            status = 404
        return None if status is None else connection.respond(status, "refused\n")

    @property
    def max_frame_bytes(self) -> int:
        return int((self.behaviour.info or {}).get("max_frame_bytes", 1 << 20))

    def _handle(self, ws: ServerConnection) -> None:
        try:
            self._session(ws)
        except Exception as exc:  # surfaced by the test through `failures`
            self.failures.append(exc)
        finally:
            self._finished.release()

    def wait_sessions(self, count: int) -> None:
        """Wait until `count` more sessions have ended on the server side."""
        for _ in range(count):
            assert self._finished.acquire(timeout=10), "a fake server session did not end"

    def _session(self, ws: ServerConnection) -> None:
        message = protocol.decode_message(ws.recv(timeout=10))
        assert isinstance(message, Open)
        self.opens.append(message)
        if (
            self.behaviour.error_on_open is not None
            and len(self.opens) <= self.behaviour.error_opens
        ):
            ws.send(protocol.encode_message(self.behaviour.error_on_open))
            return
        plan = self._plan(message)
        ws.send(protocol.encode_message(plan))
        if self.behaviour.error_after_plan is not None:  # and close before the prefill arrives
            ws.send(protocol.encode_message(self.behaviour.error_after_plan))
            return
        if self.behaviour.silent:  # read frames, never answer, until the client gives up
            while isinstance(ws.recv(timeout=10), bytes):
                pass
            return
        self._generate(ws, message, plan.layer)

    def _plan(self, message: Open) -> Plan:
        config = self.model.config
        plan = Plan(
            session_id=f"s{len(self.opens)}",
            layer=self.behaviour.default_layer if message.layer is None else message.layer,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            dtype="float32",
            model="tiny",
            max_tokens=message.max_tokens,
            max_prompt_tokens=self.behaviour.max_prompt_tokens,
            predicted_latency_s=None,
            sla_s=message.sla_s,
            running_requests=0,
            planned_by="planner" if message.layer is None else "client",
        )
        return replace(plan, **self.behaviour.plan_changes)

    def _generate(self, ws: ServerConnection, message: Open, k: int) -> None:
        history: list[torch.Tensor] = []
        for index in range(message.max_tokens):
            wanted = message.prompt_tokens if index == 0 else 1
            rows = self._receive_rows(ws, "prefill" if index == 0 else "decode", wanted)
            if rows is None:  # the client gave up
                return
            if self.behaviour.close_after_prefill:
                return
            history += rows
            token_id = self.next_token(torch.cat(history), k)
            finish = self._finish(message, index, token_id)
            text = self.tokenizer.decode([token_id])
            ws.send(protocol.encode_message(Token(index, token_id, text, finish, 0.001)))
            if finish is not None:
                break
        with contextlib.suppress(Exception):  # the client's optional Close
            self.closes += isinstance(protocol.decode_message(ws.recv(timeout=2)), Close)

    def _receive_rows(
        self, ws: ServerConnection, kind: str, wanted: int
    ) -> list[torch.Tensor] | None:
        """The hidden states of `wanted` tokens, in one frame or several; None on Close."""
        rows: list[torch.Tensor] = []
        while sum(len(r) for r in rows) < wanted:
            data = ws.recv(timeout=10)
            if isinstance(data, str):
                self.closes += isinstance(protocol.decode_message(data), Close)
                return None
            frame = protocol.decode_frame(data, max_bytes=self.max_frame_bytes)
            self.frames.append(frame)
            assert frame.kind == kind and frame.shape[1] == self.model.config.hidden_size
            rows.append(torch.from_numpy(frame.to_numpy().copy()))
        assert sum(len(r) for r in rows) == wanted
        return rows

    @staticmethod
    def _finish(message: Open, index: int, token_id: int) -> Literal["stop", "length"] | None:
        if token_id == 1 and not message.sampling.ignore_eos:
            return "stop"
        return "length" if index + 1 == message.max_tokens else None

    @torch.no_grad()
    def next_token(self, hidden: torch.Tensor, k: int) -> int:
        """Greedy token after the whole sequence, from the residual stream entering layer k."""
        inner = self.model.model
        h = hidden[None]
        positions = torch.arange(h.shape[1])[None]
        mask = create_causal_mask(
            config=self.model.config,
            inputs_embeds=h,
            attention_mask=None,
            past_key_values=None,
            position_ids=positions,
        )
        rope = inner.rotary_emb(h, position_ids=positions)
        for layer in inner.layers[k:]:
            h = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        logits = self.model.lm_head(inner.norm(h))
        return int(logits[0, -1].argmax())


@pytest.fixture
def fake(
    request: pytest.FixtureRequest, hf_model: LlamaForCausalLM, model_path: Path
) -> Iterator[FakeSplitServer]:
    """A running fake server; parametrize indirectly with a `Behaviour` to misbehave."""
    behaviour = getattr(request, "param", None) or Behaviour()
    server = FakeSplitServer(hf_model, AutoTokenizer.from_pretrained(model_path), behaviour)
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.thread.join(timeout=10)
    assert not server.failures, server.failures


def misbehaving(**changes: Any) -> Any:
    return pytest.mark.parametrize("fake", [Behaviour(**changes)], indirect=True)


def client_for(server: FakeSplitServer, model_path: Path, **kwargs: Any) -> SplitClient:
    return SplitClient(server.url, model_path, client_spec=SPEC, timeout_s=10, **kwargs)


def hf_greedy(model: Any, ids: list[int], max_tokens: int) -> list[int]:
    """Hugging Face's own greedy generation (`model` is a LlamaForCausalLM; typed Any because
    transformers' annotation of `generate` trips mypy)."""
    inputs = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=2,
        )
    return [int(t) for t in out[0, len(ids) :]]


# --------------------------------------------------------------------------- the partial model


def hf_hidden_states(model: LlamaForCausalLM, ids: list[int]) -> list[torch.Tensor]:
    """Residual stream entering each layer 0..N, from Hugging Face. Its `hidden_states[N]` has
    the final norm applied, so entry N is taken from the last decoder layer's output instead."""
    captured: list[torch.Tensor] = []
    hook = model.model.layers[-1].register_forward_hook(lambda m, i, out: captured.append(out))
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        hook.remove()
    states = [h[0] for h in out.hidden_states[:NUM_LAYERS]]
    last = captured[0][0] if isinstance(captured[0], tuple) else captured[0]
    return [*states, last[0]]


@pytest.mark.parametrize("k", [0, 3, NUM_LAYERS])
def test_hidden_states_match_hugging_face(
    k: int, hf_model: LlamaForCausalLM, client_model: ClientModel
) -> None:
    expected = hf_hidden_states(hf_model, IDS)[k]
    got = client_model.hidden_states(IDS, k, DynamicCache())
    assert got.shape == (len(IDS), 256) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_layer_states_hold_every_split_of_the_hidden_states(
    hf_model: LlamaForCausalLM, client_model: ClientModel
) -> None:
    """What the split benchmark's replay clients send: row k of `layer_states` is what a client
    at split k computes, for every k."""
    expected = hf_hidden_states(hf_model, IDS)
    every = client_model.layer_states(IDS)
    assert every.shape == (NUM_LAYERS + 1, len(IDS), 256)
    for k in range(NUM_LAYERS + 1):
        torch.testing.assert_close(every[k], expected[k], rtol=0, atol=1e-5)
    assert client_model.layer_states(IDS, 2).shape == (3, len(IDS), 256)


def test_final_hidden_state_of_hugging_face_is_normed(hf_model: LlamaForCausalLM) -> None:
    """Why the k = N reference above comes from a hook: HF normalises its last hidden state."""
    with torch.no_grad():
        out = hf_model(torch.tensor([IDS]), output_hidden_states=True)
    normed = hf_model.model.norm(hf_hidden_states(hf_model, IDS)[NUM_LAYERS])
    torch.testing.assert_close(out.hidden_states[NUM_LAYERS][0], normed)


@pytest.mark.parametrize("k", [0, 1, 3, NUM_LAYERS])
def test_decode_steps_with_kv_cache_match_full_recompute(k: int, client_model: ClientModel) -> None:
    cache = DynamicCache()
    steps = [client_model.hidden_states(IDS[:7], k, cache)]
    steps += [client_model.hidden_states([t], k, cache) for t in IDS[7:]]
    full = client_model.hidden_states(IDS, k, DynamicCache())
    # Hidden values reach ~150 with these random weights, and one-token attention reduces in
    # another order than the full pass (HF's own cached decode differs as much): compare to
    # float32 resolution at that scale.
    torch.testing.assert_close(torch.cat(steps), full, rtol=0, atol=1e-5 * float(full.abs().max()))
    assert cache.get_seq_length() == (len(IDS) if k else 0)


def test_half_precision_compute_stays_close(model_path: Path, client_model: ClientModel) -> None:
    reference = client_model.hidden_states(IDS, 2, DynamicCache())
    half = ClientModel(model_path, dtype="bfloat16").hidden_states(IDS, 2, DynamicCache())
    assert half.dtype == torch.bfloat16
    error = (half.float() - reference).norm() / reference.norm()
    assert error < 0.05


def test_only_the_needed_tensors_are_read(model_path: Path) -> None:
    model = ClientModel(model_path)
    assert model.tensors_read == []
    model.ensure_layers(0)
    assert model.tensors_read == ["model.embed_tokens.weight"]
    model.ensure_layers(3)
    read = model.tensors_read
    assert {name.split(".")[2] for name in read[1:]} == {"0", "1", "2"}
    assert len(read) == 1 + 3 * 9 and len(set(read)) == len(read)
    model.ensure_layers(2)
    assert model.tensors_read == read  # nothing read again
    model.ensure_layers(5)
    extra = model.tensors_read[len(read) :]
    assert {name.split(".")[2] for name in extra} == {"3", "4"}
    assert not any(n.startswith(("lm_head", "model.norm", "model.layers.5")) for n in extra + read)


def test_sharded_checkpoint_is_read_through_its_index(model_path: Path, tmp_path: Path) -> None:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_path / name, tmp_path / name)
    (tmp_path / "shard-1.safetensors").symlink_to(model_path / "model.safetensors")
    full = ClientModel(model_path)
    names = full.checkpoint.files
    index = {"weight_map": dict.fromkeys(names, "shard-1.safetensors")}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = ClientModel(tmp_path)
    torch.testing.assert_close(
        sharded.hidden_states(IDS, 2, DynamicCache()), full.hidden_states(IDS, 2, DynamicCache())
    )


def test_bad_model_folder_and_dtype(tmp_path: Path, model_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        ClientModel(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        ClientModel(model_path, dtype="int8")
    with pytest.raises(ValueError, match="out of range"):
        ClientModel(model_path).ensure_layers(NUM_LAYERS + 1)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/v1/split/session"),
        ("https://example.org/", "wss://example.org/v1/split/session"),
        ("http://h:1/v1", "ws://h:1/v1/split/session"),
        ("http://h:1/prefix/v1/split/session", "ws://h:1/prefix/v1/split/session"),
        ("ws://h:1", "ws://h:1/v1/split/session"),
    ],
)
def test_session_url(url: str, expected: str) -> None:
    assert session_url(url) == expected


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://h/", "http://"])
def test_bad_server_url(url: str) -> None:
    with pytest.raises(ValueError, match="server URL"):
        session_url(url)


# --------------------------------------------------------------------------- sessions


@pytest.mark.parametrize("k", [0, 3, NUM_LAYERS])
def test_split_greedy_generation_equals_hugging_face(
    k: int, fake: FakeSplitServer, model_path: Path, hf_model: LlamaForCausalLM
) -> None:
    with client_for(fake, model_path) as client:
        done = client.generate(IDS, max_tokens=8, layer=k)
    assert done.token_ids == hf_greedy(hf_model, IDS, 8)
    assert done.layer == k and done.plan.planned_by == "client"
    assert done.finish_reason in ("stop", "length") and len(done.timings) == len(done.token_ids)
    assert done.text == "".join(fake.tokenizer.decode([t]) for t in done.token_ids)
    decodes = len(done.token_ids) - 1
    assert [f.shape for f in fake.frames] == [(len(IDS), 256)] + [(1, 256)] * decodes
    assert all(t.round_trip_s > 0 and t.client_compute_s > 0 for t in done.timings)
    fake.wait_sessions(1)
    assert fake.closes == 1  # the client said goodbye after the last token
    opened = fake.opens[0]
    assert (opened.prompt_tokens, opened.max_tokens, opened.layer) == (len(IDS), 8, k)
    assert opened.client == SPEC


def test_string_prompt_is_tokenized_as_vllm_does(fake: FakeSplitServer, model_path: Path) -> None:
    with client_for(fake, model_path) as client:
        done = client.generate(PROMPT, max_tokens=3, ignore_eos=True)
    expected = fake.tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
    assert done.prompt_token_ids == expected
    assert fake.opens[0].prompt_tokens == len(expected) == fake.frames[0].num_tokens
    assert fake.opens[0].sampling == Sampling(ignore_eos=True)


def test_the_planner_chooses_k_and_layers_load_lazily(
    fake: FakeSplitServer, model_path: Path
) -> None:
    with client_for(fake, model_path) as client:
        done = client.generate(IDS, max_tokens=2)  # the fake planner says k = 2
        assert (done.layer, done.plan.planned_by) == (2, "planner")
        first = client.model.tensors_read
        assert max(int(n.split(".")[2]) for n in first if ".layers." in n) == 1
        client.generate(IDS, max_tokens=2, layer=4)
        later = client.model.tensors_read
    assert later[: len(first)] == first and len(set(later)) == len(later)
    assert {n.split(".")[2] for n in later[len(first) :]} == {"2", "3"}
    assert not any(n.startswith(("lm_head", "model.norm")) for n in later)


def test_sampling_sla_and_defaults_travel_in_open(fake: FakeSplitServer, model_path: Path) -> None:
    with client_for(fake, model_path, layer=1, sla_s=5.0) as client:
        client.generate(IDS, max_tokens=1, temperature=0.5, top_p=0.9, top_k=7, seed=3)
        client.generate(IDS, max_tokens=1, layer=3, sla_s=2.0)
    first, second = fake.opens
    assert (first.layer, first.sla_s, second.layer, second.sla_s) == (1, 5.0, 3, 2.0)
    assert first.sampling == Sampling(temperature=0.5, top_p=0.9, top_k=7, seed=3)


def test_openai_shaped_result(fake: FakeSplitServer, model_path: Path) -> None:
    with client_for(fake, model_path) as client:
        done = client.generate(IDS, max_tokens=4, ignore_eos=True)
    result = done.to_openai()
    assert isinstance(result, Completion) and result.object == "text_completion"
    assert result.choices[0].text == done.text
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(IDS), 4)


def test_stream_yields_openai_completion_chunks(fake: FakeSplitServer, model_path: Path) -> None:
    with client_for(fake, model_path) as client:
        done = client.generate(IDS, max_tokens=5, layer=3, ignore_eos=True)
        chunks = list(client.stream(IDS, max_tokens=5, layer=3, ignore_eos=True))
    assert len(chunks) == 5 and all(isinstance(c, Completion) for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == done.text
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 4 + ["length"]
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == "tiny"


def test_stopping_a_stream_early_closes_the_session(
    fake: FakeSplitServer, model_path: Path
) -> None:
    with client_for(fake, model_path) as client:
        stream = client.stream(IDS, max_tokens=10, ignore_eos=True)
        next(stream), next(stream)
        stream.close()
    fake.wait_sessions(1)
    assert fake.closes == 1 and len(fake.frames) == 2


def test_interleaved_streams_keep_separate_caches(fake: FakeSplitServer, model_path: Path) -> None:
    with client_for(fake, model_path, layer=3) as client:
        alone = [client.generate(p, max_tokens=4, ignore_eos=True).text for p in (IDS, PROMPT)]
        first = client.stream(IDS, max_tokens=4, ignore_eos=True)
        second = client.stream(PROMPT, max_tokens=4, ignore_eos=True)
        pairs = list(zip(first, second, strict=True))
    texts = [
        "".join(a.choices[0].text for a, _ in pairs),
        "".join(b.choices[0].text for _, b in pairs),
    ]
    assert texts == alone


def test_client_spec_is_measured_once_with_documented_link_defaults(
    fake: FakeSplitServer, model_path: Path
) -> None:
    with SplitClient(fake.url, model_path, timeout_s=10, calibrate=False) as client:
        client.generate(IDS, max_tokens=1)
        client.generate(IDS, max_tokens=1)
    first, second = (message.client for message in fake.opens)
    assert first is not None and first == second
    assert first.flops_per_s > 1e6 and first.mem_bytes_per_s > 1e6
    assert 0 < first.layer_overhead_s < 1.0  # eager per-layer time, measured
    assert (first.uplink_bps, first.rtt_s) == (DEFAULT_UPLINK_BPS, DEFAULT_RTT_S)


#: A frame limit that fits three rows of the tiny model's float32 hidden states.
THREE_ROWS = 64 + protocol.MAX_HEADER_BYTES + 3 * 256 * 4


@misbehaving(info={"protocol_version": 1, "num_layers": 6, "max_frame_bytes": THREE_ROWS})
def test_long_prompt_goes_in_several_prefill_frames(
    fake: FakeSplitServer, model_path: Path, hf_model: LlamaForCausalLM
) -> None:
    with client_for(fake, model_path, layer=2) as client:
        assert client.info()["num_layers"] == 6
        done = client.generate(IDS, max_tokens=3, ignore_eos=True)
        assert client.max_frame_bytes == THREE_ROWS
    assert [f.shape for f in fake.frames] == [(3, 256)] * 4 + [(1, 256)] * 2
    assert [f.kind for f in fake.frames] == ["prefill"] * 4 + ["decode"] * 2
    assert done.token_ids == hf_greedy(hf_model, IDS, 3)


def test_frame_limit_falls_back_without_info_and_can_be_given(
    fake: FakeSplitServer, model_path: Path
) -> None:
    with client_for(fake, model_path) as client:
        client.generate(IDS, max_tokens=1)
        assert client.max_frame_bytes == DEFAULT_MAX_FRAME_BYTES  # the fake answers 404
        with pytest.raises(SplitConnectionError) as info:
            client.info()
        assert info.value.code == "not_found"
    assert [f.shape for f in fake.frames] == [(len(IDS), 256)]
    with client_for(fake, model_path, max_frame_bytes=THREE_ROWS + 256 * 4) as client:
        client.generate(IDS, max_tokens=1)
    assert [f.shape for f in fake.frames[1:]] == [(4, 256)] * 3


# --------------------------------------------------------------------------- errors


@misbehaving(error_on_open=protocol.Error("too_many_sessions", "64 sessions are open"))
def test_server_error_becomes_split_error(fake: FakeSplitServer, model_path: Path) -> None:
    with client_for(fake, model_path) as client, pytest.raises(SplitError) as info:
        client.generate(IDS)
    assert info.value.code == "too_many_sessions"
    assert "64 sessions are open" in str(info.value)


BUSY = protocol.Error("infeasible_sla", "busy: retry in about 0.1 s", retry_after_s=0.1)


@misbehaving(error_on_open=BUSY, error_opens=1)
def test_a_refusal_with_a_retry_hint_is_waited_out_and_retried_with_what_is_left_of_the_sla(
    fake: FakeSplitServer, model_path: Path
) -> None:
    with client_for(fake, model_path) as client:
        done = client.generate(IDS, max_tokens=2, ignore_eos=True, sla_s=30.0)
    assert done.busy_retries == 1 and len(done.token_ids) == 2
    first, retry = (o.sla_s for o in fake.opens)
    assert first == 30.0 and retry is not None and 29.0 < retry <= 30.0 - 0.1


@misbehaving(error_on_open=BUSY)
def test_busy_retries_are_bounded_and_never_outlive_the_sla(
    fake: FakeSplitServer, model_path: Path
) -> None:
    with client_for(fake, model_path) as client, pytest.raises(SplitError) as info:
        client.generate(IDS, max_tokens=2, sla_s=30.0)
    assert info.value.code == "infeasible_sla" and len(fake.opens) == 3  # 1 + busy_retries=2
    with client_for(fake, model_path) as client, pytest.raises(SplitError):
        client.generate(IDS, max_tokens=2, sla_s=0.05)  # nothing left after a 0.1 s wait
    assert len(fake.opens) == 4
    with client_for(fake, model_path, busy_retries=0) as client, pytest.raises(SplitError):
        client.generate(IDS, max_tokens=2)
    assert len(fake.opens) == 5


@misbehaving(error_after_plan=protocol.Error("engine_error", "the engine died"))
def test_server_error_after_the_plan(fake: FakeSplitServer, model_path: Path) -> None:
    with client_for(fake, model_path) as client, pytest.raises(SplitError) as info:
        client.generate(IDS)
    assert info.value.code == "engine_error" and "the engine died" in str(info.value)


@misbehaving(api_key="sesame")
def test_missing_api_key_is_a_clear_auth_error(fake: FakeSplitServer, model_path: Path) -> None:
    with client_for(fake, model_path) as client, pytest.raises(SplitConnectionError) as info:
        client.generate(IDS)
    assert info.value.code == "unauthorized"
    assert "requires --api-key; pass api_key=" in str(info.value)
    with client_for(fake, model_path) as client, pytest.raises(SplitConnectionError) as info:
        client.info()
    assert info.value.code == "unauthorized" and "/v1/split/info" in str(info.value)
    with client_for(fake, model_path, api_key="wrong") as client, pytest.raises(SplitError) as bad:
        client.generate(IDS)
    assert "rejected the api_key" in str(bad.value)
    with client_for(fake, model_path, api_key="sesame") as client:
        assert len(client.generate(IDS, max_tokens=2, ignore_eos=True).token_ids) == 2


@misbehaving(status=403)
def test_forbidden_handshake(fake: FakeSplitServer, model_path: Path) -> None:
    with client_for(fake, model_path) as client, pytest.raises(SplitConnectionError) as info:
        client.generate(IDS)
    assert info.value.code == "unauthorized" and "HTTP 403" in str(info.value)


@misbehaving(status=404)
def test_server_without_split_endpoint(fake: FakeSplitServer, model_path: Path) -> None:
    with client_for(fake, model_path) as client, pytest.raises(SplitConnectionError) as info:
        client.generate(IDS)
    assert info.value.code == "not_found" and "split execution" in str(info.value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused(model_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = SplitClient(url, model_path, client_spec=SPEC)
    with client, pytest.raises(SplitConnectionError) as info:
        client.generate(IDS)
    assert info.value.code == "connection_refused"
    assert "connection refused" in str(info.value) and url.replace("http", "ws") in str(info.value)


@misbehaving(close_after_prefill=True)
def test_server_closing_mid_session(fake: FakeSplitServer, model_path: Path) -> None:
    with client_for(fake, model_path) as client, pytest.raises(SplitConnectionError) as info:
        client.generate(IDS)
    assert info.value.code == "connection_closed"
    assert "closed the session before it finished" in str(info.value)
    # Each resume ran at the k the planner chose first, though no token had arrived (the
    # server may not answer at k = 0 until the end: Open.stream).
    assert [o.layer for o in fake.opens] == [None, 2, 2, 2]


@misbehaving(silent=True)
def test_silent_server_times_out(fake: FakeSplitServer, model_path: Path) -> None:
    client = SplitClient(fake.url, model_path, client_spec=SPEC, timeout_s=0.3)
    with client, pytest.raises(SplitError) as info:
        client.generate(IDS)
    assert info.value.code == "timeout"


@misbehaving(max_prompt_tokens=4)
def test_prompt_longer_than_the_plan_allows(fake: FakeSplitServer, model_path: Path) -> None:
    with client_for(fake, model_path) as client, pytest.raises(SplitError) as info:
        client.generate(IDS)
    assert info.value.code == "prompt_too_long"
    assert f"{len(IDS)} tokens" in str(info.value) and "at most 4" in str(info.value)
    fake.wait_sessions(1)
    assert fake.frames == [] and fake.closes == 1


@misbehaving(plan_changes={"num_layers": 8})
def test_plan_for_another_model(fake: FakeSplitServer, model_path: Path) -> None:
    with client_for(fake, model_path) as client, pytest.raises(SplitError) as info:
        client.generate(IDS)
    assert info.value.code == "model_mismatch"


def test_bad_prompts_and_sampling(model_path: Path) -> None:
    with SplitClient("http://127.0.0.1:1", model_path, client_spec=SPEC) as client:
        with pytest.raises(ValueError, match="empty"):
            client.generate("")
        with pytest.raises(ValueError, match="token ids"):
            client.generate([5, 4096])
        with pytest.raises(ValueError, match="top_p"):
            client.generate(IDS, top_p=0.0)


# --------------------------------------------------------------------------- the command


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="adaptivellm split-client")
    add_split_client_arguments(parser)
    code = run_split_client(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_text_and_summary(
    fake: FakeSplitServer, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--url", fake.url, "--model-path", str(model_path), "--max-tokens", "4"]
    code, out, err = cli([*base, "--layer", "3", "--ignore-eos", PROMPT], capsys)
    assert code == 0 and out.strip() != ""
    assert "k=3 of 6 layers (client), 4 tokens (length), mean round trip" in err
    code, streamed, _ = cli([*base, "--layer", "3", "--ignore-eos", "--stream", PROMPT], capsys)
    assert code == 0 and streamed == out
    code, text, _ = cli([*base, "--json", "--ignore-eos", PROMPT], capsys)
    report = json.loads(text)
    assert code == 0 and report["layer"] == 2 and len(report["steps"]) == 4
    assert report["text"] + "\n" == out  # another k, the same greedy text
    assert report["plan"]["planned_by"] == "planner" and report["mean_round_trip_ms"] > 0
    # The client offers token ids for k = 0 unless told not to (an older server refuses it).
    assert fake.opens[-1].prompt_ids
    code, _, _ = cli([*base, "--no-prompt-ids", "--layer", "3", "--ignore-eos", PROMPT], capsys)
    assert code == 0 and not fake.opens[-1].prompt_ids


def test_cli_reports_connection_errors(
    model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--url", f"http://127.0.0.1:{free_port()}", "--model-path", str(model_path), "hi"]
    code, out, err = cli(argv, capsys)
    assert code == 1 and out == ""
    assert "adaptivellm split-client: error: connection refused" in err


def test_calibration_scales_the_declared_spec_to_measured_speed(
    fake: FakeSplitServer, model_path: Path
) -> None:
    """A client declaring an absurdly fast machine learns after a generation that its layers
    are slower, and declares less next time; calibrate=False keeps the spec as given."""
    fast = ClientSpec(flops_per_s=1e18, uplink_bps=1e9, downlink_bps=1e9, rtt_s=0.001,
                      mem_bytes_per_s=1e18, layer_overhead_s=1e-9)  # fmt: skip
    with SplitClient(fake.url, model_path, client_spec=fast, layer=3, timeout_s=10) as client:
        client.generate(IDS, max_tokens=3, ignore_eos=True)
        assert client.calibration > 10
        assert client.measured_rtt_s is not None and client.measured_rtt_s >= 0
        declared = client.client_spec
        assert declared.flops_per_s < fast.flops_per_s / 10
        assert declared.layer_overhead_s > fast.layer_overhead_s * 10
        client.generate(IDS, max_tokens=2, ignore_eos=True)
    assert fake.opens[-1].client == declared
    with SplitClient(fake.url, model_path, client_spec=fast, layer=3, timeout_s=10,
                     calibrate=False) as fixed:  # fmt: skip
        fixed.generate(IDS, max_tokens=2, ignore_eos=True)
        assert fixed.calibration == 1.0 and fixed.client_spec == fast


def test_free_memory_is_read_from_meminfo_and_unknown_means_no_limit(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    2048 kB\n")
    assert available_memory_bytes(meminfo) == 2048 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")
    assert math.isinf(available_memory_bytes(meminfo))
    meminfo.write_text("MemAvailable: lots\n")
    assert math.isinf(available_memory_bytes(meminfo))
    assert math.isinf(available_memory_bytes(tmp_path / "missing"))
    assert available_memory_bytes() > 0  # this machine's


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_bad_client_memory_is_refused_before_anything_loads(bad: float) -> None:
    with pytest.raises(ValueError, match="memory_bytes must be > 0"):
        SplitClient("http://127.0.0.1:9", "/nonexistent", memory_bytes=bad)


def test_declared_memory_overrides_the_spec_and_survives_calibration() -> None:
    client = SplitClient.__new__(SplitClient)  # the spec logic only: no model, no server
    client._spec = ClientSpec(1e12, 1e9, 1e9, 0.001, memory_bytes=8e9)
    client.calibration, client.measured_rtt_s, client.memory_bytes = 2.0, None, None
    assert client.client_spec.memory_bytes == 8e9  # calibration scales speed, not memory
    client.memory_bytes = 1e9
    assert client.client_spec.memory_bytes == 1e9


class _Replies:
    """A connection that answers each `recv` with the next of `messages` (JSON texts)."""

    def __init__(self, *messages: protocol.Message) -> None:
        self.messages = [protocol.encode_message(m) for m in messages]

    def recv(self, timeout: float | None = None) -> str:
        return self.messages.pop(0)


def test_a_whole_answer_becomes_one_step_a_token_and_is_checked() -> None:
    """A session served whole without a stream (k = 0): the `Tokens` answer becomes a step per
    token, the text and finish reason on the last, the server's time on the first. More tokens
    than the plan allows, or another message where a token belongs, is a protocol error."""
    plan = Plan("s1", 0, 6, 256, "float32", "tiny", 3, 1024, None, None, 0, "planner",
                server_decodes=True, prompt_ids=True)  # fmt: skip
    answer = protocol.Tokens([5, 6, 7], "abc", "length", 0.5)
    steps = _expect_token(_Replies(answer), plan, 1.0, 0.01)  # type: ignore[arg-type]
    assert isinstance(steps, list)
    assert [s.token.token_id for s in steps] == [5, 6, 7]
    assert [s.token.index for s in steps] == [0, 1, 2]
    assert [s.token.text for s in steps] == ["", "", "abc"]
    assert [s.token.finish_reason for s in steps] == [None, None, "length"]
    assert steps[0].timing.server_step_s == 0.5 and steps[0].timing.client_compute_s == 0.01
    assert steps[2].timing.round_trip_s == 0.0
    streamed = _expect_token(_Replies(Token(0, 9, "x", None, 0.2)), plan, 1.0, 0.0)  # type: ignore[arg-type]
    assert not isinstance(streamed, list) and streamed.token.token_id == 9
    assert streamed.timing.server_step_s == 0.2
    too_long = protocol.Tokens([1, 2, 3, 4], "abcd", "length", 0.5)
    with pytest.raises(SplitError, match="sent 4 tokens; the plan allows 3"):
        _expect_token(_Replies(too_long), plan, 1.0, 0.0)  # type: ignore[arg-type]
    with pytest.raises(SplitError, match="expected a token from the server, got 'close'"):
        _expect_token(_Replies(Close()), plan, 1.0, 0.0)  # type: ignore[arg-type]


def test_generate_asks_for_one_answer_only_without_on_token(
    fake: FakeSplitServer, model_path: Path
) -> None:
    """`generate()` without `on_token` sends Open.stream false (a session served whole may
    answer at once); with `on_token`, or on a client made with `one_answer=False` (for an older
    server), it asks for the stream; `stream()` always does."""
    with client_for(fake, model_path) as client:
        client.generate(IDS, max_tokens=2)
        client.generate(IDS, max_tokens=2, on_token=lambda token: None)
        list(client.stream(IDS, max_tokens=2))
    with client_for(fake, model_path, one_answer=False) as older:
        older.generate(IDS, max_tokens=2)
    assert [o.stream for o in fake.opens] == [False, True, True, True]
