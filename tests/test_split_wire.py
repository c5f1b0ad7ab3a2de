"""The split chunk's wire format inside vLLM (adaptivellm.split_wire): packed by the API server,
unpacked by the engine core, its layer read by the worker."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptivellm.split_wire import EXTRA_KEY, layer_of, pack, unpack, wire_dtype


@pytest.mark.parametrize(
    ("dtype", "torch_dtype", "width"),
    [("float32", torch.float32, 4), ("float16", torch.float16, 2), ("bfloat16", torch.bfloat16, 2)],
)
def test_a_chunk_keeps_its_dtype_and_values_across_the_wire(
    dtype: str, torch_dtype: torch.dtype, width: int
) -> None:
    values = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).to(torch_dtype)
    payload = pack(4, values.float().numpy(), dtype)
    assert len(payload["embeds"]) == 3 * 8 * width  # 2 bytes a value for half precision
    layer, tensor = unpack(payload)
    assert layer == 4 and payload == {"layer": 4}  # only the layer rides on to the worker
    assert tensor.dtype == torch_dtype and tensor.shape == (3, 8)
    assert torch.equal(tensor, values)  # values already in dtype come back bit for bit


def test_bfloat16_rounds_to_nearest_even_as_torch_does() -> None:
    values = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    _, tensor = unpack(pack(1, values.numpy(), "bfloat16"))
    assert torch.equal(tensor, values.to(torch.bfloat16))


def test_an_unknown_dtype_is_refused() -> None:
    payload = pack(1, np.zeros((1, 4), dtype=np.float32), "float32")
    payload["dtype"] = "int8"
    with pytest.raises(ValueError, match="int8"):
        unpack(payload)


def test_wire_dtype_is_the_models_where_the_wire_carries_it() -> None:
    assert wire_dtype(torch.bfloat16) == "bfloat16"
    assert wire_dtype("float16") == "float16"
    assert wire_dtype(torch.float32) == "float32"
    assert wire_dtype(torch.float64) == "float32"


def test_layer_of_reads_only_split_payloads() -> None:
    assert layer_of({EXTRA_KEY: {"layer": 3}}) == 3
    assert layer_of({EXTRA_KEY: "not a payload"}) is None
    assert layer_of({"other": 1}) is None
    assert layer_of(None) is None
