"""Engine-core side of split execution: hidden states arriving as streaming-input chunks.

A split session is one vLLM request in resumable (streaming-input) mode: the API server feeds it
one chunk per step, the prompt's hidden states first and then one token's hidden state per
decode step; each chunk generates exactly one token (`max_tokens=1`), after which vLLM parks the
session in `WAITING_FOR_STREAMING_REQ` with its KV cache kept. vLLM 0.32 refuses
`prompt_embeds` on streaming inputs in the API server (`AsyncLLM._add_streaming_input_request`),
so each chunk travels as placeholder token ids with its tensor packed in
`sampling_params.extra_args["adaptivellm_split"]` (adaptivellm.split_wire). This module turns it
back into `prompt_embeds` when the scheduler receives the chunk:

- a new session: the request becomes an embeddings-only request (`prompt_token_ids=None`, as
  vLLM's own `EmbedsPrompt` requests are), and its prefix-cache hashes are recomputed over the
  tensors, salted with k (see `cache_salt`);
- a later chunk: vLLM's `_update_request_as_session` only knows token ids, so
  `extend_session` does the same bookkeeping for embeddings (the one piece of
  vLLM logic copied here; checked against vLLM 0.32.0 by the version guard).

The model runner then feeds `prompt_embeds` to the model, whose forward pass starts each
request at its own layer k (adaptivellm.split_model).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.engine import EngineCoreEventType
from vllm.v1.request import Request, RequestStatus

from adaptivellm.split_wire import EXTRA_KEY, append_rows, layer_of, pack, unpack

__all__ = [
    "EXTRA_KEY",
    "SplitChunk",
    "SplitChunks",
    "append_rows",
    "cache_salt",
    "extend_session",
    "pack",
    "split_layer",
    "start_session",
    "take_chunk",
]


@dataclass(frozen=True)
class SplitChunk:
    """One chunk's hidden states at layer `layer`, as the scheduler receives them."""

    layer: int
    embeds: torch.Tensor


def cache_salt(layer: int) -> str:
    """Prefix-cache salt of split requests starting at `layer`.

    A split request's KV cache holds nothing meaningful below its layer k (those layers never
    ran for it), so blocks of requests with different k must never be shared even when their
    input tensors agree; ordinary requests never share them either (their hashes have no salt
    and no embeddings)."""
    return f"adaptivellm-split-k{layer}"


def take_chunk(request: Request, model_dtype: Any) -> SplitChunk | None:
    """Pop the chunk's tensor out of the request's extra_args (so it is not carried around),
    leaving `{"layer": k}` behind for the model runner. None for ordinary requests."""
    params = request.sampling_params
    extra = params.extra_args if params is not None else None
    payload = extra.get(EXTRA_KEY) if extra else None
    if not isinstance(payload, dict) or "embeds" not in payload:
        return None
    layer, embeds = unpack(payload)
    return SplitChunk(layer=layer, embeds=embeds.to(model_dtype))


def split_layer(request: Request) -> int | None:
    """k of a split request, None for an ordinary one."""
    params = request.sampling_params
    return layer_of(params.extra_args) if params is not None else None


def start_session(request: Request, chunk: SplitChunk) -> None:
    """Make a fresh request embeddings-only: its placeholder token ids become prompt_embeds."""
    if chunk.embeds.shape[0] != request.num_prompt_tokens:
        raise ValueError(
            f"split chunk has {chunk.embeds.shape[0]} tokens, request {request.num_prompt_tokens}"
        )
    request.prompt_token_ids = None
    request.prompt_is_token_ids = None
    request.prompt_embeds = chunk.embeds
    _rehash(request)


def extend_session(
    session: Request, chunk: SplitChunk, update: Any, hash_block_size: int, log_stats: bool
) -> bool:
    """vLLM's `Scheduler._update_request_as_session` for an embeddings-only session: drop the
    sampled token of the last chunk (the client sends it back as this chunk's hidden state),
    append the chunk and make the session waiting again. Returns True if the session was
    waiting for input (the caller decrements vLLM's counter of such sessions)."""
    computed = session.num_computed_tokens
    if computed != session.num_prompt_tokens or session.prompt_embeds is None:
        raise ValueError(
            f"split session {session.request_id}: {computed} tokens computed of "
            f"{session.num_prompt_tokens} prompt tokens; a chunk must generate one token"
        )
    del session._all_token_ids[computed:]
    del session.block_hashes[computed // hash_block_size :]
    session._output_token_ids.clear()
    session.prompt_embeds = append_rows(session, session.prompt_embeds, chunk.embeds)
    session._all_token_ids.extend([0] * chunk.embeds.shape[0])
    session.num_prompt_tokens = session.prompt_embeds.shape[0]
    session.update_block_hashes()
    session.arrival_time = update.arrival_time
    session.sampling_params = update.sampling_params
    session.max_tokens = update.max_tokens
    was_waiting = session.status == RequestStatus.WAITING_FOR_STREAMING_REQ
    session.status = RequestStatus.WAITING
    if log_stats:
        session.record_event(EngineCoreEventType.QUEUED)
    return was_waiting


def _rehash(request: Request) -> None:
    request.cache_salt = cache_salt(split_layer(request) or 0)
    request.block_hashes = []
    request._prompt_embeds_per_block_hashes = {}
    request.update_block_hashes()


class SplitChunks:
    """Chunks received for live sessions, applied in arrival order (vLLM may queue a chunk
    that arrives while the session is still running its previous one)."""

    def __init__(self) -> None:
        self._pending: dict[str, deque[SplitChunk]] = {}

    def push(self, request_id: str, chunk: SplitChunk) -> None:
        self._pending.setdefault(request_id, deque()).append(chunk)

    def pop(self, request_id: str) -> SplitChunk | None:
        queue = self._pending.get(request_id)
        return queue.popleft() if queue else None

    def drop(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def __len__(self) -> int:
        return sum(len(q) for q in self._pending.values())
