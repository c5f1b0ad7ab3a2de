"""`adaptivellm profile [MODEL]`: measure swap and recompute costs, train, store the profile.

Wired into the `adaptivellm` CLI through `add_profile_arguments` and `run_profile`; also runs
standalone as `python -m adaptivellm.predictors.cli` (torch, xgboost, numpy and tqdm only, never
vLLM: for GPU machines without vLLM, the profile's vLLM version is then 'none').
Exit codes: 0 saved, 2 bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `profile` subcommand's flags to `parser`."""
    parser.add_argument(
        "model",
        nargs="?",
        help="a Hugging Face model folder (its config.json); default: the embedded model",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--quick", action="store_true", help="a small grid (about a minute)")
    parser.add_argument("--reps", type=int, help="timings per point (default 9, quick 5)")
    parser.add_argument(
        "--statistic",
        choices=("median", "min"),
        default="median",
        help="summary of a point's timings (min resists load from other processes)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads on CPU (default: cores - 1, as vLLM's CPU worker binds them)",
    )
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--seed", type=int, default=0, help="seed of the grid order and split")
    parser.add_argument("--out", type=Path, help="profile file (default: the profile store)")
    parser.add_argument("--summary", type=Path, help="also write a JSON summary here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_profile(args: argparse.Namespace) -> int:
    """Profile, train and save as `args` says; print the MAPE table and the path."""
    from adaptivellm.predictors.features import ModelShape

    if args.device == "cuda" and not _cuda_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        shape, name = _model_shape(args.model, args.dtype)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read the model's config.json: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    assert isinstance(shape, ModelShape)
    profile = measure_and_train(args, shape, name)
    from adaptivellm.predictors.store import save_profile

    path = save_profile(profile, args.out)
    print(format_table(profile))
    print(f"profile: {path}")
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary(profile, path), indent=2) + "\n")
        print(f"summary: {args.summary}")
    return EXIT_OK


def measure_and_train(args: argparse.Namespace, shape: Any, name: str) -> Any:
    """Run the profiler over the grid `args` selects and train both cost models."""
    from adaptivellm.predictors.profiler import ProfileGrid, profile
    from adaptivellm.predictors.store import Profile, ProfileKey
    from adaptivellm.predictors.train import KINDS, fit

    grid = ProfileGrid.default(quick=args.quick)
    grid = dataclasses.replace(
        grid, reps=args.reps or grid.reps, statistic=args.statistic, block_size=args.block_size
    )
    threads = args.threads or (_default_threads() if args.device == "cpu" else None)
    result = profile(shape, args.dtype, args.device, grid, args.seed, not args.no_progress, threads)
    samples = {"swap": result.swap, "recompute": result.recompute}
    costs = {kind: fit(kind, samples[kind], seed=args.seed) for kind in KINDS}
    meta = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command_line(),
        "grid": dataclasses.asdict(grid),
        "threads": threads,
    }
    key = ProfileKey.for_shape(shape, args.device, args.dtype, model=name)
    return Profile(key, shape, costs, samples, meta)


def format_table(profile: Any) -> str:
    """The held-out error table of a profile."""
    rows = [f"{'cost':<10} {'samples':>7} {'train':>5} {'test':>4} {'MAPE':>7} {'baseline':>8}"]
    for kind, cost in profile.costs.items():
        rows.append(
            f"{kind:<10} {len(profile.samples[kind]):>7} {cost.n_train:>5} {cost.n_test:>4} "
            f"{cost.mape:>6.2f}% {cost.baseline_mape:>7.2f}%"
        )
    return "\n".join(rows)


def summary(profile: Any, path: Path) -> dict[str, Any]:
    """A small JSON summary of a profile run (for bench/results)."""
    return {
        "command": profile.meta["command"],
        "created": profile.meta["created"],
        "profile": str(path),
        "key": dataclasses.asdict(profile.key),
        "device": profile.key.device,
        "dtype": profile.key.dtype,
        "model_shape": dataclasses.asdict(profile.shape),
        "grid": profile.meta["grid"],
        "threads": profile.meta["threads"],
        "samples": {kind: len(s) for kind, s in profile.samples.items()},
        "held_out": {kind: cost.n_test for kind, cost in profile.costs.items()},
        "mape": {kind: round(cost.mape, 3) for kind, cost in profile.costs.items()},
        "baseline_mape": {
            kind: round(cost.baseline_mape, 3) for kind, cost in profile.costs.items()
        },
    }


def _model_shape(model: str | None, dtype: str) -> tuple[Any, str]:
    from adaptivellm.predictors.features import ModelShape

    if model is None:
        # The embedded model's shape, straight from its spec: no build (and no transformers)
        # needed, and equal to ModelShape.from_hf_config of the built model's config.json.
        from adaptivellm.model import DEFAULT_MODEL_NAME, ModelSpec

        return ModelShape.from_spec(ModelSpec(), dtype), DEFAULT_MODEL_NAME
    path = Path(model)
    config = path / "config.json" if path.is_dir() else path
    return ModelShape.from_hf_config(json.loads(config.read_text()), dtype), str(path)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _default_threads() -> int:
    from adaptivellm.cpu import cpu_count

    return max(1, cpu_count() - 1)


def _command_line() -> str:
    argv = sys.argv[1:]
    prog = "adaptivellm" if Path(sys.argv[0]).name == "adaptivellm" else None
    head = prog or "python -m adaptivellm.predictors.cli"
    return " ".join([head, *map(shlex.quote, argv)])


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m adaptivellm.predictors.cli`."""
    parser = argparse.ArgumentParser(
        prog="python -m adaptivellm.predictors.cli", description=__doc__.splitlines()[0]
    )
    add_profile_arguments(parser)
    return run_profile(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
