"""`adaptivellm serve --replicas N [every vllm serve and AdaptiveLLM flag]`: one endpoint over N
replicas (Ray actors, each a full `adaptivellm serve`), behind AdaptiveLLM's router.

The flags below are the router's; every other flag is passed to each replica unchanged (and
checked with `adaptivellm serve`'s own parser first, so a mistake fails here once rather than in
N restarting replicas). `--host`/`--port` are the router's; each replica gets its own port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import shlex
import sys
from typing import TYPE_CHECKING, Any

from adaptivellm import setup_logging
from adaptivellm.replicas.router import ROUTING

if TYPE_CHECKING:
    from adaptivellm.replicas.proxy import RouterOptions

logger = logging.getLogger("adaptivellm.replicas")

#: Flags that make `adaptivellm serve` the router (cli.main looks for them).
TRIGGERS = ("--replicas", "--replica-urls")


def wants_replicas(argv: list[str]) -> bool:
    """Whether `adaptivellm serve ARGV` asks for the router."""
    return any(a == t or a.startswith(f"{t}=") for a in argv for t in TRIGGERS)


def build_parser() -> argparse.ArgumentParser:
    """The router's own flags (parse_known_args: the rest goes to the replicas)."""
    p = argparse.ArgumentParser(
        prog="adaptivellm serve --replicas N",
        description="Serve one OpenAI-compatible endpoint over N AdaptiveLLM replicas placed "
        "by Ray. Every other flag (vLLM's and AdaptiveLLM's) is passed to each replica.",
        allow_abbrev=False,
        add_help=False,
    )
    p.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    _add_replica_flags(p.add_argument_group("Replicas (Ray)"))
    _add_router_flags(p.add_argument_group("Router"))
    return p


def _add_replica_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--replicas", type=int, default=None, help="number of replicas (>= 1)")
    g.add_argument("--replica-cpus", type=float, default=1.0,
                   help="CPUs Ray reserves per replica; on CPU also the cores its engine is "
                   "bound to (default: %(default)s)")  # fmt: skip
    g.add_argument("--replica-gpus", type=float, default=0.0,
                   help="GPUs per replica; > 1 places the replica's GPUs on one node with a "
                   "STRICT_PACK placement group (default: %(default)s)")  # fmt: skip
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. ray://head:10001 or auto); default: start a "
                   "local Ray instance sized for the replicas")  # fmt: skip
    g.add_argument("--replica-max-restarts", type=int, default=20,
                   help="how many times Ray restarts a replica that died (-1: always; "
                   "default: %(default)s)")  # fmt: skip
    g.add_argument(
        "--replica-log-dir",
        default=None,
        help="folder for the replicas' server logs (default: the system temp dir)",
    )
    g.add_argument("--replica-extra", action="append", default=[], metavar="I=FLAGS",
                   help="extra flags for replica I only, e.g. 1='--max-num-seqs 2' "
                   "(heterogeneous replicas); repeatable")  # fmt: skip
    g.add_argument("--replica-urls", default=None, metavar="URL,URL",
                   help="route over servers already running at these URLs instead of starting "
                   "replicas (no Ray)")  # fmt: skip
    g.add_argument(
        "--no-replica-cpu-bind",
        dest="replica_cpu_bind",
        action="store_false",
        help="do not bind each CPU replica's engine to its own cores",
    )


def _add_router_flags(r: argparse._ArgumentGroup) -> None:
    r.add_argument("--host", default=None, help="router address (default: all interfaces)")
    r.add_argument("--port", type=int, default=8000, help="router port (default: %(default)s)")
    r.add_argument("--routing", choices=ROUTING, default="predicted",
                   help="predicted: lowest predicted completion time from each replica's "
                   "published load and service model; least-loaded; round-robin; session: "
                   "affinity on --session-header, bounded fallback (default: %(default)s)",
                   )  # fmt: skip
    r.add_argument(
        "--session-header",
        default="X-Session-Id",
        help="header naming a session for --routing session (default: %(default)s)",
    )
    r.add_argument("--session-imbalance", type=float, default=3.0,
                   help="a session leaves its replica when that one's predicted completion "
                   "exceeds the best one's this many times (default: %(default)s; inf: never "
                   "while it is ready)")  # fmt: skip
    r.add_argument("--router-target-backlog", type=int, default=None, metavar="N",
                   help="router requests in flight per replica before new ones wait at the "
                   "router in per-tenant queues (default: each replica's --max-num-seqs, "
                   "else 128)")  # fmt: skip
    r.add_argument(
        "--router-queue-limit",
        type=int,
        default=1024,
        metavar="N",
        help="requests waiting at the router before 429 (default: %(default)s)",
    )
    r.add_argument("--global-fairness", action=argparse.BooleanOptionalAction, default=True,
                   help="release queued requests least-served tenant first by the global "
                   "ledger (default: on; off: arrival order)")  # fmt: skip
    r.add_argument("--replica-poll-s", type=float, default=1.0,
                   help="how often each replica's /health and /metrics are read "
                   "(default: %(default)s)")  # fmt: skip
    r.add_argument("--replica-unhealthy-after", type=int, default=3,
                   help="consecutive /health polls that time out before a replica is taken "
                   "out of routing; a refused connection or an error answer takes it out at "
                   "once (default: %(default)s)")  # fmt: skip
    r.add_argument("--router-max-retries", type=int, default=2,
                   help="other replicas tried for a request whose replica failed before "
                   "answering (default: %(default)s)")  # fmt: skip


def replica_argv(rest: list[str]) -> tuple[list[str], Any]:
    """Check the replicas' flags with `adaptivellm serve`'s parser (the embedded model is built
    here once, before N replicas look for it); returns them and the parsed namespace."""
    from adaptivellm.serve import build_parser as serve_parser
    from adaptivellm.serve import with_model

    checked, _ = with_model(list(rest))
    args = serve_parser().parse_args(["serve", *checked])
    return list(rest), args


def extras(specs: list[str], replicas: int) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for spec in specs:
        index, sep, flags = spec.partition("=")
        if not sep or not index.strip().isdigit() or not 0 <= int(index) < replicas:
            raise SystemExit(
                f"adaptivellm serve: error: --replica-extra wants I=FLAGS with 0 <= I < "
                f"{replicas}, got {spec!r}"
            )
        out.setdefault(int(index), []).extend(shlex.split(flags))
    return out


def _max_num_seqs(flags: list[str]) -> int | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--max-num-seqs", type=int, default=None)
    return pre.parse_known_args(flags)[0].max_num_seqs


def check_router_flags(
    parser: argparse.ArgumentParser, opts: argparse.Namespace, count: int, urls: list[str]
) -> None:
    """Refuse bad router flags before any replica starts (argparse's usage error, exit 2)."""
    if count < 1:
        parser.error("--replicas must be >= 1")
    if urls and len(urls) != count:
        parser.error(f"--replicas {count} but {len(urls)} --replica-urls")
    if opts.router_target_backlog is not None and opts.router_target_backlog < 1:
        parser.error("--router-target-backlog must be >= 1")
    if opts.router_queue_limit < 0:
        parser.error("--router-queue-limit must be >= 0")
    if not (math.isfinite(opts.replica_poll_s) and opts.replica_poll_s > 0):
        parser.error("--replica-poll-s must be a positive number of seconds")
    if opts.replica_unhealthy_after < 1:
        parser.error("--replica-unhealthy-after must be >= 1")


def build_backends(
    opts: argparse.Namespace,
    rest: list[str],
    count: int,
    urls: list[str],
    extra: dict[int, list[str]],
) -> tuple[Any, list[str], Any]:
    """The replicas: fixed URLs, or Ray actors each running `adaptivellm serve` with `rest` (plus
    its --replica-extra flags), which `adaptivellm serve`'s parser checks first. Returns them,
    the replicas' flags and those flags parsed (None for fixed URLs)."""
    from adaptivellm.replicas.proxy import StaticReplicas

    if urls:
        return StaticReplicas(urls), rest, None
    rest, parsed = replica_argv(rest)
    for flags in extra.values():
        replica_argv([*rest, *flags])
    from adaptivellm.replicas.actors import RayOptions, RayReplicas, ReplicaSpec

    specs = [
        ReplicaSpec(
            index=i,
            argv=[*rest, *extra.get(i, [])],
            cpus=opts.replica_cpus,
            gpus=opts.replica_gpus,
            log_dir=opts.replica_log_dir or "",
            bind_cpus=opts.replica_cpu_bind,
        )
        for i in range(count)
    ]
    ray_options = RayOptions(
        address=opts.ray_address,
        cpus=opts.replica_cpus,
        gpus=opts.replica_gpus,
        max_restarts=opts.replica_max_restarts,
    )
    return RayReplicas(specs, ray_options), rest, parsed


def router_options(
    opts: argparse.Namespace, rest: list[str], parsed: Any, count: int, extra: dict[int, list[str]]
) -> RouterOptions:
    """The router's options: its flags, each replica's batch size, and the tenants' weights and
    keys as the replicas read them (--tenant-weights, --tenant-keys among `rest`)."""
    from adaptivellm.replicas.proxy import RouterOptions
    from adaptivellm.scheduler.config import load_tenant_weights
    from adaptivellm.tenancy import load_tenant_keys

    base_seqs = _max_num_seqs(rest)
    slots = [_max_num_seqs(extra.get(i, [])) or base_seqs or 128 for i in range(count)]
    weights: dict[str, float] = {}
    keys = None
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--tenant-weights", default=None)
    pre.add_argument("--tenant-keys", default=None)
    pre.add_argument("--max-model-len", type=int, default=None)
    tenancy, _ = pre.parse_known_args(rest)
    try:
        if tenancy.tenant_weights:
            weights = load_tenant_weights(tenancy.tenant_weights)
        if tenancy.tenant_keys:
            key_file = load_tenant_keys(tenancy.tenant_keys)
            keys = key_file.tenant_of_key
            weights = {**weights, **key_file.weights}
    except ValueError as exc:
        raise SystemExit(f"adaptivellm serve: error: {exc}") from exc
    max_len = tenancy.max_model_len or getattr(parsed, "max_model_len", None) or 1024
    return RouterOptions(
        routing=opts.routing,
        target_backlog=opts.router_target_backlog,
        queue_limit=opts.router_queue_limit,
        global_fairness=opts.global_fairness,
        poll_s=opts.replica_poll_s,
        unhealthy_after=opts.replica_unhealthy_after,
        session_header=opts.session_header,
        session_imbalance=opts.session_imbalance,
        max_retries=opts.router_max_retries,
        slots=slots,
        default_max_tokens=min(1024, max_len),
        tenant_weights=weights,
        tenant_of_key=keys,
    )


def main(argv: list[str]) -> int:
    """Run the router and its replicas (`adaptivellm serve --replicas N ...`)."""
    setup_logging()
    parser = build_parser()
    opts, rest = parser.parse_known_args(argv)
    if opts.help:
        parser.print_help()
        print("\nEvery other flag is `adaptivellm serve`'s (see `adaptivellm serve --help`).")
        return 0
    urls = [u for u in (opts.replica_urls or "").split(",") if u.strip()]
    count = opts.replicas if opts.replicas is not None else len(urls)
    check_router_flags(parser, opts, count, urls)
    extra = extras(opts.replica_extra, count)
    backends, rest, parsed = build_backends(opts, rest, count, urls, extra)
    options = router_options(opts, rest, parsed, count, extra)
    from aiohttp import web

    from adaptivellm.replicas.proxy import RouterServer

    server = RouterServer(backends, options)
    logger.info(
        "starting %d replica(s) (%s); router on %s:%d, routing %s, target backlog %s, "
        "global fairness %s",
        count,
        "fixed URLs" if urls else f"Ray {opts.ray_address or 'local'}",
        opts.host or "0.0.0.0",
        opts.port,
        opts.routing,
        options.target_backlog or f"each replica's --max-num-seqs {options.slots}",
        "on" if options.global_fairness else "off",
    )
    with contextlib.suppress(ImportError):  # vLLM's own dependency: a faster event loop
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        backends.start()
        web.run_app(
            server.app(), host=opts.host, port=opts.port, print=None, access_log=None,
            shutdown_timeout=5, handler_cancellation=True,
        )  # fmt: skip
    finally:
        logger.info("stopping the replicas")
        backends.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
