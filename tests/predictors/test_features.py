"""Feature and shape arithmetic on hand-made inputs, and the analytic fallback's behaviour."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adaptivellm.model import ModelSpec
from adaptivellm.predictors.analytic import AnalyticCosts, AnalyticPredictor
from adaptivellm.predictors.features import (
    ModelShape,
    PreemptionFeatures,
    blocks_for,
    dtype_bytes,
    kv_bytes,
)

# 2 layers, 4 heads of 32 (hidden 128), 2 KV heads, MLP 256, float16.
SHAPE = ModelShape(
    num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
    intermediate_size=256, dtype_bytes=2,
)  # fmt: skip


def test_kv_bytes_counts_whole_blocks_k_and_v_all_layers() -> None:
    """17 tokens in blocks of 16 fill 2 blocks. One block of one layer holds K and V:
    2 * 16 tokens * 2 kv heads * 32 dims * 2 bytes = 4096 bytes; 2 blocks * 2 layers -> 16384."""
    assert blocks_for(17, 16) == 2
    assert blocks_for(16, 16) == 1
    assert kv_bytes(SHAPE, 17, 16) == 16384
    assert PreemptionFeatures.for_victim(SHAPE, 17, 16).swap_bytes == 16384


def test_features_of_a_victim() -> None:
    """40 tokens fill ceil(40 / 16) = 3 blocks; recomputing them is a 40-token prefill."""
    f = PreemptionFeatures.for_victim(SHAPE, 40, 16)
    assert f.num_blocks == 3
    # Causal pairs: 40*41/2.
    assert f.attention_pairs == 820
    # Per layer: 2 FLOPs per weight per token + 4 * heads * head_dim per pair.
    params = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256
    assert SHAPE.layer_params == params
    assert f.recompute_flops() == 2 * (2.0 * params * 40 + 4.0 * 4 * 32 * 820)


def test_features_validate() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        PreemptionFeatures(num_tokens=33, num_blocks=2, block_size=16, shape=SHAPE)
    with pytest.raises(ValueError):
        PreemptionFeatures.for_victim(SHAPE, 0, 16)
    with pytest.raises(ValueError, match="multiple"):
        ModelShape(2, 128, 4, 3, 32, 256)
    with pytest.raises(ValueError, match="dtype"):
        dtype_bytes("int8")


def test_shape_from_hf_config_and_spec_agree() -> None:
    """A config.json like the embedded model's gives the same shape (and hash) as its spec."""
    spec = ModelSpec()
    config = {
        "num_hidden_layers": 6, "hidden_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 1024,
    }  # fmt: skip
    from_config = ModelShape.from_hf_config(config, "bfloat16")
    assert from_config == ModelShape.from_spec(spec, "bfloat16")
    assert from_config.dtype_bytes == 2
    # The hash ignores the dtype (the profile key carries it) and changes with the shape.
    assert from_config.config_hash() == ModelShape.from_spec(spec, "float32").config_hash()
    other = ModelShape.from_hf_config({**config, "num_hidden_layers": 7})
    assert other.config_hash() != from_config.config_hash()


def test_shape_from_config_defaults() -> None:
    """No num_key_value_heads -> MHA; head_dim null -> hidden / heads."""
    config = {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 2,
              "head_dim": None, "intermediate_size": 128}  # fmt: skip
    shape = ModelShape.from_hf_config(json.loads(json.dumps(config)))
    assert (shape.num_kv_heads, shape.head_dim, shape.dtype_bytes) == (2, 32, 4)


def test_embedded_model_config_matches_spec() -> None:
    """The profile CLI keys the embedded model by its spec; the server by its config.json."""
    from adaptivellm.model import ensure_model

    config = json.loads((ensure_model() / "config.json").read_text())
    assert ModelShape.from_hf_config(config) == ModelShape.from_spec(ModelSpec())


sizes = st.integers(min_value=1, max_value=8192)


@given(n=sizes, extra=st.integers(1, 4096))
def test_analytic_is_monotonic(n: int, extra: int) -> None:
    """More tokens never cost less to swap, and always cost more to recompute."""
    p = AnalyticPredictor()
    small = PreemptionFeatures.for_victim(SHAPE, n, 16)
    large = PreemptionFeatures.for_victim(SHAPE, n + extra, 16)
    assert 0 < p.swap_s(small) <= p.swap_s(large)
    assert 0 < p.recompute_s(small) < p.recompute_s(large)


def test_analytic_recompute_is_quadratic_swap_linear() -> None:
    """Long victims: recompute grows faster than swap, so swap wins past some length."""
    p = AnalyticPredictor(AnalyticCosts.for_device("cpu"))
    short, long = (PreemptionFeatures.for_victim(SHAPE, n, 16) for n in (64, 8192))
    assert p.recompute_s(long) / p.recompute_s(short) > p.swap_s(long) / p.swap_s(short)
    assert p.swap_s(long) < p.recompute_s(long)
