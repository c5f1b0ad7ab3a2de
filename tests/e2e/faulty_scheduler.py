"""An AdaptiveScheduler with injected bugs, for the fail-safe end-to-end tests.

`adaptivellm serve --scheduler-cls tests.e2e.faulty_scheduler.FaultyScheduler` (with the repo
root on PYTHONPATH, for the engine-core process) runs AdaptiveLLM's scheduler unchanged except:

- its policy (`_order`) and its accounting (`_account`) raise whenever a request of tenant
  BOOM is among the requests they handle: those steps must fall back to vLLM's own order and
  skip the accounting, and every request must still be served;
- every request of tenant DOOMED is failed as a split chunk the scheduler cannot read would be
  (`_fail`): that request alone must end with an error.
"""

from __future__ import annotations

from collections.abc import Iterable

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.request import Request

from adaptivellm.scheduler.scheduler import AdaptiveScheduler

BOOM = "boom"
DOOMED = "doomed"


class FaultyScheduler(AdaptiveScheduler):
    """See the module docstring."""

    def _tenant(self, request_id: str) -> str | None:
        tracked = self.tracked.get(request_id)
        return tracked.info.tenant if tracked is not None else None

    def _order(self, requests: Iterable[Request], now: float) -> list[Request]:
        requests = list(requests)
        if any(self._tenant(r.request_id) == BOOM for r in requests):
            raise RuntimeError("injected policy bug")
        return super()._order(requests, now)

    def _account(self, output: SchedulerOutput, now: float) -> tuple[int, int]:
        if any(self._tenant(rid) == BOOM for rid in output.num_scheduled_tokens):
            raise RuntimeError("injected accounting bug")
        return super()._account(output, now)

    def _track(self, request: Request) -> None:
        super()._track(request)
        if self._tenant(request.request_id) == DOOMED:
            self._fail(request.request_id, "injected", RuntimeError("injected request bug"))
