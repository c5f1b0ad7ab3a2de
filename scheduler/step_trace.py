"""A per-step trace of the engine, for diagnosing where a policy's time goes.

Off unless the environment variable ADAPTIVELLM_STEP_TRACE names a folder: then every
AdaptiveScheduler (one per engine core) appends one JSON line per engine step to
`<folder>/steps-<pid>.jsonl`, after a header line with its policy and flags (and the name in
ADAPTIVELLM_STEP_TRACE_NAME, which the benchmark harness sets to the system's). A step's line
holds, in seconds of time.perf_counter() and counts:

- `t`: when schedule() was entered; `sched_s`: the time schedule() took (the policy's
  reordering and victim choice, then vLLM's own scheduling);
- `exec_s`: from schedule()'s return to update_from_output()'s entry (the model's forward
  pass and sampling; on CPU it also holds what the engine core does between the two);
- `update_s`: the time update_from_output() took;
- `prefill`, `decode`: prompt tokens computed and requests decoding in the step; `context`:
  the tokens of KV cache the step's requests attend over; `running`, `waiting`: the queues
  after scheduling; `preempted`: requests preempted in the step.

The gap from one step's update_from_output() to the next schedule() is the engine core's
loop (sending outputs, taking in requests): `t` of the next line minus this one's
`t + sched_s + exec_s + update_s`. bench/step_trace.py reads the folder and compares the
policies step by step. Each line is written as its step ends (line-buffered), so a server
stopped by a signal loses at most the step it was in; tracing costs a write per step.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

#: Names the folder to trace into; unset or empty: no trace.
STEP_TRACE_ENV = "ADAPTIVELLM_STEP_TRACE"
#: The server's name in its header (the benchmark harness sets it to the system's name).
STEP_TRACE_NAME_ENV = "ADAPTIVELLM_STEP_TRACE_NAME"


@dataclass
class StepTrace:
    """The open trace file of one scheduler."""

    path: Path
    file: IO[str]

    @classmethod
    def from_env(cls, header: dict[str, Any]) -> StepTrace | None:
        """The trace named by ADAPTIVELLM_STEP_TRACE with `header` written, or None when the
        variable is unset. A folder that cannot be created or written fails loudly at start-up
        (OSError naming it), not at the first step."""
        folder = os.environ.get(STEP_TRACE_ENV, "").strip()
        if not folder:
            return None
        path = Path(folder) / f"steps-{os.getpid()}.jsonl"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            file = path.open("a", buffering=1)  # line-buffered: each step is on disk as it ends
        except OSError as e:
            raise OSError(f"{STEP_TRACE_ENV}={folder}: cannot write {path}: {e}") from e
        trace = cls(path, file)
        named = {"name": n} if (n := os.environ.get(STEP_TRACE_NAME_ENV, "").strip()) else {}
        trace.write({"header": True, "pid": os.getpid(), **named, **header})
        return trace

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def step(
        self,
        t: float,
        sched_s: float,
        exec_s: float,
        update_s: float,
        counts: dict[str, int],
    ) -> None:
        """One step's line: its times (see the module docstring) and `counts`."""
        self.write({
            "t": round(t, 6), "sched_s": round(sched_s, 7), "exec_s": round(exec_s, 7),
            "update_s": round(update_s, 7), **counts,
        })  # fmt: skip


def read_trace(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A trace file's header and its steps. A last line cut short (the server was killed while
    writing it) is dropped; any other line that is not JSON, or a file without its header,
    raises ValueError naming the file and line."""
    lines = path.read_text().splitlines()
    header: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break  # the step the server was in when it stopped
            raise ValueError(f"{path}:{number}: not a JSON line: {e}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        if record.get("header"):
            header = record
        elif header is None:
            raise ValueError(f"{path}:{number}: a step before the trace's header")
        else:
            steps.append(record)
    if header is None:
        raise ValueError(f"{path}: no header line (not an {STEP_TRACE_ENV} trace?)")
    return header, steps
