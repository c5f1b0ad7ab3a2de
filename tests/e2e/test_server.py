"""End to end through the real server with the real `openai` client (embedded tiny model)."""

from __future__ import annotations

import statistics
import time

import httpx
import openai
import pytest

from adaptivellm.launch import metric_value
from tests.support import API_KEY, Server


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key=API_KEY, max_retries=0, timeout=120)


def metric(text: str, name: str, labels: str = "") -> float:
    value = metric_value(text, name, labels)
    assert value is not None, f"metric {name}{{{labels}}} not on /metrics"
    return value


def test_models_lists_served_names_and_max_len(client: openai.OpenAI, server: Server) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == list(server.names)
    assert all(getattr(m, "max_model_len", None) == server.max_model_len for m in models)


def test_completion_greedy_is_deterministic(client: openai.OpenAI, server: Server) -> None:
    kwargs = dict(model=server.model, prompt="The river and the city", max_tokens=16,
                  temperature=0.0, extra_body={"ignore_eos": True})  # fmt: skip
    first = client.completions.create(**kwargs)  # type: ignore[call-overload]
    second = client.completions.create(**kwargs)  # type: ignore[call-overload]
    assert first.usage is not None and first.usage.completion_tokens == 16
    assert first.choices[0].finish_reason == "length"
    assert first.choices[0].text == second.choices[0].text


def test_alias_name_serves_too(client: openai.OpenAI, server: Server) -> None:
    out = client.completions.create(model=server.names[1], prompt="hello", max_tokens=2)
    assert out.model in server.names  # vLLM answers with the first served name
    assert out.usage is not None and out.usage.completion_tokens >= 1


def test_chat_completion_uses_chat_template(client: openai.OpenAI, server: Server) -> None:
    out = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Tell me a story"}],
        max_tokens=8,
        temperature=0.0,
    )  # fmt: skip
    assert out.choices[0].message.role == "assistant"
    assert out.usage is not None and out.usage.prompt_tokens > 8  # template tokens included


def test_streaming_matches_non_streaming(client: openai.OpenAI, server: Server) -> None:
    kwargs = dict(model=server.model, prompt="A quiet morning in the garden", max_tokens=12,
                  temperature=0.0, extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.completions.create(**kwargs).choices[0].text  # type: ignore[call-overload]
    chunks = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs)
              if c.choices]  # type: ignore[call-overload]  # fmt: skip
    assert len(chunks) > 1
    assert "".join(chunks) == whole


def test_metrics_has_vllm_and_engine_side_adaptivellm_metrics(
    client: openai.OpenAI, server: Server
) -> None:
    before = httpx.get(f"{server.base_url}/metrics").text
    steps_before = metric(before, "adaptivellm_scheduler_steps_total")
    client.completions.create(model=server.model, prompt="count my steps", max_tokens=5,
                              extra_body={"ignore_eos": True})  # fmt: skip
    after = httpx.get(f"{server.base_url}/metrics").text
    assert metric(after, "vllm:generation_tokens_total") >= 5
    assert metric(after, "adaptivellm_info", 'vllm_version="0.32.0"') == 1
    assert metric(after, "adaptivellm_info", 'scheduler="adaptivellm.scheduler') == 1
    # Counted inside the engine-core process: 1 prefill step + 4 decode steps at least.
    assert metric(after, "adaptivellm_scheduler_steps_total") >= steps_before + 5


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "json"),
        (b'{"model": "tiny", "max_tokens": 2}', "prompt"),
        (b'{"model": "tiny", "prompt": "x", "max_tokens": "many"}', "max_tokens"),
        (b'{"model": "tiny", "prompt": "x", "max_tokens": -3}', "max_tokens"),
        (b'{"model": "tiny", "prompt": "x", "temperature": "hot"}', "temperature"),
        (b'{"model": "no-such-model", "prompt": "x"}', "no-such-model"),
        (b"[1, 2, 3]", ""),
    ],
)
def test_malformed_requests_get_4xx_and_server_stays_up(
    server: Server, client: openai.OpenAI, body: bytes, fragment: str
) -> None:
    headers = {"content-type": "application/json", **server.headers}
    r = httpx.post(f"{server.api_url}/completions", content=body, headers=headers, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    assert fragment.lower() in r.text.lower()
    ok = client.completions.create(model=server.model, prompt="still alive", max_tokens=2)
    assert ok.choices[0].text is not None


def test_prompt_longer_than_max_model_len_is_rejected(
    client: openai.OpenAI, server: Server
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=server.model, prompt=[5] * (server.max_model_len + 10),
                                  max_tokens=4)  # fmt: skip
    assert str(server.max_model_len) in str(err.value)
    ok = client.completions.create(model=server.model, prompt="after the long one", max_tokens=2)
    assert ok.usage is not None and ok.usage.completion_tokens >= 1


def test_two_tenants_are_accounted_separately(client: openai.OpenAI, server: Server) -> None:
    client.completions.create(model=server.model, prompt="tenant a", max_tokens=4, user="alice",
                              extra_body={"ignore_eos": True})  # fmt: skip
    headers = {"X-AdaptiveLLM-Tenant": "bob", **server.headers}
    r = httpx.post(f"{server.api_url}/completions", headers=headers,
                   json={"model": server.model, "prompt": "tenant b", "max_tokens": 4,
                         "ignore_eos": True}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    text = httpx.get(f"{server.base_url}/metrics").text
    assert metric(text, "adaptivellm_tenant_served_tokens_total", 'tenant="alice"') >= 4
    assert metric(text, "adaptivellm_tenant_served_tokens_total", 'tenant="bob"') >= 4
    assert 0 < metric(text, "adaptivellm_tenant_jain_index") <= 1
    assert metric(text, "adaptivellm_weighted_turnaround_count") >= 2
    assert metric(text, "adaptivellm_queue_wait_seconds_count") >= 2
    assert metric(text, "adaptivellm_info", 'fairness="weighted-turnaround"') == 1


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [({"priority": "high"}, "priority"), ({"vllm_xargs": {"weight": -1}}, "weight"),
     ({"user": ""}, "tenant")],
)  # fmt: skip
def test_bad_tenant_or_priority_is_rejected(server: Server, extra: dict, fragment: str) -> None:
    body = {"model": server.model, "prompt": "x", "max_tokens": 2, **extra}
    r = httpx.post(f"{server.api_url}/completions", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 400, r.text
    assert fragment in r.text


def test_service_model_is_learned_from_the_engines_steps(
    client: openai.OpenAI, server: Server
) -> None:
    """After requests of several prompt lengths, the decode and prefill costs on /metrics are
    the ones fitted to this engine's steps, not the fixed defaults (0.2 ms per prompt token,
    8 ms per output token). The decode cost is checked against each request's time per output
    token, which this machine sets: a request alone takes one engine step per token (its
    prefill and HTTP on top), so a step's fitted cost can neither exceed that time by much
    nor be a small part of it."""
    per_token: list[float] = []
    for i in range(12):
        started = time.perf_counter()
        client.completions.create(model=server.model, prompt="a story about a boat " * (1 + 4 * i),
                                  max_tokens=12, extra_body={"ignore_eos": True})  # fmt: skip
        per_token.append((time.perf_counter() - started) / 12)
    text = httpx.get(f"{server.base_url}/metrics").text
    name = "adaptivellm_service_model_seconds_per_token"
    decode, prefill = metric(text, name, 'term="decode"'), metric(text, name, 'term="prefill"')
    typical = statistics.median(per_token)
    assert decode != pytest.approx(0.008), "still the configured default"
    assert typical / 10 < decode < typical * 1.5, (decode, typical)
    assert 0 < prefill != pytest.approx(0.0002)
