"""A split session watches its socket while the engine makes its token: a client that leaves
then ends the session at once (its engine request aborted, its KV cache freed), instead of when
the engine next answers. A fresh-clone CI saw a session outlive its client by more than 30 s
with its request held back in the engine. Here the engine and the socket are stand-ins, so the
order of events is exact; tests/e2e/test_split_protocol.py covers disconnects on a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import WebSocketDisconnect

from adaptivellm.split_client.protocol import Close, ProtocolError, Token, Turn, encode_message
from adaptivellm.split_server import Session


class Socket:
    """A WebSocket whose client speaks when the test says so."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.receives = 0

    async def receive(self) -> dict[str, Any]:
        self.receives += 1
        return await self.inbox.get()


class Engine:
    """An engine whose outputs come when the test says so; records aborts."""

    def __init__(self) -> None:
        self.outputs: asyncio.Queue[Any] = asyncio.Queue()
        self.aborted: list[str] = []
        self.closed = False

    async def stream(self) -> AsyncIterator[Any]:
        try:
            while (item := await self.outputs.get()) is not None:
                yield item
        finally:
            self.closed = True

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def output(token: int) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(
        outputs=[SimpleNamespace(token_ids=[token], text=f"t{token}")], finished=False
    )


def session(idle_timeout_s: float = 5.0) -> tuple[Session, Socket, Engine]:
    from types import SimpleNamespace

    engine, socket = Engine(), Socket()
    service = SimpleNamespace(engine=engine, config=SimpleNamespace(idle_timeout_s=idle_timeout_s))
    s = Session(service, socket)  # type: ignore[arg-type]
    s.outputs = engine.stream()
    return s, socket, engine


async def leaves(message: dict[str, Any]) -> tuple[BaseException, Engine, Session]:
    s, socket, engine = session()
    waiting = asyncio.ensure_future(s._next_token())
    await asyncio.sleep(0.01)
    assert not waiting.done()  # the engine has not answered
    socket.inbox.put_nowait(message)
    with pytest.raises((WebSocketDisconnect, ProtocolError)) as caught:
        await asyncio.wait_for(waiting, 2.0)
    await s.abort()
    return caught.value, engine, s


@pytest.mark.parametrize(
    "message",
    [
        {"type": "websocket.disconnect", "code": 1006},
        {"type": "websocket.receive", "text": encode_message(Close())},
    ],
    ids=["disconnect", "close"],
)
def test_a_client_that_leaves_while_the_engine_works_ends_the_session(
    message: dict[str, Any],
) -> None:
    error, engine, s = asyncio.run(leaves(message))
    assert isinstance(error, WebSocketDisconnect)
    assert engine.aborted == [s.request_id]  # its KV cache is freed now, not later


def test_a_message_before_the_token_is_a_protocol_error() -> None:
    error, engine, s = asyncio.run(leaves({"type": "websocket.receive", "bytes": b"\x00" * 8}))
    assert isinstance(error, ProtocolError) and error.code == "bad_request"
    assert engine.aborted == [s.request_id]


def test_the_engine_answering_first_loses_no_client_message() -> None:
    """The receive started while the engine worked is the next `_receive`'s: a frame the
    client sends after the token is not lost, and no second receive runs beside it."""

    async def run() -> tuple[tuple[int, str], str | bytes, int, Engine]:
        s, socket, engine = session()
        engine.outputs.put_nowait(output(7))
        token = await s._next_token()
        socket.inbox.put_nowait({"type": "websocket.receive", "bytes": b"frame"})
        received = await s._receive()
        return token, received, socket.receives, engine

    token, received, receives, engine = asyncio.run(run())
    assert token == (7, "t7")
    assert received == b"frame"
    assert receives == 1
    assert engine.aborted == []


def test_the_engine_ending_early_is_an_engine_error() -> None:
    async def run() -> None:
        s, _, engine = session()
        engine.outputs.put_nowait(None)
        await s._next_token()

    with pytest.raises(ProtocolError, match="ended the session early"):
        asyncio.run(run())


def test_an_idle_client_still_times_out_and_its_receive_is_cancelled() -> None:
    async def run() -> asyncio.Future[Any] | None:
        s, _, _ = session(idle_timeout_s=0.05)
        with pytest.raises(ProtocolError, match="no message for"):
            await s._receive()
        pending = s._receiving
        await s.abort()
        await asyncio.sleep(0)
        return pending

    pending = asyncio.run(run())
    assert pending is not None and pending.cancelled()


def test_the_service_reports_what_its_sessions_wait_for() -> None:
    """`/v1/split/info`'s clue to a session that outlives its client: what each open session
    waits for, and the longest wait."""
    from types import SimpleNamespace

    from adaptivellm.split_server import SplitService

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        s, _, engine = session()
        service = SimpleNamespace(open_sessions={s.request_id: s})
        waiting = asyncio.ensure_future(s._next_token())
        await asyncio.sleep(0.05)
        during = SplitService.waits(service)  # type: ignore[arg-type]
        engine.outputs.put_nowait(output(3))
        await waiting
        receiving = asyncio.ensure_future(s._receive())
        await asyncio.sleep(0)
        after = SplitService.waits(service)  # type: ignore[arg-type]
        receiving.cancel()
        await s.abort()
        return during, after

    during, after = asyncio.run(run())
    assert during["sessions_waiting_for"] == {"engine": 1}
    assert during["longest_wait_s"] >= 0.04
    assert after["sessions_waiting_for"] == {"client": 1}
    assert after["longest_wait_s"] < 0.04


# --------------------------------------------------------------------------- multi-turn


def turn_session(context: int, max_model_len: int = 64, idle: float = 5.0) -> tuple:
    s, socket, _ = session(idle)
    s.service.max_model_len = max_model_len  # type: ignore[attr-defined]
    s.context = context
    return s, socket


def next_turn(context: int, message: dict[str, Any] | None, **kw: Any) -> Any:
    async def run() -> Any:
        s, socket = turn_session(context, **kw)
        if message is not None:
            socket.inbox.put_nowait(message)
        return await s._next_turn()

    return asyncio.run(run())


def text(message: Any) -> dict[str, Any]:
    return {"type": "websocket.receive", "text": encode_message(message)}


def test_a_turn_after_a_finished_turn_is_accepted_when_it_fits() -> None:
    turn = Turn(prompt_tokens=10, max_tokens=13)
    assert next_turn(40, text(turn)) == turn  # 40 + 10 + 1 + 13 = 64: fits exactly


def test_a_turn_that_overflows_the_context_is_a_clear_error() -> None:
    with pytest.raises(ProtocolError, match="holds 41 tokens") as err:
        next_turn(41, text(Turn(prompt_tokens=10, max_tokens=13)))
    assert err.value.code == "bad_request"


@pytest.mark.parametrize(
    "message",
    [text(Close()), {"type": "websocket.disconnect", "code": 1006}, None],
    ids=["close", "disconnect", "idle-timeout"],
)
def test_close_a_disconnect_or_silence_between_turns_ends_the_conversation(
    message: dict[str, Any] | None,
) -> None:
    assert next_turn(10, message, idle=0.05) is None


@pytest.mark.parametrize(
    "message, fragment",
    [
        ({"type": "websocket.receive", "bytes": b"\x00" * 8}, "binary frame"),
        (text(Token(0, 1, "x", None, 0.0)), "expected a turn or close, got token"),
        (
            {
                "type": "websocket.receive",
                "text": '{"type": "turn", "prompt_tokens": 0, "max_tokens": 1}',
            },
            "prompt_tokens must be between",
        ),
    ],
)
def test_anything_else_between_turns_is_a_protocol_error(
    message: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        next_turn(10, message)
