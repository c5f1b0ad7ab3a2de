"""AdaptiveLLM's vLLM scheduler, selected with `--scheduler-cls` by `adaptivellm serve`.

It keeps only vLLM's overrides and delegates to four parts:

- the fairness policy (scheduler.fairness_policy, built from the config by one factory): the
  order of the waiting queue and of the victims, the turnaround victim, the step budget, and
  the tenant ledger;
- the preemption advisor (scheduler.preemption.PreemptionAdvisor): swap or recompute, per
  victim;
- the split sessions (scheduler.split_sessions): the chunks of split-execution requests;
- the observer (scheduler.observer.EngineObserver): engine metrics, the Jain window and the
  step trace.

It applies the policy's answers through these seams of vLLM's scheduler, leaving its block
accounting untouched:

- admission: at the start of each step the waiting queue (vLLM's FCFS deque) is re-ordered by
  the policy, so vLLM's `peek_request`/`pop_request` take the most deserving request first;
- victim choice: when a step may have to preempt (fewer free KV blocks than running requests),
  `self.running` is re-ordered most-deserving-first, so vLLM's FCFS preemption
  (`running.pop()`, the last one) takes the least deserving request. Otherwise `running` keeps
  vLLM's order, so that the model runner's persistent batch is not reshuffled every step;
- step budget: under weighted-turnaround, `max_num_scheduled_tokens` (the token budget vLLM
  reads at the start of `schedule`) is lowered for the step to about --max-step-s of prefill
  and restored right after, so long prompts go in chunks (`FairnessPolicy.step_budget`).

It also times each model step (from `schedule` returning to `update_from_output`) to learn the
service-time model the policies rank with (adaptivellm.scheduler.service_fit.ServiceTimes).

The order is fixed for the whole step, so peek and pop always agree. `fcfs` and `priority`
leave vLLM's own behaviour alone (vLLM's `--scheduling-policy`). Engine-side metrics reach
`/metrics` through prometheus_client's multi-process mode (see adaptivellm.metrics).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import SchedulingPolicy, create_request_queue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from adaptivellm.scheduler.config import (
    DEFAULT_TENANT,
    MAX_TENANT_LEN,
    AdaptiveConfig,
    FairnessConfig,
    effective_weight,
    finite_or,
)
from adaptivellm.scheduler.fail_safe import InternalErrors, initialise_series
from adaptivellm.scheduler.fairness_policy import StepLoad, create_fairness_policy
from adaptivellm.scheduler.observer import EngineObserver
from adaptivellm.scheduler.policies import (
    OutputLengthEstimate,
    RequestInfo,
    RunningInfo,
    ServiceModel,
    committed_cost,
)
from adaptivellm.scheduler.preemption import Decision, PreemptionAdvisor
from adaptivellm.scheduler.service_fit import InFlight, ServiceTimes
from adaptivellm.scheduler.split_sessions import (
    SplitChunks,
    extend_session,
    start_session,
    take_chunk,
)
from adaptivellm.scheduler.step_trace import StepTrace
from adaptivellm.scheduler.swap_connector import AdaptiveSwapConnector
from adaptivellm.split_wire import layer_of, send_new_rows

logger = logging.getLogger(__name__)

#: Qualified name that `adaptivellm serve` passes to vLLM's `--scheduler-cls`.
QUALNAME = "adaptivellm.scheduler.scheduler.AdaptiveScheduler"


@dataclass
class Tracked:
    """What the scheduler remembers about a live request."""

    info: RequestInfo
    predicted_output: float
    first_scheduled: float | None = None
    preempted: int = 0
    """Times preempted by weighted-turnaround for a waiting request."""


def request_info(request: Request, config: FairnessConfig) -> RequestInfo:
    """Tenant and weight from the request's `vllm_xargs` (set by the client, or by
    adaptivellm.tenancy from the API key, the OpenAI `user` field or the X-AdaptiveLLM-Tenant
    header). The priority (vLLM's convention: lower = more important; carried in vllm_xargs by
    the middleware) scales the weight by 2**-priority. The API server validates every one of
    these; here they are bounded again (config.effective_weight), since vllm_xargs can reach
    the engine through routes the middleware does not read."""
    params = request.sampling_params
    extra = params.extra_args if params is not None and params.extra_args else {}
    if not isinstance(extra, dict):
        extra = {}
    tenant = str(extra.get("tenant") or DEFAULT_TENANT)[:MAX_TENANT_LEN]
    priority = request.priority or extra.get("priority", 0)
    return RequestInfo(
        request_id=request.request_id,
        arrival_time=finite_or(request.arrival_time, time.time()),
        prompt_tokens=max(0, request.num_prompt_tokens),
        max_tokens=max(0, request.max_tokens),
        tenant=tenant,
        weight=effective_weight(config.weight_of(tenant), extra.get("weight", 1.0), priority),
    )


class AdaptiveScheduler(Scheduler):
    """vLLM's V1 scheduler plus AdaptiveLLM's fairness policies and engine metrics.

    vLLM builds the class `--scheduler-cls` names with its config; when that config schedules
    asynchronously (CUDA's default), this class builds AdaptiveAsyncScheduler instead, which
    keeps vLLM's async scheduling (two steps in flight, output placeholders)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> AdaptiveScheduler:
        config = kwargs.get("vllm_config", args[0] if args else None)
        if cls is AdaptiveScheduler and schedules_async(config):
            cls = AdaptiveAsyncScheduler
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Errors of this class's own code, contained (scheduler.fail_safe); tests read counts.
        self.errors = InternalErrors()
        with self.errors.guard("metrics"):
            initialise_series()
        #: Requests to finish with an error result at the start of the next step (_fail).
        self._failed: dict[str, str] = {}
        #: Requests finished with an error this step, whose outputs update_from_output adds.
        self._errored: list[Request] = []
        config = AdaptiveConfig.from_additional_config(self.vllm_config.additional_config)
        self.fairness = config.fairness
        self.fairness_policy = create_fairness_policy(
            self.fairness, self.vllm_config.model_config.max_model_len
        )
        #: Per-tenant counters and live requests, the policy's (fairness_policy.TenantLedger).
        self.ledger = self.fairness_policy.ledger
        if self.fairness_policy.reorders and self.policy != SchedulingPolicy.FCFS:
            self._use_fcfs_queue()
        self.tracked: dict[str, Tracked] = {}
        self.output_estimate = OutputLengthEstimate()
        #: Wall clock (request arrival times are time.time()); tests substitute a simulated one.
        self.clock: Callable[[], float] = time.time
        swap = self.connector if isinstance(self.connector, AdaptiveSwapConnector) else None
        costs = load_costs(self.vllm_config) if swap is not None else None
        self.advisor = PreemptionAdvisor(config.preemption, swap, costs, self.errors)
        self.split_chunks = SplitChunks()
        #: Rows of each split session's context the model runner holds (send_new_rows).
        self.split_rows_held: dict[str, int] = {}
        self.service_times = ServiceTimes(self.fairness.service, self.fairness.learn_service)
        #: Times the model's steps for service_times; tests substitute a simulated one.
        self.step_timer: Callable[[], float] = time.perf_counter
        #: Each data-parallel rank has its own scheduler, counters and gauges (`rank` label).
        rank = str(getattr(self.vllm_config.parallel_config, "data_parallel_index", 0))
        self.observer = EngineObserver(self.fairness, rank, StepTrace.from_env({
            "policy": self.fairness.policy,
            "max_step_s": self.fairness.max_step_s,
            "fairness_preemption": self.fairness.preemption.enabled,
            "preemption_mode": config.preemption.mode,
            "max_num_seqs": self.max_num_running_reqs,
        }))  # fmt: skip
        self.observer.service_model(self.service, self.service_times.fit)

    def _use_fcfs_queue(self) -> None:
        """The policy orders a FCFS queue itself, and a request's priority already scales its
        weight; vLLM's priority heap cannot be re-ordered, nor its victim rule used."""
        logger.warning(
            "--fairness %s orders requests itself (a request's priority scales its weight): "
            "vLLM's --scheduling-policy %s queue is replaced by its own order",
            self.fairness.policy,
            self.policy.value,
        )
        self.policy = SchedulingPolicy.FCFS
        self.waiting = create_request_queue(self.policy)
        self.kv_holding_waiting = create_request_queue(self.policy)

    @property
    def vtc_counters(self) -> dict[str, float]:
        """Per-tenant virtual token counters (the policy's ledger; empty under fcfs/priority)."""
        return self.ledger.counters

    @property
    def live_requests(self) -> dict[str, int]:
        """Live (tracked) requests per active tenant."""
        return self.ledger.live

    @property
    def served_tokens(self) -> dict[str, float]:
        """Tokens served per tenant label (the observer's)."""
        return self.observer.served_tokens

    @property
    def service(self) -> ServiceModel:
        """The service model requests are ranked with: learned, or the configured one."""
        return self.service_times.model

    # --- inputs -------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        rid = request.request_id
        try:
            chunk = take_chunk(request, self.vllm_config.model_config.dtype)
            if chunk is not None and rid in self.requests:
                self.split_chunks.push(rid, chunk)  # next chunk of a split session
            elif chunk is not None:
                start_session(request, chunk)
        except Exception as exc:  # a split chunk it cannot read: this request fails alone
            self._fail(rid, "split_chunk", exc)
        if rid not in self.requests:
            with self.errors.guard("track", rid):
                self._track(request)
        super().add_request(request)

    def _track(self, request: Request) -> None:
        """Remember a new request's tenant and weight, and admit it to the tenant ledger.
        Without it, a request keeps its arrival place."""
        info = request_info(request, self.fairness)
        predicted = self.output_estimate.predict(info.max_tokens)
        self.tracked[request.request_id] = Tracked(info, predicted)
        self.ledger.admit(info.tenant)

    def _fail(self, request_id: str, where: str, exc: Exception) -> None:
        """Count the error and finish the request with an error result at the start of the
        next step (finish_failed): for errors after which it cannot be served correctly."""
        self.errors.record(where, exc, request_id)
        self._failed[request_id] = where

    def _finish_failed(self) -> None:
        """Finish the requests _fail named, as vLLM finishes one whose grammar failed to
        compile: removed from the queues, blocks freed, an error output sent
        (update_from_output)."""
        self._errored += self.finish_requests(self._failed, RequestStatus.FINISHED_ERROR)
        self._failed = {}  # kept when finishing raised: retried at the next step

    # --- the step -----------------------------------------------------------------------

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        """vLLM's step with AdaptiveLLM's order, preemptions and budget applied first. Each of
        those is fail-safe (scheduler.fail_safe): if one raises, this step keeps vLLM's own
        order, victims and budget, and the engine keeps serving."""
        trace = self.observer.trace
        entered = time.perf_counter() if trace is not None else 0.0
        now = self.clock()
        if self._failed:
            with self.errors.guard("finish_failed"):
                self._finish_failed()
        if self.fairness_policy.reorders:
            with self.errors.guard("order_waiting"):
                self._reorder(self.waiting, now)
            with self.errors.guard("turnaround_preemption"):
                self._preempt_for_turnaround(now)
            with self.errors.guard("order_running"):
                if self._preemption_possible():
                    self.running[:] = self._order(self.running, now, victims=True)
        full_budget = self.max_num_scheduled_tokens
        threshold = self.scheduler_config.long_prefill_token_threshold
        budget, chunk = full_budget, 0
        with self.errors.guard("step_budget"):
            budget, chunk = self.fairness_policy.step_budget(full_budget, self)
        self.max_num_scheduled_tokens = budget
        if chunk:
            self.scheduler_config.long_prefill_token_threshold = min(chunk, threshold or chunk)
        try:
            output = super().schedule(throttle_prefills)
        finally:
            self.max_num_scheduled_tokens = full_budget
            self.scheduler_config.long_prefill_token_threshold = threshold
        if output.scheduled_new_reqs:
            with self.errors.guard("split_new_rows"):
                self._send_new_rows(output)
        prefill = decode = 0
        with self.errors.guard("accounting"):
            prefill, decode = self._account(output, now)
        step = InFlight(output, self.step_timer(), prefill, decode)
        if trace is not None:
            with self.errors.guard("step_trace"):
                counts = self._trace_counts(output, prefill, decode)
                step.traced = (entered, time.perf_counter(), counts)
        self.service_times.in_flight.append(step)
        return output

    def _send_new_rows(self, output: SchedulerOutput) -> None:
        """A resumed split session goes to the model runner as a new request with its whole
        context (vLLM's streaming input): send only the rows the runner does not hold yet.
        A session's context only grows, so what the runner holds is a prefix of it: a count
        left behind by an error here only means more rows are sent than needed, never fewer
        (and a session not trimmed goes whole, which the runner takes as vLLM's own)."""
        held_rows = self.split_rows_held
        for data in output.scheduled_new_reqs:
            embeds = data.prompt_embeds
            params = data.sampling_params
            if embeds is None or params is None or layer_of(params.extra_args) is None:
                continue
            held = held_rows.get(data.req_id)
            held_rows[data.req_id] = embeds.shape[0]  # what the runner holds after this step
            if held is not None:
                send_new_rows(data, held)

    def _trace_counts(self, output: SchedulerOutput, prefill: int, decode: int) -> dict[str, int]:
        context = 0
        for req_id in output.num_scheduled_tokens:
            if (request := self.requests.get(req_id)) is not None:
                context += request.num_computed_tokens
        return {
            "prefill": prefill, "decode": decode, "context": context,
            "running": len(self.running), "waiting": len(self.waiting),
            "preempted": len(output.preempted_req_ids or ()),
        }  # fmt: skip

    def step_load(self) -> StepLoad:
        """What is in the engine now, for the policy's step budget."""
        return StepLoad(
            requests=sum(self.get_request_counts()),
            running=len(self.running),
            chunked_prefill=self.scheduler_config.enable_chunked_prefill,
        )

    def prefilling(self) -> int:
        """Requests with prompt tokens to compute this step. Waiting requests count only as
        many as there are free batch slots: with every slot taken none is admitted this step,
        and halving a running prompt's chunk for them would only prefill it in more steps."""
        free = self.max_num_active_reqs - len(self.running) - self.num_waiting_for_streaming_input
        return min(len(self.waiting), max(0, free)) + sum(
            r.num_computed_tokens < r.num_prompt_tokens for r in self.running
        )

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> dict[int, EngineCoreOutputs]:
        step = self.service_times.done(scheduler_output)
        if step is not None and self.service_times.learn:
            with self.errors.guard("service_fit"):
                if self.service_times.observe(step, self.step_timer()):
                    self.observer.service_model(self.service, self.service_times.fit)
        entered = time.perf_counter()
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self._errored:
            self._send_errors(outputs)
        self._flush_if_idle()
        if step is not None and step.traced is not None:
            with self.errors.guard("step_trace"):
                self.observer.trace_step(step.traced, entered, time.perf_counter())
        return outputs

    def finish_requests(
        self, request_ids: str | Iterable[str] | None, finished_status: RequestStatus
    ) -> list[Request]:
        finished = super().finish_requests(request_ids, finished_status)
        self._flush_if_idle()  # the last requests aborted: no step will follow
        return finished

    def _flush_if_idle(self) -> None:
        """With nothing left to run, write the per-step metrics the observer holds back
        (EngineObserver.flush): a scrape of an idle engine sees every step."""
        if not self.has_unfinished_requests():
            with self.errors.guard("metrics"):
                self.observer.flush()

    def _send_errors(self, outputs: dict[int, EngineCoreOutputs]) -> None:
        """Add an error output for each request _finish_failed finished (as vLLM does for its
        own FINISHED_ERROR requests): the client gets an error, not a hang."""
        errored, self._errored = self._errored, []
        for request in errored:
            output = EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[],
                finish_reason=request.get_finished_reason(),
                events=request.take_events(),
                trace_headers=request.trace_headers,
            )
            if (batch := outputs.get(request.client_index)) is None:
                batch = outputs[request.client_index] = EngineCoreOutputs()
            batch.outputs.append(output)

    def _waiting_tenants(self, among: set[str] | None) -> set[str]:
        """The tenants (of `among`, None: all) with a request waiting. Every step: the scan
        stops as soon as every tenant of `among` has been seen."""
        found: set[str] = set()
        for request in itertools.chain(self.waiting, self.kv_holding_waiting):
            if (tracked := self.tracked.get(request.request_id)) is None:
                continue
            tenant = tracked.info.tenant
            if among is None or tenant in among:
                found.add(tenant)
                if among is not None and len(found) == len(among):
                    break
        return found

    def _preempt_for_turnaround(self, now: float) -> None:
        """With every batch slot taken, preempt the running request that choose_turnaround_victim
        names for a waiting request (which then takes its slot this step). The candidates are
        the first `rule.candidates` waiting requests in the policy's order (default: the head
        only), tried in turn: the head may be a long request that would not gain enough, while
        a short one behind it would; that one does not delay the head, which waits for the next
        slot to free either way. The victim's KV cache is swapped or recomputed like any
        victim's (_preempt_request)."""
        if (
            not self.fairness_policy.preempts_for_turnaround
            or not self.waiting
            or len(self.running) < self.max_num_active_reqs
        ):
            return
        by_id = {r.request_id: r for r in self.running}
        running: list[RunningInfo] = []
        for r in self.running:
            if (info := self.tracked.get(r.request_id)) is None:
                continue
            # Victims only among requests past their prompt, with no split-execution session.
            # Under async scheduling with a KV connector, every running request is in the step
            # in flight, and vLLM defers returning its blocks to the pool until that step is
            # done (`_free_request_blocks`): preempting it still frees its batch slot now,
            # which is what this rule is for (vLLM's own KV-pressure loop skips such victims
            # because a deferred free gives no blocks now).
            preemptible = not r.resumable and r.num_computed_tokens >= r.num_prompt_tokens
            running.append(
                RunningInfo(
                    info.info,
                    r.num_output_tokens,
                    r.num_computed_tokens,
                    info.preempted,
                    preemptible,
                    self.advisor.kept_tokens(r) if preemptible else 0,
                )
            )
        for candidate in list(self.waiting)[: self.fairness.preemption.candidates]:
            tracked = self.tracked.get(candidate.request_id)
            if tracked is None or candidate.status not in (
                RequestStatus.WAITING,
                RequestStatus.PREEMPTED,
            ):
                continue
            victim_info = self.fairness_policy.turnaround_victim(tracked.info, running, now, self)
            if victim_info is not None:
                self._preempt_for(candidate, by_id[victim_info.request_id])
                return

    def _preempt_for(self, candidate: Request, victim: Request) -> None:
        """Preempt `victim` and put `candidate` at the head of the waiting queue, into its slot."""
        self.running.remove(victim)
        self._preempt_request(victim, time.monotonic(), drop_stale_output=self.requires_kv_delivery)
        # It is not running in this step: the model runner must be sent its state again when it
        # resumes (as vLLM's reset_prefix_cache does for the requests it preempts).
        self.prev_step_scheduled_req_ids.discard(victim.request_id)
        self.tracked[victim.request_id].preempted += 1
        # The victim was put at the head of the queue: the candidate goes first, into its slot.
        self.waiting.remove_request(candidate)
        self.waiting.prepend_request(candidate)
        self.observer.preempted_for_turnaround()

    def _preemption_possible(self) -> bool:
        """True when this step may have to preempt: fewer free KV blocks than running requests
        (each may need a new block). Only then is `running` re-ordered for the victim choice:
        re-ordering it every step changes the batch order every step, which makes the model
        runner reshuffle its persistent batch."""
        free = self.kv_cache_manager.block_pool.get_num_free_blocks()
        return free < len(self.running) + 1

    def _order(
        self, requests: Iterable[Request], now: float, victims: bool = False
    ) -> list[Request]:
        """Most deserving first, by the configured policy (its victim order if `victims`)."""
        by_id = {r.request_id: r for r in requests}
        infos = [self.tracked[i].info for i in by_id if i in self.tracked]
        policy = self.fairness_policy
        ranked = (policy.order_victims if victims else policy.order)(infos, by_id, now, self)
        ordered = [by_id[i.request_id] for i in ranked]
        # Requests we do not track (none expected) keep their place at the end.
        ordered += [r for i, r in by_id.items() if i not in self.tracked]
        return ordered

    def committed(self, exclude: Container[str]) -> dict[str, float]:
        """Per tenant, the predicted cost still to be charged for its running requests but
        those in `exclude` (the requests being ordered): see order_by_turnaround."""
        pending: dict[str, float] = defaultdict(float)
        for request in self.running:
            if request.request_id in exclude:
                continue
            if (tracked := self.tracked.get(request.request_id)) is not None:
                pending[tracked.info.tenant] += committed_cost(
                    tracked.info,
                    request.num_output_tokens,
                    request.num_computed_tokens,
                    self.output_estimate,
                    self.fairness.vtc,
                )
        return pending

    def _reorder(self, queue: Any, now: float) -> None:
        """Re-order vLLM's FCFS waiting deque in place."""
        if len(queue) > 1:
            ordered = self._order(list(queue), now)
            queue.clear()
            queue.extend(ordered)

    def _account(self, output: SchedulerOutput, now: float) -> tuple[int, int]:
        """Charge scheduled tokens to tenants and tell the observer; note first-scheduled
        times. Returns the step's prompt tokens and decoding requests. Runs every step on the
        engine core's critical path."""
        self.observer.step(output.total_num_scheduled_tokens, self.advisor.swap_space_bytes())
        prefill = decode = 0
        # Tokens to charge per (tenant, weight): (prompt, output); the ledger is charged once
        # per pair, not once per request.
        charges: dict[tuple[str, float], tuple[int, int]] | None = (
            {} if self.ledger.keeps_counters else None
        )
        served: dict[str, int] = {}
        for req_id, n in output.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            if request is None:
                continue
            # num_computed_tokens already includes this step's n tokens. Tokens recomputed
            # after a preemption count as prompt: they cost what prompt tokens cost.
            before = request.num_computed_tokens - n
            prompt_part = max(0, min(n, request.num_tokens - 1 - before))
            prefill += prompt_part
            decode += n > prompt_part
            if (tracked := self.tracked.get(req_id)) is None:
                continue
            info = tracked.info
            if tracked.first_scheduled is None:
                tracked.first_scheduled = now
                self.observer.first_scheduled(now - info.arrival_time)
            served[info.tenant] = served.get(info.tenant, 0) + n
            if charges is not None:
                charged = max(0, min(n, request.num_prompt_tokens - before))
                prompt, out = charges.get((info.tenant, info.weight), (0, 0))
                charges[info.tenant, info.weight] = (prompt + charged, out + n - charged)
        for (tenant, weight), (prompt, out) in (charges or {}).items():
            self.ledger.charge(tenant, prompt, out, weight)
        self.observer.served(served, now, self._waiting_tenants)
        return prefill, decode

    # --- outputs ------------------------------------------------------------------------

    def _preempt_request(
        self, request: Request, timestamp: float, drop_stale_output: bool = False
    ) -> None:
        # Before vLLM frees the victim's blocks. A failure recomputes, as stock vLLM does.
        decision = Decision("recompute", "internal-error", math.nan, math.nan)
        with self.errors.guard("preemption_mode", request.request_id):
            decision = self._decide(request)
        super()._preempt_request(request, timestamp, drop_stale_output)
        with self.errors.guard("metrics"):
            self.observer.preempted(decision)

    def _decide(self, request: Request) -> Decision:
        """Swap or recompute this victim (the advisor's; it plans the swap-out)."""

        def block_ids() -> list[int]:
            return list(self.kv_cache_manager.get_block_ids(request.request_id)[0])

        return self.advisor.decide(request, block_ids)

    def _update_request_as_session(self, session: Request, update: Any) -> None:
        chunk = self.split_chunks.pop(session.request_id)
        if chunk is None:
            super()._update_request_as_session(session, update)
            return
        try:
            if extend_session(session, chunk, update, self.hash_block_size, self.log_stats):
                self.num_waiting_for_streaming_input -= 1
        except Exception as exc:  # the session cannot go on correctly: it fails alone
            self._fail(session.request_id, "split_session", exc)

    def _free_request(
        self, request: Request, delay_free_blocks: bool = False
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        rid = request.request_id
        with self.errors.guard("finish_accounting", rid):
            self.split_chunks.drop(rid)
            self.split_rows_held.pop(rid, None)
            tracked = self.tracked.pop(rid, None)
            if tracked is not None:
                self.ledger.leave(tracked.info.tenant)
                self._record_finish(tracked, request)
        if self.advisor.swap is not None:
            with self.errors.guard("swap_release", rid):
                self.advisor.release(rid)
        return super()._free_request(request, delay_free_blocks)

    def _record_finish(self, tracked: Tracked, request: Request) -> None:
        """Weighted turnaround (service time predicted with the actual output length) and output
        length prediction error."""
        info, actual = tracked.info, request.num_output_tokens
        service = self.service.service_time(info.prompt_tokens, actual)
        turnaround = self.clock() - info.arrival_time
        self.observer.finished(turnaround, service, tracked.predicted_output, actual)
        self.output_estimate = self.output_estimate.update(info.max_tokens, actual)


def schedules_async(vllm_config: Any) -> bool:
    """True when vLLM will run this scheduler with two steps in flight (async scheduling)."""
    scheduler_config = getattr(vllm_config, "scheduler_config", None)
    return bool(getattr(scheduler_config, "async_scheduling", False))


class AdaptiveAsyncScheduler(AdaptiveScheduler, AsyncScheduler):
    """AdaptiveScheduler over vLLM's AsyncScheduler, for async scheduling (built by
    AdaptiveScheduler when vLLM's config asks for it). Everything AdaptiveScheduler does is
    unchanged; what differs under two steps in flight is handled there: each step's timing is
    keyed by its SchedulerOutput (`_in_flight`), and a step is timed from when the one before
    it finished.

    With a KV connector that consumes KV (our swap connector is `kv_both`) and two batches in
    flight, vLLM defers returning a freed request's blocks to the pool until the step that may
    still write them is done (`defer_block_free`). Every running request is in the step in
    flight, so fairness preemption preempts it all the same (its batch slot is what the rule
    frees) and vLLM returns the blocks a step later; the swap-out copies them before then."""


def load_costs(vllm_config: Any) -> Callable[[int, int], tuple[float, float]]:
    """(num_tokens, num_blocks) -> (swap_s, recompute_s) from the cost predictors
    for this model and device (a profile made by `adaptivellm profile`, else analytic)."""
    from adaptivellm.scheduler.costs import costs_for_vllm_config

    return costs_for_vllm_config(vllm_config)
