"""Patch of vLLM 0.32.0's model runner for split execution: tell the model where each token of
the batch starts.

vLLM passes a model only flat per-token tensors (ids or embeddings, positions); which request a
token belongs to is known to the model runner alone. This patch wraps
`GPUModelRunner._model_forward` (which the CPU runner inherits; vLLM documents it as the method
subclasses override "for model execution") so that, for the duration of one forward pass,
`current_start_layers()` returns each token's start layer: k for a split request's tokens, 0 for
an ordinary request's (and for padding). It is `None` when the batch holds no split request, so
ordinary batches take the model's unmodified (compiled) path.

It is installed by the split model class when vLLM instantiates it, in the worker process only,
and only when split execution is on. Touch points: `GPUModelRunner._model_forward`,
`self.input_batch.req_ids`, `self.input_batch.num_reqs`, `self.requests[id].sampling_params`,
`self.query_start_loc.np` (the per-request token offsets of the step being run); for the
start-up check, `VllmConfig.use_v2_model_runner`, `compilation_config.cudagraph_mode` and `.mode`,
`parallel_config.use_ubatching` and `VLLM_USE_BREAKABLE_CUDAGRAPH`.

It also wraps `GPUModelRunner._update_streaming_request`, where vLLM hands the runner a resumed
streaming-input request (a split session's next chunk) as a new request: the engine core sends
only the rows of the context the runner does not hold (`split_wire.send_new_rows`), and the
wrapper puts the rows the runner holds (`self.requests[id].prompt_embeds`) back in front before
vLLM's own update runs (`split_wire.receive_rows`). So a decode token no longer carries the
session's whole context through the executor's queue.

The hook exists on vLLM's V1 model runner only (`vllm.v1.worker.gpu_model_runner`, and the CPU
runner that inherits it). Model Runner V2 (`vllm.v1.worker.gpu.model_runner`, vLLM 0.32's default
wherever Triton is present) has no `_model_forward`, and CUDA graphs that capture whole forward
passes replay them without running the model's Python. `check_runner` (called by the split model
at start-up) finds the model runner that is building the model and refuses, with
`SplitRunnerError`, any set-up under which start layers would silently not reach the model: split
requests would otherwise enter at layer 0 and produce wrong tokens with no error.
`adaptivellm serve --split-execution` chooses a set-up that passes (docs/split_execution.md).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import sys
from typing import Any, Final

import numpy as np
import torch

from adaptivellm.compat import check_vllm_version
from adaptivellm.split_wire import layer_of, receive_rows

logger = logging.getLogger(__name__)
WRITTEN_FOR: Final = "0.32.0"
#: Attribute set on the installed wrappers, so that a runner class's `_model_forward` and
#: `_update_streaming_request` can be recognised as hooked through its MRO.
HOOK_MARK: Final = "__adaptivellm_split_hook__"
#: The runner methods the patch wraps.
HOOKED: Final = ("_model_forward", "_update_streaming_request")
_FIX: Final = (
    "Start the server with `adaptivellm serve --split-execution`, which selects vLLM's V1 model "
    "runner (VLLM_USE_V2_MODEL_RUNNER=0) and piecewise CUDA graphs; see docs/split_execution.md."
)
_start_layers: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "adaptivellm_split_start_layers", default=None
)
_installed = False


class SplitRunnerError(RuntimeError):
    """Split execution cannot be served correctly by the model runner this worker uses."""


def current_start_layers() -> torch.Tensor | None:
    """Start layer of each token of the forward pass being run (int64, on CPU), or None."""
    return _start_layers.get()


def start_layers_for(
    layers: list[int], query_start_loc: np.ndarray, num_tokens: int
) -> torch.Tensor | None:
    """Per-token start layers from per-request k and the step's token offsets (pure)."""
    if not any(layers):
        return None
    counts = np.diff(query_start_loc[: len(layers) + 1])
    starts = np.zeros(num_tokens, dtype=np.int64)
    used = int(query_start_loc[len(layers)])
    if used > num_tokens:
        raise ValueError(f"batch layout covers {used} tokens but the input has {num_tokens}")
    starts[:used] = np.repeat(np.asarray(layers, dtype=np.int64), counts)
    return torch.from_numpy(starts)


def _request_layers(runner: Any) -> list[int]:
    layers = []
    for req_id in runner.input_batch.req_ids[: runner.input_batch.num_reqs]:
        state = runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        layer = layer_of(params.extra_args) if params is not None else None
        layers.append(layer or 0)
    return layers


def install() -> None:
    """Wrap the model runner's forward call once per process; refuses other vLLM versions."""
    global _installed
    if _installed:
        return
    version = check_vllm_version()
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward

    @functools.wraps(original)
    def _model_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        tokens = embeds.shape[0] if embeds is not None else (ids.shape[0] if ids is not None else 0)
        starts = None
        if tokens and self.input_batch.num_reqs:
            starts = start_layers_for(_request_layers(self), self.query_start_loc.np, tokens)
        token = _start_layers.set(starts)
        try:
            return original(self, *args, **kwargs)
        finally:
            _start_layers.reset(token)

    original_update = GPUModelRunner._update_streaming_request

    @functools.wraps(original_update)
    def _update_streaming_request(self: Any, req_id: str, new_req_data: Any) -> Any:
        state = self.requests.get(req_id)
        held = receive_rows(state, getattr(state, "prompt_embeds", None), new_req_data)
        embeds = new_req_data.prompt_embeds
        if embeds is not None:
            _count_rows(sent=embeds.shape[0] - held, held=held)
        return original_update(self, req_id, new_req_data)

    for wrapper in (_model_forward, _update_streaming_request):
        setattr(wrapper, HOOK_MARK, True)
    GPUModelRunner._model_forward = _model_forward  # type: ignore[method-assign]
    GPUModelRunner._update_streaming_request = _update_streaming_request  # type: ignore[method-assign]
    _installed = True
    if version.split("+")[0] != WRITTEN_FOR:
        logger.warning(
            "split runner patch written for vLLM %s, running on %s", WRITTEN_FOR, version
        )


def _count_rows(sent: int, held: int) -> None:
    """A resumed session's context rows at the runner: sent this chunk, or held from before."""
    from adaptivellm.metrics import SplitWorkerMetrics

    rows = SplitWorkerMetrics.get().context_rows
    rows.labels(kind="sent").inc(sent)
    if held:
        rows.labels(kind="held").inc(held)


def is_hooked(runner_cls: type) -> bool:
    """Whether `runner_cls` runs its forward passes and its resumed streaming requests through
    the installed hooks: its `_model_forward` and `_update_streaming_request`, resolved through
    the MRO, are the wrappers (a subclass that overrides one, or a runner without them, such as
    Model Runner V2, is not hooked)."""
    return all(getattr(getattr(runner_cls, name, None), HOOK_MARK, False) for name in HOOKED)


def building_runner() -> Any | None:
    """The model runner whose `load_model` is building the model now: the innermost `self` on the
    call stack that is a vLLM model runner (a class named `...ModelRunner` with `execute_model`),
    or None when the model is built outside a runner."""
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if (
            obj is not None
            and type(obj).__name__.endswith("ModelRunner")
            and callable(getattr(obj, "execute_model", None))
        ):
            return obj
        frame = frame.f_back  # type: ignore[assignment]
    return None


def runner_problems(vllm_config: Any, runner_cls: type | None) -> list[str]:
    """Why start layers would not reach the split model under this config and runner class
    (empty when split execution is served correctly). Pure: reads the config and the class."""
    from vllm.compilation.breakable_cudagraph import is_breakable_cudagraph_enabled
    from vllm.config import CompilationMode, CUDAGraphMode

    problems = []
    if runner_cls is not None and not is_hooked(runner_cls):
        where = f"{runner_cls.__module__}.{runner_cls.__qualname__}"
        problems.append(
            f"the model runner in use, {where}, does not run forward passes and resumed "
            "requests through the patched vllm.v1.worker.gpu_model_runner.GPUModelRunner."
            "_model_forward and _update_streaming_request"
        )
    elif vllm_config.use_v2_model_runner:
        problems.append(
            "vLLM selected Model Runner V2 (vllm.v1.worker.gpu.model_runner), which has no "
            "_model_forward to patch"
        )
    compilation = vllm_config.compilation_config
    mode = compilation.cudagraph_mode
    graphs = mode is not None and mode != CUDAGraphMode.NONE
    if mode is not None and mode.has_full_cudagraphs():
        problems.append(
            f"cudagraph_mode {mode.name} replays whole captured forward passes, in which the "
            "split model's branch on start layers does not run"
        )
    if graphs and is_breakable_cudagraph_enabled():
        problems.append(
            "VLLM_USE_BREAKABLE_CUDAGRAPH=1 captures the model's whole forward pass, in which the "
            "split model's branch on start layers does not run"
        )
    if compilation.mode == CompilationMode.STOCK_TORCH_COMPILE:
        problems.append(
            "compilation mode STOCK_TORCH_COMPILE compiles the model's whole forward pass "
            "(fullgraph), including the split model's data-dependent branch"
        )
    if vllm_config.parallel_config.use_ubatching:
        problems.append(
            "micro-batching (--enable-dbo, --ubatch-size) runs the model on parts of the batch in "
            "other threads, which do not see the step's start layers"
        )
    return problems


def check_runner(vllm_config: Any, runner_cls: type | None = None) -> None:
    """Refuse to serve split execution where it would be served wrong.

    `runner_cls` defaults to the class of the model runner building the model (found on the call
    stack); when there is none, the runner vLLM's config selects is checked instead. Raises
    SplitRunnerError naming each problem and the fix."""
    install()  # the hook must be in place for the runner class to be recognised as hooked
    if runner_cls is None:
        runner = building_runner()
        runner_cls = type(runner) if runner is not None else None
    problems = runner_problems(vllm_config, runner_cls)
    if not problems:
        logger.info(
            "split execution: start-layer hook attached to %s",
            f"{runner_cls.__module__}.{runner_cls.__qualname__}"
            if runner_cls is not None
            else "the V1 model runner (vLLM's config; no runner on the call stack)",
        )
    if problems:
        raise SplitRunnerError(
            "split execution (--split-execution) cannot run on this worker: split requests "
            "would enter the model at layer 0 and produce wrong tokens. "
            + "; ".join(problems)
            + ". "
            + _FIX
        )
