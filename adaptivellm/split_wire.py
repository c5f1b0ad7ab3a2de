"""How a split chunk travels inside vLLM: from the split endpoint (API server) through the engine
core to the model runner (worker). The one module all three sides import.

Between the engine core and the runner, a resumed session carries only the rows of its context
the runner does not hold (`send_new_rows`, `receive_rows`).

vLLM 0.32 refuses `prompt_embeds` on streaming inputs in the API server, so a chunk's hidden
states ride in `SamplingParams.extra_args[EXTRA_KEY]` (`pack`) beside placeholder token ids. The
engine core pops the tensor out (`unpack`) and leaves `{"layer": k}` behind, which the model
runner reads (`layer_of`). The tensor keeps the dtype it came in (the model's, for a client that
follows its plan), so a bfloat16 model's chunks cross the process boundary at 2 bytes a value.

No vLLM import: numpy and torch only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import torch

from adaptivellm.split_client.protocol import encode_payload
from adaptivellm.split_client.shapes import DTYPE_BYTES
from adaptivellm.split_client.shapes import wire_dtype as wire_dtype

#: Key of the split payload in SamplingParams.extra_args.
EXTRA_KEY: Final = "adaptivellm_split"
#: Wire dtype name -> torch dtype (the names are torch's own).
TORCH_DTYPES: Final[dict[str, torch.dtype]] = {name: getattr(torch, name) for name in DTYPE_BYTES}
#: Integer type of the same width, to reinterpret bytes as a float dtype numpy may lack.
_WORDS: Final = {2: torch.int16, 4: torch.int32}


def pack(layer: int, array: np.ndarray, dtype: str) -> dict[str, Any]:
    """The extra_args payload for one chunk: `array` (tokens, hidden) as `dtype` bytes."""
    return {
        "layer": int(layer),
        "dtype": dtype,
        "shape": [int(d) for d in array.shape],
        "embeds": encode_payload(array, dtype),
    }


def unpack(payload: dict[str, Any]) -> tuple[int, torch.Tensor]:
    """(k, the chunk's tensor in its wire dtype), taking the tensor's bytes out of `payload` so
    that only `{"layer": k}` stays behind (the payload rides with the request to the worker)."""
    raw = payload.pop("embeds")
    shape = tuple(int(d) for d in payload.pop("shape"))
    dtype = str(payload.pop("dtype", "float32"))
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"split chunk dtype {dtype!r}; carried: {sorted(TORCH_DTYPES)}")
    words = torch.frombuffer(bytearray(raw), dtype=_WORDS[DTYPE_BYTES[dtype]])
    return int(payload["layer"]), words.view(TORCH_DTYPES[dtype]).reshape(shape)


def layer_of(extra_args: Mapping[str, Any] | None) -> int | None:
    """k of a split request from its extra_args, None for an ordinary request."""
    payload = (extra_args or {}).get(EXTRA_KEY)
    return int(payload["layer"]) if isinstance(payload, dict) else None


#: The request attribute holding a session's embeddings buffer (see `append_rows`).
_BUFFER = "_adaptivellm_embeds_buffer"


def append_rows(owner: object, embeds: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`embeds` with `rows` appended, without copying `embeds` at every call.

    The result is a view of the first rows of a buffer kept on `owner` (the session's
    Request in the engine core, its CachedRequestState in the worker) whose capacity doubles
    when it is full, so a session of T tokens copies O(T) rows in all instead of O(T^2) (a
    `torch.cat` per token). Rows already handed out
    are never written again: a view given to the model runner earlier keeps its contents.
    A view of a prefix of a contiguous buffer is contiguous, so vLLM's shared-memory queue
    sends only its rows. If `embeds` is not the buffer's own view (the first chunk, or
    anything that replaced it), a new buffer is started from it."""
    n, m = embeds.shape[0], rows.shape[0]
    buffer, used = getattr(owner, _BUFFER, (None, 0))
    if (
        buffer is None
        or used != n  # rows past n were handed out: never overwrite them
        or buffer.data_ptr() != embeds.data_ptr()
        or buffer.shape[1:] != embeds.shape[1:]
        or buffer.dtype != embeds.dtype
        or buffer.shape[0] < n + m
    ):
        capacity = max(2 * (n + m), 16)
        buffer = embeds.new_empty((capacity, *embeds.shape[1:]))
        buffer[:n] = embeds
    buffer[n : n + m] = rows
    setattr(owner, _BUFFER, (buffer, n + m))
    return buffer[: n + m]


#: Attribute of a `NewRequestData` whose `prompt_embeds` hold only the rows from this index on:
#: the engine core sends a resumed split session only the rows its model runner lacks
#: (`send_new_rows`), and the runner's patched `_update_streaming_request` puts the rows it
#: holds back in front (`receive_rows`). A plain attribute, which pickle (the executor's
#: queue) carries. A runner without the patch would take the new rows for the whole context:
#: the start-up guard (`patches.split_runner.check_runner`) refuses such a runner.
ROWS_FROM: Final = "adaptivellm_rows_from"


class HeldRowsMismatch(RuntimeError):
    """The model runner does not hold the rows the engine core counted on (a bug)."""


def send_new_rows(data: Any, held: int) -> None:
    """Engine-core side: leave in `data.prompt_embeds` (a NewRequestData's, the whole context of
    a resumed split session) only the rows from `held` on, and mark where they start. `held` is
    what the model runner holds of this session: the length of the context sent last time."""
    embeds = data.prompt_embeds
    if embeds is None or not 0 < held <= embeds.shape[0]:
        rows = None if embeds is None else embeds.shape[0]
        raise ValueError(f"split session {data.req_id}: {held} rows held of a context of {rows}")
    data.prompt_embeds = embeds[held:]
    setattr(data, ROWS_FROM, held)


def receive_rows(owner: object, held: torch.Tensor | None, data: Any) -> int:
    """Model-runner side: make `data.prompt_embeds` the whole context again, from the rows the
    runner holds (`held`, its request state's `prompt_embeds`) and the new rows sent. Returns
    how many held rows were reused (0 when the engine core sent the whole context). The rows are
    appended to a buffer kept on `owner` (`append_rows`), so a session of T tokens copies O(T)
    rows in the worker in all."""
    rows_from = getattr(data, ROWS_FROM, None)
    if rows_from is None:
        return 0
    if held is None or held.shape[0] < rows_from:
        have = None if held is None else held.shape[0]
        raise HeldRowsMismatch(
            f"split session {data.req_id}: the engine core sent rows from {rows_from} on, but "
            f"the model runner holds {have}"
        )
    data.prompt_embeds = append_rows(owner, held[:rows_from], data.prompt_embeds)
    delattr(data, ROWS_FROM)
    return rows_from
