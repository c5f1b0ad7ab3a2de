"""The one dtype table: every side (client, planner, wire, predictors) reads the same one."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from adaptivellm.split_client import protocol, shapes
from adaptivellm.split_client.shapes import DTYPE_BYTES, canonical_dtype, dtype_bytes


def test_dtype_bytes_and_aliases() -> None:
    assert DTYPE_BYTES == {"float32": 4, "float16": 2, "bfloat16": 2}
    assert [dtype_bytes(n) for n in ("torch.bfloat16", "half", "float")] == [2, 2, 4]
    assert canonical_dtype("int8") == "int8"
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        dtype_bytes("int8")


def test_torch_names_match_the_table() -> None:
    """Torch dtypes are derived from the table's names; their sizes agree with it."""
    for name, size in DTYPE_BYTES.items():
        assert getattr(torch, name).itemsize == size


def test_every_side_shares_the_table() -> None:
    from adaptivellm import split_wire
    from adaptivellm.predictors import features

    assert protocol.DTYPE_BYTES is features.DTYPE_BYTES is shapes.DTYPE_BYTES
    assert set(split_wire.TORCH_DTYPES) == set(DTYPE_BYTES)


def test_shapes_imports_nothing_heavy() -> None:
    """The cost predictors import it on every step, and the client package has no vLLM."""
    code = (
        "import sys, adaptivellm.split_client.shapes; "
        "print([m for m in ('torch', 'numpy', 'vllm') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
