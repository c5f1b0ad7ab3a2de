"""`adaptivellm split-client`: generate one completion by split execution against a server.

Wired into the `adaptivellm` CLI through `add_split_client_arguments` and `run_split_client`.
The text goes to stdout (token by token with `--stream`) and a one-line summary to stderr;
`--json` prints a JSON summary instead. Exit codes: 0 done, 1 the session failed (connection,
authentication, server error), 2 bad input. torch and transformers are imported only when the
command runs, so building the `adaptivellm` parser stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adaptivellm.split_client.client import SplitCompletion
    from adaptivellm.split_client.protocol import Token

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def add_split_client_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `split-client` subcommand's flags to `parser`."""
    parser.add_argument("prompt", help="the prompt (tokenized here with the model's tokenizer)")
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--model-path",
        default=None,
        help="the checkpoint the server serves (default: the embedded model)",
    )
    parser.add_argument("--api-key", default=None, help="the server's --api-key")
    parser.add_argument(
        "--layer", type=int, default=None, help="force the split layer k (default: server plans)"
    )
    parser.add_argument("--sla-s", type=float, default=None, help="end-to-end latency SLA")
    parser.add_argument(
        "--client-memory-gb",
        type=float,
        default=None,
        help="memory this machine can give the model's layers, weights and KV cache "
        "(default: the free memory measured here); the server plans no more layers than fit",
    )
    parser.add_argument(
        "--no-prompt-ids",
        action="store_true",
        help="when the server serves the session whole (k = 0), send the prompt's embeddings "
        "rather than its token ids (for a server older than that, which refuses the offer)",
    )
    parser.add_argument(
        "--no-one-answer",
        action="store_true",
        help="without --stream, still take a session the server serves whole (k = 0) a token "
        "a message rather than in one answer (for a server older than that, which refuses it)",
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="(default: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="(default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0, help="(default: 0, off)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--ignore-eos", action="store_true", help="generate past end-of-text")
    parser.add_argument(
        "--timeout-s", type=float, default=60.0, help="wait per server reply (default: 60)"
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    output.add_argument("--json", action="store_true", help="print a JSON summary")


def run_split_client(args: argparse.Namespace) -> int:
    """Run one split generation as `args` describe, print it, return the exit code."""
    from adaptivellm.split_client.client import SplitClient, SplitError

    def on_token(token: Token) -> None:
        print(token.text, end="", flush=True)

    try:
        with SplitClient(
            args.url,
            _model_path(args),
            api_key=args.api_key,
            layer=args.layer,
            sla_s=args.sla_s,
            timeout_s=args.timeout_s,
            memory_bytes=None if args.client_memory_gb is None else args.client_memory_gb * 2**30,
            prompt_ids=not args.no_prompt_ids,
            one_answer=not args.no_one_answer,
        ) as client:
            done = client.generate(
                args.prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                ignore_eos=args.ignore_eos,
                on_token=on_token if args.stream else None,
            )
    except SplitError as exc:
        if args.stream:
            print(file=sys.stdout)
        print(f"adaptivellm split-client: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, OSError) as exc:
        print(f"adaptivellm split-client: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _report(done, args)
    return EXIT_OK


def _model_path(args: argparse.Namespace) -> str:
    if args.model_path:
        return str(args.model_path)
    from adaptivellm.model import ensure_model

    return str(ensure_model())


def _report(done: SplitCompletion, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(summary(done), indent=2, allow_nan=False))
        return
    print("" if args.stream else done.text, flush=True)
    plan = done.plan
    print(
        f"split-client: k={plan.layer} of {plan.num_layers} layers ({plan.planned_by}), "
        f"{len(done.token_ids)} tokens ({done.finish_reason}), "
        f"mean round trip {_ms(done.mean_round_trip_s)} ms, "
        f"client compute {_ms(done.mean_client_compute_s)} ms/step",
        file=sys.stderr,
    )


def _ms(seconds: float) -> float | None:
    return round(seconds * 1e3, 3) if math.isfinite(seconds) else None


def summary(done: SplitCompletion) -> dict[str, Any]:
    """JSON-ready summary of a split generation (what `--json` prints); times in ms."""
    plan = dataclasses.asdict(done.plan)
    return {
        "text": done.text,
        "token_ids": done.token_ids,
        "prompt_tokens": len(done.prompt_token_ids),
        "finish_reason": done.finish_reason,
        "layer": done.layer,
        "num_layers": done.plan.num_layers,
        "mean_round_trip_ms": _ms(done.mean_round_trip_s),
        "mean_client_compute_ms": _ms(done.mean_client_compute_s),
        "total_ms": _ms(done.total_s),
        "plan": {k: v for k, v in plan.items() if not isinstance(v, float) or math.isfinite(v)},
        "steps": [
            {
                "index": t.index,
                "client_compute_ms": _ms(t.client_compute_s),
                "round_trip_ms": _ms(t.round_trip_s),
                "server_step_ms": _ms(t.server_step_s),
            }
            for t in done.timings
        ],
    }
