"""bench/split_transfer.py: the step it builds and a short run through vLLM's real MessageQueue
to a worker process (the script itself, as a user runs it)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.support import load_bench_script

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench() -> types.ModuleType:
    return load_bench_script("split_transfer")


def test_a_step_holds_one_new_request_per_session_at_its_context(bench: types.ModuleType) -> None:
    buffers = [(f"s{i}", torch.randn(20, 8)) for i in range(3)]
    output = bench.step_output(buffers, 12)
    assert [d.req_id for d in output.scheduled_new_reqs] == ["s0", "s1", "s2"]
    assert all(d.prompt_embeds.shape == (12, 8) for d in output.scheduled_new_reqs)
    assert output.total_num_scheduled_tokens == 3
    assert bench.tensor_bytes(output) == 3 * 12 * 8 * 4


def test_a_short_run_sends_fewer_bytes_and_the_worker_rebuilds_every_context(
    tmp_path: Path,
) -> None:
    out = tmp_path / "split_transfer.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "split_transfer.py"), "--repeats", "3",
         "--contexts", "40", "--sessions", "2", "--shapes", "bench-16-layer", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    (case,) = json.loads(out.read_text())["cases"]
    # The script checks on the worker's answer that each session came back whole: 41-43 rows.
    assert case["whole"]["tensor_bytes_per_step"] == 2 * 43 * 256 * 4  # the last step's
    assert case["new_rows"]["tensor_bytes_per_step"] == 2 * 1 * 256 * 4
    assert case["whole"]["us_per_step_median"] > 0 and case["new_rows"]["us_per_step_median"] > 0


def test_bad_arguments_are_refused(bench: types.ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
