"""How a split chunk travels inside vLLM: from the split endpoint (API server) through the engine
core to the model runner (worker). The one module all three sides import.

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
