"""What one decode step of split sessions costs to hand from the engine core to the model runner.

A split session is a streaming-input request: each decode token is a new chunk, and vLLM 0.32
sends a resumed streaming request to the model runner as a new request (`NewRequestData`) with
the session's whole `prompt_embeds`. So every token of every split session carried its whole
context (rows x hidden x dtype bytes) through the executor's queue to the worker. AdaptiveLLM
now sends only the rows the worker does not hold yet, and the worker appends them to its own
copy (`adaptivellm.split_wire.send_new_rows` / `receive_rows`, the runner patch in
`patches/split_runner.py`).

This benchmark measures that hand-off alone, through vLLM's own `MessageQueue` (the
shared-memory broadcast queue through which the multiprocess executor sends each step's
`SchedulerOutput` to its workers; vLLM's CPU backend uses it too) to a worker process, which
answers on a second queue as the executor's workers do. One step holds S split sessions at a
context of C rows, one `NewRequestData` each, sent two ways in alternation:

- `whole`: every session's whole context, what vLLM sends (and this project sent before);
- `new_rows`: one row per session and its offset, rebuilt on the worker's side by
  `receive_rows`, as the runner patch does.

Shapes: the capacity benchmark's 16-layer model (hidden 256, float32) and Llama-3-8B's (hidden
4096, bfloat16). Reported per case: bytes of tensor data per step and the step's hand-off time
(enqueued to the worker's answer, the worker's rebuild included), median and p10-p90 over
`--repeats`, and the ratio.
Results are written after every case.

    python bench/split_transfer.py            # writes bench/results/split_transfer.json
    python bench/split_transfer.py --repeats 3 --contexts 64 --sessions 2   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm import tqdm

from adaptivellm import __version__
from adaptivellm.compat import installed_vllm
from adaptivellm.cpu import cpu_count
from adaptivellm.split_wire import EXTRA_KEY, receive_rows, send_new_rows

RESULTS = Path(__file__).resolve().parent / "results"
#: name -> (hidden size, dtype)
SHAPES: dict[str, tuple[int, torch.dtype]] = {
    "bench-16-layer": (256, torch.float32),
    "llama-3-8b": (4096, torch.bfloat16),
}
MODES = ("whole", "new_rows")


def step_output(sessions: list[tuple[str, torch.Tensor]], context: int) -> Any:
    """A decode step's SchedulerOutput: one NewRequestData per session, at `context` rows."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput

    output = SchedulerOutput.make_empty()
    for req_id, buffer in sessions:
        params = SamplingParams(max_tokens=1, extra_args={EXTRA_KEY: {"layer": 4}})
        output.scheduled_new_reqs.append(
            NewRequestData(
                req_id=req_id,
                prompt_token_ids=None,
                mm_features=[],
                sampling_params=params,
                pooling_params=None,
                block_ids=([*range(context // 16 + 1)],),
                num_computed_tokens=context - 1,
                lora_request=None,
                prompt_embeds=buffer[:context],
            )
        )
        output.num_scheduled_tokens[req_id] = 1
    output.total_num_scheduled_tokens = len(sessions)
    return output


def tensor_bytes(output: Any) -> int:
    return sum(d.prompt_embeds.numel() * d.prompt_embeds.element_size()
               for d in output.scheduled_new_reqs)  # fmt: skip


def worker(handle: Any, pipe: Any) -> None:
    """The model runner's side, in its own process: take each step's output off the queue, put
    the rows the runner holds back in front (what the runner patch does) and answer with the
    rows each session now has."""
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    torch.set_num_threads(1)
    steps = MessageQueue.create_from_handle(handle, 0)
    replies = MessageQueue(1, 1)
    pipe.send(replies.export_handle())
    steps.wait_until_ready()
    replies.wait_until_ready()
    held: dict[str, SimpleNamespace] = {}  # each session as the runner holds it
    while (message := steps.dequeue(indefinite=True)) is not None:
        _, (output,), _, _ = message
        for data in output.scheduled_new_reqs:
            state = held.setdefault(data.req_id, SimpleNamespace(prompt_embeds=None))
            receive_rows(state, state.prompt_embeds, data)
            state.prompt_embeds = data.prompt_embeds
        replies.enqueue([d.prompt_embeds.shape[0] for d in output.scheduled_new_reqs])


class Runner:
    """A worker process and the two queues to it (steps out, replies back), as vLLM's
    multiprocess executor has them."""

    def __init__(self) -> None:
        from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

        self.steps = MessageQueue(1, 1)
        context = multiprocessing.get_context("spawn")
        mine, theirs = context.Pipe()
        self.process = context.Process(target=worker, args=(self.steps.export_handle(), theirs))
        self.process.start()
        if not mine.poll(120):
            raise RuntimeError("the worker process did not start")
        self.replies = MessageQueue.create_from_handle(mine.recv(), 0)
        self.steps.wait_until_ready()
        self.replies.wait_until_ready()

    def step(self, output: Any) -> list[int]:
        self.steps.enqueue(("execute_model", (output,), {}, 0))
        return self.replies.dequeue(timeout=120)

    def close(self) -> None:
        self.steps.enqueue(None)
        self.process.join(timeout=30)


def measure(
    runner: Runner, case: str, hidden: int, dtype: torch.dtype, context: int, sessions: int,
    repeats: int,
) -> dict:  # fmt: skip
    """Both modes, alternated, `repeats` steps each."""
    total = context + repeats + 2
    # Each mode has its own sessions, so that what the worker holds follows that mode alone.
    buffers = {
        m: [(f"{case}-{m}-{i}", torch.randn(total, hidden).to(dtype)) for i in range(sessions)]
        for m in MODES
    }
    times: dict[str, list[float]] = {m: [] for m in MODES}
    sent: dict[str, int] = {}
    for mode in MODES:  # each session's first chunk: the whole prompt, both ways
        runner.step(step_output(buffers[mode], context))
    for r in range(repeats):
        rows = context + 1 + r
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            output = step_output(buffers[mode], rows)
            if mode == "new_rows":
                for data in output.scheduled_new_reqs:
                    send_new_rows(data, rows - 1)
            sent[mode] = tensor_bytes(output)
            start = time.perf_counter()
            lengths = runner.step(output)
            times[mode].append(time.perf_counter() - start)
            if lengths != [rows] * sessions:
                raise AssertionError(f"{mode}: the worker rebuilt {lengths}, not {rows} rows")
    row: dict[str, Any] = {
        "hidden": hidden, "dtype": str(dtype).removeprefix("torch."), "context": context,
        "sessions": sessions, "repeats": repeats,
    }  # fmt: skip
    for mode in MODES:
        us = sorted(1e6 * t for t in times[mode])
        row[mode] = {
            "tensor_bytes_per_step": sent[mode],
            "us_per_step_median": statistics.median(us),
            "us_per_step_p10": us[int(0.1 * (len(us) - 1))],
            "us_per_step_p90": us[int(0.9 * (len(us) - 1))],
        }
    row["time_ratio_whole_over_new_rows"] = (
        row["whole"]["us_per_step_median"] / row["new_rows"]["us_per_step_median"]
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--contexts", nargs="+", type=int, default=[128, 512, 2048])
    parser.add_argument("--sessions", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS / "split_transfer.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.contexts) < 1 or min(args.sessions) < 1:
        parser.error("--repeats, --contexts and --sessions must be positive")
    torch.set_num_threads(1)
    found = installed_vllm()
    report: dict[str, Any] = {
        "command": shlex.join(["python", *sys.argv]),
        "method": " ".join(__doc__.split("\n\n")[2:5]).replace("\n", " "),
        "machine": {"platform": platform.platform(), "cpus": cpu_count()},
        "versions": {"adaptivellm": __version__, "vllm": found[1] if found else None},
        "cases": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cases = [(s, c, n) for s in args.shapes for c in args.contexts for n in args.sessions]
    runner = Runner()
    try:
        for i, (shape, context, sessions) in enumerate(tqdm(cases, unit="case")):
            hidden, dtype = SHAPES[shape]
            row = measure(runner, f"c{i}", hidden, dtype, context, sessions, args.repeats)
            report["cases"].append({"shape": shape, **row})
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        runner.close()
    for row in report["cases"]:
        print(f"{row['shape']:>15} C={row['context']:>5} S={row['sessions']:>3}: whole "
              f"{row['whole']['us_per_step_median']:9.0f} us "
              f"({row['whole']['tensor_bytes_per_step'] / 1e6:7.2f} MB), new rows "
              f"{row['new_rows']['us_per_step_median']:7.0f} us "
              f"({row['new_rows']['tensor_bytes_per_step'] / 1e3:6.1f} KB), "
              f"{row['time_ratio_whole_over_new_rows']:.1f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
