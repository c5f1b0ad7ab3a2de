"""The embedded model builder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptivellm.model import (
    MANIFEST,
    ModelSpec,
    build_model,
    ensure_model,
    model_dir,
    synthetic_corpus,
    verify_model,
)

SMALL = ModelSpec(num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=1,
                  intermediate_size=128, vocab_size=600, max_position_embeddings=256)  # fmt: skip


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_model(SMALL, cache=tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_layers", 0, "num_layers"),
        ("hidden_size", 65, "multiple of num_heads"),
        ("num_kv_heads", 3, "multiple of num_kv_heads"),
        ("num_heads", 8, "head_dim"),  # 256 / 8 = 32 is fine, 64 / 8 = 8 is not
        ("vocab_size", 100, "vocab_size"),
        ("initializer_range", 0.0, "initializer_range"),
    ],
)
def test_spec_rejects_bad_shapes(field: str, value: float, message: str) -> None:
    base = dict(hidden_size=64, num_heads=2, num_kv_heads=1)
    base[field] = value  # type: ignore[assignment]
    with pytest.raises(ValueError, match=message):
        ModelSpec(**base)  # type: ignore[arg-type]


def test_key_depends_on_every_field() -> None:
    assert ModelSpec().key() == ModelSpec().key()
    assert ModelSpec(seed=1).key() != ModelSpec().key()
    assert ModelSpec(num_layers=7).key() != ModelSpec().key()


def test_corpus_is_seeded() -> None:
    assert synthetic_corpus(0, 50) == synthetic_corpus(0, 50)
    assert synthetic_corpus(0, 50) != synthetic_corpus(1, 50)


def test_built_model_has_the_requested_shape(small_model: Path) -> None:
    config = json.loads((small_model / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert config["hidden_size"] == 64
    assert config["num_key_value_heads"] == 1
    assert config["vocab_size"] == 600
    assert verify_model(small_model, SMALL)
    assert not verify_model(small_model, ModelSpec())  # another spec


def test_tokenizer_round_trips_and_has_chat_template(small_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(small_model))
    text = "The river city 1234, quiet morning!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert max(tok.encode(text)) < SMALL.vocab_size
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    assert chat == "<s><|user|>\nhi<|end|>\n<|assistant|>\n"


def test_build_is_deterministic(small_model: Path, tmp_path: Path) -> None:
    again = build_model(SMALL, tmp_path / "again")
    first = json.loads((small_model / MANIFEST).read_text())["files"]
    second = json.loads((again / MANIFEST).read_text())["files"]
    assert first == second


def test_corrupt_model_is_detected_and_rebuilt(tmp_path: Path) -> None:
    path = ensure_model(SMALL, cache=tmp_path)
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-100] + b"\0" * 100)
    assert not verify_model(path, SMALL)
    assert ensure_model(SMALL, cache=tmp_path) == path
    assert weights.read_bytes() == good


@pytest.mark.parametrize("damage", ["delete_manifest", "garble_manifest", "delete_weights"])
def test_incomplete_model_is_rebuilt(tmp_path: Path, damage: str) -> None:
    path = ensure_model(SMALL, cache=tmp_path)
    if damage == "delete_manifest":
        (path / MANIFEST).unlink()
    elif damage == "garble_manifest":
        (path / MANIFEST).write_text("{not json")
    else:
        (path / "model.safetensors").unlink()
    assert not verify_model(path)
    assert ensure_model(SMALL, cache=tmp_path) == model_dir(SMALL, cache=tmp_path)
    assert verify_model(path, SMALL)
