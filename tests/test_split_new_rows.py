"""A resumed split session's chunk carries only the rows the model runner lacks (issue 34, item 3).

vLLM 0.32 sends a resumed streaming-input request to the model runner as a new request with
its whole `prompt_embeds`, so every decode token of a split session carried its whole context to
the worker. The engine core now sends only the new rows (`split_wire.send_new_rows`, from
`AdaptiveScheduler.schedule`), and the runner's patched `_update_streaming_request` puts the rows
it holds back in front (`split_wire.receive_rows`). Covered here without a model:

- the wire functions, their refusals, and that the marker survives the executor's pickling;
- vLLM's real `GPUModelRunner._update_streaming_request` through the patch, on a runner holding
  only what the method touches (as vLLM's own tests build partial runners);
- a real `AdaptiveScheduler` serving a split session chunk by chunk: the second chunk's
  `NewRequestData` holds one row, and what the runner rebuilds equals the engine core's context.

End to end (greedy split output equal to unsplit, decode chunks through this path) is
tests/e2e/test_split_generation.py's; it also reads the rows counted on `/metrics`.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import NewRequestData
from vllm.v1.request import Request, RequestStatus
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from adaptivellm.benchmark.simulator import runner_output
from adaptivellm.patches.split_runner import install, is_hooked
from adaptivellm.scheduler.config import FairnessConfig
from adaptivellm.scheduler.simulated import make_scheduler
from adaptivellm.split_wire import (
    EXTRA_KEY,
    ROWS_FROM,
    HeldRowsMismatch,
    append_rows,
    receive_rows,
    send_new_rows,
)
from tests.test_split_serve import chunk_request


def new_request_data(req_id: str, embeds: torch.Tensor, computed: int) -> NewRequestData:
    params = SamplingParams(max_tokens=1, extra_args={EXTRA_KEY: {"layer": 2}})
    return NewRequestData(
        req_id=req_id, prompt_token_ids=None, mm_features=[], sampling_params=params,
        pooling_params=None, block_ids=([1],), num_computed_tokens=computed,
        lora_request=None, prompt_embeds=embeds,
    )  # fmt: skip


class State:
    """What the runner keeps of a request (`CachedRequestState`'s prompt_embeds)."""

    def __init__(self, embeds: torch.Tensor | None) -> None:
        self.prompt_embeds = embeds


# --- the wire --------------------------------------------------------------------------------


def test_only_new_rows_go_and_the_runner_rebuilds_the_context() -> None:
    context = torch.randn(10, 8)
    data = new_request_data("s", context.clone(), 9)
    send_new_rows(data, 9)
    assert data.prompt_embeds.shape == (1, 8) and getattr(data, ROWS_FROM) == 9
    # The executor's queue pickles the step's output: the marker goes with it.
    received = pickle.loads(pickle.dumps(data))
    state = State(context[:9].clone())
    assert receive_rows(state, state.prompt_embeds, received) == 9
    assert torch.equal(received.prompt_embeds, context)
    assert not hasattr(received, ROWS_FROM)  # consumed: the runner sees a whole context


def test_a_whole_context_is_left_alone() -> None:
    data = new_request_data("s", torch.randn(4, 8), 0)
    before = data.prompt_embeds
    assert receive_rows(State(None), None, data) == 0
    assert data.prompt_embeds is before


@pytest.mark.parametrize("held", [0, -1, 5])
def test_a_held_count_outside_the_context_is_refused_and_changes_nothing(held: int) -> None:
    data = new_request_data("s", torch.randn(4, 8), 3)
    before = data.prompt_embeds
    with pytest.raises(ValueError, match=f"{held} rows held of a context of 4"):
        send_new_rows(data, held)
    assert data.prompt_embeds is before and not hasattr(data, ROWS_FROM)


def test_a_runner_missing_the_rows_refuses_rather_than_serving_wrong_tokens() -> None:
    data = new_request_data("s", torch.randn(6, 8), 5)
    send_new_rows(data, 5)
    with pytest.raises(HeldRowsMismatch, match="rows from 5 on, but the model runner holds 3"):
        receive_rows(State(None), torch.randn(3, 8), data)
    with pytest.raises(HeldRowsMismatch, match="holds None"):
        receive_rows(State(None), None, data)


def test_decode_rows_are_appended_to_a_growing_buffer() -> None:
    """The runner copies O(T) rows in all for a session of T tokens, not the context a token."""
    state = State(torch.randn(4, 8))
    full = state.prompt_embeds.clone()
    storages = set()
    for step in range(40):
        row = torch.randn(1, 8)
        full = torch.cat([full, row])
        data = new_request_data("s", full.clone(), 4 + step)
        send_new_rows(data, 4 + step)
        receive_rows(state, state.prompt_embeds, data)
        state.prompt_embeds = data.prompt_embeds
        storages.add(data.prompt_embeds.untyped_storage().data_ptr())
        assert torch.equal(data.prompt_embeds, full)
    assert len(storages) <= 4


def test_append_rows_is_the_one_the_scheduler_uses() -> None:
    from adaptivellm.scheduler import split_sessions

    assert split_sessions.append_rows is append_rows


# --- vLLM's runner, patched -------------------------------------------------------------------


def stub_runner(states: dict[str, Any]) -> Any:
    """A runner with what `_update_streaming_request` touches: its requests, the input batch's
    removal, the late-interaction registry and whether the model uses M-RoPE."""
    return SimpleNamespace(
        requests=states,
        input_batch=SimpleNamespace(remove_request=lambda req_id: None),
        late_interaction_runner=SimpleNamespace(register_request=lambda *a: None),
        uses_mrope=False,
    )


def cached_state(embeds: torch.Tensor) -> Any:
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    return CachedRequestState(
        req_id="s", prompt_token_ids=None, prompt_embeds=embeds, mm_features=[],
        sampling_params=SamplingParams(max_tokens=1), pooling_params=None, generator=None,
        block_ids=([1],), num_computed_tokens=len(embeds), output_token_ids=[7],
    )  # fmt: skip


def test_the_patched_runner_rebuilds_the_context_it_gives_the_model() -> None:
    install()
    assert is_hooked(GPUModelRunner)
    context = torch.randn(12, 8)
    runner = stub_runner({"s": cached_state(context[:11].clone())})
    data = new_request_data("s", context.clone(), 11)
    send_new_rows(data, 11)
    state = GPUModelRunner._update_streaming_request(runner, "s", data)  # type: ignore[arg-type]
    assert torch.equal(state.prompt_embeds, context)
    assert state.num_prompt_tokens == 12 and state.num_computed_tokens == 11
    assert state.output_token_ids == []  # vLLM's own update ran after the rows were rebuilt


def test_the_patched_runner_refuses_a_session_it_does_not_hold() -> None:
    install()
    runner = stub_runner({"s": cached_state(torch.randn(3, 8))})
    data = new_request_data("s", torch.randn(8, 8), 7)
    send_new_rows(data, 7)
    with pytest.raises(HeldRowsMismatch):
        GPUModelRunner._update_streaming_request(runner, "s", data)  # type: ignore[arg-type]


# --- the engine core's scheduler --------------------------------------------------------------


def test_the_scheduler_sends_a_resumed_session_only_its_new_rows() -> None:
    scheduler, _ = make_scheduler(FairnessConfig(), num_blocks=64)
    first, _ = chunk_request("s", 5, layer=2)
    scheduler.add_request(first)
    out = scheduler.schedule()
    (data,) = out.scheduled_new_reqs
    assert data.prompt_embeds.shape[0] == 5 and not hasattr(data, ROWS_FROM)  # the first: whole
    worker = State(data.prompt_embeds.clone())
    for step in range(3):
        scheduler.update_from_output(out, runner_output(scheduler, out))
        update, _ = chunk_request("s", 1, layer=2, seed=step + 1)
        scheduler.add_request(update)
        out = scheduler.schedule()
        (data,) = out.scheduled_new_reqs
        assert data.prompt_embeds.shape[0] == 1 and getattr(data, ROWS_FROM) == 5 + step
        assert receive_rows(worker, worker.prompt_embeds, data) == 5 + step
        worker.prompt_embeds = data.prompt_embeds
        assert torch.equal(worker.prompt_embeds, scheduler.requests["s"].prompt_embeds)
    assert scheduler.errors.counts == {}
    scheduler.finish_requests("s", RequestStatus.FINISHED_ABORTED)
    assert "s" not in scheduler.split_rows_held


def test_an_ordinary_request_is_sent_as_vllm_sends_it() -> None:
    scheduler, _ = make_scheduler(FairnessConfig(), num_blocks=64)
    scheduler.add_request(Request("o", [1, 2, 3], SamplingParams(max_tokens=2), None,
                                  block_hasher=None))  # fmt: skip
    (data,) = scheduler.schedule().scheduled_new_reqs
    assert data.prompt_token_ids == [1, 2, 3] and not hasattr(data, ROWS_FROM)
    assert scheduler.split_rows_held == {}


def test_a_failed_trim_sends_the_whole_context_and_the_next_chunk_trims_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fail-safe path: the error is counted, the session goes whole (which the runner takes
    as vLLM's own), and the next chunk is trimmed to what the runner then holds."""
    from adaptivellm.scheduler import scheduler as scheduler_module

    scheduler, _ = make_scheduler(FairnessConfig(), num_blocks=64)
    first, _ = chunk_request("s", 5, layer=2)
    scheduler.add_request(first)
    out = scheduler.schedule()
    worker = State(out.scheduled_new_reqs[0].prompt_embeds.clone())

    def broken(data: Any, held: int) -> None:
        raise RuntimeError("injected")

    for step, trim in enumerate((broken, send_new_rows)):
        monkeypatch.setattr(scheduler_module, "send_new_rows", trim)
        scheduler.update_from_output(out, runner_output(scheduler, out))
        update, _ = chunk_request("s", 1, layer=2, seed=step + 1)
        scheduler.add_request(update)
        out = scheduler.schedule()
        (data,) = out.scheduled_new_reqs
        sent, marked = data.prompt_embeds.shape[0], hasattr(data, ROWS_FROM)
        receive_rows(worker, worker.prompt_embeds, data)
        worker.prompt_embeds = data.prompt_embeds
        assert torch.equal(worker.prompt_embeds, scheduler.requests["s"].prompt_embeds)
        if trim is broken:
            assert sent == 6 and not marked
        else:
            assert sent == 1 and marked and worker.prompt_embeds.shape[0] == 7
    assert scheduler.errors.counts == {"split_new_rows": 1}
