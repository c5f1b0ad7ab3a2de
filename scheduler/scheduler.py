"""AdaptiveLLM's vLLM scheduler, selected with `--scheduler-cls` by `adaptivellm serve`.

It gathers inputs for AdaptiveLLM's policies and applies their answers; the policies themselves
are pure functions elsewhere in this package. vLLM's own scheduling is unchanged so far: this
class records engine-side metrics (steps, preemptions) that reach `/metrics` through
prometheus_client's multi-process mode (see adaptivellm.metrics).
"""

from __future__ import annotations

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from adaptivellm.metrics import EngineMetrics

#: Qualified name that `adaptivellm serve` passes to vLLM's `--scheduler-cls`.
QUALNAME = "adaptivellm.scheduler.scheduler.AdaptiveScheduler"


class AdaptiveScheduler(Scheduler):
    """vLLM's V1 scheduler plus AdaptiveLLM's hooks."""

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        output = super().schedule(throttle_prefills)
        if output.total_num_scheduled_tokens:
            EngineMetrics.get().scheduler_steps.inc()
        return output

    def _preempt_request(
        self, request: Request, timestamp: float, drop_stale_output: bool = False
    ) -> None:
        super()._preempt_request(request, timestamp, drop_stale_output)
        EngineMetrics.get().preemptions.labels(mode="recompute").inc()
