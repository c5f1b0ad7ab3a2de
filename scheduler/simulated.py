"""A vLLM scheduler with a handful of KV blocks and no model, driven by hand-written model
outputs (the way vLLM's own scheduler tests work), on a simulated clock.

Shared by the scheduler's tests (tests/scheduler/) and the benchmarks that replay workloads
through the real scheduler without a model (bench/fairness_sim.py, bench/scheduler_overhead.py).
Nothing on a serving path imports it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from adaptivellm.model import ensure_model
from adaptivellm.scheduler import swap_connector
from adaptivellm.scheduler.config import FairnessConfig
from adaptivellm.scheduler.fairness_policy import waiting_queue
from adaptivellm.scheduler.scheduler import AdaptiveScheduler

BLOCK_SIZE = 16
EOS = 1


@dataclass
class Clock:
    """Simulated wall clock."""

    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(
    fairness: FairnessConfig,
    num_blocks: int,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 256,
    max_model_len: int = 1024,
    preemption: str = "recompute",
    swap_slots: int = 0,
    scheduler_cls: type[Scheduler] = AdaptiveScheduler,
    async_scheduling: bool = False,
) -> tuple[AdaptiveScheduler, Clock]:
    """An AdaptiveScheduler over `num_blocks` KV blocks of 16 tokens (block 0 is vLLM's null
    block, so num_blocks - 1 are usable). `scheduler_cls=Scheduler` builds stock vLLM's
    scheduler over the same configuration instead (for comparisons; it has no clock of its own
    and ignores AdaptiveLLM's settings). `async_scheduling`: vLLM's async scheduling on, as on
    CUDA (the CPU platform turns it off while the config is built, so it is set back after):
    `AdaptiveScheduler` then builds `AdaptiveAsyncScheduler`; pass `AsyncScheduler` for stock's."""
    vllm_config = _vllm_config(fairness, max_num_seqs, max_num_batched_tokens, max_model_len,
                               preemption, swap_slots)  # fmt: skip
    vllm_config.scheduler_config.async_scheduling = async_scheduling
    spec = FullAttentionSpec(BLOCK_SIZE, num_kv_heads=1, head_size=1, dtype=torch.float32)
    groups = [KVCacheGroupSpec(["layer"], spec)]
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=groups
    )
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    scheduler = scheduler_cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK_SIZE,
        log_stats=True,
    )
    clock = Clock()
    if isinstance(scheduler, AdaptiveScheduler):
        scheduler.clock = clock
    # A stock Scheduler is returned under the same type: callers that ask for one use only
    # what both have.
    return cast(AdaptiveScheduler, scheduler), clock


def _vllm_config(
    fairness: FairnessConfig,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_model_len: int,
    preemption: str,
    swap_slots: int,
) -> VllmConfig:
    """vLLM's config for make_scheduler, on the embedded tiny model (only its config.json is
    read), with AdaptiveLLM's settings in additional_config as `adaptivellm serve` stores them."""
    model = str(ensure_model())
    policy = waiting_queue(fairness)
    scheduler_config = SchedulerConfig(
        max_model_len=max_model_len,
        is_encoder_decoder=False,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_chunked_prefill=True,
        async_scheduling=False,
        policy=policy,
    )
    model_config = ModelConfig(model=model, dtype="float32", seed=0, skip_tokenizer_init=True,
                               max_model_len=max_model_len)  # fmt: skip
    cache_config = CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=False)
    vllm_config = VllmConfig(
        scheduler_config=scheduler_config,
        model_config=model_config,
        cache_config=cache_config,
        additional_config={
            "adaptivellm": {
                "fairness": fairness.to_dict(),
                # No KV tensors here: one "byte" per block, so swap_slots bytes hold swap_slots.
                "preemption": {"mode": preemption, "swap_space_bytes": swap_slots},
            }
        },
        kv_transfer_config=None
        if preemption == "recompute"
        else KVTransferConfig(
            kv_connector=swap_connector.CLASS_NAME,
            kv_connector_module_path=swap_connector.QUALNAME,
            kv_role="kv_both",
            kv_connector_extra_config={swap_connector.SWAP_BYTES_KEY: swap_slots},
        ),
    )
    return vllm_config


def make_request(
    request_id: str,
    prompt_tokens: int,
    max_tokens: int,
    arrival_time: float,
    tenant: str | None = None,
    priority: int = 0,
) -> Request:
    extra = {"tenant": tenant} if tenant else None
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra)
    return Request(
        request_id=request_id,
        prompt_token_ids=[7 + (hash(request_id) % 50)] * prompt_tokens,
        sampling_params=params,
        pooling_params=None,
        arrival_time=arrival_time,
        priority=priority,
    )


@dataclass
class Run:
    """Drives a scheduler step by step and records what happened to each request."""

    scheduler: AdaptiveScheduler
    clock: Clock
    step_s: float = 0.01
    first_scheduled: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    step_cost: Callable[[SchedulerOutput], float] | None = None
    """If given: the simulated duration of a step's model execution, read by the scheduler's
    step timer (which otherwise times real, near-instant steps)."""
    timer: Clock = field(default_factory=lambda: Clock(0.0))

    def __post_init__(self) -> None:
        if self.step_cost is not None:
            self.scheduler.step_timer = self.timer

    def step(self) -> SchedulerOutput:
        """One engine step: schedule, sample one token for every request past its prompt."""
        out = self.scheduler.schedule()
        if self.step_cost is not None:
            self.timer.now += self.step_cost(out)
        for new in out.scheduled_new_reqs:
            if new.req_id not in self.first_scheduled:
                self.first_scheduled[new.req_id] = self.clock.now
                self.order.append(new.req_id)
        self.preempted.extend(out.preempted_req_ids or ())
        req_ids = list(out.num_scheduled_tokens)
        sampled = []
        for rid in req_ids:
            req = self.scheduler.requests[rid]
            sampled.append([5] if req.num_computed_tokens >= req.num_tokens else [])
        runner = ModelRunnerOutput(req_ids=req_ids,
                                   req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                   sampled_token_ids=sampled)  # fmt: skip
        for outputs in self.scheduler.update_from_output(out, runner).values():
            for o in outputs.outputs:
                if o.finish_reason is not None:
                    self.finished[o.request_id] = self.clock.now
        self.clock.now += self.step_s
        return out

    def until_idle(self, max_steps: int = 100_000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_requests():
                return
            self.step()
        raise AssertionError("scheduler did not drain")
