"""The split-execution model: vLLM's Llama whose forward pass starts each token at its own layer.

`adaptivellm serve --split-execution` serves the model under this architecture (registered by
the plugin, selected through `--hf-overrides`). For a split request the input embeddings vLLM
hands the model are not token embeddings but the residual stream entering layer k, computed by
the client. Each token t of the batch has a start layer s_t (patches.split_runner: k for a
split request, 0 otherwise), and layer j runs only on the tokens with s_t <= j:

- entering: at layer j the tokens with s_t == j take their client hidden state as the residual
  stream (vLLM keeps the stream as `hidden + residual`, so hidden = h, residual = 0);
- computed: norms, the QKV and output projections and the MLP run on the active rows only
  (gathered, then scattered back): that is the server compute a split client saves;
- attention: vLLM's attention op works on the whole batch layout (its metadata is built once
  per step for every request), so it runs on all rows with zero query/key/value on the inactive
  ones. The zeros land in the inactive tokens' own KV slots at layers below their k, which
  nothing reads: a split request never runs those layers, and split blocks are kept apart from
  other requests' in the prefix cache (scheduler.split_sessions.cache_salt).

A batch without split tokens (or with k = 0 only) takes vLLM's own forward, compiled path
included. A batch with split tokens runs `_split_forward`, which calls the decoder layers one by
one outside the compiled `LlamaModel.forward` (vLLM compiles `LlamaModel`, not this class): it
runs eagerly, so it is correct only where this forward's Python runs on every step, i.e. on
vLLM's V1 model runner without full CUDA graphs. The constructor refuses any other set-up
(patches.split_runner.check_runner).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from vllm.model_executor.models.llama import LlamaForCausalLM

from adaptivellm.metrics import SplitWorkerMetrics
from adaptivellm.patches.split_runner import check_runner, current_start_layers, install


class AdaptiveSplitLlamaForCausalLM(LlamaForCausalLM):
    """`LlamaForCausalLM` with per-token start layers (see the module docstring)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        if vllm_config.parallel_config.pipeline_parallel_size != 1:
            raise ValueError("split execution does not support pipeline parallelism")
        install()
        # The runner building this model must publish start layers and let this forward's
        # Python run on every split batch; otherwise refuse to start (patches.split_runner).
        check_runner(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._num_layers = len(self.model.layers)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> Any:
        starts = current_start_layers()
        began = time.perf_counter()
        flat = inputs_embeds if inputs_embeds is not None else input_ids
        tokens = flat.shape[0] if flat is not None else 0
        metrics = SplitWorkerMetrics.get()
        if starts is None:
            out = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
            computed, kind = tokens * self._num_layers, "ordinary"
        else:
            out = self._split_forward(input_ids, positions, inputs_embeds, starts)
            computed = int((self._num_layers - starts.clamp(max=self._num_layers)).sum())
            # Padding and ordinary tokens start at 0; a batch of split tokens only has none.
            kind = "mixed" if bool((starts == 0).any()) else "split"
            metrics.token_layers.labels(kind="saved").inc(tokens * self._num_layers - computed)
        metrics.token_layers.labels(kind="computed").inc(computed)
        metrics.forward_passes.labels(batch=kind).inc()
        if (
            isinstance(out, torch.Tensor) and out.device.type == "cpu"
        ):  # elsewhere the time would be the launch, not the work
            metrics.forward_seconds.inc(time.perf_counter() - began)
        return out

    def _split_forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        inputs_embeds: torch.Tensor | None,
        starts: torch.Tensor,
    ) -> torch.Tensor:
        model = self.model
        x = inputs_embeds if inputs_embeds is not None else model.embed_input_ids(input_ids)
        starts = starts.to(x.device)
        # The rows a layer runs change only at the layers where some token enters, so they
        # (and their positions) are found there, not at every layer: one device sync for the
        # distinct start layers, then two at each layer where tokens enter (none elsewhere),
        # instead of three at every layer.
        enters = set(torch.unique(starts).tolist())
        hidden, residual = x.clone(), torch.zeros_like(x)
        part = _Partial(positions)
        every = False
        for j, layer in enumerate(model.layers):
            if j in enters:
                if j > 0:
                    entering = (starts == j).nonzero().squeeze(1)
                    hidden.index_copy_(0, entering, x.index_select(0, entering))
                    residual.index_fill_(0, entering, 0)
                every = part.select((starts <= j).nonzero().squeeze(1), starts.numel())
            if every:
                hidden, residual = layer(positions, hidden, residual)
            elif part.rows is not None:
                _partial_layer(layer, hidden, residual, part)
        if max(enters) >= self._num_layers:  # k = N: the client ran every layer
            done = (starts >= self._num_layers).nonzero().squeeze(1)
            hidden.index_copy_(0, done, x.index_select(0, done))
            residual.index_fill_(0, done, 0)
        hidden, _ = model.norm(hidden, residual)
        return hidden


class _Partial:
    """What the layers of one split batch share between layer changes: the rows they run (None:
    none), those rows' positions, and the zero-padded query/key/value the attention op takes
    for the whole batch. The padding is allocated once a pass: a row, once active, stays active
    in every later layer (start layers only let rows in), so each layer overwrites every row
    an earlier one wrote and the inactive rows stay zero."""

    def __init__(self, positions: torch.Tensor) -> None:
        self.positions = positions
        self.rows: torch.Tensor | None = None
        self.row_positions: torch.Tensor | None = None
        self.padded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def select(self, rows: torch.Tensor, total: int) -> bool:
        """Run `rows` from this layer on; True when they are the whole batch."""
        self.rows = rows if rows.numel() else None
        self.row_positions = self.positions[rows] if rows.numel() else None
        return rows.numel() == total

    def pad(
        self, rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, total: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`q`, `k`, `v` of `rows`, in the batch's layout with zeros elsewhere."""
        if self.padded is None:
            self.padded = (
                q.new_zeros(total, q.shape[1]),
                k.new_zeros(total, k.shape[1]),
                v.new_zeros(total, v.shape[1]),
            )
        for full, part in zip(self.padded, (q, k, v), strict=True):
            full.index_copy_(0, rows, part)
        return self.padded


def _partial_layer(
    layer: Any,
    hidden: torch.Tensor,
    residual: torch.Tensor,
    part: _Partial,
) -> None:
    """One Llama decoder layer on `part.rows` of the batch, in place (vLLM's LlamaDecoderLayer
    and LlamaAttention forward, with the projections and MLP on the active rows only)."""
    rows = part.rows
    assert rows is not None
    h, r = layer.input_layernorm(hidden.index_select(0, rows), residual.index_select(0, rows))
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(h)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = attn.rotary_emb(part.row_positions, q, k)
    out = attn.attn(*part.pad(rows, q, k, v, hidden.shape[0]))
    o, _ = attn.o_proj(out.index_select(0, rows))
    h, r = layer.post_attention_layernorm(o, r)
    hidden.index_copy_(0, rows, layer.mlp(h))
    residual.index_copy_(0, rows, r)
