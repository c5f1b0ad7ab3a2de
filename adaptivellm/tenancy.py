"""Tenants for fairness scheduling: an ASGI middleware in vLLM's API server (`--middleware`).

A request names its tenant with, in order of precedence, the `X-AdaptiveLLM-Tenant` header,
`vllm_xargs.tenant`, or the OpenAI `user` field. vLLM passes only `vllm_xargs` on to the engine
(`sampling_params.extra_args`), so the middleware writes the tenant there. It also checks what
the scheduler relies on and answers 400 with a clear message otherwise: tenant names (and, with
`--strict-tenants`, that the tenant is known), and `vllm_xargs.weight` (a number > 0).

The configuration comes from `ADAPTIVELLM_TENANCY` (JSON), which `adaptivellm serve` sets before
vLLM's launcher creates the app (and its API-server processes inherit).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

ENV = "ADAPTIVELLM_TENANCY"
HEADER = b"x-adaptivellm-tenant"
MAX_TENANT_LEN = 128
ROUTES = ("/v1/completions", "/v1/chat/completions")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class TenantError(ValueError):
    """The request's tenant information is unusable; the message is shown to the client."""


def resolve_tenant(
    body: dict[str, Any],
    header: str | None,
    known: frozenset[str] | None,
    carry_priority: bool = False,
) -> dict[str, Any]:
    """Return the body with `vllm_xargs.tenant` set (when a tenant is named), or raise
    TenantError. `known`: the allowed tenants under --strict-tenants, else None.
    `carry_priority`: move `priority` into vllm_xargs (AdaptiveLLM's own policies weigh it;
    vLLM's frontend accepts a priority only under its own priority policy)."""
    xargs = body.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        return body  # vLLM's own validation answers this one
    xargs = dict(xargs or {})
    if carry_priority and "priority" in body:
        priority = body["priority"]
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TenantError(f"priority must be an integer, got {priority!r}")
        body = {k: v for k, v in body.items() if k != "priority"}
        xargs["priority"] = priority
    tenant = header if header is not None else xargs.get("tenant", body.get("user"))
    if "weight" in xargs:
        weight = xargs["weight"]
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise TenantError(f"vllm_xargs.weight must be a number > 0, got {weight!r}")
        if not (math.isfinite(weight) and weight > 0):
            raise TenantError(f"vllm_xargs.weight must be a number > 0, got {weight!r}")
    if tenant is None:
        if "priority" in xargs:
            return {**body, "vllm_xargs": xargs}
        if known is not None:
            raise TenantError(
                "this server requires a tenant: set the `user` field, vllm_xargs.tenant or the "
                "X-AdaptiveLLM-Tenant header"
            )
        return body
    if not isinstance(tenant, str) or not tenant.strip() or len(tenant) > MAX_TENANT_LEN:
        raise TenantError(
            f"tenant must be a non-empty string of at most {MAX_TENANT_LEN} characters, "
            f"got {tenant!r}"
        )
    if known is not None and tenant not in known:
        raise TenantError(f"unknown tenant {tenant!r}; this server knows {sorted(known)}")
    xargs["tenant"] = tenant
    return {**body, "vllm_xargs": xargs}


def _config() -> tuple[frozenset[str] | None, bool]:
    """(known tenants under --strict-tenants else None, carry priority) from the environment."""
    config = json.loads(os.environ.get(ENV) or "{}")
    known = frozenset(config.get("tenant_weights", {})) if config.get("strict_tenants") else None
    return known, bool(config.get("carry_priority"))


class TenantMiddleware:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.known, self.carry_priority = _config()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ROUTES:
            await self.app(scope, receive, send)
            return
        raw = await _read_body(receive)
        headers = dict(scope.get("headers") or [])
        header = headers.get(HEADER)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        if isinstance(body, dict):
            try:
                tenant = header.decode() if header else None
                new = resolve_tenant(body, tenant, self.known, self.carry_priority)
            except TenantError as exc:
                await _bad_request(send, str(exc))
                return
            if new is not body:
                raw = json.dumps(new).encode()
                scope = _with_length(scope, len(raw))
        await self.app(scope, _replay(raw, receive), send)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields the (possibly rewritten) body once, then defers to the client's
    stream (so disconnects still reach vLLM)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_length(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


async def _bad_request(send: Send, message: str) -> None:
    payload = json.dumps(
        {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(payload)).encode())],
        }
    )  # fmt: skip
    await send({"type": "http.response.body", "body": payload})
