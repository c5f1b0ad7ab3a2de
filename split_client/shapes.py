"""Model shapes and element sizes, written once.

`ModelShape` is what the split planner counts FLOPs and bytes over, what the preemption cost
predictors key their profiles by, and what the split client and server agree on; `DTYPE_BYTES` is
the one table of element sizes (the split wire carries exactly these dtypes). Standard library
only: the cost predictors use it on every scheduler step, and the client package installs
without vLLM.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from adaptivellm.model import ModelSpec

#: Bytes per element of the dtypes AdaptiveLLM serves in and the split wire carries
#: (bfloat16 travels as raw 16-bit words). Torch dtypes are `getattr(torch, name)`.
DTYPE_BYTES: Final[dict[str, int]] = {"float32": 4, "float16": 2, "bfloat16": 2}
#: PyTorch's other names for the same dtypes (as `torch_dtype` in some config.json files).
_ALIASES: Final = {"float": "float32", "half": "float16"}
#: Model types whose MLP is two matrices (up, down) rather than a gated three (gate, up, down).
_UNGATED_MODEL_TYPES: Final = frozenset(
    {"gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "phi", "bert"}
)
#: The fields of a shape that its `config_hash` covers (the decoder layers' dimensions).
_HASHED: Final = (
    "num_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
)


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


def wire_dtype(model_dtype: Any) -> str:
    """The dtype split chunks travel in for a model served in `model_dtype` (a name or a torch
    dtype): the model's where the wire carries it (float32, float16, bfloat16), else float32."""
    name = canonical_dtype(str(model_dtype))
    return name if name in DTYPE_BYTES else "float32"


def _check_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ModelShape:
    """Shape of a decoder-only transformer: all that the split planner and the preemption cost
    predictors need to count FLOPs and bytes.

    Every decoder layer has the same shape. `name` is a label and `vocab_size` matters only to the
    LM head (0 when unknown: the preemption predictors never need it, the split planner refuses
    it); neither takes part in equality or in `config_hash`.
    """

    num_layers: int
    """Decoder layers (each has its own KV cache)."""
    hidden_size: int
    """Width of the residual stream."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (fewer than num_heads under grouped-query attention)."""
    head_dim: int
    """Width of one attention head."""
    intermediate_size: int
    """Width of the MLP."""
    dtype_bytes: int = 4
    """Bytes per element of weights, activations, KV cache and hidden states on the wire."""
    gated_mlp: bool = True
    """SwiGLU-style MLP with gate, up and down matrices (Llama); False for GPT-2's two."""
    vocab_size: int = field(default=0, compare=False)
    """Rows of the LM head; 0 when unknown."""
    name: str = field(default="", compare=False)
    """A label: the model type or preset."""

    def __post_init__(self) -> None:
        for name in (*_HASHED, "dtype_bytes"):
            _check_int(name, getattr(self, name))
        _check_int("vocab_size", self.vocab_size, minimum=0)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer (attention projections and MLP; norms are negligible)."""
        q_dim = self.num_heads * self.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        attention = 2 * self.hidden_size * q_dim + 2 * self.hidden_size * kv_dim
        mlp = (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size
        return attention + mlp

    @property
    def layer_weight_bytes(self) -> int:
        """Bytes of weights one forward pass through a layer reads."""
        return self.layer_params * self.dtype_bytes

    def layer_flops(self, new_tokens: float, context_before: Any) -> Any:
        """FLOPs of one layer for `new_tokens` tokens appended after `context_before` cached ones.

        Linear layers cost 2 FLOPs per weight per token. With a causal mask the t-th new token
        attends to context_before + t keys, and QK^T and AV cost 2 * head_dim FLOPs per head
        per (query, key) pair each: this is the term that grows quadratically with length.
        `context_before` may be a numpy array (one decode step per element).
        """
        pairs = new_tokens * context_before + new_tokens * (new_tokens + 1) / 2
        return 2.0 * self.layer_params * new_tokens + 4.0 * self.num_heads * self.head_dim * pairs

    def kv_bytes(self, tokens: Any) -> Any:
        """Bytes of one layer's KV cache for `tokens` tokens."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes * tokens

    @property
    def hidden_bytes_per_token(self) -> int:
        """Bytes of the residual stream of one token: what crosses a split boundary."""
        return self.hidden_size * self.dtype_bytes

    @property
    def lm_head_flops_per_token(self) -> int:
        """FLOPs of the final projection to the vocabulary for one token."""
        return 2 * self.hidden_size * self.vocab_size

    def config_hash(self) -> str:
        """Short stable hash of the decoder layers' dimensions, without the dtype (the profile
        key carries it): two checkpoints of the same shape cost the same, whatever their
        weights."""
        dims = {name: getattr(self, name) for name in _HASHED}
        return hashlib.sha256(json.dumps(dims, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def preset(cls, name: str) -> ModelShape:
        """One of `PRESETS` by name (`gpt2`, `llama3-8b`, `llama3-70b`)."""
        try:
            return PRESETS[name]
        except KeyError:
            known = ", ".join(sorted(PRESETS))
            raise ValueError(f"unknown model preset {name!r}; known: {known}") from None

    @classmethod
    def from_spec(cls, spec: ModelSpec, dtype: str = "float32") -> ModelShape:
        """Shape of a model built by `adaptivellm.model` from `spec`."""
        return cls(
            num_layers=spec.num_layers,
            hidden_size=spec.hidden_size,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            intermediate_size=spec.intermediate_size,
            dtype_bytes=dtype_bytes(dtype),
            vocab_size=spec.vocab_size,
            name="llama",
        )

    @classmethod
    def from_hf_config(
        cls, config: Mapping[str, Any] | str | Path, dtype: str | None = None
    ) -> ModelShape:
        """Shape from a Hugging Face `config.json`: its dict, the file, or a folder holding it.

        Understands Llama-style names (`hidden_size`, `num_key_value_heads`, ...) and GPT-2's
        (`n_embd`, `n_head`, `n_layer`, `n_inner`); a multimodal config's `text_config` is used
        when the top level has no hidden size. `dtype` is the dtype served in; None takes the
        config's own (`torch_dtype` or `dtype`; float32 when it names none, as transformers
        loads it).
        """
        default_name = ""
        if not isinstance(config, Mapping):
            config, default_name = _read_config(Path(config))
        if "hidden_size" not in config and isinstance(config.get("text_config"), Mapping):
            config = {**config["text_config"], "model_type": config.get("model_type", "")}
        if dtype is not None:
            size = dtype_bytes(dtype)
        else:
            named = config.get("torch_dtype") or config.get("dtype") or "float32"
            size = DTYPE_BYTES.get(canonical_dtype(str(named)), 2)
        return _shape_from_dict(config, size, default_name)


def _read_config(path: Path) -> tuple[dict[str, Any], str]:
    file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read a model config from {file}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return config, file.parent.name


def _shape_from_dict(config: Mapping[str, Any], size: int, default_name: str) -> ModelShape:
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    heads = _config_int(config, "num_attention_heads", "n_head")
    model_type = str(config.get("model_type") or "")
    return ModelShape(
        num_layers=_config_int(config, "num_hidden_layers", "n_layer"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        # Some configs carry head_dim: null; the Llama default is hidden / heads.
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate_size=int(
            config.get("intermediate_size") or config.get("n_inner") or 4 * hidden
        ),
        dtype_bytes=size,
        gated_mlp=model_type not in _UNGATED_MODEL_TYPES,
        vocab_size=int(config.get("vocab_size") or 0),
        name=model_type or default_name,
    )


def _config_int(config: Mapping[str, Any], *keys: str) -> int:
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    raise ValueError(f"model config has none of {', '.join(keys)}")


def _preset(name: str, hidden: int, mlp: int, heads: int, kv: int, layers: int, vocab: int,
            gated: bool = True) -> ModelShape:  # fmt: skip
    return ModelShape(
        num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv,
        head_dim=hidden // heads, intermediate_size=mlp, dtype_bytes=2, gated_mlp=gated,
        vocab_size=vocab, name=name,
    )  # fmt: skip


#: Model shapes used by the planner's CLI and the benchmark (fp16/bf16 weights and activations).
PRESETS: Final[dict[str, ModelShape]] = {
    "gpt2": _preset("gpt2", 768, 3072, 12, 12, 12, 50257, gated=False),
    "llama3-8b": _preset("llama3-8b", 4096, 14336, 32, 8, 32, 128256),
    "llama3-70b": _preset("llama3-70b", 8192, 28672, 64, 8, 80, 128256),
}
