"""The tenant middleware (ASGI, in-process) and its pure resolver."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from adaptivellm.tenancy import (
    ENV,
    TenantError,
    TenantKeys,
    TenantMiddleware,
    key_digest,
    load_tenant_keys,
    resolve_tenant,
)


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


@pytest.mark.parametrize(
    ("body", "message"),
    [({"priority": -1100}, "priority must be an integer between -20 and 20"),
     ({"priority": 21}, "between -20 and 20"), ({"priority": 10**400}, "between -20 and 20"),
     ({"vllm_xargs": {"priority": 99}}, "between -20 and 20"),
     ({"vllm_xargs": {"weight": 1e9}}, "vllm_xargs.weight must be a number between 0.001 and 1000"),
     ({"vllm_xargs": {"weight": 0}}, "between 0.001 and 1000"),
     ({"vllm_xargs": {"weight": float("nan")}}, "between 0.001 and 1000"),
     ({"vllm_xargs": {"tenant": ["a"]}}, "tenant must be a non-empty string")],
)  # fmt: skip
def test_out_of_range_values_name_the_field_and_range(body: dict, message: str) -> None:
    with pytest.raises(TenantError, match=message) as err:
        resolve_tenant(body, None, None, carry_priority=True)
    assert err.value.status == 400


def test_bounds_are_inclusive() -> None:
    for priority in (-20, 20):
        out = resolve_tenant({"priority": priority}, None, None, carry_priority=True)
        assert out["vllm_xargs"]["priority"] == priority
    for weight in (1e-3, 1e3):
        resolve_tenant({"vllm_xargs": {"weight": weight}}, None, None)


# --- authenticated tenants (--tenant-keys) ------------------------------------------------


def write_keys(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(data))
    return path


def test_key_file_maps_keys_to_tenants_and_weights(tmp_path: Path) -> None:
    tenants = {
        "acme": {"keys": ["k-acme-1", "k-acme-2"], "weight": 2},
        "free": {"keys": ["k-free"]},
    }
    path = write_keys(tmp_path, {"tenants": tenants})
    keys = load_tenant_keys(path)
    assert keys.tenant_of_key == {"k-acme-1": "acme", "k-acme-2": "acme", "k-free": "free"}
    assert keys.weights == {"acme": 2.0, "free": 1.0}
    lookup = TenantKeys.from_digests({key_digest(k): t for k, t in keys.tenant_of_key.items()})
    assert lookup.tenant_of("k-acme-2") == "acme" and lookup.tenant_of("k-free") == "free"
    assert lookup.tenant_of("k-acme") is None and lookup.tenant_of("") is None


@pytest.mark.parametrize(
    ("data", "message"),
    [({"acme": ["k"]}, "must hold"), ({"tenants": {}}, "must hold"),
     ({"tenants": {"acme": {"weight": 2}}}, "needs a list of keys"),
     ({"tenants": {"acme": {"keys": [""]}}}, "non-empty strings"),
     ({"tenants": {"acme": {"keys": [" k"]}}}, "surrounding spaces"),
     ({"tenants": {"a": {"keys": ["k"]}, "b": {"keys": ["k"]}}}, "belongs to both"),
     ({"tenants": {"a": {"keys": ["k"], "weight": 0}}}, "between 0.001 and 1000")],
)  # fmt: skip
def test_bad_key_files_are_refused_clearly(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_tenant_keys(write_keys(tmp_path, data))


def test_missing_or_corrupt_key_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read tenant key file"):
        load_tenant_keys(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_bytes(b"\xff{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tenant_keys(tmp_path / "bad.json")


def test_a_keyed_request_cannot_choose_its_tenant_or_raise_its_weight() -> None:
    out = resolve_tenant({"user": "alice", "prompt": "x"}, None, None, True, keyed="acme")
    assert out["vllm_xargs"] == {"tenant": "acme"} and out["user"] == "alice"  # end user kept
    same = resolve_tenant({"vllm_xargs": {"tenant": "acme"}}, "acme", None, True, keyed="acme")
    assert same["vllm_xargs"]["tenant"] == "acme"
    lower = resolve_tenant({"priority": 3}, None, None, True, keyed="acme")
    assert lower["vllm_xargs"] == {"priority": 3, "tenant": "acme"}
    for body, header, message in [
        ({"vllm_xargs": {"tenant": "other"}}, None, "belongs to tenant 'acme'"),
        ({}, "other", "belongs to tenant 'acme'"),
        ({"vllm_xargs": {"weight": 2}}, None, "weights come from the key file"),
        ({"priority": -1}, None, "priorities are >= 0"),
    ]:
        with pytest.raises(TenantError, match=message) as err:
            resolve_tenant(body, header, None, True, keyed="acme")
        assert err.value.status == 403


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_middleware_takes_the_tenant_from_the_key(
    monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    digests = {key_digest("k-acme"): "acme"}
    monkeypatch.setenv(ENV, json.dumps({"carry_priority": True, "tenant_keys": digests}))
    app = TenantMiddleware(echo)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    keyed = {"Authorization": "Bearer k-acme"}
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        ok = await client.post("/v1/responses", json={"user": "bob"}, headers=keyed)
        assert ok.json()["vllm_xargs"] == {"tenant": "acme"}
        forged = await client.post("/v1/completions", json={"vllm_xargs": {"tenant": "b"}},
                                   headers=keyed)  # fmt: skip
        assert forged.status_code == 403
        assert forged.json()["error"]["type"] == "PermissionDeniedError"
        # An operator key (vLLM's --api-key, not in the file) still declares its tenant.
        operator = await client.post("/v1/completions", json={"user": "bob"},
                                     headers={"Authorization": "Bearer op"})  # fmt: skip
        assert operator.json()["vllm_xargs"] == {"tenant": "bob"}
        extreme = await client.post("/v1/chat/completions", json={"priority": -1100})
        assert extreme.status_code == 400
        assert "between -20 and 20" in extreme.json()["error"]["message"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_middleware_passes_plain_bodies_unparsed_and_still_tags_the_rest(
    monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """Without strict tenants, keys or a tenant header, a body naming none of the fields the
    middleware reads goes through byte for byte; one that names them (also through a JSON
    escape) is tagged as before."""
    monkeypatch.delenv(ENV, raising=False)
    app = TenantMiddleware(echo)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        plain = b'{"prompt":  "hi", "max_tokens": 4}'
        same = await client.post("/v1/completions", content=plain)
        assert same.content == plain
        user = await client.post("/v1/completions", json={"user": "bob", "prompt": "hi"})
        assert user.json()["vllm_xargs"] == {"tenant": "bob"}
        escaped = b'{"\\u0075ser": "bob", "prompt": "hi"}'
        tagged = await client.post("/v1/completions", content=escaped)
        assert tagged.json()["vllm_xargs"] == {"tenant": "bob"}
        header = await client.post(
            "/v1/completions", content=plain, headers={"X-AdaptiveLLM-Tenant": "carol"}
        )
        assert header.json()["vllm_xargs"] == {"tenant": "carol"}
        bad = await client.post("/v1/completions", json={"vllm_xargs": {"priority": 99}})
        assert bad.status_code == 400
