"""The split-execution endpoint: `/v1/split/session` (WebSocket) and `/v1/split/info` (GET).

A vLLM endpoint plugin (`vllm.endpoint_plugins` entry point `adaptivellm-split`, enabled by
`adaptivellm serve --split-execution`). One WebSocket is one generation
(adaptivellm.split_client.protocol): the server plans k with its current load, then feeds the
client's hidden states to the engine as a streaming-input session, one chunk per token, and
sends each sampled token back. The engine side is adaptivellm.scheduler.split_sessions and
adaptivellm.split_model. vLLM's `--api-key` middleware guards `/v1/...` WebSockets too.

Nothing a client sends can hurt other requests: every frame is checked (size, dtype, shape,
hidden size, NaN/Inf) before it reaches the engine, and whatever ends a session (error, close,
disconnect, idle timeout) aborts its engine request, which frees its KV cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from argparse import Namespace
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from starlette.datastructures import State
from starlette.requests import Request as StarletteRequest

from adaptivellm.metrics import SplitServerMetrics
from adaptivellm.scheduler.config import AdaptiveConfig
from adaptivellm.split_client.planner import (
    ClientProfile,
    InfeasibleSLAError,
    ModelShape,
    Request,
    ServerProfile,
    build_costs,
    choose_split_layer,
    evaluate_placements,
)
from adaptivellm.split_client.protocol import (
    INFO_PATH,
    PROTOCOL_VERSION,
    SESSION_PATH,
    Close,
    Error,
    Open,
    Plan,
    Prompt,
    ProtocolError,
    TensorFrame,
    Token,
    Tokens,
    Turn,
    decode_frame,
    decode_message,
    encode_message,
)
from adaptivellm.split_config import SPLIT_PLUGIN_NAME, SplitConfig
from adaptivellm.split_wire import EXTRA_KEY, pack, wire_dtype

logger = logging.getLogger(__name__)
#: Planner's per-step overhead before any split step was observed, and the EWMA weight.
INITIAL_STEP_S = 0.01
STEP_EWMA_WEIGHT = 0.05
#: The planner's slack is a quantile (SplitConfig.sla_target) of the recent latency ratios, once
#: this many are known; until then split sessions plan with INITIAL_SLACK (a fresh server has
#: not yet seen how late its sessions run).
MIN_RATIOS = 4
INITIAL_SLACK = 1.2
#: The planner fits measured = offset + factor x predicted (`fit_calibration`) once this many
#: sessions of a kind are known and at least MIN_SLOPE_PAIRS pairs of them have predictions at
#: least SLOPE_SPREAD of the median prediction apart; a slope under MIN_FACTOR or an offset
#: below 0 is not trusted (a factor alone, offset 0, is used instead).
MIN_AFFINE_SESSIONS = 16
MIN_SLOPE_PAIRS = 8
SLOPE_SPREAD = 0.1
MIN_FACTOR = 0.5
#: The slack is the SLA target's quantile of measured over the line, its tail extrapolated
#: (`tail_quantile`) from this share of the largest ratios: 64 sessions cannot show a 0.99
#: quantile (the largest of 64 is exceeded by 1 in 65 of the next), so the largest half is
#: taken as an exponential tail and the quantile read off that.
TAIL_SHARE = 0.5
#: ... read on latencies padded by this share of the window's median measured latency
#: (`fit_calibration`): a session's fixed delays (its first pass behind another's, a round
#: trip) are seconds, not a share of its length, and over ratios alone the short sessions'
#: tail would set the slack of long ones.
PAD_SHARE = 0.5
#: ... and the tail extrapolated, once this many sessions are known (as many as a line needs).
#: With fewer, the ratios are read unpadded and the slack is their interpolated quantile (near
#: the largest seen) times 1 + FEW_SESSIONS_MARGIN / n: extrapolated from a handful of ratios
#: the tail reads far more than they show (of n = 4, at the 0.99 quantile, the second largest
#: times the largest over it to the power 3.9: a fresh-clone CI read an all-client slack of 865
#: from 4 sessions, and a pad times that bounded any all-client session by 147 s; a capacity
#: run read 8.1-12.9 from 10-12 split sessions and served 52 of 55 and 75 of 78 split-capable
#: sessions whole at 1-2/s).
MIN_PADDED_SESSIONS = MIN_AFFINE_SESSIONS
#: Replayed over the capacity runs' 5th to 16th sessions of each kind, each against the ones
#: before it (bench/split_calibration.py `few_sessions`; in sample: the margin was chosen on
#: it), the interpolated quantile alone covered 89% / 87% of interior / all-client sessions;
#: with this margin 100% / 94%, as the extrapolated tail did (97% / 94%), at bounds of 1.53x /
#: 1.97x the prediction (median) against its 1.58x / 2.41x. It applies to sessions served
#: whole too, and at any SLA target.
FEW_SESSIONS_MARGIN = 2.0
#: Interior and all-client sessions are planned with their own calibration once this many of
#: their kind are known (as many as a padded slack needs), and with split sessions' as a whole
#: before: the slack of a handful of sessions is uncertain (1, 1, 1 and 2 read 2.96x), and a
#: kind whose slack rules every plan of it out gets no session to correct it (a capacity run
#: read an all-client slack of 16.3 from 11 sessions, one of them late, and then split 2 of 78
#: split-capable sessions at 2/s and none after).
MIN_OWN_SESSIONS = MIN_PADDED_SESSIONS
#: A kind none of which finished for SplitConfig.calibration_stale_s is forgotten only once at
#: least this many sessions were planned meanwhile (`forget_stale`): a kind the planner rules
#: out, not a server with no traffic.
STALE_PLANS = 16
#: The shortest SLA a plan is asked to meet: a budget calibrated down to nothing or below.
MIN_PLANNED_SLA_S = 1e-9
#: A prefill teaches the planner the rate prefills run at (`observe_prefill`) when it ran at
#: least this many token-layers (fewer: the fixed part of a pass dominates its time), folded
#: in with this weight (on a log scale: a rate is off by factors, not by FLOP/s).
MIN_PREFILL_TOKEN_LAYERS = 256
PREFILL_EWMA_WEIGHT = 0.2
#: The kinds of session whose predictions the planner calibrates apart: `interior`, the server
#: runs some layers (0 < k < N); `client`, the client runs every layer (k = N); `whole`, served
#: as an ordinary request (k = 0). `split` is interior and client together.
SessionKind = Literal["interior", "client", "whole", "split"]
#: The kinds a finished session is recorded as (`split` is two of them together).
RECORDED_KINDS: tuple[SessionKind, ...] = ("interior", "client", "whole")
#: A client with no compute time and a free link: the prediction of a session with it is the
#: server's share of the session's latency (SplitService.client_share_s).
INSTANT_CLIENT = ClientProfile(
    flops_per_s=math.inf, uplink_bps=math.inf, downlink_bps=math.inf, rtt_s=0.0
)
#: WebSocket close codes: 1000 normal, 1008 policy violation, 1011 server error, 1013 try later.
_CLOSE_CODES = {"too_many_sessions": 1013, "infeasible_sla": 1013, "engine_error": 1011}


@dataclass
class SplitService:
    """Per-server state of the endpoint: the model, the limits and the open sessions."""

    engine: Any
    config: SplitConfig
    shape: ModelShape
    served_names: tuple[str, ...]
    eos_token_id: int | None
    max_model_len: int
    server: ServerProfile
    #: The dtype frames travel in, client to server and on to the engine: the model's.
    wire_dtype: str = "float32"
    #: The open sessions, by request id.
    open_sessions: dict[str, Session] = field(default_factory=dict)
    #: Slots taken (open sessions, and slots handed to a queued session not yet open).
    taken: int = 0
    #: Sessions waiting for a slot, in arrival order (`admit`).
    queue: deque[asyncio.Future[None]] = field(default_factory=deque)
    #: How long recent sessions held their slot (`retry_after_s`).
    held_s: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    #: Exponentially weighted mean of observed decode steps (frame in to token out): the
    #: planner's per-step overhead, so predictions follow the server's real load.
    step_estimate_s: float = INITIAL_STEP_S
    #: The rate this server's prefills ran at (FLOP/s, see `observe_prefill`); None until one
    #: was seen (the profile's own rate is used until then).
    prefill_flops_per_s: float | None = None
    #: Recent (predicted, measured) end-to-end latencies, by SessionKind (see `fit`).
    #: Interior splits and all-client sessions err differently (a CPU run read median ratios
    #: 1.10 and 1.00), and sessions served whole are ordinary requests (no client, no round
    #: trip per token).
    samples: dict[str, deque[tuple[float, float]]] = field(
        default_factory=lambda: {k: deque(maxlen=64) for k in RECORDED_KINDS}
    )
    #: Sessions planned (`plan`), and when (time.monotonic, `plans`) a session of each kind
    #: last finished (`forget_stale`).
    plans: int = 0
    last_observed: dict[str, tuple[float, int]] = field(default_factory=dict)
    #: `fit`'s answers since the last session was recorded.
    _fits: dict[str, Calibration] = field(default_factory=dict, repr=False)

    def observe_step(self, seconds: float) -> None:
        """Fold one observed decode step into the estimate."""
        self.step_estimate_s += STEP_EWMA_WEIGHT * (seconds - self.step_estimate_s)

    def observe_prefill(self, rows: int, past: int, layers: int, seconds: float) -> None:
        """Fold one observed prefill into the learned prefill rate: `rows` new tokens after
        `past` cached ones through `layers` of the server's layers took `seconds` from their
        arrival to the first token. The decode step's estimate (the fixed part of a pass, and
        one token's work) is taken off; a prefill too small to say more than that teaches
        nothing."""
        if rows * layers < MIN_PREFILL_TOKEN_LAYERS or not math.isfinite(seconds):
            return
        compute_s = seconds - self.step_estimate_s
        if compute_s <= 0:
            return
        sample = float(self.shape.layer_flops(rows, past)) * layers / compute_s
        if not (math.isfinite(sample) and sample > 0):
            return
        if self.prefill_flops_per_s is None:
            self.prefill_flops_per_s = sample
            return
        log_rate = math.log(self.prefill_flops_per_s)
        log_rate += PREFILL_EWMA_WEIGHT * (math.log(sample) - log_rate)
        self.prefill_flops_per_s = math.exp(log_rate)

    def profile(self) -> ServerProfile:
        """The server as the planner prices it now: its load, the observed per-pass overhead
        and the learned prefill rate."""
        return replace(
            self.server,
            decode_batch=max(1, self.load() + 1),
            step_overhead_s=self.step_estimate_s,
            prefill_flops_per_s=self.prefill_flops_per_s or self.server.prefill_flops_per_s,
        )

    def can_open(self) -> bool:
        return self.taken < self.config.max_sessions

    async def admit(self) -> bool:
        """Take a slot: at once if one is free and no session queues, else wait for one, in
        arrival order, up to `queue_s`. False when none came (the caller refuses)."""
        if not self.queue and self.can_open():
            self.taken += 1
            return True
        if self.config.queue_s <= 0:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.config.queue_s)
        except TimeoutError:
            pass
        except BaseException:  # the server stops: a slot already handed over goes back
            if waiter.done() and not waiter.cancelled():
                self.release()
            waiter.cancel()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self.queue.remove(waiter)
        if waiter.done() and not waiter.cancelled():
            return True  # `release` handed it a slot (possibly as the wait timed out)
        waiter.cancel()
        return False

    def release(self, held_s: float | None = None) -> None:
        """Give a slot back: to the first queued session, else to the pool."""
        if held_s is not None:
            self.held_s.append(held_s)
        while self.queue:
            waiter = self.queue.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to it; `taken` is unchanged
                return
        self.taken = max(0, self.taken - 1)

    def retry_after_s(self) -> float:
        """About how long until a slot frees, for a refused session: the mean time recent
        sessions held a slot, spread over the slots, times the sessions queued plus one (at
        least 1 s; `queue_s` before any session ended)."""
        mean = sum(self.held_s) / len(self.held_s) if self.held_s else self.config.queue_s
        slots = self.config.max_sessions
        return round(max(1.0, mean / slots * (len(self.queue) + 1)), 1)

    def info(self) -> dict[str, Any]:
        """What `GET /v1/split/info` answers: enough for a client to prepare a session."""
        return {
            "protocol_version": PROTOCOL_VERSION,
            "model": self.served_names[0],
            "num_layers": self.shape.num_layers,
            "hidden_size": self.shape.hidden_size,
            "dtype": self.wire_dtype,
            "max_model_len": self.max_model_len,
            "max_sessions": self.config.max_sessions,
            "policy": self.config.policy,
            "open_sessions": len(self.open_sessions),
            "queued_sessions": len(self.queue),
            **self.waits(),
            "calibration": self.calibration_report(),
            "server_profile": {
                "flops_per_s": self.server.flops_per_s,
                "prefill_flops_per_s": self.prefill_flops_per_s,
                "step_overhead_s": round(self.step_estimate_s, 6),
            },
            "max_frame_bytes": self.config.max_frame_bytes,
            "pass_costs": self.pass_costs_report(),
        }

    def pass_costs_report(self) -> dict[str, Any] | None:
        """The cost profile the planner prices splits with (None without one), and the
        smallest k whose split saves server time now and beside requests served whole."""
        pass_costs = self.config.pass_costs
        if pass_costs is None:
            return None
        return {
            **pass_costs.to_dict(),
            "whole_rows": self.whole_rows(),
            "break_even_layer": pass_costs.break_even_layer(self.whole_rows()),
            "break_even_layer_beside_whole": pass_costs.break_even_layer(1),
        }

    def calibration_report(self) -> dict[str, Any]:
        """How the planner corrects its cost model now, for each SessionKind: the offset and
        factor on its predictions, the slack it plans against, and how many recent sessions they
        rest on (an operator's answer to "why does the planner keep sessions whole?")."""
        self.forget_stale()
        return {
            kind: {"sessions": len(self._recent(kind)), **self.fit(kind).report()}
            for kind in ("split", *RECORDED_KINDS)
        }

    def waits(self) -> dict[str, Any]:
        """What the open sessions wait for (`client`: its next message; `engine`: its next
        token; `sending`; `finishing`: the engine's end of the session), and the longest wait:
        a session that outlives its client shows here."""
        now = time.monotonic()
        states = Counter(s.state for s in self.open_sessions.values())
        longest = max((now - s.since for s in self.open_sessions.values()), default=0.0)
        return {"sessions_waiting_for": dict(states), "longest_wait_s": round(longest, 3)}

    def plan(self, request: Open) -> tuple[int, float | None, Literal["planner", "client"]]:
        """(k, predicted end-to-end latency, who chose k) for an Open, at the current load.
        A kind that went stale is forgotten first (`forget_stale`)."""
        self.plans += 1
        self.forget_stale()
        server = self.profile()
        client = request.client
        work = Request(request.prompt_tokens, request.max_tokens, request.sla_s or math.inf)
        costs = build_costs(self.shape, client, server, work)
        if request.layer is not None:
            if request.layer > self.shape.num_layers:
                raise ProtocolError(
                    "bad_request",
                    f"layer {request.layer} is beyond the model's {self.shape.num_layers} layers",
                )
            return request.layer, _latency(costs, request.layer), "client"
        try:
            layer = self._choose(client, server, work)
            if self._whole_is_cheaper(layer, costs, request.sla_s):
                return 0, _latency(costs, 0), "planner"
        except InfeasibleSLAError:
            whole = _latency(costs, 0)
            if whole is not None and self.fit("whole").bound(whole) <= (request.sla_s or 0):
                # Served whole, the request meets its SLA as such sessions have run lately.
                return 0, whole, "planner"
            if (
                self.config.when_busy == "refuse"
                and self.busy()
                and self._idle_would_meet(client, server, self._within_every_kind(work))
            ):
                retry = self.retry_after_s()
                raise ProtocolError(
                    "infeasible_sla",
                    f"no split meets the {request.sla_s:g} s SLA with {self.load()} requests "
                    f"running; an idle server would: retry in about {retry:g} s",
                    retry_after_s=retry,
                ) from None
            # No split meets the SLA, and waiting would not help (or the operator asked for
            # it): serve it whole (k = 0 runs as an ordinary request, with no round trip per
            # token, so it is the fastest in practice). The Plan's predicted latency tells the
            # client; the SLA metric counts a miss.
            layer = 0
        return layer, _latency(costs, layer), "planner"

    def _whole_is_cheaper(self, layer: int, costs: Any, sla_s: float | None) -> bool:
        """With a cost profile (`SplitConfig.pass_costs`), under the planner policy: whether a
        split at `layer` would take more server time per token than the session served whole
        beside the requests now served whole (`PassCosts.split_saves`), and served whole it
        meets its SLA as such sessions have run lately (`fit("whole")`). Counted on
        /metrics."""
        pass_costs = self.config.pass_costs
        if pass_costs is None or self.config.policy != "planner" or layer <= 0:
            return False
        if pass_costs.split_saves(layer, self.whole_rows()):
            return False
        whole = _latency(costs, 0)
        if whole is None or self.fit("whole").bound(whole) > (sla_s or math.inf):
            return False
        SplitServerMetrics.get().served_whole_cheaper.inc()
        return True

    def whole_rows(self) -> int:
        """Requests in flight that are served whole: the engine's, less the split sessions."""
        split = sum(1 for s in self.open_sessions.values() if s.layer > 0)
        return max(0, self.load() - split)

    def kind(self, layer: int) -> SessionKind:
        """The SessionKind of a session split at `layer`."""
        return session_kind(layer, self.shape.num_layers)

    def _budgets(self, work: Request) -> dict[str, Request]:
        """`work` with its SLA replaced by the longest prediction that meets it as interior
        and all-client sessions have run lately (`Calibration.budget`)."""
        return {
            kind: _with_sla(work, self.fit(kind).budget(work.sla_s))
            for kind in ("interior", "client")
        }

    def _within_every_kind(self, work: Request) -> Request:
        """`work` planned against the smaller of the two budgets: it holds for every k."""
        return _strictest(self._budgets(work))

    def _choose(self, client: ClientProfile, server: ServerProfile, work: Request) -> int:
        """The policy's k against the SLA as sessions of k's kind have run versus their
        predictions (`fit`): a plan that only just fits the SLA on paper misses it. Interior
        splits (k = 0 planned by the policy is priced as a split, so with them) and
        all-client sessions have each their calibration: k is planned against each kind's
        budget and kept if it is of that kind (the larger k when both are: less server work);
        otherwise it is planned against the smaller budget, which holds for every k.
        InfeasibleSLAError when no k meets that."""
        chosen = []
        budgets = self._budgets(work)
        for kind, budget in budgets.items():
            with contextlib.suppress(InfeasibleSLAError):
                layer = choose_split_layer(self.shape, client, server, budget, self.config.policy)
                if ("client" if layer >= self.shape.num_layers else "interior") == kind:
                    chosen.append(layer)
        if chosen:
            return max(chosen)
        strict = _strictest(budgets)
        return choose_split_layer(self.shape, client, server, strict, self.config.policy)

    def busy(self) -> bool:
        """Whether the server is busy enough to refuse sessions whose SLA only load makes
        unreachable: at least half as many requests in flight as split session slots (and
        at least 2). Below that, one more request barely moves a step's time."""
        return self.load() >= max(2, self.config.max_sessions // 2)

    def _idle_would_meet(self, client: Any, server: ServerProfile, work: Request) -> bool:
        """Whether the request's SLA is reachable on `server` with nothing else running (the
        step overhead as observed: an idle server's may be lower still)."""
        idle = replace(server, decode_batch=1)
        try:
            choose_split_layer(self.shape, client, idle, work, self.config.policy)
        except InfeasibleSLAError:
            return False
        return True

    def fit(self, kind: SessionKind = "split") -> Calibration:
        """How sessions of `kind` have run against the cost model lately (`fit_calibration`
        over the last 64, with the SLA target's quantile as the slack, read on padded
        latencies, its tail extrapolated, from 16 sessions on). Interior and all-client
        sessions fall back to split sessions' as a whole while fewer than MIN_OWN_SESSIONS of
        their own are known, and those to INITIAL_SLACK with the predictions as they are
        (below MIN_RATIOS). A stale kind is forgotten by `plan` and `calibration_report`, once
        each, not here (a plan reads several fits).

        Sessions served whole may plan beyond the SLA when their line runs below their
        predictions (an ordinary request priced by the split cost model; it is the SLA check of
        serving whole that reads it), with slack 1 while too few are known. Split kinds' budget
        is at most the SLA. Kept until the next session is recorded (a plan reads several; a
        fit takes about 0.25 ms)."""
        if (fitted := self._fits.get(kind)) is None:
            fitted = self._fits[kind] = self._fit(kind)
        return fitted

    def _fit(self, kind: SessionKind) -> Calibration:
        split = kind != "whole"
        samples = self._samples(kind)
        if samples is None:
            return Calibration(slack=INITIAL_SLACK if split else 1.0, within_sla=split)
        return fit_calibration(samples, self.config.sla_target, within_sla=split)

    def forget_stale(self, now: float | None = None) -> list[SessionKind]:
        """Forget the sessions of each kind none of which finished for
        `SplitConfig.calibration_stale_s` (0: never) while at least STALE_PLANS sessions were
        planned; the kinds forgotten. A kind is only recalibrated by its own sessions: once its
        calibration rules it out (one session far past its prediction among a few can make
        every plan of the kind infeasible), none is planned, and without this it would stay
        out for good. An idle server forgets nothing: its calibration still holds when traffic
        comes back. Forgotten, a kind plans as on a fresh server (`fit`'s fallbacks). Counted
        on /metrics and logged."""
        stale_s = self.config.calibration_stale_s
        if stale_s <= 0:
            return []
        now = time.monotonic() if now is None else now
        forgotten = [
            kind
            for kind in RECORDED_KINDS
            if self.samples[kind]
            and (last := self.last_observed.get(kind)) is not None
            and now - last[0] > stale_s
            and self.plans - last[1] >= STALE_PLANS
        ]
        for kind in forgotten:
            ratios = [measured / predicted for predicted, measured in self.samples[kind]]
            since_s, planned = self.last_observed[kind]
            logger.info(
                "Split planner forgets how its last %d %s sessions ran (measured over predicted: "
                "median %.2f, largest %.2f): none finished in %.0f s, while %d sessions were "
                "planned",
                len(ratios),
                kind,
                float(np.median(ratios)),
                max(ratios),
                now - since_s,
                self.plans - planned,
            )
            self.samples[kind].clear()
            SplitServerMetrics.get().calibration_forgotten.labels(kind=kind).inc()
        if forgotten:
            self._fits.clear()
        return forgotten

    def _recent(self, kind: SessionKind) -> list[tuple[float, float]]:
        if kind == "split":
            return [*self.samples["interior"], *self.samples["client"]]
        return list(self.samples[kind])

    def _samples(self, kind: SessionKind) -> np.ndarray | None:
        """The recent (predicted, measured) pairs `fit` reads; None while too few are known."""
        samples = self._recent(kind)
        if len(samples) < MIN_OWN_SESSIONS and kind in ("interior", "client"):
            samples = self._recent("split")
        return np.array(samples, dtype=float) if len(samples) >= MIN_RATIOS else None

    def observe_session(
        self,
        predicted_s: float | None,
        measured_s: float,
        kind: SessionKind = "interior",
        client_late_s: float = 0.0,
    ) -> None:
        """Record a finished session's measured latency against its prediction (`kind`: how
        it was split, see `kind`). `client_late_s`, the time the session waited for its client
        beyond the client's predicted share, is not counted: a client slower than it declared
        is late on its own account, and must not make the server plan every later session
        more cautiously (one stalled client would otherwise set the slack for the next 64).
        A session whose whole time was its client's lateness says nothing of the server's."""
        if kind == "split":
            raise ValueError("a session is interior, client or whole")
        measured_s -= max(0.0, client_late_s)
        if predicted_s is not None and 0 < predicted_s < math.inf and 0 < measured_s < math.inf:
            self.samples[kind].append((predicted_s, measured_s))
            self.last_observed[kind] = (time.monotonic(), self.plans)
            self._fits.clear()

    def client_share_s(self, client: ClientProfile, work: Request, layer: int) -> float:
        """The client's predicted share of a session's latency at split `layer`: its layers,
        the transfers and the link (the prediction with an instant client and link is the
        server's share; the server's profile cancels out)."""
        costs = build_costs(self.shape, client, self.server, work)
        server_only = build_costs(self.shape, INSTANT_CLIENT, self.server, work)
        total, server = _latency(costs, layer), _latency(server_only, layer)
        return max(0.0, total - server) if total is not None and server is not None else 0.0

    def load(self) -> int:
        """Requests in flight on this server (the planner's decode batch)."""
        try:
            return int(self.engine.get_num_unfinished_requests())
        except Exception:  # an engine client without the counter: assume idle
            return 0


def _count_sla(sla_s: float | None, took_s: float, turn: Literal["first", "follow_up"]) -> None:
    """Count one turn against its SLA on /metrics (nothing without an SLA)."""
    if sla_s is not None:
        SplitServerMetrics.get().sla_met.labels(met=str(took_s <= sla_s).lower(), turn=turn).inc()


def torch_tensor(array: np.ndarray) -> Any:
    """A float32 torch tensor holding a copy of `array` (the engine keeps it)."""
    import torch

    return torch.from_numpy(np.array(array, dtype=np.float32))


def prediction_error(
    predicted_s: float | None, measured_s: float
) -> tuple[Literal["over", "under"], float] | None:
    """(direction, |predicted - measured| / measured) of a session's latency prediction; None
    without a prediction or a measurement."""
    if predicted_s is None or not math.isfinite(predicted_s) or not measured_s > 0:
        return None
    direction: Literal["over", "under"] = "over" if predicted_s > measured_s else "under"
    return direction, abs(predicted_s - measured_s) / measured_s


def session_kind(layer: int, num_layers: int) -> SessionKind:
    """The SessionKind of a session split at `layer` of `num_layers`."""
    if layer == 0:
        return "whole"
    return "client" if layer >= num_layers else "interior"


def _strictest(budgets: dict[str, Request]) -> Request:
    """The budget with the shortest SLA: it holds for every kind."""
    return min(budgets.values(), key=lambda budget: budget.sla_s)


def _with_sla(work: Request, sla_s: float) -> Request:
    """`work` planned against `sla_s` (a budget of nothing or less: one no plan meets)."""
    return replace(work, sla_s=max(sla_s, MIN_PLANNED_SLA_S))


@dataclass(frozen=True)
class Calibration:
    """How sessions of one kind have run against the planner's cost model lately: measured
    latency offset_s + factor x predicted at the median, and within `slack` times that for the
    SLA target's share of them, both padded by `pad_s` (the bound is (line + pad) x slack -
    pad). A factor alone misjudges short sessions: a fixed cost per session (its set-up, its
    first pass behind another's) weighs more in them; the offset carries that cost at the
    median, and the pad in the tail, where a slack over ratios alone, taken over short and long
    sessions, would be the short ones' (several times the prediction) for every session."""

    offset_s: float = 0.0
    factor: float = 1.0
    slack: float = 1.0
    #: Plan no prediction above the SLA, however early sessions ran (split kinds).
    within_sla: bool = False
    pad_s: float = 0.0

    def predict(self, predicted_s: float) -> float:
        """The calibrated prediction: the server's best estimate of the latency."""
        return self.offset_s + self.factor * predicted_s

    def bound(self, predicted_s: float) -> float:
        """The latency the SLA target's share of such sessions stays within."""
        return (self.predict(predicted_s) + self.pad_s) * self.slack - self.pad_s

    def budget(self, sla_s: float) -> float:
        """The longest prediction whose bound is within `sla_s` (0 or less: none is)."""
        budget = ((sla_s + self.pad_s) / self.slack - self.pad_s - self.offset_s) / self.factor
        return min(budget, sla_s) if self.within_sla else budget

    def report(self) -> dict[str, float]:
        return {
            "slack": round(self.slack, 3),
            "calibration": round(self.factor, 3),
            "offset_s": round(self.offset_s, 4),
            "pad_s": round(self.pad_s, 4),
        }


def fit_calibration(
    samples: np.ndarray, quantile: float, *, within_sla: bool, pad_share: float = PAD_SHARE
) -> Calibration:
    """The Calibration of (predicted, measured) pairs: a Theil-Sen line (the median of the
    pairwise slopes, then the median offset; robust to the tail, which the slack is for) where
    the predictions spread enough to fit one, else the median ratio alone; the slack is the
    `quantile` of measured over the line, both padded by `pad_share` x the median measured
    latency and its tail extrapolated (`tail_quantile`) once MIN_PADDED_SESSIONS are known;
    with fewer, the interpolated quantile of the unpadded ratios (near the largest) times
    1 + FEW_SESSIONS_MARGIN / n. At least
    1 where `within_sla`, and at least 1 anyway once known: at least half the sessions are on
    or above a median line, and the tail estimate is never below the interpolated quantile."""
    predicted, measured = samples[:, 0], samples[:, 1]
    offset, factor = 0.0, float(np.median(measured / predicted))
    if len(predicted) >= MIN_AFFINE_SESSIONS:
        first, second = np.triu_indices(len(predicted), 1)
        apart = predicted[second] - predicted[first]
        spread = np.abs(apart) >= SLOPE_SPREAD * float(np.median(predicted))
        if int(spread.sum()) >= MIN_SLOPE_PAIRS:
            rise = measured[second] - measured[first]
            slope = float(np.median(rise[spread] / apart[spread]))
            intercept = float(np.median(measured - slope * predicted))
            if slope >= MIN_FACTOR and intercept >= 0:
                offset, factor = intercept, slope
    line = offset + factor * predicted
    known = len(measured) >= MIN_PADDED_SESSIONS
    pad = pad_share * float(np.median(measured)) if known else 0.0
    tail = tail_quantile((measured + pad) / (line + pad), quantile, extrapolate=known)
    if not known:
        tail *= 1 + FEW_SESSIONS_MARGIN / len(measured)
    return Calibration(offset, factor, max(1.0, tail) if within_sla else tail, within_sla, pad)


def tail_quantile(ratios: np.ndarray, quantile: float, *, extrapolate: bool = True) -> float:
    """The `quantile` of positive `ratios`, read beyond the largest where it lies there (the
    peaks-over-threshold estimate): the logs of the largest m = TAIL_SHARE x n of the n ratios
    are taken as an exponential tail above the smallest of them, its scale the mean excess over
    that threshold (unbiased: times m / (m - 1)), and the quantile is the threshold plus the
    scale times log(m / (n (1 - quantile))). Never below the interpolated quantile of the
    ratios (the rule before). A quantile that does not reach into the tail (at most 1 - m / n)
    is that interpolated quantile, and so is the quantile 1 (nothing bounds an unbounded
    tail), and so is any quantile with `extrapolate` False. Ratios that are not finite and
    positive are left out; none left: 1."""
    ratios = np.asarray(ratios, dtype=float)
    ratios = ratios[np.isfinite(ratios) & (ratios > 0)]
    count = len(ratios)
    if count == 0:
        return 1.0
    seen = float(np.quantile(ratios, quantile))
    if not extrapolate:
        return seen
    largest = min(count, max(2, round(TAIL_SHARE * count)))
    if count < 2 or quantile >= 1 or quantile <= 1 - largest / count:
        return seen
    tail = np.sort(np.log(ratios))[count - largest :]
    threshold = float(tail[0])
    scale = float(np.mean(tail - threshold)) * largest / (largest - 1)
    beyond = threshold + scale * math.log(largest / (count * (1 - quantile)))
    return max(seen, math.exp(beyond))


def _latency(costs: Any, layer: int) -> float | None:
    on_server = np.arange(costs.num_layers) >= layer
    latency, _ = evaluate_placements(costs, on_server[None, :])
    value = float(latency[0])
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- the plugin


#: Every route AdaptiveLLM adds to vLLM's app.
ROUTES = (SESSION_PATH, INFO_PATH)


def check_guarded(paths: tuple[str, ...]) -> None:
    """Every route we add must sit under a prefix vLLM's `--api-key` middleware guards (HTTP
    and WebSocket alike), or it would be open to anyone: refuse to start otherwise."""
    from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX

    if open_paths := [p for p in paths if not p.startswith(GUARDED_PREFIX)]:
        raise RuntimeError(
            f"AdaptiveLLM routes {open_paths} are outside vLLM's --api-key guard {GUARDED_PREFIX}"
        )


class SplitEndpointPlugin:
    """`vllm.endpoint_plugins` entry point: adds the split routes to vLLM's app."""

    name = SPLIT_PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        check_guarded(ROUTES)
        app.add_api_websocket_route(SESSION_PATH, session_endpoint)
        app.add_api_route(INFO_PATH, info_endpoint, methods=["GET"])

    async def init_state(self, engine_client: Any, state: State, args: Namespace) -> None:
        additional = getattr(args, "additional_config", None)
        config = AdaptiveConfig.from_additional_config(additional).split
        if engine_client is None or config is None:
            state.adaptivellm_split = None
            return
        state.adaptivellm_split = build_service(engine_client, config, args)
        logger.info(
            "Split execution on %s and %s: %d layers, at most %d sessions",
            SESSION_PATH,
            INFO_PATH,
            state.adaptivellm_split.shape.num_layers,
            config.max_sessions,
        )
        if config.pass_costs is not None:
            logger.info(
                "Split planner prices splits with the cost profile %s: beside requests served "
                "whole a split saves server time from k = %s",
                config.pass_costs.source,
                config.pass_costs.break_even_layer(1),
            )


def build_service(engine_client: Any, config: SplitConfig, args: Namespace) -> SplitService:
    """The endpoint's state, from the running engine's model config."""
    model_config = engine_client.model_config
    hf = model_config.hf_config.to_dict()
    shape = ModelShape.from_hf_config(hf, dtype=wire_dtype(model_config.dtype))
    if not shape.name:
        shape = replace(shape, name=str(args.model))
    names = tuple(args.served_model_name or [args.model])
    if config.pass_costs is not None and config.pass_costs.layers != shape.num_layers:
        raise ValueError(
            f"--split-cost-profile was measured on a {config.pass_costs.layers}-layer model "
            f"({config.pass_costs.source}); this model has {shape.num_layers} layers: measure "
            "it with bench/split_host_cost.py on this model"
        )
    return SplitService(
        engine=engine_client,
        config=config,
        shape=shape,
        served_names=names,
        eos_token_id=getattr(model_config.hf_config, "eos_token_id", None),
        max_model_len=int(model_config.max_model_len),
        server=server_profile(config),
        wire_dtype=wire_dtype(model_config.dtype),
    )


def server_profile(config: SplitConfig) -> ServerProfile:
    """The planner's view of this server: configured, else measured (CPU) or the GPU default."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        flops = config.server_flops_per_s or measure_cpu_flops()
        mem = config.server_mem_bytes_per_s or 20e9
    else:
        flops = config.server_flops_per_s or ServerProfile.flops_per_s
        mem = config.server_mem_bytes_per_s or ServerProfile.mem_bytes_per_s
    return ServerProfile(flops_per_s=flops, mem_bytes_per_s=mem)


def measure_cpu_flops(size: int = 256, repeats: int = 20) -> float:
    """float32 matmul throughput of this process (FLOP/s), best of a few short runs."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - began)
    return 2 * size**3 / max(best, 1e-9)


async def info_endpoint(request: StarletteRequest) -> JSONResponse:
    """GET /v1/split/info."""
    service = getattr(request.app.state, "adaptivellm_split", None)
    if service is None:
        return JSONResponse({"error": "split execution is not enabled"}, status_code=404)
    return JSONResponse(service.info())


# --------------------------------------------------------------------------- one session


async def session_endpoint(websocket: WebSocket) -> None:
    """One split generation over one WebSocket."""
    service: SplitService | None = getattr(websocket.app.state, "adaptivellm_split", None)
    await websocket.accept()
    metrics = SplitServerMetrics.get()
    if service is None:
        await _fail(websocket, ProtocolError("bad_request", "split execution is not enabled"))
        return
    if not await service.admit():
        metrics.sessions.labels(outcome="refused").inc()
        retry = service.retry_after_s()
        await _fail(
            websocket,
            ProtocolError(
                "too_many_sessions",
                f"{service.config.max_sessions} split sessions are open"
                + (
                    f" and none ended in {service.config.queue_s:g} s"
                    if service.config.queue_s
                    else ""
                )
                + f"; retry in about {retry:g} s",
                retry_after_s=retry,
            ),
        )
        return
    admitted = time.monotonic()
    session = Session(service, websocket)
    service.open_sessions[session.request_id] = session
    metrics.sessions_open.inc()
    outcome = "error"
    try:
        outcome = await session.run()
    except ProtocolError as exc:
        metrics.errors.labels(code=exc.code).inc()
        if exc.code == "infeasible_sla":  # admission control, as a full server's refusal
            outcome = "refused"
        await _fail(websocket, exc)
    except WebSocketDisconnect:
        outcome = "disconnected"
    except Exception as exc:  # the engine failed: tell the client, keep the server up
        logger.exception("Split session %s failed", session.request_id)
        metrics.errors.labels(code="engine_error").inc()
        await _fail(websocket, ProtocolError("engine_error", f"server error: {exc}"))
    finally:
        await session.abort()
        service.open_sessions.pop(session.request_id, None)
        service.release(time.monotonic() - admitted)
        metrics.sessions_open.dec()
        metrics.sessions.labels(outcome=outcome).inc()


def _decode_or_none(text: str) -> Any:
    try:
        return decode_message(text)
    except ProtocolError:
        return None


async def _fail(websocket: WebSocket, error: ProtocolError) -> None:
    with contextlib.suppress(Exception):
        message = Error(code=error.code, message=str(error), retry_after_s=error.retry_after_s)
        await websocket.send_text(encode_message(message))
        await websocket.close(code=_CLOSE_CODES.get(error.code, 1008), reason=error.code)


def rows_for_engine(frame: np.ndarray, layer: int, num_layers: int) -> np.ndarray:
    """The rows of a split chunk the engine needs. At k = N the client ran every decoder layer:
    the server runs none, so a row is read only as the input of the final norm and the LM head,
    and vLLM computes logits for a chunk's last row alone. The rows before it would take only
    attention (with zero query, key and value at every layer) and KV cache blocks nothing
    reads, so only the last row is sent; the token sampled from it is the same. Below N every
    row is needed (layers k..N-1 attend over the whole context)."""
    return frame[-1:] if layer >= num_layers and frame.shape[0] > 1 else frame


class Session:
    """The engine request behind one WebSocket (a vLLM streaming-input session)."""

    def __init__(self, service: SplitService, websocket: WebSocket) -> None:
        self.service = service
        self.websocket = websocket
        self.request_id = f"split-{uuid.uuid4().hex}"
        self.inputs: asyncio.Queue[Any] = asyncio.Queue()
        self.outputs: AsyncIterator[Any] | None = None
        self.layer = 0
        self.finished = False
        #: Tokens of the conversation so far (all turns): the rows of hidden states the client
        #: sent, whether or not the engine needed them all (`rows_for_engine`).
        self.context = 0
        #: The socket's pending receive: started while the engine works (to see a client
        #: leave), taken over by the next `_receive`.
        self._receiving: asyncio.Future[Any] | None = None
        #: What the session waits for now, and since when (SplitService.waits).
        self.state: Literal["client", "engine", "sending", "finishing"] = "client"
        self.since = time.monotonic()
        #: Seconds spent in each state before the current one (since `_wait_for` last reset).
        self.waited: defaultdict[str, float] = defaultdict(float)

    def _wait_for(self, state: Literal["client", "engine", "sending", "finishing"]) -> None:
        now = time.monotonic()
        self.waited[self.state] += now - self.since
        self.state, self.since = state, now

    def waited_for(self, state: str) -> float:
        """Seconds this session has waited in `state`, the current wait included."""
        current = time.monotonic() - self.since if self.state == state else 0.0
        return self.waited[state] + current

    async def _send(self, message: Any) -> None:
        self._wait_for("sending")
        await self.websocket.send_text(encode_message(message))

    async def run(self) -> str:
        """Open, prefill, decode until a finish reason; returns how the session ended."""
        opened = await self._receive_open()
        self.layer, predicted, planned_by = self.service.plan(opened)
        calibration = self.service.fit(self.service.kind(self.layer))
        metrics = SplitServerMetrics.get()
        metrics.chosen_layer.observe(self.layer)
        plan = Plan(
            session_id=self.request_id,
            layer=self.layer,
            num_layers=self.service.shape.num_layers,
            hidden_size=self.service.shape.hidden_size,
            dtype=self.service.wire_dtype,
            model=self.service.served_names[0],
            max_tokens=opened.max_tokens,
            max_prompt_tokens=self.service.max_model_len - opened.max_tokens,
            predicted_latency_s=(calibration.predict(predicted) if predicted is not None else None),
            sla_s=opened.sla_s,
            running_requests=self.service.load(),
            planned_by=planned_by,
            server_decodes=self.layer == 0,
            # Follow-up turns need the engine's streaming session: split sessions only.
            multi_turn=opened.multi_turn and self.layer > 0,
            # Served whole, the prompt goes up as token ids where the client can send them.
            prompt_ids=opened.prompt_ids and self.layer == 0,
        )
        await self._send(plan)
        began = time.monotonic()
        self.waited.clear()
        if self.layer == 0:
            await self._serve_whole(opened, plan.prompt_ids)
        else:
            await self._serve_split(opened)
        took = time.monotonic() - began  # until the last token was sent (the client holds it)
        late = 0.0
        if self.layer > 0:  # waiting for a client slower than it declared: not the server's
            work = Request(opened.prompt_tokens, opened.max_tokens, math.inf)
            share = self.service.client_share_s(opened.client, work, self.layer)
            late = self.waited_for("client") - share
        self.service.observe_session(
            predicted, took, self.service.kind(self.layer), client_late_s=late
        )
        if (error := prediction_error(plan.predicted_latency_s, took)) is not None:
            metrics.latency_error.labels(direction=error[0]).observe(error[1])
        _count_sla(opened.sla_s, took, "first")
        if plan.multi_turn:
            while (turn := await self._next_turn()) is not None:
                began = time.monotonic()
                await self._serve_split(
                    replace(
                        opened,
                        prompt_tokens=turn.prompt_tokens + 1,
                        max_tokens=turn.max_tokens,
                        sampling=turn.sampling,
                    )
                )
                # The conversation's SLA holds for each turn, from its Turn to its last token.
                _count_sla(opened.sla_s, time.monotonic() - began, "follow_up")
        await self._finish()
        return "finished"

    async def _next_turn(self) -> Turn | None:
        """After a finished turn of a multi-turn session: the client's next `Turn`; None when it
        sends `Close`, leaves, or stays silent for the idle timeout (the conversation is over,
        which is no error). The turn must fit the model's context with what the session holds."""
        try:
            message = await self._receive()
        except (ProtocolError, WebSocketDisconnect):  # the idle timeout, or gone
            return None
        if isinstance(message, bytes):
            raise ProtocolError("bad_request", "expected a turn or close, got a binary frame")
        parsed = decode_message(message)
        if isinstance(parsed, Close):
            return None
        if not isinstance(parsed, Turn):
            raise ProtocolError("bad_request", f"expected a turn or close, got {parsed.type}")
        needed = self.context + parsed.prompt_tokens + 1 + parsed.max_tokens
        if needed > self.service.max_model_len:
            raise ProtocolError(
                "bad_request",
                f"the conversation holds {self.context} tokens; this turn's "
                f"{parsed.prompt_tokens} + 1 prompt and {parsed.max_tokens} output tokens exceed "
                f"the model's context of {self.service.max_model_len} tokens",
            )
        return parsed

    async def _serve_whole(self, opened: Open, prompt_ids: bool) -> None:
        """k = 0: an ordinary request, on the prompt's token ids (`prompt_ids`) or on its
        embeddings; the engine decodes on its own and every token streams to the client, or,
        where the client asked for no stream (`Open.stream` False), all of them go in one
        `Tokens` message at the end, as an ordinary request's answer does."""
        from vllm.inputs.engine import EmbedsInput, TokensInput, embeds_input, tokens_input
        from vllm.sampling_params import RequestOutputKind

        inputs: TokensInput | EmbedsInput
        if prompt_ids:
            inputs = tokens_input(await self._receive_prompt_ids(opened.prompt_tokens))
        else:
            prompt = await self._receive_prefill(opened.prompt_tokens)
            embeds = torch_tensor(prompt).to(self.service.engine.model_config.dtype)
            inputs = embeds_input(embeds)
        began = time.monotonic()
        params = self._sampling(opened)
        params.max_tokens, params.extra_args = opened.max_tokens, None
        if not opened.stream:
            params.output_kind = RequestOutputKind.FINAL_ONLY
        self.outputs = self.service.engine.generate(inputs, params, self.request_id)
        index = 0
        while (output := await self._engine_output()) is not None:
            if not opened.stream:  # FINAL_ONLY: one output, when the request has finished
                await self._send_answer(output, began)
                await anext(self.outputs, None)  # the generator ends at once
                break
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            for n, token_id in enumerate(ids):
                last = n == len(ids) - 1
                finish = completion.finish_reason if last and output.finished else None
                if finish not in (None, "stop", "length"):
                    raise ProtocolError("engine_error", f"generation ended: {finish}")
                text = completion.text if last else ""
                step_s = time.monotonic() - began
                if index == 0:  # the prompt's prefill through every layer
                    self.service.observe_prefill(
                        opened.prompt_tokens, 0, self.service.shape.num_layers, step_s
                    )
                await self._send(Token(index, int(token_id), text, finish, step_s))
                began, index = time.monotonic(), index + 1
            if output.finished:  # the generator ends at once; a client's Close may come first
                await anext(self.outputs, None)
                break
        self.finished = True

    async def _send_answer(self, output: Any, began: float) -> None:
        """The finished output of a session served whole without a stream, as one `Tokens`."""
        completion = output.outputs[0]
        finish = completion.finish_reason
        if not output.finished or finish not in ("stop", "length") or not completion.token_ids:
            raise ProtocolError("engine_error", f"generation ended: {finish}")
        answer = Tokens(
            [int(i) for i in completion.token_ids],
            completion.text,
            finish,
            time.monotonic() - began,
        )
        await self._send(answer)

    async def _serve_split(self, opened: Open) -> None:
        """k > 0: a streaming-input session, one chunk (hidden states at layer k) per token."""
        metrics = SplitServerMetrics.get()
        if self.outputs is None:  # a later turn goes on in the same engine session
            self.outputs = self.service.engine.generate(
                self._input_stream(), self._sampling(opened), self.request_id
            )
        for index in range(opened.max_tokens):
            kind = "prefill" if index == 0 else "decode"
            if index == 0:
                frame = await self._receive_prefill(opened.prompt_tokens)
            else:
                frame = await self._receive_frame("decode", 1, 1)
            step_began = time.monotonic()
            self.context += frame.shape[0]
            rows = rows_for_engine(frame, self.layer, self.service.shape.num_layers)
            if skipped := frame.shape[0] - rows.shape[0]:
                metrics.rows_skipped.inc(skipped)
            await self.inputs.put(self._chunk(rows, opened))
            token_id, text = await self._next_token()
            finish = self._finish_reason(token_id, index, opened)
            step_s = time.monotonic() - step_began
            metrics.step_seconds.labels(kind=kind).observe(step_s)
            if kind == "decode":
                self.service.observe_step(step_s)
            else:
                layers = self.service.shape.num_layers - self.layer
                past = self.context - frame.shape[0]
                self.service.observe_prefill(rows.shape[0], past, layers, step_s)
            await self._send(Token(index, token_id, text, finish, step_s))
            if finish is not None:
                break

    async def _receive_open(self) -> Open:
        message = await self._receive()
        if not isinstance(message, str):
            raise ProtocolError("bad_request", "a session starts with an Open message (JSON)")
        opened = decode_message(message)
        if not isinstance(opened, Open):
            raise ProtocolError("bad_request", f"expected open, got {opened.type}")
        if opened.model is not None and opened.model not in self.service.served_names:
            raise ProtocolError(
                "unknown_model",
                f"model {opened.model!r} is not served here; served: "
                f"{', '.join(self.service.served_names)}",
            )
        limit = self.service.max_model_len
        if opened.prompt_tokens + opened.max_tokens > limit:
            raise ProtocolError(
                "bad_request",
                f"prompt_tokens + max_tokens = {opened.prompt_tokens + opened.max_tokens} "
                f"exceeds the model's context of {limit} tokens",
            )
        return opened

    async def _receive(self) -> str | bytes:
        timeout = self.service.config.idle_timeout_s
        self._wait_for("client")
        receiving = self._start_receiving()
        try:
            message = await asyncio.wait_for(asyncio.shield(receiving), timeout)
        except TimeoutError:
            raise ProtocolError("bad_request", f"no message for {timeout:g} s; closing") from None
        self._receiving = None
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        if message.get("bytes") is not None:
            return bytes(message["bytes"])
        return str(message.get("text") or "")

    async def _receive_prompt_ids(self, tokens: int) -> list[int]:
        """The prompt's `tokens` token ids, in one `Prompt` message (Plan.prompt_ids)."""
        message = await self._receive()
        if isinstance(message, bytes):
            raise ProtocolError("bad_request", "expected the prompt's token ids, got a frame")
        parsed = decode_message(message)
        if isinstance(parsed, Close):
            raise WebSocketDisconnect(1000)
        if not isinstance(parsed, Prompt):
            raise ProtocolError("bad_request", f"expected a prompt, got {parsed.type}")
        ids = parsed.token_ids
        if len(ids) != tokens:
            raise ProtocolError(
                "bad_request", f"the prompt has {len(ids)} token ids; the Open said {tokens}"
            )
        vocab = self.service.engine.model_config.get_vocab_size()
        if max(ids) >= vocab:
            raise ProtocolError(
                "bad_request", f"token id {max(ids)} is outside the vocabulary of {vocab} tokens"
            )
        return ids

    async def _receive_prefill(self, tokens: int) -> np.ndarray:
        """The prompt's hidden states, in one frame or several (a frame is at most
        --split-max-frame-mb; the client splits longer prompts along the token axis)."""
        parts: list[np.ndarray] = []
        received = 0
        while received < tokens:
            part = await self._receive_frame("prefill", 1, tokens - received)
            parts.append(part)
            received += part.shape[0]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    async def _receive_frame(self, kind: str, least: int, most: int) -> np.ndarray:
        message = await self._receive()
        if isinstance(message, str):
            parsed = decode_message(message)
            if isinstance(parsed, Close):
                raise WebSocketDisconnect(1000)
            raise ProtocolError("bad_request", f"expected a {kind} frame, got {parsed.type}")
        frame = decode_frame(message, max_bytes=self.service.config.max_frame_bytes)
        return self._check_frame(frame, kind, least, most)

    def _check_frame(self, frame: TensorFrame, kind: str, least: int, most: int) -> np.ndarray:
        hidden = self.service.shape.hidden_size
        if frame.kind != kind:
            raise ProtocolError("bad_tensor", f"expected a {kind} frame, got {frame.kind}")
        tokens, width = frame.shape
        if width != hidden or not least <= tokens <= most:
            wanted = f"[{most}, {hidden}]" if least == most else f"[{least}..{most}, {hidden}]"
            raise ProtocolError(
                "bad_tensor",
                f"{kind} frame has shape {list(frame.shape)}; expected {wanted} "
                f"(tokens, hidden size of layer {self.layer})",
            )
        array = frame.to_numpy().astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            raise ProtocolError("bad_tensor", f"{kind} frame holds NaN or infinite values")
        return array

    def _sampling(self, opened: Open) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        s = opened.sampling
        return SamplingParams(
            max_tokens=1,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else 0,
            seed=s.seed,
            ignore_eos=s.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            extra_args={EXTRA_KEY: {"layer": self.layer}},
            # Made fresh for each chunk or request and never reused, so vLLM's input processor
            # may copy it shallowly (as vLLM's own streaming-input endpoint, realtime speech,
            # asks) rather than deep-copy it for every chunk (a first py-spy profile of
            # bench/split_host_cost.py: 9% of the API server's event loop; A/B runs could not
            # tell the difference on this machine).
            skip_clone=True,
        )

    def _chunk(self, array: np.ndarray, opened: Open) -> Any:
        from vllm.engine.protocol import StreamingInput
        from vllm.inputs.engine import tokens_input

        params = self._sampling(opened)
        params.extra_args = {EXTRA_KEY: pack(self.layer, array, self.service.wire_dtype)}
        return StreamingInput(prompt=tokens_input([0] * array.shape[0]), sampling_params=params)

    async def _input_stream(self) -> AsyncIterator[Any]:
        while (chunk := await self.inputs.get()) is not None:
            yield chunk

    def _start_receiving(self) -> asyncio.Future[Any]:
        if self._receiving is None:
            self._receiving = asyncio.ensure_future(self.websocket.receive())
        return self._receiving

    async def _engine_output(self) -> Any:
        """The engine's next output (None at its end), while watching the socket: a client that
        leaves while its token is being made ends the session at once, rather than when the
        engine next answers (a request the engine holds back would keep its KV cache until
        then). The client sends nothing while it waits for a token, so any message now is a
        close, a disconnect or a protocol error."""
        assert self.outputs is not None
        self._wait_for("engine")
        output = asyncio.ensure_future(anext(self.outputs, None))
        receiving = self._start_receiving()
        try:
            await asyncio.wait((output, receiving), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not output.done():
                output.cancel()
        if output.done() and not output.cancelled():
            return output.result()
        message = await self._receive()  # the one just received; a disconnect raises there
        if isinstance(message, str) and isinstance(_decode_or_none(message), Close):
            raise WebSocketDisconnect(1000)
        raise ProtocolError("bad_request", "a message arrived before the server's token")

    async def _next_token(self) -> tuple[int, str]:
        output = await self._engine_output()
        if output is None:
            raise ProtocolError("engine_error", "the engine ended the session early")
        completion = output.outputs[0]
        if not completion.token_ids:
            raise ProtocolError("engine_error", "the engine returned no token")
        return int(completion.token_ids[-1]), completion.text

    def _finish_reason(self, token_id: int, index: int, opened: Open) -> Any:
        eos = self.service.eos_token_id
        if not opened.sampling.ignore_eos and eos is not None and token_id == eos:
            return "stop"
        if index + 1 >= opened.max_tokens:
            return "length"
        return None

    async def _finish(self) -> None:
        """End the input stream, let the engine close the session, then close the socket."""
        self._wait_for("finishing")
        await self.inputs.put(None)
        if self.outputs is not None and not self.finished:
            with contextlib.suppress(StopAsyncIteration, TimeoutError):
                while True:
                    await asyncio.wait_for(self.outputs.__anext__(), timeout=5.0)
        self.finished = True
        with contextlib.suppress(Exception):
            await self.websocket.close(code=1000)

    async def abort(self) -> None:
        """Abort the engine request unless it finished: frees its KV cache."""
        if self._receiving is not None:
            self._receiving.cancel()
        if self.outputs is None or self.finished:
            return
        with contextlib.suppress(Exception):
            await self.service.engine.abort(self.request_id)
        with contextlib.suppress(Exception):
            await self.outputs.aclose()  # type: ignore[attr-defined]
