"""Split execution end to end with the real client library: greedy split generation equals
unsplit generation token for token, for k = 0, a middle layer, N-1 and N, with split and
ordinary requests in the same batches."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
from transformers import DynamicCache

from adaptivellm.launch import metric_value
from adaptivellm.model import ensure_model
from adaptivellm.split_client.client import SplitClient, SplitError
from adaptivellm.split_client.protocol import ClientSpec, Token
from tests.support import API_KEY, Server

NUM_LAYERS = 6
PROMPTS = ("the quick brown fox jumps over the lazy dog", "a b c d e f g h i j k l m n o p")
MAX_TOKENS = 12
SPEC = ClientSpec(flops_per_s=5e10, uplink_bps=1e9, downlink_bps=1e9, rtt_s=0.001)


@pytest.fixture(scope="module")
def openai_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def split(server: Server) -> Iterator[SplitClient]:
    # The client computes in this process while the server's worker spins its OpenMP threads on
    # the same 2 cores: more than one torch thread here makes both crawl (oversubscription).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with SplitClient(server.base_url, ensure_model(), api_key=API_KEY, client_spec=SPEC) as c:
        # Load and run every layer once before any session: first calls of a torch model pay
        # one-off initialisation that, on 2 busy cores, can outlast the server's idle timeout.
        c.model.ensure_layers(NUM_LAYERS)
        c.model.hidden_states([5, 6, 7], NUM_LAYERS, DynamicCache())
        yield c
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(split: SplitClient, openai_client: openai.OpenAI, server: Server) -> dict:
    """Unsplit greedy generations through the ordinary API, alone on the server."""
    out = {}
    for prompt in PROMPTS:
        ids = split.encode(prompt)
        done = openai_client.completions.create(
            model=server.model, prompt=ids, max_tokens=MAX_TOKENS, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )  # fmt: skip
        out[prompt] = (list(done.choices[0].token_ids or []), done.choices[0].text)
        assert len(out[prompt][0]) == MAX_TOKENS
    return out


def metrics(server: Server) -> str:
    return httpx.get(f"{server.base_url}/metrics", timeout=30).text


class Background:
    """Ordinary requests running on the server the whole time (the split ones join their
    batches). Each thread has its own client; threads are daemons and always stopped."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.stop = threading.Event()
        #: Set once a background request has streamed its first token: it is in the batch.
        self.started = threading.Event()
        self.done = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def _run(self) -> None:
        client = openai.OpenAI(
            base_url=self.server.api_url, api_key=API_KEY, max_retries=0, timeout=300
        )
        try:
            while not self.stop.is_set():
                finish = None
                for chunk in client.completions.create(
                    model=self.server.model, prompt="keep the batch busy", max_tokens=200,
                    extra_body={"ignore_eos": True}, stream=True,
                ):  # fmt: skip
                    self.started.set()
                    finish = chunk.choices[0].finish_reason if chunk.choices else finish
                assert finish == "length", finish  # all 200 tokens (EOS is ignored)
                self.done += 1
        except BaseException as exc:  # reported by __enter__ / the test, never lost
            self.errors.append(exc)
            self.started.set()

    def __enter__(self) -> Background:
        # The first streamed token, not a sample of the running-requests gauge: a 200-token
        # request on the tiny model can start and finish between two samples.
        for t in self.threads:
            t.start()
        if not self.started.wait(timeout=120) or self.errors:
            self.__exit__()
            raise AssertionError(f"background requests did not start: {self.errors!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)


MIXED_PASSES = ("adaptivellm_split_forward_passes_total", 'batch="mixed"')


@pytest.mark.parametrize("layer", [0, 3, NUM_LAYERS - 1, NUM_LAYERS])
def test_split_greedy_equals_unsplit_in_mixed_batches(
    layer: int, split: SplitClient, reference: dict, server: Server
) -> None:
    before = metrics(server)
    mixed_before = metric_value(before, *MIXED_PASSES) or 0
    rounds = 0
    with Background(server) as background:
        # Whether a split token lands in the same forward pass as a background token is up to
        # timing on 2 busy cores: the split prompts are generated again (each time checked)
        # until one did, within a deadline, and the check below still fails if none ever did.
        deadline = time.monotonic() + 120
        while True:
            results = {p: split.generate(p, max_tokens=MAX_TOKENS, ignore_eos=True, layer=layer)
                       for p in PROMPTS}  # fmt: skip
            rounds += 1
            for prompt, result in results.items():
                assert result.layer == layer and result.plan.planned_by == "client"
                assert result.plan.server_decodes == (layer == 0)  # k = 0: no round trip per token
                assert result.plan.prompt_ids == (layer == 0)  # k = 0: the prompt as ids
                assert result.token_ids == reference[prompt][0], prompt
                assert result.text == reference[prompt][1]
                assert result.finish_reason == "length"
            mixed = metric_value(metrics(server), *MIXED_PASSES) or 0
            if layer == 0 or mixed > mixed_before or time.monotonic() > deadline:
                break
    assert not background.errors, background.errors
    assert background.done >= 1
    after = metrics(server)
    saved = 'kind="saved"'
    name = "adaptivellm_split_token_layers_total"
    gained = (metric_value(after, name, saved) or 0) - (metric_value(before, name, saved) or 0)
    if layer == 0:
        assert gained == 0  # k = 0: the server runs every layer
    else:
        # Each generated token (prompt tokens too) skipped `layer` layers on the server. At
        # k = N the engine got only each prompt's last row (rows_for_engine): the others were
        # skipped before the engine, and counted as such.
        prompt_tokens = sum(len(split.encode(p)) for p in PROMPTS)
        skipped = "adaptivellm_split_rows_skipped_total"
        rows_skipped = (metric_value(after, skipped) or 0) - (metric_value(before, skipped) or 0)
        if layer == NUM_LAYERS:
            assert rows_skipped == rounds * (prompt_tokens - len(PROMPTS)) > 0
            prompt_tokens = len(PROMPTS)
        else:
            assert rows_skipped == 0
        assert gained == rounds * layer * (prompt_tokens + len(PROMPTS) * (MAX_TOKENS - 1))
        # Split and ordinary tokens shared a forward pass.
        assert (metric_value(after, *MIXED_PASSES) or 0) > mixed_before
        # Each decode chunk reached the model runner as its one new row; the runner put the
        # context it held back in front (P + i - 1 rows before the i-th of M - 1 chunks).
        rows = "adaptivellm_split_context_rows_total"
        sent, held = (
            (metric_value(after, rows, kind) or 0) - (metric_value(before, rows, kind) or 0)
            for kind in ('kind="sent"', 'kind="held"')
        )
        chunks = MAX_TOKENS - 1
        assert sent == rounds * len(PROMPTS) * chunks
        assert held == rounds * (chunks * prompt_tokens + len(PROMPTS) * chunks * (chunks - 1) // 2)


def test_planner_chooses_k_and_output_still_matches(split: SplitClient, reference: dict) -> None:
    prompt = PROMPTS[0]
    result = split.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, sla_s=120.0)
    assert result.plan.planned_by == "planner"
    assert 0 <= result.layer <= NUM_LAYERS
    assert result.token_ids == reference[prompt][0]


def test_the_planner_asks_no_more_layers_than_the_clients_memory_holds(
    split: SplitClient, reference: dict
) -> None:
    """A loose SLA and a fast client: the planner offloads as many layers as it can. Declaring
    memory for two and a half layers (weights plus KV cache for the request) caps k at 2, and
    the output is still the unsplit one."""
    prompt = PROMPTS[0]
    free = split.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, sla_s=120.0)
    assert free.plan.planned_by == "planner"
    assert free.layer > 2, (
        f"precondition: a roomy client takes more than 2 layers, got {free.layer}: "
        f"{free.plan}, client {split.client_spec}, server {split.info()['calibration']}"
    )
    tokens = len(split.encode(prompt)) + MAX_TOKENS
    shape = split.model.shape
    split.memory_bytes = 2.5 * (shape.layer_weight_bytes + shape.kv_bytes(tokens))
    try:
        tight = split.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, sla_s=120.0)
    finally:
        split.memory_bytes = None
    assert tight.plan.planned_by == "planner" and tight.layer == 2
    assert tight.token_ids == reference[prompt][0]


def test_stream_is_shaped_like_openai_and_matches(split: SplitClient, reference: dict) -> None:
    prompt = PROMPTS[1]
    chunks = list(split.stream(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, layer=2))
    assert len(chunks) == MAX_TOKENS
    assert all(isinstance(c, openai.types.Completion) for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == reference[prompt][1]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_eos_stops_a_split_generation(split: SplitClient, reference: dict) -> None:
    """Without ignore_eos the session ends at the first EOS or at max_tokens."""
    result = split.generate(PROMPTS[0], max_tokens=MAX_TOKENS, layer=3)
    assert result.finish_reason in ("stop", "length")
    expected = reference[PROMPTS[0]][0]
    assert result.token_ids == expected[: len(result.token_ids)]


def open_sessions(server: Server) -> float:
    return metric_value(metrics(server), "adaptivellm_split_sessions_open") or 0.0


def ended_sessions(server: Server) -> float:
    """Split sessions that ended, whatever their outcome."""
    return metric_value(metrics(server), "adaptivellm_split_sessions_total") or 0.0


def test_abandoned_stream_frees_its_session(split: SplitClient, server: Server) -> None:
    """A session whose client walks away mid-decode is closed on the server: the open-session
    gauge returns to its value before it opened, and it counts as ended. (A session still
    held would leave the gauge one higher; a later session would still find a free slot, so
    the gauge is what shows a leak.)"""
    before_open, before_ended = open_sessions(server), ended_sessions(server)
    stream = split.stream(PROMPTS[0], max_tokens=40, ignore_eos=True, layer=3)
    next(stream)
    next(stream)
    assert open_sessions(server) == before_open + 1  # it is open while it decodes
    stream.close()  # the client walks away mid-decode
    deadline = time.monotonic() + 60
    while open_sessions(server) != before_open and time.monotonic() < deadline:
        time.sleep(0.2)
    assert open_sessions(server) == before_open
    assert ended_sessions(server) == before_ended + 1
    # A new session right away works (the old one's slot and KV cache are given back).
    again = split.generate(PROMPTS[1], max_tokens=3, ignore_eos=True, layer=3)
    assert len(again.token_ids) == 3


def test_wrong_key_is_a_clear_client_error(server: Server) -> None:
    client = SplitClient(server.base_url, ensure_model(), api_key="wrong", client_spec=SPEC)
    with client, pytest.raises(SplitError) as err:
        client.generate("x", max_tokens=2)
    assert err.value.code == "unauthorized"


def test_cli_prints_the_same_text(server: Server, reference: dict) -> None:
    prompt = PROMPTS[0]
    done = subprocess.run(
        [sys.executable, "-m", "adaptivellm.cli", "split-client", "--url", server.base_url,
         "--api-key", API_KEY, "--layer", "4", "--max-tokens", str(MAX_TOKENS), "--ignore-eos",
         "--json", prompt],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "[transformers]" not in done.stderr, done.stderr  # a normal run warns of nothing
    report = json.loads(done.stdout)
    assert report["text"] == reference[prompt][1]
    assert report["layer"] == 4


def test_split_chat_equals_the_servers_chat_completion(
    split: SplitClient, openai_client: openai.OpenAI, server: Server
) -> None:
    """`SplitClient.chat` goes through the model's chat template as vLLM's chat endpoint does:
    the same prompt tokens, so the same greedy tokens, at an interior split."""
    messages = [
        {"role": "system", "content": "you are terse"},
        {"role": "user", "content": PROMPTS[1]},
    ]
    served = openai_client.chat.completions.create(
        model=server.model, messages=messages, max_tokens=MAX_TOKENS, temperature=0.0,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    done = split.chat(messages, max_tokens=MAX_TOKENS, ignore_eos=True, layer=3)
    assert done.layer == 3
    assert done.prompt_token_ids == served.prompt_token_ids  # type: ignore[attr-defined]
    assert done.token_ids == list(served.choices[0].token_ids or [])  # type: ignore[attr-defined]
    assert len(done.token_ids) == MAX_TOKENS
    with pytest.raises(ValueError, match="role and content"):
        split.chat([{"role": "user"}], max_tokens=2)


def test_served_whole_the_prompt_goes_up_as_embeddings_for_a_client_that_asks(
    server: Server, reference: dict
) -> None:
    """A client that does not offer token ids (`prompt_ids=False`, as one older than the field)
    sends the prompt's embeddings at k = 0, and gets the same tokens."""
    with SplitClient(server.base_url, ensure_model(), api_key=API_KEY, client_spec=SPEC,
                     prompt_ids=False) as client:  # fmt: skip
        for prompt in PROMPTS:
            result = client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, layer=0)
            assert result.plan.server_decodes and not result.plan.prompt_ids
            assert result.token_ids == reference[prompt][0], prompt


def test_served_whole_generate_gets_one_answer_and_on_token_a_stream(
    split: SplitClient, reference: dict
) -> None:
    """At k = 0, `generate()` without `on_token` asks for the answer in one message
    (`Open.stream` False) and `on_token` keeps the token-by-token stream: both give the
    reference's tokens and the same text, and `on_token` sees every token."""
    prompt = PROMPTS[0]
    whole = split.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, layer=0)
    seen: list[Token] = []
    streamed = split.generate(
        prompt, max_tokens=MAX_TOKENS, ignore_eos=True, layer=0, on_token=seen.append
    )
    assert whole.plan.server_decodes and whole.plan.prompt_ids
    assert whole.token_ids == streamed.token_ids == reference[prompt][0]
    assert whole.text == streamed.text and whole.finish_reason == "length"
    assert [t.token_id for t in seen] == streamed.token_ids
    assert [t.index for t in seen] == list(range(MAX_TOKENS))
    # One answer: every token after the first arrived with it (no wait of its own).
    assert all(t.round_trip_s == 0.0 for t in whole.timings[1:])


@pytest.mark.parametrize("layer", [0, 3])
def test_a_dropped_connection_resumes_with_the_same_tokens(
    split: SplitClient, server: Server, openai_client: openai.OpenAI, layer: int
) -> None:
    """The network drops mid-decode (the socket goes away, no close frame): the client opens a
    new session at the same k and replays its layer-k inputs, and greedy output is the same
    token for token as without the drop (k = 0: the server was decoding on its own). The
    dropped session is freed on the server. At k = 0 the server streams on its own, so the
    generation is long: a fresh-clone CI's 12 tokens had all arrived before the drop at the
    fifth (nothing left to resume)."""
    prompt = PROMPTS[0]
    tokens = 200 if layer == 0 else MAX_TOKENS
    expected = openai_client.completions.create(
        model=server.model, prompt=split.encode(prompt), max_tokens=tokens, temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ).choices[0].token_ids  # fmt: skip
    before_open = open_sessions(server)
    # At k = 0 the server may have sent every token before the client, slowed on a busy machine,
    # handles the fifth (a fresh-clone CI: 200 tokens in 1.2 s, no resume needed): such a run
    # proves nothing, and is made again, up to 3 times.
    dropped: list[int] = []

    def drop(token: Token) -> None:
        if token.index == 4 and not dropped:
            split._open[-1].socket.shutdown(socket.SHUT_RDWR)
            dropped.append(token.index)

    for _ in range(3):
        dropped.clear()
        done = split.generate(prompt, max_tokens=tokens, ignore_eos=True, layer=layer,
                              on_token=drop)  # fmt: skip
        if done.resumes or done.token_ids != expected:
            break
    assert dropped == [4] and done.resumes == 1 and done.layer == layer
    assert done.token_ids == expected
    assert [t.index for t in done.timings] == list(range(tokens))
    deadline = time.monotonic() + 60
    while open_sessions(server) != before_open and time.monotonic() < deadline:
        time.sleep(0.2)
    assert open_sessions(server) == before_open


def test_a_session_is_not_resumed_when_resumes_are_off(server: Server) -> None:
    with SplitClient(server.base_url, ensure_model(), api_key=API_KEY, client_spec=SPEC,
                     resumes=0) as client:  # fmt: skip

        def drop(token: Token) -> None:
            if token.index == 1:
                client._open[-1].socket.shutdown(socket.SHUT_RDWR)

        with pytest.raises(SplitError) as err:
            client.generate(PROMPTS[1], max_tokens=6, ignore_eos=True, layer=3, on_token=drop)
        assert err.value.code == "connection_closed"
        with client.conversation(layer=3) as conv, pytest.raises(SplitError) as err:
            conv.send(PROMPTS[1], max_tokens=6, ignore_eos=True, on_token=drop)
        assert err.value.code == "connection_closed" and conv.sessions == 1


def test_a_conversation_dropped_mid_turn_resumes_and_goes_on(
    split: SplitClient, server: Server, openai_client: openai.OpenAI
) -> None:
    """The connection drops in the middle of a conversation's second turn: a new session at the
    same k replays the layer-k inputs of the whole conversation, the turn goes on token for
    token as unsplit, and the third turn is a follow-up on the resumed session (its new tokens
    only). The dropped session is freed on the server."""
    before_open = open_sessions(server)
    turns = [split.encode(PROMPTS[0]), split.encode(PROMPTS[1])[1:], split.encode("and then")[1:]]
    dropped: list[int] = []

    def drop(token: Token) -> None:
        if token.index == 4 and not dropped:
            split._open[-1].socket.shutdown(socket.SHUT_RDWR)
            dropped.append(token.index)

    with split.conversation(layer=3) as conv:
        context: list[int] = []
        for number, ids in enumerate(turns):
            done = conv.send(ids, max_tokens=MAX_TOKENS, ignore_eos=True,
                             on_token=drop if number == 1 else None)  # fmt: skip
            context += ids
            assert done.token_ids == unsplit(openai_client, server, context, MAX_TOKENS), number
            assert [t.index for t in done.timings] == list(range(MAX_TOKENS))
            assert done.resumes == (1 if number == 1 else 0) and done.layer == 3
            context += done.token_ids
        assert dropped == [4] and conv.history == context
        assert conv.sessions == 2  # the first, and the resumed one that served turns 2 and 3
        # Only the third turn reused the session's tokens: the resumed second sent them all.
        assert conv.reused_tokens == len(context) - len(turns[2]) - MAX_TOKENS - 1
    deadline = time.monotonic() + 60
    while open_sessions(server) != before_open and time.monotonic() < deadline:
        time.sleep(0.2)
    assert open_sessions(server) == before_open


def prediction_errors(server: Server) -> float:
    text = metrics(server)
    return sum(
        metric_value(text, "adaptivellm_split_latency_prediction_error_count", label) or 0.0
        for label in ('direction="over"', 'direction="under"')
    )


def test_each_finished_session_records_its_prediction_error(
    split: SplitClient, server: Server
) -> None:
    """The plan's latency prediction against the latency measured: one observation per
    finished session, on /metrics (planner and client-chosen k alike), and in the calibration
    that /v1/split/info reports."""
    before = prediction_errors(server)
    seen = split.info()["calibration"]["interior"]["sessions"]
    done = split.generate(PROMPTS[0], max_tokens=4, ignore_eos=True, layer=2)
    assert done.plan.predicted_latency_s is not None and done.plan.predicted_latency_s > 0
    deadline = time.monotonic() + 30
    while prediction_errors(server) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert prediction_errors(server) == before + 1
    calibration = split.info()["calibration"]["interior"]  # 0 < k = 2 < 6
    assert calibration["sessions"] == min(seen + 1, 64)  # the recent window holds 64
    assert calibration["slack"] >= 1.0 and calibration["calibration"] > 0


def test_a_long_prefill_teaches_the_planner_its_rate(split: SplitClient) -> None:
    """A split prefill of enough rows (>= 256 token-layers on the server) sets the prefill rate
    the planner prices prompts with; /v1/split/info shows it."""
    done = split.generate(" ".join(["the quick brown fox"] * 40), max_tokens=2, layer=2)
    assert done.plan.layer == 2
    profile = split.info()["server_profile"]
    assert profile["prefill_flops_per_s"] is not None
    assert 0 < profile["prefill_flops_per_s"] < math.inf and profile["step_overhead_s"] > 0


def unsplit(openai_client: openai.OpenAI, server: Server, ids: list[int], tokens: int) -> list:
    return list(
        openai_client.completions.create(
            model=server.model, prompt=ids, max_tokens=tokens, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        ).choices[0].token_ids or []  # type: ignore[attr-defined]
    )  # fmt: skip


@pytest.mark.parametrize("layer", [3, 0])
def test_a_conversation_keeps_its_session_and_matches_unsplit(
    split: SplitClient, server: Server, openai_client: openai.OpenAI, layer: int
) -> None:
    """Three turns. At k = 3 one session serves them all: each later turn sends only its new
    tokens (and the last reply's final token), on the KV cache both sides kept. At k = 0 the
    server does not keep sessions, so each turn opens one with the whole conversation. Either
    way each reply equals the unsplit completion of the conversation so far, and nothing is
    left open on the server. The conversation's SLA holds for each turn: /metrics counts every
    turn against it, the first of each session and the follow-up turns apart."""
    before_open = open_sessions(server)
    before = {turn: sla_turns(server, turn) for turn in ("first", "follow_up")}
    turns = [split.encode(PROMPTS[0]), split.encode(PROMPTS[1])[1:], split.encode("and then")[1:]]
    with split.conversation(layer=layer, sla_s=600.0) as conv:
        context: list[int] = []
        for ids in turns:
            done = conv.send(ids, max_tokens=MAX_TOKENS, ignore_eos=True)
            context += ids
            assert done.layer == layer and done.prompt_token_ids == ids
            assert done.token_ids == unsplit(openai_client, server, context, MAX_TOKENS)
            context += done.token_ids
        assert conv.history == context
        if layer:
            assert conv.sessions == 1
            held = len(turns[0]) + MAX_TOKENS + len(turns[1]) + MAX_TOKENS
            assert conv.reused_tokens == (len(turns[0]) + MAX_TOKENS - 1) + (held - 1)
            assert open_sessions(server) == before_open + 1  # kept between turns
        else:
            assert conv.sessions == len(turns) and conv.reused_tokens == 0
    deadline = time.monotonic() + 30
    while open_sessions(server) != before_open and time.monotonic() < deadline:
        time.sleep(0.2)
    assert open_sessions(server) == before_open
    counted = {turn: sla_turns(server, turn) - before[turn] for turn in before}
    assert counted == {"first": conv.sessions, "follow_up": len(turns) - conv.sessions}


def sla_turns(server: Server, turn: str) -> float:
    """Turns counted against an SLA on /metrics (met or not)."""
    return metric_value(metrics(server), "adaptivellm_split_sla_total", f'turn="{turn}"') or 0.0


def test_a_turn_beyond_the_context_is_refused_and_the_next_starts_over(
    split: SplitClient, server: Server, openai_client: openai.OpenAI
) -> None:
    """A turn that would overflow the model's context with what the session holds gets a clear
    bad_request (the session ends); the conversation's next turn opens a new session with the
    whole history, and its reply still equals unsplit."""
    limit = int(split.info()["max_model_len"])
    first = split.encode(PROMPTS[0])
    with split.conversation(layer=2) as conv:
        conv.send(first, max_tokens=4, ignore_eos=True)
        with pytest.raises(SplitError) as err:
            conv.send([5] * 8, max_tokens=limit, ignore_eos=True)
        assert err.value.code == "bad_request" and "context" in str(err.value)
        follow = split.encode(PROMPTS[1])[1:]
        done = conv.send(follow, max_tokens=4, ignore_eos=True)
        assert conv.sessions == 2
        assert done.token_ids == unsplit(openai_client, server, conv.history[:-4], 4)
