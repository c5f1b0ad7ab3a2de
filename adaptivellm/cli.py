"""The `adaptivellm` command.

`serve` hands its arguments to vLLM's own parser (see adaptivellm.serve); the other commands are
light and never import vLLM, so `adaptivellm --version`, `make-model` and `plan` stay fast and
work where only the client extra is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from adaptivellm import VLLM_VERSION_REQUIRED, __version__
from adaptivellm.compat import installed_vllm

#: make-model flag -> ModelSpec field.
_SPEC_FLAGS = {
    "--layers": "num_layers",
    "--hidden-size": "hidden_size",
    "--heads": "num_heads",
    "--kv-heads": "num_kv_heads",
    "--intermediate-size": "intermediate_size",
    "--vocab-size": "vocab_size",
    "--max-position-embeddings": "max_position_embeddings",
    "--seed": "seed",
}


def version_string() -> str:
    """AdaptiveLLM's version and the installed vLLM's."""
    found = installed_vllm()
    vllm = f"{found[0]} {found[1]}" if found else "vLLM not installed"
    return f"adaptivellm {__version__} ({vllm}; written for vLLM {VLLM_VERSION_REQUIRED})"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; `serve` is parsed by vLLM's parser in adaptivellm.serve."""
    parser = argparse.ArgumentParser(
        prog="adaptivellm",
        description="AdaptiveLLM: a drop-in replacement for `vllm serve`.",
    )
    parser.add_argument("--version", action="version", version=version_string())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "serve",
        help="serve a model (every `vllm serve` flag works; see `adaptivellm serve --help`)",
        add_help=False,
    )
    _add_make_model(sub)
    _add_plan(sub)
    _add_split_client(sub)
    _add_bench(sub)
    _add_profile(sub)
    return parser


def _add_make_model(sub: argparse._SubParsersAction) -> None:
    from adaptivellm.model import DEFAULT_MODEL_NAME, ModelSpec

    p = sub.add_parser(
        "make-model",
        help="build a random-weight Llama model and tokenizer (for tests and benchmarks)",
        description="Build a deterministic random-weight Llama-architecture model with a locally "
        "trained tokenizer. Prints the model folder; an existing valid build is reused.",
    )
    defaults = ModelSpec()
    for flag, name in _SPEC_FLAGS.items():
        p.add_argument(
            flag,
            type=int,
            default=getattr(defaults, name),
            help=f"(default: {getattr(defaults, name)})",
        )
    p.add_argument("--name", default=DEFAULT_MODEL_NAME, help="model name (cache folder prefix)")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache folder (default: $ADAPTIVELLM_CACHE or ~/.cache/adaptivellm)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="build into this folder instead of the cache (replaced if present)",
    )


def _add_plan(sub: argparse._SubParsersAction) -> None:
    try:
        from adaptivellm.split_client.plan_cli import add_plan_arguments
    except ImportError:
        return
    p = sub.add_parser(
        "plan",
        help="print the split-execution placement (client layers / server layers) for a request",
        description="Choose the client/server layer split (SplitLLM dynamic program).",
    )
    add_plan_arguments(p)


def _add_split_client(sub: argparse._SubParsersAction) -> None:
    try:
        from adaptivellm.split_client.client_cli import add_split_client_arguments
    except ImportError:
        return
    p = sub.add_parser(
        "split-client",
        help="generate by split execution: run the first k layers here, the rest on a server",
        description="Open a split-execution session with an AdaptiveLLM server, run the "
        "embedding and the first k decoder layers locally and print the completion.",
    )
    add_split_client_arguments(p)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from adaptivellm.benchmark.cli import add_bench_arguments

    p = sub.add_parser(
        "bench",
        help="benchmark stock vLLM and AdaptiveLLM side by side on a seeded workload",
        description="Start stock vLLM and AdaptiveLLM configurations, replay the same seeded "
        "workload against each, and write bench/results/<scenario>.json and plots.",
    )
    add_bench_arguments(p)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    from adaptivellm.predictors.cli import add_profile_arguments

    p = sub.add_parser(
        "profile",
        help="measure swap and recompute costs on this machine and train the cost predictors",
        description="Measure KV swap (device<->host block copies) and recompute (prefill of the "
        "model's layer stack) costs on this machine, train XGBoost predictors, report held-out "
        "MAPE and save the profile where `adaptivellm serve` finds it.",
    )
    add_profile_arguments(p)


def _make_model(args: argparse.Namespace) -> int:
    from adaptivellm.model import ModelSpec, build_model, ensure_model

    try:
        spec = ModelSpec(
            **{name: getattr(args, name_to_dest(flag)) for flag, name in _SPEC_FLAGS.items()}
        )
    except ValueError as exc:
        print(f"adaptivellm make-model: error: {exc}", file=sys.stderr)
        return 2
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        path = build_model(spec, args.out)
    else:
        path = ensure_model(spec, name=args.name, cache=args.cache)
    print(path)
    print(f"# {dataclasses.asdict(spec)}", file=sys.stderr)
    return 0


def name_to_dest(flag: str) -> str:
    """'--hidden-size' -> 'hidden_size' (argparse's dest)."""
    return flag.lstrip("-").replace("-", "_")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `adaptivellm` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from adaptivellm.replicas.main import wants_replicas

        if wants_replicas(argv[1:]):  # one endpoint over N replicas (adaptivellm.replicas)
            from adaptivellm.replicas.main import main as replicas_main

            return replicas_main(argv[1:])
        from adaptivellm.compat import VLLMVersionError
        from adaptivellm.serve import main as serve_main

        try:
            return serve_main(argv[1:])
        except VLLMVersionError as exc:
            print(f"adaptivellm serve: error: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    if args.command == "make-model":
        return _make_model(args)
    if args.command == "profile":
        from adaptivellm.predictors.cli import run_profile

        return run_profile(args)
    if args.command == "bench":
        from adaptivellm.benchmark.cli import run_bench

        return run_bench(args)
    if args.command == "plan":
        from adaptivellm.split_client.plan_cli import run_plan

        return run_plan(args)
    if args.command == "split-client":
        from adaptivellm.split_client.client_cli import run_split_client

        return run_split_client(args)
    build_parser().print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
