"""What swap and recompute costs depend on: the victim's size, the step it shares, the model shape.

Pure data and arithmetic; imports neither torch nor vLLM, so the scheduler can build features
for every victim cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

from adaptivellm.split_client.shapes import DTYPE_BYTES as DTYPE_BYTES
from adaptivellm.split_client.shapes import ModelShape as ModelShape
from adaptivellm.split_client.shapes import dtype_bytes as dtype_bytes


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def kv_bytes(shape: ModelShape, num_tokens: int, block_size: int) -> int:
    """Bytes of KV cache in the blocks holding `num_tokens` tokens, K and V, over all layers.

    Whole blocks move in a swap, so a partly filled last block counts in full.
    """
    block = 2 * block_size * shape.num_kv_heads * shape.head_dim * shape.dtype_bytes
    return shape.num_layers * blocks_for(num_tokens, block_size) * block


@dataclass(frozen=True)
class PreemptionFeatures:
    """One preemption victim, as the cost predictors see it."""

    num_tokens: int
    """Tokens whose KV would be swapped out and back, or recomputed."""
    num_blocks: int
    """KV blocks those tokens occupy (what a swap copies)."""
    block_size: int
    """Tokens per KV block."""
    shape: ModelShape
    """The served model."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.num_tokens < 1:
            raise ValueError("block_size and num_tokens must be >= 1")
        if self.num_blocks * self.block_size < self.num_tokens:
            raise ValueError(
                f"{self.num_tokens} tokens do not fit in {self.num_blocks} blocks of "
                f"{self.block_size}"
            )

    @classmethod
    def for_victim(
        cls,
        shape: ModelShape,
        num_tokens: int,
        block_size: int,
        num_blocks: int | None = None,
    ) -> PreemptionFeatures:
        """Features of a victim; `num_blocks` defaults to the blocks `num_tokens` fill."""
        blocks = blocks_for(num_tokens, block_size) if num_blocks is None else num_blocks
        return cls(num_tokens, blocks, block_size, shape)

    @property
    def swap_bytes(self) -> int:
        """Bytes one direction of the swap copies: every block, K and V, all layers."""
        s = self.shape
        block = 2 * self.block_size * s.num_kv_heads * s.head_dim * s.dtype_bytes
        return s.num_layers * self.num_blocks * block

    @property
    def attention_pairs(self) -> int:
        """Causal (query, key) pairs of the victim's prefill: the quadratic term of recompute."""
        n = self.num_tokens
        return n * (n + 1) // 2

    def recompute_flops(self) -> float:
        """FLOPs of the recompute step over all layers: 2 per weight per token for the linear
        layers, and 4 * head_dim per head per causal (query, key) pair for QK^T and AV."""
        s = self.shape
        linear = 2.0 * s.layer_params * self.num_tokens
        attention = 4.0 * s.num_heads * s.head_dim * self.attention_pairs
        return s.num_layers * (linear + attention)

    def as_dict(self) -> dict[str, int]:
        """The per-victim fields (the shape is stored once per profile)."""
        return {
            "num_tokens": self.num_tokens,
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
        }


@dataclass(frozen=True)
class Sample:
    """One measurement: a victim's features and the seconds the cost took."""

    features: PreemptionFeatures
    seconds: float
