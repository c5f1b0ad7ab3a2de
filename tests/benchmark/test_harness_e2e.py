"""The load generator and report end to end against the session's real `adaptivellm serve`."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

from adaptivellm.benchmark.client import (
    Target,
    calibration_shapes,
    replay_sync,
    scrape_metrics,
    solo_latencies,
)
from adaptivellm.benchmark.harness import (
    BenchConfig,
    SystemConfig,
    SystemRun,
    cpu_deltas,
    process_cpu_s,
)
from adaptivellm.benchmark.metrics import (
    RequestResult,
    counter_deltas,
    fit_calibration,
    output_timeline,
)
from adaptivellm.benchmark.plots import write_plots
from adaptivellm.benchmark.report import build_report, markdown_table
from adaptivellm.benchmark.workloads import WorkloadSpec, build_workload
from adaptivellm.model import ModelSpec
from tests.support import API_KEY, Server


def test_tiny_workload_against_real_server(server: Server, tmp_path: Path) -> None:
    """6 requests from 2 tenants: every one succeeds with exactly the asked-for tokens, the
    timings are ordered, /metrics counts the tokens, and the report and plots are written."""
    spec = WorkloadSpec(num_requests=6, rate=20.0, tenants=2, length_scale=0.1,
                        max_model_len=server.max_model_len, max_output_tokens=12)  # fmt: skip
    requests = build_workload(spec)
    target = Target(server.base_url, server.model, ModelSpec().vocab_size, api_key=API_KEY)
    shapes = calibration_shapes(server.max_model_len)[:4]
    fit = fit_calibration(asyncio.run(solo_latencies(target, shapes, warmup=1)))
    assert fit.predict(16, 8) > 0

    before = scrape_metrics(server.base_url)
    assert server.process.proc is not None
    cpu_before = process_cpu_s(server.process.proc.pid)
    seen: list[RequestResult] = []
    results = replay_sync(target, requests, seed=7, on_result=seen.append)
    cpu = cpu_deltas(cpu_before, process_cpu_s(server.process.proc.pid))
    counters = counter_deltas(before, scrape_metrics(server.base_url))
    # The server's real processes, found by their vLLM titles: the API server streamed the
    # tokens and the engine core ran the steps, so both spent CPU time; so did the client.
    assert {"api_server", "engine_core", "client"} <= set(cpu), cpu
    assert cpu["api_server"] > 0 and cpu["engine_core"] > 0 and cpu["client"] > 0, cpu

    assert len(seen) == 6 and [r.index for r in results] == list(range(6))
    for req, res in zip(requests, results, strict=True):
        assert res.ok, res.error
        assert res.output_tokens == req.max_tokens
        assert res.arrival_s <= res.first_token_s <= res.end_s
        assert res.token_times and res.tenant == req.tenant
    assert counters["vllm:generation_tokens_total"] == sum(r.max_tokens for r in requests)
    assert counters["vllm:prompt_tokens_total"] == sum(r.prompt_tokens for r in requests)

    run = SystemRun(SystemConfig("adaptivellm", "adaptivellm"), ["adaptivellm", "serve"], {},
                    fit, results, counters, [results[-1].end_s], round_cpu_s=[cpu],
                    round_output_per_s=[output_timeline(results)])  # fmt: skip
    config = BenchConfig((run.config,), spec, "model", server.model, 4096, (), tmp_path)
    report = build_report("tiny", "test", config, requests, {"adaptivellm": run}, {}, True)
    figures = report["systems"]["adaptivellm"]["figures"]
    assert figures["failed"] == 0 and figures["output_tokens"] == sum(
        r.max_tokens for r in requests
    )
    assert figures["output_tokens_per_s"] > 0 and figures["requests_per_s"] > 0
    assert 0 < figures["ttft_p50_s"] <= figures["ttft_p99_s"] <= figures["e2e_p99_s"]
    assert figures["mean_weighted_turnaround"] > 0
    assert 0.5 <= figures["jain_fairness"] <= 1.0
    assert report["service_time_model"]["fit_on"] == "adaptivellm"
    per_token = report["systems"]["adaptivellm"]["cpu_ms_per_output_token"]
    assert per_token["engine_core"] > 0 and per_token["total"] >= per_token["engine_core"]
    # The round's output second by second: every streamed token, none after the last one.
    timeline = report["systems"]["adaptivellm"]["round_output_per_s"][0]
    assert sum(timeline) == figures["output_tokens"]
    assert len(timeline) == int(max(max(r.token_times) for r in results if r.ok)) + 1
    assert timeline[-1] > 0
    json.loads(json.dumps(report, allow_nan=False))  # strict JSON: no NaN anywhere
    table = markdown_table(report)
    assert "adaptivellm" in table
    # The CPU column: the API server's ms per token, then the engine's (core and workers).
    api, engine = table.splitlines()[-1].split("|")[-2].split("/")
    assert float(api) == round(per_token["api_server"], 2) and float(engine) > 0
    paths = write_plots(tmp_path, "tiny", {"adaptivellm": results}, report)
    assert all(p.stat().st_size > 1000 for p in paths)
    assert not any(isinstance(v, float) and math.isnan(v) for v in figures.values())
