"""Split execution's pure server-side parts: serve flags, config, per-token start layers, and
the engine-core bookkeeping of split sessions on real vLLM `Request` objects."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.request import Request, RequestStatus

from adaptivellm.metrics import SplitServerMetrics
from adaptivellm.patches.split_runner import start_layers_for
from adaptivellm.scheduler.config import AdaptiveConfig
from adaptivellm.scheduler.split_sessions import (
    EXTRA_KEY,
    SplitChunks,
    append_rows,
    cache_salt,
    extend_session,
    pack,
    split_layer,
    start_session,
    take_chunk,
)
from adaptivellm.serve import apply_defaults, build_parser
from adaptivellm.split_client.planner import (
    SERVING_POLICIES,
    ModelShape,
    ServerProfile,
    build_costs,
    evaluate_placements,
)
from adaptivellm.split_client.planner import Request as PlannerRequest
from adaptivellm.split_client.protocol import ClientSpec, Open, ProtocolError
from adaptivellm.split_config import ARCHITECTURE, SPLIT_PLUGIN_NAME, SPLIT_POLICIES, SplitConfig
from adaptivellm.split_costs import PassCosts, load_pass_costs
from adaptivellm.split_server import (
    INITIAL_SLACK,
    INSTANT_CLIENT,
    MIN_RATIOS,
    PAD_SHARE,
    STALE_PLANS,
    Calibration,
    Session,
    SplitService,
    fit_calibration,
    rows_for_engine,
    tail_quantile,
)

ROOT = Path(__file__).resolve().parent.parent


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


@pytest.fixture(autouse=True)
def restore_environment() -> Iterator[None]:
    """`apply_defaults` sets environment variables for vLLM's processes (VLLM_PLUGINS,
    VLLM_USE_V2_MODEL_RUNNER, ...): the environment is put back as it was after each test, so
    that none of them leaks into the tests that run later in this process."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def llama(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return str(tmp_path)


def test_split_flag_selects_model_class_embeds_and_plugin(
    llama: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_PLUGINS", "recorded")  # so that the deletion is undone after
    monkeypatch.delenv("VLLM_PLUGINS")
    args = parse(llama, "--split-execution", "--split-max-sessions", "3")
    notes = apply_defaults(args, False, is_cpu=True).notes
    assert args.hf_overrides["architectures"] == [ARCHITECTURE]
    assert args.enable_prompt_embeds is True
    assert args.additional_config["adaptivellm"]["split"]["max_sessions"] == 3
    assert os.environ["VLLM_PLUGINS"].split(",") == ["adaptivellm", SPLIT_PLUGIN_NAME]
    assert any("--split-execution" in n for n in notes)


def test_split_flag_keeps_operator_plugins_and_overrides(
    llama: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_PLUGINS", "adaptivellm,other")
    args = parse(llama, "--split-execution", "--hf-overrides", '{"max_position_embeddings": 64}')
    apply_defaults(args, False, is_cpu=True)
    assert args.hf_overrides == {"max_position_embeddings": 64, "architectures": [ARCHITECTURE]}
    assert os.environ["VLLM_PLUGINS"] == f"adaptivellm,other,{SPLIT_PLUGIN_NAME}"


def test_split_off_changes_nothing(llama: str) -> None:
    args = parse(llama)
    apply_defaults(args, False, is_cpu=True)
    assert "split" not in args.additional_config["adaptivellm"]
    assert not args.enable_prompt_embeds


def test_split_refuses_other_architectures(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(SystemExit, match="GPT2LMHeadModel"):
        apply_defaults(parse(str(tmp_path), "--split-execution"), False, is_cpu=True)


@pytest.mark.parametrize(
    "flags",
    [("--split-max-sessions", "0"), ("--split-max-frame-mb", "17"),
     ("--split-idle-timeout-s", "nan"), ("--split-server-flops", "-1")],
)  # fmt: skip
def test_bad_split_flags_are_clear(llama: str, flags: tuple[str, str]) -> None:
    with pytest.raises(SystemExit, match=flags[0].removeprefix("--split-").split("-")[-1]):
        apply_defaults(parse(llama, "--split-execution", *flags), False, is_cpu=True)


def test_a_negative_queue_wait_is_refused_and_the_flag_reaches_the_config(llama: str) -> None:
    with pytest.raises(SystemExit, match="queue_s must be a number >= 0"):
        apply_defaults(parse(llama, "--split-execution", "--split-queue-s", "-1"), False, True)
    args = parse(llama, "--split-execution", "--split-queue-s", "0")
    apply_defaults(args, False, is_cpu=True)
    assert args.additional_config["adaptivellm"]["split"]["queue_s"] == 0.0
    with pytest.raises(SystemExit, match="calibration_stale_s must be a number >= 0"):
        apply_defaults(
            parse(llama, "--split-execution", "--split-calibration-stale-s", "nan"), False, True
        )
    args = parse(llama, "--split-execution", "--split-calibration-stale-s", "30")
    apply_defaults(args, False, is_cpu=True)
    assert args.additional_config["adaptivellm"]["split"]["calibration_stale_s"] == 30.0


def test_the_split_policy_flag_reaches_the_config_and_bad_ones_are_refused(llama: str) -> None:
    args = parse(llama, "--split-execution", "--split-policy", "static")
    apply_defaults(args, False, is_cpu=True)
    assert args.additional_config["adaptivellm"]["split"]["policy"] == "static"
    args = parse(llama, "--split-execution")
    apply_defaults(args, False, is_cpu=True)
    assert args.additional_config["adaptivellm"]["split"]["policy"] == "planner"
    assert args.additional_config["adaptivellm"]["split"]["when_busy"] == "refuse"
    args = parse(llama, "--split-execution", "--split-when-busy", "serve",
                 "--split-sla-target", "0.9")  # fmt: skip
    apply_defaults(args, False, is_cpu=True)
    assert args.additional_config["adaptivellm"]["split"]["when_busy"] == "serve"
    assert args.additional_config["adaptivellm"]["split"]["sla_target"] == 0.9
    with pytest.raises(SystemExit, match="sla_target must be in"):
        apply_defaults(parse(llama, "--split-execution", "--split-sla-target", "nan"), False, True)
    with pytest.raises(SystemExit):  # argparse refuses a name it does not know
        parse(llama, "--split-execution", "--split-policy", "best")
    with pytest.raises(ValueError, match="policy must be one of"):
        SplitConfig(policy="best")
    assert tuple(SERVING_POLICIES) == SPLIT_POLICIES  # the flag's names are the planner's


def test_config_round_trips_through_additional_config() -> None:
    config = SplitConfig(max_sessions=5, max_frame_mb=2.0, queue_s=1.5)
    stored = {"adaptivellm": {"split": config.to_dict()}}
    assert AdaptiveConfig.from_additional_config(stored).split == config
    assert AdaptiveConfig.from_additional_config({"adaptivellm": {}}).split is None
    assert config.max_frame_bytes == 2 * 2**20


# --------------------------------------------------------------------------- start layers


def test_start_layers_follow_the_batch_layout() -> None:
    """Three requests of 2, 1 and 3 tokens with k = 0, 4, 2, plus 2 padding tokens."""
    starts = start_layers_for([0, 4, 2], np.array([0, 2, 3, 6]), num_tokens=8)
    assert starts is not None
    assert starts.tolist() == [0, 0, 4, 2, 2, 2, 0, 0]


def test_no_split_request_means_no_start_layers() -> None:
    assert start_layers_for([0, 0], np.array([0, 5, 6]), num_tokens=6) is None


def test_layout_larger_than_input_is_refused() -> None:
    with pytest.raises(ValueError, match="covers 9 tokens"):
        start_layers_for([1], np.array([0, 9]), num_tokens=4)


# --------------------------------------------------------------------------- sessions


def chunk_request(
    request_id: str, rows: int, layer: int, seed: int = 0
) -> tuple[Request, np.ndarray]:
    """A request as the API server sends a chunk: placeholder ids, tensor in extra_args."""
    array = np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)
    params = SamplingParams(max_tokens=1, extra_args={EXTRA_KEY: pack(layer, array, "float32")})
    request = Request(request_id, [0] * rows, params, None, block_hasher=None, resumable=True)
    return request, array


def test_take_chunk_turns_bytes_back_into_the_tensor() -> None:
    request, array = chunk_request("r", 3, layer=2)
    chunk = take_chunk(request, torch.float32)
    assert chunk is not None and chunk.layer == 2
    assert torch.equal(chunk.embeds, torch.from_numpy(array))
    # Only {"layer": k} stays behind for the model runner.
    assert request.sampling_params is not None
    assert request.sampling_params.extra_args == {EXTRA_KEY: {"layer": 2}}
    assert split_layer(request) == 2
    assert take_chunk(request, torch.float32) is None  # nothing left to take


def test_ordinary_request_has_no_chunk() -> None:
    request = Request("o", [1, 2, 3], SamplingParams(max_tokens=2), None, block_hasher=None)
    assert take_chunk(request, torch.float32) is None
    assert split_layer(request) is None


def test_start_session_makes_an_embeddings_only_request() -> None:
    request, _ = chunk_request("s", 4, layer=3)
    chunk = take_chunk(request, torch.float32)
    assert chunk is not None
    start_session(request, chunk)
    assert request.prompt_token_ids is None and request.prompt_embeds is not None
    assert request.prompt_embeds.shape == (4, 8)
    assert request.cache_salt == cache_salt(3) != cache_salt(2)


def test_extend_session_appends_one_token_and_drops_the_sampled_one() -> None:
    session, first = chunk_request("s", 4, layer=1)
    chunk = take_chunk(session, torch.float32)
    assert chunk is not None
    start_session(session, chunk)
    # The engine computed the prompt and sampled one token (not computed, never fed back).
    session.num_computed_tokens = 4
    session.append_output_token_ids(77)
    session.status = RequestStatus.WAITING_FOR_STREAMING_REQ
    update, second = chunk_request("s", 1, layer=1, seed=1)
    next_chunk = take_chunk(update, torch.float32)
    assert next_chunk is not None
    was_waiting = extend_session(session, next_chunk, update, hash_block_size=16, log_stats=False)
    assert was_waiting and session.status == RequestStatus.WAITING
    assert session.num_prompt_tokens == 5 == session.num_tokens
    assert list(session.output_token_ids) == []
    assert session.prompt_embeds is not None
    assert torch.equal(session.prompt_embeds, torch.from_numpy(np.concatenate([first, second])))


def test_extend_session_refuses_a_session_with_uncomputed_prompt() -> None:
    session, _ = chunk_request("s", 4, layer=1)
    chunk = take_chunk(session, torch.float32)
    assert chunk is not None
    start_session(session, chunk)
    session.num_computed_tokens = 2
    with pytest.raises(ValueError, match="2 tokens computed of 4"):
        extend_session(session, chunk, session, hash_block_size=16, log_stats=False)


def test_chunks_are_applied_in_arrival_order() -> None:
    chunks = SplitChunks()
    a, b = (take_chunk(chunk_request("r", 1, 1, seed)[0], torch.float32) for seed in (1, 2))
    assert a is not None and b is not None
    chunks.push("r", a)
    chunks.push("r", b)
    assert len(chunks) == 2 and chunks.pop("r") is a and chunks.pop("r") is b
    assert chunks.pop("r") is None
    chunks.push("r", a)
    chunks.drop("r")
    assert len(chunks) == 0


# --------------------------------------------------------------------------- planning


class _Engine:
    def __init__(self, load: int = 3) -> None:
        self.load = load

    def get_num_unfinished_requests(self) -> int:
        return self.load


def _service(config: SplitConfig | None = None, load: int = 3) -> SplitService:
    shape = ModelShape(6, 256, 4, 2, 64, 1024, dtype_bytes=4, vocab_size=4096, name="tiny")
    return SplitService(
        engine=_Engine(load), config=config or SplitConfig(), shape=shape, served_names=("tiny",),
        eos_token_id=1, max_model_len=1024,
        server=ServerProfile(flops_per_s=5e10, mem_bytes_per_s=2e10),
    )  # fmt: skip


def _open(sla_s: float | None, layer: int | None = None, flops: float = 1e11) -> Open:
    client = ClientSpec(flops_per_s=flops, uplink_bps=1e9, downlink_bps=1e9, rtt_s=0.001)
    return Open(prompt_tokens=64, max_tokens=16, client=client, sla_s=sla_s, layer=layer)


def test_loose_sla_moves_layers_to_a_fast_client_and_infeasible_serves_whole() -> None:
    service = _service()
    layer, predicted, by = service.plan(_open(sla_s=60.0))
    assert by == "planner" and layer == 6 and predicted is not None and predicted < 60
    layer, _, _ = service.plan(_open(sla_s=1e-4))  # nothing meets it: served as ordinary
    assert layer == 0
    layer, _, by = service.plan(_open(sla_s=None, layer=2))
    assert (layer, by) == (2, "client")


def test_the_service_plans_with_its_policy() -> None:
    """One Open, three servers: the planner takes the interior split that fits the SLA; static
    cannot (every layer on the client misses it), so it serves the request whole; each
    server's info names its policy."""
    slow = 2e9  # a client slower than the server, so latency grows with k
    planner = _service()
    _, all_client, _ = planner.plan(_open(None, layer=6, flops=slow))
    _, server_only, _ = planner.plan(_open(None, layer=0, flops=slow))
    assert all_client is not None and server_only is not None and all_client > server_only
    sla = (all_client + server_only) / 2
    layer, _, by = planner.plan(_open(sla, flops=slow))
    assert by == "planner" and 0 < layer < 6
    static = _service(SplitConfig(policy="static"))
    assert static.plan(_open(sla, flops=slow))[0] == 0
    assert static.plan(_open(all_client * INITIAL_SLACK * 1.01, flops=slow))[0] == 6
    greedy = _service(SplitConfig(policy="greedy"))
    assert 0 < greedy.plan(_open(sla, flops=slow))[0] < 6
    assert [s.info()["policy"] for s in (planner, static, greedy)] == [
        "planner",
        "static",
        "greedy",
    ]


#: A 6-layer server's costs (adaptivellm.split_costs) where, beside requests served whole,
#: only the all-client split saves server time: one more row in their pass costs 2.07 ms a
#: token, a split at 5 a pass of its own over one layer and its host cost, 2.24 ms.
SIX_LAYER_COSTS = PassCosts(6, 0.3e-3, 0.6e-3, 0.3e-3, 0.27e-3, ((3, 1.2e-3), (6, 0.96e-3)))


def _midway_sla(service: SplitService, flops: float, share: float = 0.5) -> tuple[float, float]:
    """An SLA `share` of the way from the served-whole prediction to the all-client one at
    `service`'s load, for a client of `flops`, and the served-whole prediction."""
    _, all_client, _ = service.plan(_open(None, layer=6, flops=flops))
    _, server_only, _ = service.plan(_open(None, layer=0, flops=flops))
    assert all_client is not None and server_only is not None
    return server_only + share * (all_client - server_only), server_only


def _served_whole_cheaper() -> float:
    from prometheus_client import REGISTRY

    SplitServerMetrics.get()
    return REGISTRY.get_sample_value("adaptivellm_split_served_whole_cheaper_total") or 0.0


def test_a_cost_profile_serves_whole_the_splits_that_would_cost_the_server_more() -> None:
    """With --split-cost-profile, an interior split the planner would choose is served whole
    where it saves no server time beside the requests served whole, and whole meets the SLA;
    on an idle server (a request served whole would run a pass of its own) a split at k >= 2
    stays split, as does an all-client split, and the other policies are left as they are."""
    slow = 2e9  # a client slower than the server: latency grows with k, so whole is fastest
    planner = _service(load=3)
    sla, server_only = _midway_sla(planner, slow)
    assert 0 < planner.plan(_open(sla, flops=slow))[0] < 6  # without costs: interior
    priced = _service(SplitConfig(pass_costs=SIX_LAYER_COSTS), load=3)
    before = _served_whole_cheaper()
    layer, predicted, by = priced.plan(_open(sla, flops=slow))
    assert (layer, by) == (0, "planner") and predicted == server_only
    assert _served_whole_cheaper() == before + 1
    report = priced.info()["pass_costs"]
    assert report["whole_rows"] == 3 and report["break_even_layer"] == 6
    assert report["break_even_layer_beside_whole"] == 6 and report["layers"] == 6
    idle = _service(SplitConfig(pass_costs=SIX_LAYER_COSTS), load=0)
    assert idle.info()["pass_costs"]["break_even_layer"] == 2
    deep = _midway_sla(idle, slow, 0.9)[0]  # the planner's k: 3 (its initial slack)
    assert 2 <= idle.plan(_open(deep, flops=slow))[0] < 6
    assert priced.plan(_open(deep, flops=slow))[0] == 0
    assert priced.plan(_open(60.0))[0] == 6  # a fast client: all-client saves, kept
    greedy = _service(SplitConfig(policy="greedy", pass_costs=SIX_LAYER_COSTS), load=3)
    assert 0 < greedy.plan(_open(sla, flops=slow))[0] < 6
    assert planner.info()["pass_costs"] is None
    # Open split sessions are not served whole: with 3 in flight, all of them split, a
    # request served whole would run a pass of its own, so the split stays.
    for n in range(3):
        priced.open_sessions[f"s{n}"] = SimpleNamespace(layer=3)  # type: ignore[assignment]
    assert priced.whole_rows() == 0 and 2 <= priced.plan(_open(deep, flops=slow))[0] < 6
    assert _served_whole_cheaper() == before + 2  # the two served whole above


def test_a_cost_profile_keeps_the_split_when_served_whole_runs_late() -> None:
    """The planner serves a session whole to save server time only where sessions served whole
    have lately met such an SLA: here they ran three times their predictions."""
    slow = 2e9
    priced = _service(SplitConfig(pass_costs=SIX_LAYER_COSTS), load=3)
    sla, server_only = _midway_sla(priced, slow)
    for _ in range(MIN_RATIOS):
        priced.observe_session(server_only, 3 * server_only, "whole")
    assert priced.fit("whole").bound(server_only) > sla
    assert 0 < priced.plan(_open(sla, flops=slow))[0] < 6


def test_a_cost_profile_for_another_model_or_a_bad_file_is_refused_at_start_up(
    llama: str, tmp_path: Path
) -> None:
    from transformers import LlamaConfig

    from adaptivellm.split_server import build_service

    profile = ROOT / "bench" / "results" / "split_host_cost.json"
    args = parse(llama, "--split-execution", "--split-cost-profile", str(profile))
    apply_defaults(args, False, is_cpu=True)
    carried = args.additional_config["adaptivellm"]["split"]["pass_costs"]
    assert carried["layers"] == 16 and carried["split_host"]
    three = tmp_path / "three-layers"
    three.mkdir()
    (three / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3})
    )
    with pytest.raises(SystemExit, match="16-layer model; this model has 3 layers"):
        apply_defaults(parse(str(three), "--split-execution", "--split-cost-profile",
                             str(profile)), False, is_cpu=True)  # fmt: skip
    missing = tmp_path / "nowhere.json"
    with pytest.raises(SystemExit, match=f"cannot read the split cost profile {missing}"):
        apply_defaults(parse(llama, "--split-execution", "--split-cost-profile", str(missing)),
                       False, is_cpu=True)  # fmt: skip
    hf = LlamaConfig(
        num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=600, torch_dtype="float32",
    )  # fmt: skip
    model_config = SimpleNamespace(hf_config=hf, dtype=torch.float32, max_model_len=256)
    config = SplitConfig(server_flops_per_s=1e12, server_mem_bytes_per_s=1e11,
                         pass_costs=load_pass_costs(profile))  # fmt: skip
    with pytest.raises(ValueError, match=r"16-layer model .* this model has 3 layers"):
        build_service(SimpleNamespace(model_config=model_config), config,
                      argparse.Namespace(model="tiny", served_model_name=None))  # fmt: skip


def test_an_sla_missed_only_because_of_load_is_refused_with_a_retry_hint() -> None:
    """An SLA the idle server meets but the loaded one does not: refused (`infeasible_sla`,
    with when to retry), or served whole with --split-when-busy serve. One that even an idle
    server misses is served whole either way: waiting would not help."""
    idle = _service(load=0)
    _, fastest_idle, _ = idle.plan(_open(None, layer=0))
    assert fastest_idle is not None
    busy = _service(load=5000)
    _, fastest_busy, _ = busy.plan(_open(None, layer=0))
    assert fastest_busy is not None and fastest_busy > 2 * fastest_idle
    sla = fastest_idle * 1.5
    assert idle.plan(_open(sla))[0] >= 0  # idle: planned
    with pytest.raises(ProtocolError, match="retry in about") as refused:
        busy.plan(_open(sla))
    assert refused.value.code == "infeasible_sla"
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1
    # Sessions served whole have run far faster than predicted: such a session now meets the
    # SLA served whole, so it is served, not refused; split sessions' slack is kept apart.
    ratio = 0.5 * sla / fastest_busy
    for _ in range(8):
        busy.observe_session(1.0, ratio, "whole")
    assert busy.fit("whole").bound(1.0) == pytest.approx(ratio * (1 + 2 / 8))  # 8: a margin
    assert busy.fit().slack == INITIAL_SLACK
    assert busy.plan(_open(sla))[:1] == (0,)
    serving = _service(SplitConfig(when_busy="serve"), load=5000)
    assert serving.plan(_open(sla))[0] == 0
    assert busy.plan(_open(fastest_idle / 10))[0] == 0  # unreachable even idle: served whole
    # One request in flight is not busy: a session only that one request makes late is served.
    quiet = _service(load=1)
    _, fastest_quiet, _ = quiet.plan(_open(None, layer=0))
    assert fastest_quiet is not None and not quiet.busy() and busy.busy()
    assert quiet.plan(_open(fastest_quiet * 0.999))[0] == 0
    with pytest.raises(ValueError, match="when_busy must be one of"):
        SplitConfig(when_busy="queue")


def test_a_refusal_carries_its_retry_hint_and_closes_with_try_again_later() -> None:
    import asyncio

    from adaptivellm.split_client.protocol import Error, decode_message
    from adaptivellm.split_server import _fail

    class Socket:
        def __init__(self) -> None:
            self.sent: list[str] = []
            self.closed: tuple[int, str] | None = None

        async def send_text(self, text: str) -> None:
            self.sent.append(text)

        async def close(self, code: int, reason: str) -> None:
            self.closed = (code, reason)

    socket = Socket()
    error = ProtocolError("infeasible_sla", "busy", retry_after_s=2.5)
    asyncio.run(_fail(socket, error))  # type: ignore[arg-type]
    message = decode_message(socket.sent[0])
    assert isinstance(message, Error) and message.retry_after_s == 2.5
    assert socket.closed == (1013, "infeasible_sla")


def test_slack_follows_the_tail_of_measured_over_predicted() -> None:
    service = _service()
    for _ in range(3):
        service.observe_session(0.1, 0.3)
    assert service.fit().slack == INITIAL_SLACK  # too few sessions to judge
    for ratio in (1.0, 2.0, 3.0, 3.0, 5.0, 0.5, 3.0):
        service.observe_session(0.1, 0.1 * ratio)
    fit = service.fit()
    assert fit.factor == pytest.approx(3.0) and fit.offset_s == 0.0  # the median: best estimate
    # The 0.99 quantile of 10: nearly the worst ratio seen, times 1 + 2 / 10 (few sessions).
    assert 4.5 * 1.2 < fit.bound(0.1) / 0.1 <= 5.0 * 1.2
    assert service.fit("whole") == Calibration()  # none served whole yet
    median = _service(SplitConfig(sla_target=0.5))
    for ratio in (1.0, 2.0, 3.0, 3.0, 5.0, 0.5, 3.0, 3.0):
        median.observe_session(0.1, 0.1 * ratio)
    assert median.fit().bound(0.1) == pytest.approx(0.3 * (1 + 2 / 8))  # 8: a margin
    with pytest.raises(ValueError, match="sla_target must be in"):
        SplitConfig(sla_target=0.3)
    service.observe_session(None, 1.0)  # no prediction: ignored
    service.observe_session(0.0, 1.0)
    service.observe_session(1.0, math.nan)
    service.observe_session(1.0, 0.5, client_late_s=0.7)  # all of it the client's lateness
    assert len(service.samples["interior"]) == 10
    with pytest.raises(ValueError, match="interior, client or whole"):
        service.observe_session(1.0, 1.0, "split")


def test_a_fixed_cost_per_session_is_fitted_as_an_offset() -> None:
    """Sessions that each ran 0.3 s on top of their prediction: a factor alone (the median
    ratio) would under-predict the short ones and over-predict the long ones; the fit finds
    the offset and a factor of 1, short sessions get the smaller budget they need, and long
    ones are not held to the short ones' ratio."""
    service = _service()
    rng = np.random.default_rng(0)
    for predicted in np.linspace(0.2, 4.0, 32):
        service.observe_session(predicted, 0.3 + predicted * rng.uniform(1.0, 1.05))
    fit = service.fit("interior")
    assert fit.offset_s == pytest.approx(0.3, abs=0.05)
    assert fit.factor == pytest.approx(1.025, abs=0.03)
    assert 1.0 <= fit.slack < 1.1
    # All but the worst session are within their bound (0.99 of 32, interpolated); a ratio
    # alone would need 2.5x for the shortest.
    outside = [m > fit.bound(p) for p, m in service.samples["interior"]]
    assert sum(outside) <= 1
    assert fit.budget(1.0) < 0.7  # a 1-s SLA leaves under 0.7 s of prediction
    assert fit.budget(8.0) > 6.5  # an 8-s one more than 6.5 s (1.5x ratio: 5.3 s)
    assert fit.budget(0.2) <= 0  # less than the fixed cost: nothing meets it
    assert service.fit("interior").report() == {
        "slack": round(fit.slack, 3),
        "calibration": round(fit.factor, 3),
        "offset_s": round(fit.offset_s, 4),
        "pad_s": round(fit.pad_s, 4),
    }


def test_the_fit_falls_back_to_a_factor_where_a_line_is_not_trusted() -> None:
    """Too few sessions, predictions all alike, a slope under 0.5 or an offset below 0: the
    median ratio alone, as with few sessions."""
    alike = np.array([[1.0, r] for r in np.linspace(1.0, 2.0, 20)])
    fit = fit_calibration(alike, 0.99, within_sla=True)
    assert fit.offset_s == 0.0 and fit.factor == pytest.approx(1.5)
    flat = np.array([[p, 2.0 + 0.1 * p] for p in np.linspace(0.5, 5.0, 20)])  # slope 0.1
    assert fit_calibration(flat, 0.99, within_sla=True).offset_s == 0.0
    below = np.array([[p, 2.0 * p - 0.5] for p in np.linspace(0.5, 5.0, 20)])  # offset -0.5
    assert fit_calibration(below, 0.99, within_sla=True).offset_s == 0.0
    few = np.array([[p, 0.3 + p] for p in np.linspace(0.5, 5.0, 15)])
    assert fit_calibration(few, 0.99, within_sla=True).offset_s == 0.0
    assert fit_calibration(np.vstack([few, [[6.0, 6.3]]]), 0.99, within_sla=True).offset_s > 0
    # Split kinds never plan a prediction above the SLA, sessions served whole may.
    early = np.array([[p, 0.5 * p] for p in np.linspace(0.5, 5.0, 20)])
    assert fit_calibration(early, 0.99, within_sla=True).budget(1.0) == 1.0
    assert fit_calibration(early, 0.99, within_sla=False).budget(1.0) == pytest.approx(2.0)


def test_the_slack_reads_a_099_quantile_beyond_the_sessions_seen() -> None:
    """64 sessions cannot show a 0.99 quantile: the next session exceeds the largest of 64 one
    time in 65, and the interpolated quantile more often. Over 2,000 windows of 64 lognormal
    ratios, the extrapolated quantile bounds the next ratio 0.99 of the time or nearly, where
    the interpolated one does not reach 0.985."""
    rng = np.random.default_rng(1)
    windows = np.exp(rng.normal(0.0, 0.3, size=(2000, 65)))
    extrapolated = [window[64] <= tail_quantile(window[:64], 0.99) for window in windows]
    interpolated = [window[64] <= np.quantile(window[:64], 0.99) for window in windows]
    assert np.mean(extrapolated) >= 0.985
    assert np.mean(interpolated) < 0.985
    # The true 0.99 quantile is exp(0.3 x 2.33) = 2.01: the estimate is above it at the median
    # (an exponential tail is heavier than a normal's), but not far (it reads 2.53).
    estimates = [tail_quantile(window[:64], 0.99) for window in windows[:200]]
    assert 2.0 < float(np.median(estimates)) < 3.0


def test_a_fixed_delay_pads_the_slack_instead_of_multiplying_long_sessions_bounds() -> None:
    """Sessions from 0.05 s to 5 s long, each late by a spread factor and by a fixed delay
    (exponential, 0.1 s at the mean: a pass in flight, a round trip). Over ratios alone, the
    short sessions' tail (a delay several times their length) sets every session's slack; over
    padded latencies the bound of a 3-s session is far tighter, and the next session is still
    within its bound 0.99 of the time or nearly (1,000 windows of 64)."""
    rng = np.random.default_rng(2)
    covered: dict[float, list[bool]] = {PAD_SHARE: [], 0.0: []}
    long_bounds: dict[float, list[float]] = {PAD_SHARE: [], 0.0: []}
    for _ in range(1000):
        predicted = np.exp(rng.uniform(math.log(0.05), math.log(5.0), 65))
        measured = predicted * rng.lognormal(0.0, 0.1, 65) + rng.exponential(0.1, 65)
        for share in covered:
            samples = np.c_[predicted[:64], measured[:64]]
            fit = fit_calibration(samples, 0.99, within_sla=True, pad_share=share)
            covered[share].append(measured[64] <= fit.bound(predicted[64]))
            long_bounds[share].append(fit.bound(3.0) / 3.0)
    assert np.mean(covered[PAD_SHARE]) >= 0.985  # it reads 0.993 (0.991 unpadded)
    padded, unpadded = np.median(long_bounds[PAD_SHARE]), np.median(long_bounds[0.0])
    assert padded < 1.8 and unpadded > 1.3 * padded  # they read 1.67 and 2.37
    # Sessions on their line: a slack of 1, and the pad changes no bound; budget inverts bound.
    early = np.array([[p, 0.5 * p] for p in np.linspace(0.1, 5.0, 20)])
    fit = fit_calibration(early, 0.99, within_sla=False)
    assert fit.slack == pytest.approx(1.0) and fit.pad_s == pytest.approx(0.5 * 0.5 * 2.55)
    assert fit.bound(0.5) == pytest.approx(fit.predict(0.5))
    late = fit_calibration(early * [1.0, 2.0] + [0.0, 0.1], 0.99, within_sla=True)
    assert late.budget(late.bound(2.0)) == pytest.approx(2.0)
    padded = Calibration(offset_s=0.2, factor=1.1, slack=1.5, within_sla=False, pad_s=0.7)
    for predicted in (0.05, 0.5, 2.0, 7.0):
        assert padded.bound(predicted) == pytest.approx((0.2 + 1.1 * predicted + 0.7) * 1.5 - 0.7)
        assert padded.budget(padded.bound(predicted)) == pytest.approx(predicted)


def test_the_tail_estimate_keeps_to_what_the_ratios_show() -> None:
    """Alike ratios have no tail; two clusters are not a tail where the larger half is one of
    them; a quantile that does not reach into the tail, or the quantile 1, is read off the
    ratios; the estimate is never below the interpolated quantile."""
    assert tail_quantile(np.full(20, 1.5), 0.99) == pytest.approx(1.5)
    clusters = np.array([0.5] * 8 + [1.5] * 8)
    assert tail_quantile(clusters, 0.99) == pytest.approx(1.5)
    spread = np.linspace(1.0, 3.0, 21)
    assert tail_quantile(spread, 0.5) == pytest.approx(2.0)
    assert tail_quantile(spread, 1.0) == pytest.approx(3.0)
    assert tail_quantile(spread, 0.99) > np.quantile(spread, 0.99)
    assert tail_quantile(np.array([2.0]), 0.99) == pytest.approx(2.0)
    # One far ratio among alike ones: the exponential fit (2.3) is below the interpolated
    # quantile (4.3), which is the floor.
    one_far = np.array([1.0] * 63 + [10.0])
    assert tail_quantile(one_far, 0.99) == pytest.approx(np.quantile(one_far, 0.99))
    # Ratios that are not finite and positive say nothing; none at all: 1.
    assert tail_quantile(np.array([1.5, 0.0, -1.0, np.nan, np.inf] + [1.5] * 19), 0.99) == 1.5
    assert tail_quantile(np.array([]), 0.99) == 1.0


def test_a_short_session_is_planned_against_the_fixed_cost() -> None:
    """After sessions that each ran 0.3 s beyond their prediction, a session whose best split
    is predicted within its SLA but with less than 0.3 s to spare is not split (served whole
    here: the server is idle, so not refused); with the budget to spare, it is."""
    service = _service(load=0)
    _, all_client, _ = service.plan(_open(None, layer=6))
    assert all_client is not None
    for predicted in np.linspace(0.2, 4.0, 32):
        service.observe_session(predicted, 0.3 + predicted)
        service.observe_session(predicted, 0.3 + predicted, "client")
    assert service.plan(_open(all_client + 0.2))[0] == 0
    layer, predicted, _ = service.plan(_open(all_client + 0.35))
    assert layer == 6 and predicted == pytest.approx(all_client)


def test_the_clients_share_is_the_prediction_less_the_servers() -> None:
    """client_share_s: the prediction at split k less the prediction with an instant client and
    link. It grows with the layers a slow client runs, is 0 for an instant client, and the two
    shares add up to the prediction the planner makes."""
    service = _service(load=0)
    slow = _open(None, flops=1e9).client
    work = PlannerRequest(64, 16, math.inf)
    shares = [service.client_share_s(slow, work, k) for k in range(7)]
    assert shares == sorted(shares) and shares[6] > 10 * shares[0] > 0
    assert [service.client_share_s(INSTANT_CLIENT, work, k) for k in (0, 3, 6)] == [0.0] * 3
    on_server = np.arange(7)[:, None] <= np.arange(6)[None, :]  # row k: layers k.. on the server
    total, _ = evaluate_placements(
        build_costs(service.shape, slow, service.server, work), on_server
    )
    server_share, _ = evaluate_placements(
        build_costs(service.shape, INSTANT_CLIENT, service.server, work), on_server
    )
    assert np.array(shares) + server_share == pytest.approx(total)
    assert (server_share > 0).all()


def test_a_client_slower_than_it_declared_does_not_raise_the_slack() -> None:
    """Sessions that ran 10x late because their client kept the server waiting leave the slack
    as it was; the same lateness on the server's side raises it."""
    clients_fault, servers_fault = _service(), _service()
    for _ in range(16):
        clients_fault.observe_session(1.0, 1.0)
        servers_fault.observe_session(1.0, 1.0)
    before = clients_fault.fit().bound(1.0)
    for _ in range(8):
        clients_fault.observe_session(1.0, 10.0, client_late_s=9.0)
        servers_fault.observe_session(1.0, 10.0)
    assert clients_fault.fit().bound(1.0) == pytest.approx(before)
    assert servers_fault.fit().bound(1.0) > 9.0
    clients_fault.observe_session(1.0, 2.0, client_late_s=-5.0)  # early client: no credit
    assert clients_fault.samples["interior"][-1] == pytest.approx((1.0, 2.0))


def test_a_session_counts_the_time_it_waited_for_each_side(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter([0.0, 1.0, 3.0, 3.5, 6.0, 7.0])
    monkeypatch.setattr("adaptivellm.split_server.time.monotonic", lambda: next(clock))
    session = Session(_service(), object())  # type: ignore[arg-type]  # since 0
    session._wait_for("engine")  # 1: 1 s waiting for the client
    session._wait_for("client")  # 3: 2 s for the engine
    session._wait_for("sending")  # 3.5: 0.5 s more for the client
    assert session.waited_for("client") == pytest.approx(1.5)  # not waiting for it now
    session._wait_for("client")  # 6
    assert session.waited_for("client") == pytest.approx(2.5)  # read at 7: the current wait too
    assert session.waited["engine"] == pytest.approx(2.0)


def test_the_calibration_report_shows_what_the_planner_plans_with() -> None:
    service = _service()
    report = service.calibration_report()
    fresh = {"sessions": 0, "slack": INITIAL_SLACK, "calibration": 1.0, "offset_s": 0.0}
    fresh["pad_s"] = 0.0
    assert report == {
        "split": fresh,
        "interior": fresh,
        "client": fresh,
        "whole": {"sessions": 0, "slack": 1.0, "calibration": 1.0, "offset_s": 0.0, "pad_s": 0.0},
    }
    for ratio in (2.0, 2.0, 2.0, 4.0):
        service.observe_session(1.0, ratio)
        service.observe_session(1.0, ratio / 4, "whole")
    report = service.calibration_report()
    # Ratios over the median 1, 1, 1, 2. With fewer than 16 sessions they are neither padded
    # nor extrapolated: the slack is their interpolated 0.99 quantile, 1 + 0.97 x (2 - 1),
    # times 1 + 2 / 4.
    # (Extrapolated, the largest half, 1 and 2, as a tail above 1 with scale log 2 / 2 x 2 / 1,
    # would read 1 x exp(log 2 x log(0.5 / 0.01)) = 15.05: the ratio of two sessions to the
    # power 3.9.)
    late = {"sessions": 4, "slack": 2.955, "calibration": 2.0, "offset_s": 0.0, "pad_s": 0.0}
    assert report["split"] == late and report["interior"] == late
    # No all-client session yet: they are planned with split sessions' calibration as a whole.
    assert report["client"] == {**late, "sessions": 0}
    assert report["whole"] == {**late, "calibration": 0.5}
    for ratio in (1.0, 1.0, 1.0, 1.0):
        service.observe_session(1.0, ratio, "client")
    report = service.calibration_report()
    # Fewer than 16 of their own: all-client sessions are still planned with split sessions'.
    assert report["split"]["sessions"] == 8
    assert report["client"] == {**report["split"], "sessions": 4}
    assert service.info()["calibration"] == report
    for _ in range(12):  # 16 known: their own, padded by half the median latency
        service.observe_session(1.0, 1.0, "client")
    assert service.calibration_report()["client"] == {
        "sessions": 16, "slack": 1.0, "calibration": 1.0, "offset_s": 0.0, "pad_s": 0.5,
    }  # fmt: skip


def test_slack_shrinks_the_sla_the_planner_plans_against() -> None:
    """An SLA the plan meets on paper is served whole once sessions are known to run 10x late
    (on an idle server: with load, that is a refusal, tested above)."""
    service = _service(load=0)
    _, fastest_all_client, _ = service.plan(_open(sla_s=None, layer=6))
    assert fastest_all_client is not None
    sla = fastest_all_client * 3
    assert service.plan(_open(sla_s=sla))[0] > 0
    for _ in range(8):
        service.observe_session(1.0, 10.0)
    assert service.plan(_open(sla_s=sla))[0] == 0


def test_interior_and_all_client_sessions_are_planned_with_their_own_slack() -> None:
    """All-client sessions that ran on time and interior splits that ran 3x late: an SLA the
    all-client plan meets on paper gets it (with one slack for both, 3x would rule it out);
    an SLA only an interior split meets is planned against the interior slack, so with a
    slow client the session goes whole or to a k whose latency fits 3x inside the SLA."""
    fast = _service(load=0)
    _, all_client, _ = fast.plan(_open(None, layer=6))
    assert all_client is not None
    for _ in range(16):
        fast.observe_session(1.0, 1.0, "client")
        fast.observe_session(1.0, 3.0, "interior")
    assert fast.fit("client").bound(1.0) == 1.0
    assert fast.fit("interior").bound(1.0) == pytest.approx(3.0)
    assert fast.fit().bound(1.0) == pytest.approx(3.0)  # pooled: what planning used before
    assert fast.plan(_open(all_client * 1.5))[0] == 6
    assert fast.kind(6) == "client" and fast.kind(3) == "interior" and fast.kind(0) == "whole"
    assert fast.fit("client").factor == 1.0 and fast.fit("interior").factor == 3.0

    slow = 2e9  # latency grows with k: the SLA below only interior splits meet
    on_time, late = _service(load=0), _service(load=0)
    _, slow_all_client, _ = on_time.plan(_open(None, layer=6, flops=slow))
    _, server_only, _ = on_time.plan(_open(None, layer=0, flops=slow))
    assert slow_all_client is not None and server_only is not None
    sla = (slow_all_client + server_only) / 2
    for _ in range(16):
        on_time.observe_session(1.0, 1.0, "interior")
        on_time.observe_session(1.0, 3.0, "client")
        late.observe_session(1.0, 3.0, "interior")
        late.observe_session(1.0, 1.0, "client")
    layer, predicted, _ = on_time.plan(_open(sla, flops=slow))
    assert 0 < layer < 6 and predicted is not None and predicted <= sla
    layer, predicted, _ = late.plan(_open(sla, flops=slow))
    assert layer < 6 and predicted is not None
    assert layer == 0 or predicted * 3.0 <= sla


def _forgotten(kind: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "adaptivellm_split_calibration_forgotten_total", {"kind": kind}
    )
    return value or 0.0


def test_a_kind_with_few_sessions_of_its_own_plans_with_split_sessions_calibration() -> None:
    """Ten all-client sessions on time and one 4x late: read alone (unpadded, with a margin
    for so few) they give a slack of 4.37, 3.7 x (1 + 2 / 11); until 16 of its own are known
    the kind plans with split sessions' as a whole (here 16 interior ones, 1.1x), padded: 2.3."""
    service = _service(load=0)
    for ratio in [1.0] * 10 + [4.0]:
        service.observe_session(1.0, ratio, "client")
    for _ in range(16):
        service.observe_session(1.0, 1.1, "interior")
    own = fit_calibration(np.array(service.samples["client"]), 0.99, within_sla=True)
    assert own.slack == pytest.approx(3.7 * (1 + 2 / 11))
    assert service.fit("client") == service.fit("split")
    assert service.fit("client").slack == pytest.approx(2.3, abs=0.01)
    assert service.fit("client").pad_s == pytest.approx(0.55)
    for _ in range(5):  # 16 of its own: its own calibration
        service.observe_session(1.0, 1.0, "client")
    assert service.fit("client").factor == 1.0 and service.fit("interior").factor == 1.1


def test_a_kind_ruled_out_by_a_few_late_sessions_is_planned_again_once_stale() -> None:
    """The stuck calibration of a capacity run: ten all-client sessions on time and one 40x
    late give a slack that rules out every all-client plan, so no all-client session runs
    again and its calibration never moves. Once none has finished for calibration_stale_s
    while STALE_PLANS sessions were planned it is forgotten (counted), and the kind plans as
    a fresh server's does; an idle server forgets nothing; 0 never forgets."""
    stuck, kept = _service(load=0), _service(SplitConfig(calibration_stale_s=0), load=0)
    _, all_client, _ = stuck.plan(_open(None, layer=6))
    assert all_client is not None
    sla = all_client * 3
    assert stuck.plan(_open(sla))[0] == 6
    for service in (stuck, kept):
        for ratio in [1.0] * 10 + [40.0]:
            service.observe_session(1.0, ratio, "client")
        for _ in range(8):
            service.observe_session(1.0, 1.1, "interior")
        assert service.fit("client").slack > 10
        assert service.plan(_open(sla))[0] < 6  # ruled out
    before = _forgotten("client")
    assert stuck.forget_stale(time.monotonic()) == []  # recent: kept
    # An idle server forgets nothing, however long: one plan since (the one ruled out above).
    assert stuck.forget_stale(time.monotonic() + 1e6) == []
    for _ in range(STALE_PLANS):  # sessions keep coming, and none is all-client or interior
        assert stuck.plan(_open(sla))[0] < 6
    assert stuck.forget_stale(time.monotonic()) == []  # planned, but not for a minute yet
    assert stuck.forget_stale(time.monotonic() + 61) == ["interior", "client"]
    assert _forgotten("client") == before + 1
    assert stuck.calibration_report()["client"]["sessions"] == 0
    assert stuck.fit("client").slack == INITIAL_SLACK  # as on a fresh server
    assert stuck.plan(_open(sla))[0] == 6
    kept.plans += STALE_PLANS
    assert kept.forget_stale(time.monotonic() + 1e6) == []
    assert kept.plan(_open(sla))[0] < 6
    # A kind that still runs keeps its calibration while another goes stale.
    mixed = _service(load=0)
    for _ in range(4):
        mixed.observe_session(1.0, 2.0, "client")
        mixed.observe_session(1.0, 2.0, "whole")
    mixed.plans += STALE_PLANS
    mixed.last_observed["whole"] = (time.monotonic(), mixed.plans)
    mixed.last_observed["client"] = (time.monotonic() - 200, 0)
    assert mixed.fit("client").factor == 2.0  # fit() alone forgets nothing (plan() does)
    mixed.plan(_open(None))
    assert mixed.fit("client").slack == INITIAL_SLACK  # plan() forgot: a fresh server's fit
    assert mixed.fit("whole").factor == 2.0
    assert len(mixed.samples["client"]) == 0 and len(mixed.samples["whole"]) == 4


def test_observed_prefills_teach_the_planner_their_rate() -> None:
    """A prefill that ran 10x slower than the profile's rate: the planner learns the rate it
    ran at, and prices a prompt's prefill with it (the prediction rises). Prefills too small
    to measure, or no longer than a decode step, teach nothing; bad numbers are ignored."""
    service = _service(load=0)
    shape, rate = service.shape, service.server.flops_per_s
    _, long_before, _ = service.plan(_open(None, layer=0))
    assert long_before is not None
    service.observe_prefill(4, 0, 6, 1.0)  # 24 token-layers: too small to say anything
    service.observe_prefill(64, 0, 6, service.step_estimate_s)  # no more than a decode step
    service.observe_prefill(64, 0, 6, math.nan)
    service.observe_prefill(64, 0, 0, 1.0)  # no server layer ran
    assert service.prefill_flops_per_s is None
    compute = float(shape.layer_flops(64, 0)) * 6 / (rate / 10)
    service.observe_prefill(64, 0, 6, service.step_estimate_s + compute)
    assert service.prefill_flops_per_s == pytest.approx(rate / 10)
    assert service.info()["server_profile"]["prefill_flops_per_s"] == pytest.approx(rate / 10)
    _, long_after, _ = service.plan(_open(None, layer=0))
    assert long_after is not None and long_after > long_before + 0.5 * compute
    # Later ones move it a fifth of the way on a log scale.
    service.observe_prefill(64, 0, 6, service.step_estimate_s + compute / 10)
    assert service.prefill_flops_per_s == pytest.approx(rate / 10 * 10**0.2)
    with pytest.raises(ValueError, match="prefill_flops_per_s must be > 0"):
        ServerProfile(prefill_flops_per_s=0.0)


def test_observed_steps_raise_the_per_step_overhead() -> None:
    service = _service()
    before = service.step_estimate_s
    for _ in range(50):
        service.observe_step(0.05)
    assert before < service.step_estimate_s <= 0.05


def test_the_service_reads_its_shape_from_the_engine_config() -> None:
    """The server's ModelShape comes from the engine's HF config in the dtype it serves (not the
    checkpoint's), named after the model when the config has no model_type."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from adaptivellm.split_server import build_service

    hf = LlamaConfig(
        num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=600, torch_dtype="float32",
    )  # fmt: skip
    model_config = SimpleNamespace(hf_config=hf, dtype=torch.bfloat16, max_model_len=256)
    engine = SimpleNamespace(model_config=model_config)
    args = argparse.Namespace(model="tiny-llama", served_model_name=None)
    config = SplitConfig(server_flops_per_s=1e12, server_mem_bytes_per_s=1e11)
    service = build_service(engine, config, args)
    shape = service.shape
    assert (shape.num_layers, shape.head_dim, shape.num_kv_heads) == (3, 16, 2)
    assert (shape.dtype_bytes, shape.vocab_size, shape.name) == (2, 600, "llama")
    assert service.wire_dtype == "bfloat16"


def test_prediction_error_is_relative_to_the_measured_latency() -> None:
    from adaptivellm.split_server import prediction_error

    assert prediction_error(1.5, 1.0) == ("over", 0.5)
    assert prediction_error(0.5, 1.0) == ("under", 0.5)
    assert prediction_error(None, 1.0) is None  # the plan predicted nothing
    assert prediction_error(float("inf"), 1.0) is None
    assert prediction_error(1.0, 0.0) is None


def test_a_full_server_queues_sessions_in_arrival_order_and_hands_them_slots() -> None:
    import asyncio

    async def run() -> list[str]:
        service = _service(SplitConfig(max_sessions=1, queue_s=5.0))
        order: list[str] = []
        assert await service.admit()  # the one slot

        async def queued(name: str) -> None:
            if await service.admit():
                order.append(name)

        waiting = [asyncio.ensure_future(queued(n)) for n in ("first", "second")]
        await asyncio.sleep(0.01)
        assert service.info()["queued_sessions"] == 2 and order == []
        service.release(2.0)  # the slot passes to the first in line, not to the pool
        await asyncio.sleep(0.01)
        assert order == ["first"] and service.taken == 1
        service.release(2.0)
        await asyncio.gather(*waiting)
        service.release(2.0)
        assert service.taken == 0 and not service.queue
        return order

    assert asyncio.run(run()) == ["first", "second"]


def test_a_session_that_waits_too_long_is_refused_with_a_retry_hint() -> None:
    import asyncio

    async def run() -> tuple[bool, bool, float, int]:
        service = _service(SplitConfig(max_sessions=2, queue_s=0.05))
        assert await service.admit() and await service.admit()
        service.held_s.extend([8.0, 12.0])  # sessions held their slot 10 s on average
        refused = await service.admit()
        service.release()
        late = await service.admit()  # a free slot again: taken at once
        return refused, late, service.retry_after_s(), service.taken

    refused, late, retry, taken = asyncio.run(run())
    assert not refused and late and taken == 2
    assert retry == 5.0  # 10 s a session, 2 slots, nobody queued


def test_queue_s_zero_refuses_at_once_and_bad_values_are_refused() -> None:
    import asyncio

    async def run() -> bool:
        service = _service(SplitConfig(max_sessions=1, queue_s=0.0))
        assert await service.admit()
        return await service.admit()

    assert asyncio.run(run()) is False
    assert _service().retry_after_s() >= 1.0
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="queue_s"):
            SplitConfig(queue_s=bad)


def test_append_rows_grows_a_buffer_instead_of_copying_the_context_each_token() -> None:
    class Owner:
        pass

    owner = Owner()
    first = torch.randn(4, 8)
    embeds = first
    rows = [torch.randn(1, 8) for _ in range(40)]
    buffers = set()
    handed_out = []
    for row in rows:
        embeds = append_rows(owner, embeds, row)
        buffers.add(embeds.untyped_storage().data_ptr())
        handed_out.append((embeds, embeds.clone()))
        assert embeds.is_contiguous()
    assert torch.equal(embeds, torch.cat([first, *rows]))
    # Capacity doubles: 44 rows in a handful of buffers, not one per token.
    assert len(buffers) <= 3
    # A view handed out earlier (the model runner's) keeps its contents.
    for view, copy in handed_out:
        assert torch.equal(view, copy)


def test_append_rows_starts_over_when_the_tensor_is_not_its_own_view() -> None:
    class Owner:
        pass

    owner = Owner()
    grown = append_rows(owner, torch.zeros(2, 4), torch.ones(1, 4))
    shorter = grown[:2]  # something truncated the session: rows 2.. were handed out
    again = append_rows(owner, shorter, torch.full((1, 4), 2.0))
    assert torch.equal(grown, torch.cat([torch.zeros(2, 4), torch.ones(1, 4)]))
    assert torch.equal(again[2], torch.full((4,), 2.0))
    replaced = torch.randn(3, 4)  # a tensor from elsewhere: copied, never written through
    out = append_rows(owner, replaced, torch.ones(2, 4))
    assert out.shape == (5, 4) and torch.equal(out[:3], replaced)
    assert out.data_ptr() != replaced.data_ptr()


def test_rows_for_engine_keeps_the_last_row_only_when_the_client_ran_every_layer() -> None:
    """At k = N the engine reads a chunk's last row alone (final norm, LM head): the rows
    before it are not sent. Below N, and for one-row chunks, every row goes."""
    frame = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    last = rows_for_engine(frame, 6, 6)
    assert last.shape == (1, 4) and np.array_equal(last[0], frame[-1])
    for layer in (1, 3, 5):
        assert rows_for_engine(frame, layer, 6) is frame
    assert rows_for_engine(frame[:1], 6, 6).shape == (1, 4)
