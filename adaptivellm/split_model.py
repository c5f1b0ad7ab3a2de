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
        hidden, residual = x.clone(), torch.zeros_like(x)
        for j, layer in enumerate(model.layers):
            entering = starts == j
            if j > 0 and bool(entering.any()):
                hidden[entering] = x[entering]
                residual[entering] = 0
            active = starts <= j
            if bool(active.all()):
                hidden, residual = layer(positions, hidden, residual)
            else:
                rows = active.nonzero().squeeze(1)
                if rows.numel():
                    _partial_layer(layer, positions, hidden, residual, rows)
        done = starts >= self._num_layers  # k = N: the client ran every layer
        if bool(done.any()):
            hidden[done] = x[done]
            residual[done] = 0
        hidden, _ = model.norm(hidden, residual)
        return hidden


def _partial_layer(
    layer: Any,
    positions: torch.Tensor,
    hidden: torch.Tensor,
    residual: torch.Tensor,
    rows: torch.Tensor,
) -> None:
    """One Llama decoder layer on `rows` of the batch, in place (vLLM's LlamaDecoderLayer and
    LlamaAttention forward, with the projections and MLP on the active rows only)."""
    h, r = layer.input_layernorm(hidden[rows], residual[rows])
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(h)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = attn.rotary_emb(positions[rows], q, k)
    total = hidden.shape[0]
    full_q = q.new_zeros(total, q.shape[1])
    full_k = k.new_zeros(total, k.shape[1])
    full_v = v.new_zeros(total, v.shape[1])
    full_q[rows], full_k[rows], full_v[rows] = q, k, v
    out = attn.attn(full_q, full_k, full_v)
    o, _ = attn.o_proj(out[rows])
    h, r = layer.post_attention_layernorm(o, r)
    hidden[rows] = layer.mlp(h)
    residual[rows] = r
