"""Element sizes of the dtypes AdaptiveLLM serves and carries, written once.

Shared by the split client, the planner, the split wire format (adaptivellm.split_wire) and the
preemption cost predictors. Standard library only: the cost predictors import it on every
scheduler step, and the client package installs without vLLM.
"""

from __future__ import annotations

from typing import Final

#: Bytes per element of the dtypes AdaptiveLLM serves in and the split wire carries
#: (bfloat16 travels as raw 16-bit words). Torch dtypes are `getattr(torch, name)`.
DTYPE_BYTES: Final[dict[str, int]] = {"float32": 4, "float16": 2, "bfloat16": 2}
#: PyTorch's other names for the same dtypes (as `torch_dtype` in some config.json files).
_ALIASES: Final = {"float": "float32", "half": "float16"}


def canonical_dtype(name: str) -> str:
    """`name` without a `torch.` prefix and with PyTorch's aliases resolved ('half' ->
    'float16'); unknown names are returned as they are."""
    bare = str(name).removeprefix("torch.")
    return _ALIASES.get(bare, bare)


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of `dtype` ('float32', 'bfloat16' or 'float16'; a `torch.` prefix and
    the aliases 'float' and 'half' are accepted). ValueError for any other dtype."""
    try:
        return DTYPE_BYTES[canonical_dtype(dtype)]
    except KeyError:
        known = sorted(DTYPE_BYTES)
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {known}") from None
