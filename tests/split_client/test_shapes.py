"""The one dtype table: every side (client, planner, wire, predictors) reads the same one."""

from __future__ import annotations

import dataclasses
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
    # The server picks the chunks' dtype and the client sizes its frames by the same function.
    assert split_wire.wire_dtype is shapes.wire_dtype
    assert [shapes.wire_dtype(d) for d in (torch.bfloat16, "half", "int8")] == [
        "bfloat16",
        "float16",
        "float32",
    ]


def test_shapes_imports_nothing_heavy() -> None:
    """The cost predictors import it on every step, and the client package has no vLLM."""
    code = (
        "import sys, adaptivellm.split_client.shapes; "
        "print([m for m in ('torch', 'numpy', 'vllm') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_model_shape_for_planner_and_predictors() -> None:
    """The planner and the cost predictors share one ModelShape; the profile key's hash covers
    the decoder layers' dimensions only (pinned: stored profiles are found by it)."""
    from adaptivellm.model import ModelSpec
    from adaptivellm.predictors import features
    from adaptivellm.split_client import planner

    assert planner.ModelShape is features.ModelShape is shapes.ModelShape
    spec_shape = shapes.ModelShape.from_spec(ModelSpec())
    assert spec_shape.config_hash() == "762e9f0e6778"
    assert shapes.PRESETS["llama3-8b"].config_hash() == "48bd48a76070"
    relabelled = dataclasses.replace(spec_shape, name="other", vocab_size=7)
    assert relabelled == spec_shape and relabelled.config_hash() == spec_shape.config_hash()


def test_from_hf_config_dtype() -> None:
    """An explicit dtype is the served one; else the config's own; float32 when it names none."""
    config = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
              "intermediate_size": 128, "torch_dtype": "bfloat16"}  # fmt: skip
    assert shapes.ModelShape.from_hf_config(config).dtype_bytes == 2
    assert shapes.ModelShape.from_hf_config(config, "float32").dtype_bytes == 4
    del config["torch_dtype"]
    bare = shapes.ModelShape.from_hf_config(config)
    assert (bare.dtype_bytes, bare.vocab_size, bare.gated_mlp) == (4, 0, True)
    with pytest.raises(ValueError, match="unknown dtype"):
        shapes.ModelShape.from_hf_config(config, "int8")


def test_planner_refuses_a_shape_without_vocabulary() -> None:
    from adaptivellm.split_client.planner import ClientProfile, Request, ServerProfile, build_costs

    shape = shapes.ModelShape(2, 64, 2, 2, 32, 128)
    client = ClientProfile(flops_per_s=1e11, uplink_bps=1e8, downlink_bps=1e8, rtt_s=0.01)
    with pytest.raises(ValueError, match="vocab_size"):
        build_costs(shape, client, ServerProfile(), Request(4, 2, 1.0))
