"""Sessions served whole (k = 0): what the split protocol costs over an ordinary request.

When the planner keeps a split client's session on the server (no split meets its SLA, or the
client is slow), the server runs every layer and decodes on its own, streaming every token. Until
the `Prompt` message, the prompt then went up as its embeddings: `hidden_size` values per token
instead of one token id, and the engine took it as `prompt_embeds`. bench/split_serving.py found
such sessions taking about twice an ordinary request's latency. A client now offers the token ids
(`Open.prompt_ids`, on by default) and the server takes them as an ordinary prompt.

This benchmark starts one `adaptivellm serve --split-execution` on the deep model
(bench/split_serving.py's, `--layers` 16) and serves each of `--requests` seeded requests
(ShareGPT prompt and output lengths, clipped to `--max-prompt` and `--max-tokens`, random token
ids) three ways, one at a time and in rotated order, for `--rounds` rounds:

- `ordinary`: the real `openai` client, `/v1/completions` on the token ids;
- `embeddings`: `SplitClient(prompt_ids=False)` at k = 0 (as an older client does);
- `ids`: `SplitClient()` at k = 0 (the prompt's token ids).

All on localhost: the measured latency (call to last token) holds no link time. What each sends
up is reported in bytes, with what that takes on the uplink of each of bench/split_serving.py's
client tiers (`upload_s_by_tier`). Reported per mode: median latency, and per request and round
the ratio to `ordinary` in the same round (median, p10, p90), and whether every mode's greedy
tokens equal ordinary's. Results are written after every round.

    python bench/split_whole.py              # writes bench/results/split_whole.json
    python bench/split_whole.py --rounds 1 --requests 4   # a smoke test
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import openai
import torch
from tqdm import tqdm

from adaptivellm.benchmark.simulator import write_report
from adaptivellm.benchmark.workloads import sharegpt_pairs
from adaptivellm.launch import adaptivellm_command, free_port, running_server
from adaptivellm.model import ModelSpec, ensure_model
from adaptivellm.split_client.client import SplitClient
from adaptivellm.split_client.planner import TOKEN_ID_BYTES, transfer_time

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
MODES = ("ordinary", "embeddings", "ids")
#: bench/split_serving.py's client tiers' uplinks (bits/s), for the upload time of each mode.
UPLINK_BPS = {"phone": 20e6, "laptop": 100e6, "workstation": 1e9}
MODEL_NAME = "split-bench"


def requests(n: int, max_prompt: int, max_tokens: int, seed: int) -> list[tuple[list[int], int]]:
    """`n` seeded (prompt token ids, output tokens) pairs of ShareGPT lengths."""
    rng = np.random.default_rng(seed)
    pairs = sharegpt_pairs()
    out = []
    for _ in range(n):
        prompt_len, out_len = pairs[int(rng.integers(len(pairs)))]
        prompt = rng.integers(10, 4000, size=int(np.clip(prompt_len, 4, max_prompt))).tolist()
        out.append((prompt, int(np.clip(out_len, 4, max_tokens))))
    return out


def rotated(round_index: int, request_index: int) -> tuple[str, ...]:
    """The order of the three modes for one request of one round: each goes first, second and
    third equally often."""
    shift = (round_index + request_index) % len(MODES)
    return MODES[shift:] + MODES[:shift]


def upload_bytes(mode: str, prompt_tokens: int, hidden_size: int) -> int:
    """Bytes of the prompt on the wire (payload; frame and JSON framing left out)."""
    if mode == "embeddings":
        return prompt_tokens * hidden_size * 4  # float32 frames (the deep model is float32)
    return prompt_tokens * TOKEN_ID_BYTES


def ratio_summary(ratios: list[float]) -> dict[str, Any]:
    if not ratios:
        return {"n": 0, "median": None, "p10": None, "p90": None}
    return {
        "n": len(ratios),
        "median": float(np.median(ratios)),
        "p10": float(np.quantile(ratios, 0.1)),
        "p90": float(np.quantile(ratios, 0.9)),
    }


def summarise(rows: list[dict[str, Any]], hidden_size: int) -> dict[str, Any]:
    """The JSON's figures from the rows measured so far (one per request, round and mode)."""
    by_key = {(r["round"], r["request"], r["mode"]): r for r in rows}
    latency: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        latency[mode] = float(np.median([r["latency_s"] for r in mine])) if mine else None
        if mode != "ordinary":
            pairs = [
                r["latency_s"] / base["latency_s"]
                for r in mine
                if (base := by_key.get((r["round"], r["request"], "ordinary"))) is not None
            ]
            ratios[mode] = ratio_summary(pairs)
    tokens = sum(r["prompt_tokens"] for r in rows if r["mode"] == "ordinary")
    count = sum(1 for r in rows if r["mode"] == "ordinary")
    mean_prompt = tokens / count if count else 0.0
    upload = {m: upload_bytes(m, round(mean_prompt), hidden_size) for m in MODES}
    return {
        "median_latency_s": latency,
        "latency_ratio_to_ordinary": ratios,
        "tokens_match": all(r["tokens_match"] for r in rows),
        "mean_prompt_tokens": mean_prompt,
        "upload_bytes_mean_prompt": upload,
        "upload_s_by_tier": {
            tier: {m: transfer_time(upload[m], bps, 0.0) for m in MODES}
            for tier, bps in UPLINK_BPS.items()
        },
    }


def serve_one(
    mode: str,
    prompt: list[int],
    max_tokens: int,
    ordinary: openai.OpenAI,
    clients: dict[str, SplitClient],
) -> tuple[float, list[int]]:
    """One request, one way: (latency, output token ids)."""
    began = time.perf_counter()
    if mode == "ordinary":
        out = ordinary.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )  # fmt: skip
        ids = list(getattr(out.choices[0], "token_ids", None) or [])
    else:
        done = clients[mode].generate(prompt, max_tokens=max_tokens, ignore_eos=True, layer=0)
        if done.plan.prompt_ids != (mode == "ids"):
            raise RuntimeError(f"{mode}: the plan says prompt_ids={done.plan.prompt_ids}")
        ids = list(done.token_ids)
    return time.perf_counter() - began, ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--layers", type=int, default=16, help="decoder layers of the model")
    parser.add_argument("--max-prompt", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "split_whole.json")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.requests < 1 or args.layers < 1:
        parser.error("--rounds, --requests and --layers must be >= 1")
    if args.max_prompt < 4 or args.max_tokens < 4 or args.max_prompt + args.max_tokens > 2048:
        parser.error("--max-prompt and --max-tokens must be >= 4 and fit the 2048-token context")
    torch.set_num_threads(1)  # the clients share the 2 cores with the server
    model_path = ensure_model(ModelSpec(num_layers=args.layers), name="adaptivellm-deep-llama")
    work = requests(args.requests, args.max_prompt, args.max_tokens, args.seed)
    port = free_port()
    flags = ["--enforce-eager", "--max-model-len", "2048", "--split-execution",
             "--served-model-name", MODEL_NAME]  # fmt: skip
    command = adaptivellm_command(str(model_path), port, flags)
    log = RESULTS / "logs" / "split_whole.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with running_server(command, port, log) as server:
        ordinary = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none",
                                 max_retries=0, timeout=300)  # fmt: skip
        clients = {
            "embeddings": SplitClient(server.base_url, model_path, prompt_ids=False,
                                      calibrate=False, timeout_s=300),
            "ids": SplitClient(server.base_url, model_path, calibrate=False, timeout_s=300),
        }  # fmt: skip
        hidden_size = clients["ids"].model.hidden_size
        for mode in MODES:  # warm-up, not measured: first passes and the client's embedding
            serve_one(mode, work[0][0], 4, ordinary, clients)
        for r in range(args.rounds):
            for i, (prompt, max_tokens) in enumerate(tqdm(work, desc=f"round {r + 1}")):
                outputs: dict[str, list[int]] = {}
                for mode in rotated(r, i):
                    latency, outputs[mode] = serve_one(mode, prompt, max_tokens, ordinary, clients)
                    rows.append({
                        "round": r, "request": i, "mode": mode, "latency_s": latency,
                        "prompt_tokens": len(prompt), "max_tokens": max_tokens,
                    })  # fmt: skip
                for row in rows[-len(MODES) :]:
                    row["tokens_match"] = outputs[row["mode"]] == outputs["ordinary"]
            save(args, argv, rows, hidden_size, command, partial=r + 1 < args.rounds)
        for client in clients.values():
            client.close()
    return 0


def save(
    args: argparse.Namespace,
    argv: list[str] | None,
    rows: list[dict[str, Any]],
    hidden_size: int,
    command: list[str],
    partial: bool,
) -> None:
    summary = summarise(rows, hidden_size)
    text = "  ".join(
        f"{m}: {v['median']:.2f}x ({v['p10']:.2f}-{v['p90']:.2f})"
        for m, v in summary["latency_ratio_to_ordinary"].items()
        if v["median"] is not None
    )
    write_report("bench/split_whole.py", argv, args.out, {
        "partial": partial,
        "rounds": args.rounds,
        "requests": args.requests,
        "layers": args.layers,
        "hidden_size": hidden_size,
        "server_command": shlex.join(command),
        **summary,
        "rows": rows,
    }, f"latency / ordinary's: {text}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
