"""Tenants for fairness scheduling: an ASGI middleware in vLLM's API server (`--middleware`).

Where the tenant comes from:

- **With `--tenant-keys FILE`** (authenticated tenants): the tenant is the one the request's
  API key (`Authorization: Bearer KEY`) belongs to in the key file. `adaptivellm serve` adds the
  file's keys to vLLM's `--api-key`, so vLLM's own middleware answers 401 to a missing or wrong
  key on every `/v1` route (WebSockets included), comparing keys in constant time. A request
  cannot name another fairness tenant (403), nor set its own `vllm_xargs.weight` or a negative
  (weight-raising) priority (403); the OpenAI `user` field only names an end user inside the
  tenant and is passed on untouched. Keys given with `--api-key` alone (not in the file) are
  operator keys, e.g. of a gateway that authenticates its users itself: their requests name
  their tenant as below.
- **Without it** the tenant is self-declared: the `X-AdaptiveLLM-Tenant` header,
  `vllm_xargs.tenant`, or the OpenAI `user` field, in that order. Any client can then name any
  tenant, so fairness between tenants holds only among honest clients.

vLLM passes only `vllm_xargs` on to the engine (`sampling_params.extra_args`), so the middleware
writes the tenant there. It also checks everything the scheduler derives from a request and
answers 400 with a message naming the field and its allowed range: the tenant name (and, with
`--strict-tenants`, that the tenant is known), `vllm_xargs.weight` and `priority` (which
AdaptiveLLM's own policies turn into a weight; scheduler.config has the ranges). The engine
bounds them again (scheduler.config.effective_weight).

The configuration comes from `ADAPTIVELLM_TENANCY` (JSON), which `adaptivellm serve` sets before
vLLM's launcher creates the app (and its API-server processes inherit). It holds SHA-256
digests of the tenant keys, never the keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptivellm.jsonfile import read_json
from adaptivellm.scheduler.config import (
    MAX_TENANT_LEN,
    PRIORITY_RANGE,
    WEIGHT_RANGE,
    check_weights,
)

ENV = "ADAPTIVELLM_TENANCY"
HEADER = b"x-adaptivellm-tenant"
#: The generation routes whose bodies carry `vllm_xargs` to the engine.
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class TenantError(ValueError):
    """The request's tenant information is unusable; the message is shown to the client."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def key_digest(key: str) -> str:
    """Hex SHA-256 of an API key (what the API server keeps)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TenantKeys:
    """API key -> tenant, held as SHA-256 digests (`--tenant-keys`)."""

    digests: tuple[tuple[bytes, str], ...]

    @staticmethod
    def from_digests(by_digest: Mapping[str, str]) -> TenantKeys:
        """From {hex digest: tenant} (the ADAPTIVELLM_TENANCY form)."""
        return TenantKeys(tuple((bytes.fromhex(d), t) for d, t in by_digest.items()))

    def tenant_of(self, key: str) -> str | None:
        """The tenant `key` belongs to, or None. Compares with every stored digest in constant
        time, as vLLM's own --api-key check does: how long it takes says nothing of which
        stored key, if any, shares a prefix with `key`."""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: str | None = None
        for stored, tenant in self.digests:
            if secrets.compare_digest(digest, stored):
                found = tenant
        return found


@dataclass(frozen=True)
class KeyFile:
    """What `--tenant-keys FILE` holds: each key's tenant and each tenant's weight."""

    tenant_of_key: dict[str, str]
    weights: dict[str, float]


def load_tenant_keys(path: str | Path) -> KeyFile:
    """Read a tenant key file; ValueError with a clear message when it is unusable.

    The file is JSON: `{"tenants": {"acme": {"keys": ["sk-acme-1", ...], "weight": 2}, ...}}`
    (`weight` optional, default 1). A key belongs to exactly one tenant."""
    path = Path(path).expanduser()
    data = read_json(path, "tenant key file")
    tenants = data.get("tenants") if isinstance(data, dict) else None
    if not isinstance(tenants, dict) or not tenants:
        raise ValueError(
            f'tenant key file {path} must hold {{"tenants": {{"NAME": {{"keys": ["KEY", ...], '
            '"weight": W}}}}}}'
        )
    keys: dict[str, str] = {}
    weights: dict[str, float] = {}
    for tenant, entry in tenants.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("keys"), list):
            raise ValueError(f"tenant {tenant!r} in {path} needs a list of keys under 'keys'")
        weights[tenant] = entry.get("weight", 1.0)
        for key in entry["keys"]:
            if not isinstance(key, str) or not key.strip() or key != key.strip():
                raise ValueError(
                    f"tenant {tenant!r} in {path}: keys must be non-empty strings without "
                    "surrounding spaces"
                )
            if key in keys:
                raise ValueError(
                    f"a key in {path} belongs to both {keys[key]!r} and {tenant!r}: each key "
                    "names one tenant"
                )
            keys[key] = tenant
    check_weights(weights)
    return KeyFile(keys, {t: float(w) for t, w in weights.items()})


def check_priority(priority: object) -> int:
    """The request's priority, or TenantError naming the field and its range."""
    low, high = PRIORITY_RANGE
    if isinstance(priority, bool) or not isinstance(priority, int) or not low <= priority <= high:
        raise TenantError(
            f"priority must be an integer between {low} and {high} (lower = more important), "
            f"got {priority!r}"
        )
    return priority


def check_request_weight(weight: object) -> None:
    """`vllm_xargs.weight` is a number in WEIGHT_RANGE, or TenantError."""
    low, high = WEIGHT_RANGE
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not low <= weight <= high:
        raise TenantError(
            f"vllm_xargs.weight must be a number between {low:g} and {high:g}, got {weight!r}"
        )


def resolve_tenant(
    body: dict[str, Any],
    header: str | None,
    known: frozenset[str] | None,
    carry_priority: bool = False,
    keyed: str | None = None,
) -> dict[str, Any]:
    """Return the body with `vllm_xargs.tenant` set (when a tenant is named), or raise
    TenantError. `known`: the allowed tenants under --strict-tenants, else None.
    `carry_priority`: move `priority` into vllm_xargs (AdaptiveLLM's own policies weigh it;
    vLLM's frontend accepts a priority only under its own priority policy). `keyed`: the
    tenant of the request's API key under --tenant-keys (it cannot be overridden)."""
    xargs = body.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        return body  # vLLM's own validation answers this one
    xargs = dict(xargs or {})
    if carry_priority and "priority" in body:
        xargs["priority"] = check_priority(body["priority"])
        body = {k: v for k, v in body.items() if k != "priority"}
    elif "priority" in xargs:
        check_priority(xargs["priority"])
    if "weight" in xargs:
        check_request_weight(xargs["weight"])
    declared = header if header is not None else xargs.get("tenant")
    if keyed is not None:
        return _keyed(body, xargs, declared, keyed)
    tenant = declared if declared is not None else body.get("user")
    if tenant is None:
        if "priority" in xargs:
            return {**body, "vllm_xargs": xargs}
        if known is not None:
            raise TenantError(
                "this server requires a tenant: set the `user` field, vllm_xargs.tenant or the "
                "X-AdaptiveLLM-Tenant header"
            )
        return body
    check_tenant_name(tenant)
    if known is not None and tenant not in known:
        raise TenantError(f"unknown tenant {tenant!r}; this server knows {sorted(known)}")
    xargs["tenant"] = tenant
    return {**body, "vllm_xargs": xargs}


def _keyed(
    body: dict[str, Any], xargs: dict[str, Any], declared: object, keyed: str
) -> dict[str, Any]:
    """The body of a request authenticated with a tenant key: the key's tenant, and nothing
    that would raise the request's weight above it."""
    if declared is not None and declared != keyed:
        raise TenantError(
            f"this API key belongs to tenant {keyed!r}; a request cannot name tenant "
            f"{declared!r} (the `user` field may name an end user)",
            status=403,
        )
    if "weight" in xargs:
        raise TenantError(
            "vllm_xargs.weight is not accepted with tenant keys: weights come from the key file",
            status=403,
        )
    if xargs.get("priority", 0) < 0:
        raise TenantError(
            f"priority {xargs['priority']} would raise this request's weight above its "
            "tenant's; with tenant keys, priorities are >= 0",
            status=403,
        )
    xargs["tenant"] = keyed
    return {**body, "vllm_xargs": xargs}


def check_tenant_name(tenant: object) -> None:
    """A tenant name is a non-empty string of at most MAX_TENANT_LEN characters."""
    if not isinstance(tenant, str) or not tenant.strip() or len(tenant) > MAX_TENANT_LEN:
        raise TenantError(
            f"tenant must be a non-empty string of at most {MAX_TENANT_LEN} characters, "
            f"got {tenant!r}"
        )


@dataclass(frozen=True)
class TenancyConfig:
    """What the middleware needs, from ADAPTIVELLM_TENANCY."""

    known: frozenset[str] | None = None
    """The allowed tenants under --strict-tenants, else None."""
    carry_priority: bool = False
    keys: TenantKeys | None = None

    @staticmethod
    def from_env() -> TenancyConfig:
        config = json.loads(os.environ.get(ENV) or "{}")
        weights = config.get("tenant_weights", {})
        keys = config.get("tenant_keys")
        return TenancyConfig(
            known=frozenset(weights) if config.get("strict_tenants") else None,
            carry_priority=bool(config.get("carry_priority")),
            keys=TenantKeys.from_digests(keys) if keys else None,
        )


class TenantMiddleware:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.config = TenancyConfig.from_env()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ROUTES:
            await self.app(scope, receive, send)
            return
        raw = await _read_body(receive)
        headers = dict(scope.get("headers") or [])
        if self._untouched(raw, headers):
            await self.app(scope, _replay(raw, receive), send)
            return
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        if isinstance(body, dict):
            config = self.config
            try:
                header = headers.get(HEADER)
                tenant = header.decode() if header else None
                keyed = _key_tenant(config.keys, headers.get(b"authorization"))
                new = resolve_tenant(body, tenant, config.known, config.carry_priority, keyed)
            except UnicodeDecodeError:
                await _error(send, 400, "the X-AdaptiveLLM-Tenant header must be UTF-8")
                return
            except TenantError as exc:
                await _error(send, exc.status, str(exc))
                return
            if new is not body:
                raw = json.dumps(new).encode()
                scope = _with_length(scope, len(raw))
        await self.app(scope, _replay(raw, receive), send)

    def _untouched(self, raw: bytes, headers: dict[bytes, bytes]) -> bool:
        """True when resolve_tenant would return the body unchanged and raise nothing, known
        without parsing it: no --strict-tenants, no tenant keys, no tenant header, and none of
        the fields it reads in the raw bytes (a JSON key spelt with escapes contains a
        backslash-u, so it is parsed)."""
        config = self.config
        return (
            config.known is None
            and config.keys is None
            and HEADER not in headers
            and not any(field in raw for field in _FIELDS)
        )


#: Bytes whose presence in a body means the middleware has to parse it.
_FIELDS = (b'"user"', b'"vllm_xargs"', b'"priority"', b"\\u")


def _key_tenant(keys: TenantKeys | None, authorization: bytes | None) -> str | None:
    """The tenant of the bearer key in an Authorization header (None: no tenant keys, no
    key, or an operator key)."""
    if keys is None or not authorization:
        return None
    scheme, _, key = authorization.decode("latin-1").partition(" ")
    return keys.tenant_of(key) if scheme.lower() == "bearer" else None


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


_ERROR_TYPES = {400: "BadRequestError", 403: "PermissionDeniedError"}


async def _error(send: Send, status: int, message: str) -> None:
    kind = _ERROR_TYPES.get(status, "BadRequestError")
    payload = json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": status}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(payload)).encode())],
        }
    )  # fmt: skip
    await send({"type": "http.response.body", "body": payload})
