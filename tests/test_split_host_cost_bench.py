"""bench/split_host_cost.py's pure parts: reading py-spy's stacks of the API server, and the
summary of CPU per token by mode (no server)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from tests.support import load_bench_script


@pytest.fixture(scope="module")
def bench() -> types.ModuleType:
    return load_bench_script("split_host_cost")


LOOP = "_run_module_as_main (<frozen runpy>:198);run (uvloop/__init__.py:92);Runner.run (x.py:1)"


def test_event_loop_shares_count_the_loop_thread_only(bench: types.ModuleType) -> None:
    lines = [
        f"{LOOP};handle_inputs (a.py:1);deepcopy (copy.py:1);deepcopy (copy.py:2) 6",
        f"{LOOP};run_asgi (b.py:1);Session._send (s.py:1) 3",
        f"{LOOP} 1",  # the loop's own C code
        "Thread._bootstrap (threading.py:1);Condition.wait (threading.py:2) 50",  # idle pool
        "not a stack",
        "",
    ]
    shares = bench.event_loop_shares(lines, top=10)
    assert shares["event_loop_samples"] == 10
    assert dict(shares["entry"]) == {"handle_inputs": 0.6, "run_asgi": 0.3, "(event loop)": 0.1}
    inclusive = dict(shares["inclusive"])
    # A recursive function counts once per stack; frames above the loop are not counted.
    assert inclusive["deepcopy"] == 0.6
    assert inclusive["Session._send"] == 0.3
    assert "Condition.wait" not in inclusive and "run" not in inclusive


def test_event_loop_shares_keep_the_top_functions(bench: types.ModuleType) -> None:
    lines = [f"{LOOP};f{i} (m.py:1) {i + 1}" for i in range(5)]
    shares = bench.event_loop_shares(lines, top=2)
    assert [name for name, _ in shares["entry"]] == ["f4", "f3"]
    assert shares["event_loop_samples"] == 15


def _run(
    mode: str, api: float, engine: float, worker: float, forward: float, passes: int = 100
) -> dict:
    return {
        "mode": mode,
        "tokens": 300,
        "forward_passes": passes,
        "cpu_ms_per_token": {"api_server": api, "engine_core": engine, "worker": worker},
        "forward_ms_per_token": forward,
    }


def test_summary_pairs_each_split_mode_with_whole_in_its_round(bench: types.ModuleType) -> None:
    rounds = [
        [_run("whole", 0.5, 6.0, 4.0, 7.0), _run("split@16", 2.0, 3.0, 1.0, 0.4, 250)],
        [_run("split@16", 3.0, 3.0, 1.0, 0.5, 300), _run("whole", 1.0, 6.0, 2.0, 6.0)],
        [_run("whole", 0.5, 6.0, 4.0, 7.5), _run("split@16", 1.0, 3.0, 1.0, 0.3, 200)],
    ]
    summary = bench.summarise(rounds, ["whole", "split@16"])
    split = summary["split@16"]
    assert split["api_server_cpu_ms_per_token"] == {"median": 2.0, "min": 1.0, "max": 3.0}
    # Ratios and differences per round (4, 3 and 2; 1.5, 2 and 0.5), not of the medians.
    assert split["api_server_cpu_vs_whole"] == {"median": 3.0, "min": 2.0, "max": 4.0}
    extra = split["api_server_extra_cpu_ms_per_token_vs_whole"]
    assert extra == {"median": 1.5, "min": 0.5, "max": 2.0}
    assert split["engine_cpu_ms_per_token"]["median"] == 4.0
    assert summary["whole"]["engine_cpu_ms_per_token"] == {"median": 10.0, "min": 8.0, "max": 10.0}
    assert summary["whole"]["forward_ms_per_token"]["median"] == 7.0
    assert "api_server_cpu_vs_whole" not in summary["whole"]
    # Output tokens per pass: 300 tokens in 100 passes whole, in 200-300 passes split.
    assert summary["whole"]["output_tokens_per_pass"] == {"median": 3.0, "min": 3.0, "max": 3.0}
    assert split["output_tokens_per_pass"] == {"median": 1.2, "min": 1.0, "max": 1.5}


def test_summary_compares_splits_with_streamed_and_streamed_with_whole(
    bench: types.ModuleType,
) -> None:
    rounds = [
        [
            _run("whole", 0.5, 1.0, 1.0, 1.0),
            _run("streamed", 1.0, 1.0, 1.0, 1.0),
            _run("split@16", 3.0, 1.0, 1.0, 1.0),
        ],
        [
            _run("split@16", 2.0, 1.0, 1.0, 1.0),
            _run("streamed", 2.0, 1.0, 1.0, 1.0),
            _run("whole", 1.0, 1.0, 1.0, 1.0),
        ],
    ]
    summary = bench.summarise(rounds, ["whole", "streamed", "split@16"])
    split = summary["split@16"]
    # Per round: split / whole 6 and 2, split / streamed 3 and 1 (medians of the medians
    # would read 2.5 / 0.75 = 3.33 and 2.5 / 1.5 = 1.67).
    assert split["api_server_cpu_vs_whole"] == {"median": 4.0, "min": 2.0, "max": 6.0}
    assert split["api_server_cpu_vs_streamed"] == {"median": 2.0, "min": 1.0, "max": 3.0}
    extra = split["api_server_extra_cpu_ms_per_token_vs_streamed"]
    assert extra == {"median": 1.0, "min": 0.0, "max": 2.0}
    streamed = summary["streamed"]
    assert streamed["api_server_cpu_vs_whole"] == {"median": 2.0, "min": 2.0, "max": 2.0}
    assert streamed["api_server_extra_cpu_ms_per_token_vs_whole"]["median"] == 0.75
    assert "api_server_cpu_vs_streamed" not in streamed
    assert not any("_vs_" in key for key in summary["whole"])


def test_streamed_token_ids_join_the_chunks_in_order(bench: types.ModuleType) -> None:
    def chunk(*ids: int | None) -> types.SimpleNamespace:
        choices = [types.SimpleNamespace(token_ids=None if i is None else [i]) for i in ids]
        return types.SimpleNamespace(choices=choices)

    chunks = [chunk(5), chunk(7), chunk(), chunk(9), chunk(None)]  # the last: no ids
    assert bench.streamed_token_ids(chunks) == [5, 7, 9]
    assert bench.streamed_token_ids([]) == []


def test_the_profile_samples_the_first_split_mode(bench: types.ModuleType) -> None:
    assert bench.profiled_mode(["whole", "streamed", "split@16", "split@8"]) == "split@16"
    assert bench.profiled_mode(["split@8"]) == "split@8"


def test_summary_skips_a_ratio_over_zero(bench: types.ModuleType) -> None:
    rounds = [
        [_run("whole", 0.0, 1.0, 1.0, 1.0), _run("split@16", 1.0, 1.0, 1.0, 1.0)],
        [_run("whole", 0.5, 1.0, 1.0, 1.0), _run("split@16", 1.5, 1.0, 1.0, 1.0)],
    ]
    split = bench.summarise(rounds, ["whole", "split@16"])["split@16"]
    assert split["api_server_cpu_vs_whole"] == {"median": 3.0, "min": 3.0, "max": 3.0}
    extra = split["api_server_extra_cpu_ms_per_token_vs_whole"]
    assert extra == {"median": 1.0, "min": 1.0, "max": 1.0}


def test_summary_without_whole_has_no_ratio(bench: types.ModuleType) -> None:
    summary = bench.summarise([[_run("split@8", 1.0, 1.0, 1.0, 1.0)]], ["split@8"])
    assert "api_server_cpu_vs_whole" not in summary["split@8"]


def test_bad_arguments_are_refused_before_any_server_starts(
    bench: types.ModuleType, tmp_path: Path
) -> None:
    """--model must be a checkpoint folder (its layer count comes from its config.json), and
    --layers-at must name layers of the model (0: served whole through the protocol)."""
    with pytest.raises(SystemExit):
        bench.main(["--model", str(tmp_path), "--out", str(tmp_path / "x.json")])
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    with pytest.raises(SystemExit):  # layer 8 of a 4-layer model
        bench.main(["--model", str(tmp_path), "--layers-at", "8", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        bench.main(["--layers-at", "-1"])
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "x").exists()
