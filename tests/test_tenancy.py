"""The tenant middleware (ASGI, in-process) and its pure resolver."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from adaptivellm.tenancy import ENV, TenantError, TenantMiddleware, resolve_tenant


@pytest.mark.parametrize(
    ("body", "header", "tenant"),
    [({"user": "alice"}, None, "alice"),
     ({"user": "alice", "vllm_xargs": {"tenant": "bob"}}, None, "bob"),
     ({"user": "alice"}, "carol", "carol"),
     ({"prompt": "x"}, None, None)],
)  # fmt: skip
def test_tenant_precedence(body: dict, header: str | None, tenant: str | None) -> None:
    out = resolve_tenant(body, header, known=None)
    assert (out.get("vllm_xargs") or {}).get("tenant") == tenant


@pytest.mark.parametrize(
    ("body", "known", "message"),
    [({"user": ""}, None, "non-empty"), ({"user": 42}, None, "non-empty string"),
     ({"user": "x" * 200}, None, "at most"), ({"user": "mallory"}, {"alice"}, "unknown tenant"),
     ({"prompt": "x"}, {"alice"}, "requires a tenant"),
     ({"vllm_xargs": {"weight": "big"}}, None, "weight"),
     ({"vllm_xargs": {"weight": -2}}, None, "weight")],
)  # fmt: skip
def test_bad_tenant_input(body: dict, known: set[str] | None, message: str) -> None:
    with pytest.raises(TenantError, match=message):
        resolve_tenant(body, None, frozenset(known) if known is not None else None)


def test_priority_is_carried_and_checked() -> None:
    out = resolve_tenant({"priority": -1, "user": "a"}, None, None, carry_priority=True)
    assert "priority" not in out
    assert out["vllm_xargs"] == {"priority": -1, "tenant": "a"}
    out = resolve_tenant({"priority": 2}, None, None, carry_priority=True)
    assert out["vllm_xargs"] == {"priority": 2}
    assert resolve_tenant({"priority": 2}, None, None) == {"priority": 2}  # vLLM's own policy
    for bad in ("high", 1.5, True):
        with pytest.raises(TenantError, match="priority must be an integer"):
            resolve_tenant({"priority": bad}, None, None, carry_priority=True)


async def echo(scope: dict, receive: Any, send: Any) -> None:
    """Stands in for vLLM's app: answers with the body it received."""
    body = (await receive())["body"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_middleware_rewrites_and_rejects(
    monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    monkeypatch.setenv(ENV, json.dumps({"tenant_weights": {"alice": 2}, "strict_tenants": True}))
    app = TenantMiddleware(echo)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        ok = await client.post("/v1/completions", json={"user": "alice", "prompt": "hi"})
        assert ok.status_code == 200
        assert ok.json()["vllm_xargs"] == {"tenant": "alice"}
        bad = await client.post("/v1/chat/completions", json={"user": "mallory"})
        assert bad.status_code == 400
        assert "unknown tenant 'mallory'" in bad.json()["error"]["message"]
        other = await client.post("/v1/embeddings", json={"user": "mallory"})
        assert other.status_code == 200  # other routes pass through untouched
        garbage = await client.post("/v1/completions", content=b"{not json")
        assert garbage.content == b"{not json"  # left for vLLM to reject
