"""Split execution on the model runner vLLM really uses (issue 36, item 2), without a model:

- the worker-side guard (patches.split_runner.check_runner, run by the split model's
  constructor) refuses Model Runner V2, a runner overriding `_model_forward`, full or breakable
  CUDA graphs, stock torch.compile and micro-batching;
- `adaptivellm serve --split-execution` selects what passes it (V1 runner, PIECEWISE graphs),
  simulating CUDA with `apply_defaults(..., is_cpu=False)`, and refuses operator choices that
  would not.

Configs are built the way vLLM's own tests build them (`VllmConfig()`, then fields set).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest
from vllm.config import CompilationMode, CUDAGraphMode, VllmConfig
from vllm.v1.worker.cpu.model_runner import CPUModelRunner as CPUModelRunnerV2
from vllm.v1.worker.cpu_model_runner import CPUModelRunner as CPUModelRunnerV1
from vllm.v1.worker.gpu.model_runner import GPUModelRunner as GPUModelRunnerV2
from vllm.v1.worker.gpu_model_runner import GPUModelRunner as GPUModelRunnerV1

from adaptivellm.patches import split_runner
from adaptivellm.patches.split_runner import (
    SplitRunnerError,
    building_runner,
    check_runner,
    install,
    is_hooked,
    runner_problems,
)
from adaptivellm.serve import apply_defaults, build_parser
from adaptivellm.split_model import AdaptiveSplitLlamaForCausalLM

V2_ENV = "VLLM_USE_V2_MODEL_RUNNER"
BREAKABLE_ENV = "VLLM_USE_BREAKABLE_CUDAGRAPH"


@pytest.fixture(autouse=True)
def hook_and_clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook installed (as in a split worker) and the runner switches restored after each
    test (set, then deleted, so that monkeypatch undoes what the code under test sets)."""
    install()
    for name in (V2_ENV, BREAKABLE_ENV, "VLLM_PLUGINS"):
        monkeypatch.setenv(name, "recorded")
        monkeypatch.delenv(name)


def v1_config(**compilation: Any) -> VllmConfig:
    """A config whose runner choice is V1 (what `serve --split-execution` sets)."""
    os.environ[V2_ENV] = "0"
    config = VllmConfig()
    for name, value in compilation.items():
        setattr(config.compilation_config, name, value)
    return config


# --- the hook and the runner classes -------------------------------------------------------


def test_hook_is_on_the_v1_runner_and_the_cpu_runner_that_inherits_it() -> None:
    assert is_hooked(GPUModelRunnerV1)
    assert is_hooked(CPUModelRunnerV1)
    install()  # idempotent: the wrapper wraps vLLM's method, not itself
    for method in split_runner.HOOKED:
        wrapped = getattr(GPUModelRunnerV1, method).__wrapped__
        assert not getattr(wrapped, split_runner.HOOK_MARK, False)


def test_model_runner_v2_is_not_hooked() -> None:
    assert not hasattr(GPUModelRunnerV2, "_model_forward")
    assert not is_hooked(GPUModelRunnerV2)
    assert not is_hooked(CPUModelRunnerV2)


@pytest.mark.parametrize("method", split_runner.HOOKED)
def test_a_runner_overriding_a_hooked_method_is_not_hooked(method: str) -> None:
    """Either override escapes the patch: start layers would not reach the model, or a resumed
    session's new rows would be taken for its whole context."""
    PlatformModelRunner = type(
        "PlatformModelRunner", (GPUModelRunnerV1,), {method: lambda self, *a, **k: None}
    )
    assert not is_hooked(PlatformModelRunner)
    problems = runner_problems(v1_config(), PlatformModelRunner)
    assert any("_update_streaming_request" in p for p in problems), problems


# --- the worker-side guard ----------------------------------------------------------------


def test_v1_runner_with_piecewise_graphs_passes() -> None:
    for graphs in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE):
        config = v1_config(cudagraph_mode=graphs)
        assert runner_problems(config, GPUModelRunnerV1) == []
        assert runner_problems(config, None) == []  # the config's choice: V1
        check_runner(config, CPUModelRunnerV1)


@pytest.mark.parametrize("runner_cls", [GPUModelRunnerV2, CPUModelRunnerV2])
def test_guard_fires_on_model_runner_v2_class(runner_cls: type) -> None:
    with pytest.raises(SplitRunnerError) as refused:
        check_runner(v1_config(), runner_cls)
    message = str(refused.value)
    assert f"{runner_cls.__module__}.{runner_cls.__qualname__}" in message  # the runner
    assert "layer 0" in message and "VLLM_USE_V2_MODEL_RUNNER=0" in message  # the fix


def test_guard_fires_when_the_config_selects_v2(monkeypatch: pytest.MonkeyPatch) -> None:
    config = VllmConfig()
    monkeypatch.setenv(V2_ENV, "1")  # what vLLM does by itself wherever Triton is present
    assert config.use_v2_model_runner
    with pytest.raises(SplitRunnerError, match="Model Runner V2"):
        check_runner(config)  # no runner on the stack: the config's choice is checked


def test_guard_finds_the_runner_building_the_model() -> None:
    config = v1_config()

    class V2LikeModelRunner:
        """Like Model Runner V2: a runner without `_model_forward`."""

        def execute_model(self) -> None: ...

        def load_model(self) -> None:
            check_runner(config)

    class HookedModelRunner(GPUModelRunnerV1):
        def load_model(self, *args: Any, **kwargs: Any) -> None:
            self.found = building_runner()
            check_runner(config)

    with pytest.raises(SplitRunnerError, match="V2LikeModelRunner"):
        V2LikeModelRunner().load_model()
    runner = object.__new__(HookedModelRunner)  # no device needed: only the class matters
    runner.load_model()
    assert runner.found is runner
    assert building_runner() is None  # a model built outside a runner: the config decides


@pytest.mark.parametrize(
    "graphs", [CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.FULL, CUDAGraphMode.FULL_DECODE_ONLY]
)
def test_guard_fires_under_full_cuda_graphs(graphs: CUDAGraphMode) -> None:
    with pytest.raises(SplitRunnerError, match=graphs.name):
        check_runner(v1_config(cudagraph_mode=graphs), GPUModelRunnerV1)


def test_guard_fires_under_breakable_cuda_graphs() -> None:
    config = v1_config(cudagraph_mode=CUDAGraphMode.PIECEWISE)
    os.environ[BREAKABLE_ENV] = "1"
    with pytest.raises(SplitRunnerError, match=BREAKABLE_ENV):
        check_runner(config, GPUModelRunnerV1)
    config.compilation_config.cudagraph_mode = CUDAGraphMode.NONE  # no graph captured at all
    check_runner(config, GPUModelRunnerV1)


def test_guard_fires_under_stock_torch_compile_and_micro_batching() -> None:
    config = v1_config(mode=CompilationMode.STOCK_TORCH_COMPILE)
    with pytest.raises(SplitRunnerError, match="STOCK_TORCH_COMPILE"):
        check_runner(config, GPUModelRunnerV1)
    config = v1_config()
    config.parallel_config.enable_dbo = True
    with pytest.raises(SplitRunnerError, match="micro-batching"):
        check_runner(config, GPUModelRunnerV1)


def test_split_model_refuses_to_build_on_model_runner_v2(monkeypatch: pytest.MonkeyPatch) -> None:
    config = VllmConfig()
    monkeypatch.setenv(V2_ENV, "1")
    with pytest.raises(SplitRunnerError, match="Model Runner V2"):
        AdaptiveSplitLlamaForCausalLM(vllm_config=config)


def test_split_model_refuses_full_graphs_before_building_layers() -> None:
    config = v1_config(cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    with pytest.raises(SplitRunnerError, match="FULL_AND_PIECEWISE"):
        AdaptiveSplitLlamaForCausalLM(vllm_config=config)  # no model config needed: it stops first


def test_the_written_for_version_is_the_required_one() -> None:
    from adaptivellm import VLLM_VERSION_REQUIRED

    assert split_runner.WRITTEN_FOR == VLLM_VERSION_REQUIRED


# --- serve's selection (CUDA simulated with is_cpu=False) ----------------------------------


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


@pytest.fixture
def llama(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return str(tmp_path)


def serve(parser: argparse.ArgumentParser, *argv: str, is_cpu: bool = False) -> tuple[Any, list]:
    args = parser.parse_args(["serve", *argv])
    return args, apply_defaults(args, False, is_cpu=is_cpu).notes


@pytest.mark.parametrize("is_cpu", [False, True])
def test_serve_selects_v1_runner_and_piecewise_graphs(
    parser: argparse.ArgumentParser, llama: str, is_cpu: bool
) -> None:
    args, notes = serve(parser, llama, "--split-execution", is_cpu=is_cpu)
    assert os.environ[V2_ENV] == "0"
    assert os.environ[BREAKABLE_ENV] == "0"
    assert args.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    said = " ".join(notes)
    assert "VLLM_USE_V2_MODEL_RUNNER=0" in said and "PIECEWISE" in said
    # What serve chose passes the worker's guard; CUDA's default would not.
    config = VllmConfig()
    config.compilation_config.cudagraph_mode = args.compilation_config.cudagraph_mode
    assert runner_problems(config, None) == []
    config.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    assert runner_problems(config, None)


def test_serve_without_split_changes_nothing(parser: argparse.ArgumentParser, llama: str) -> None:
    args, _ = serve(parser, llama)
    assert V2_ENV not in os.environ and BREAKABLE_ENV not in os.environ
    assert args.compilation_config.cudagraph_mode is None


@pytest.mark.parametrize("graphs", ["PIECEWISE", "NONE"])
def test_serve_keeps_a_safe_operator_graph_mode(
    parser: argparse.ArgumentParser, llama: str, graphs: str
) -> None:
    args, notes = serve(parser, llama, "--split-execution", f"-cc.cudagraph_mode={graphs}")
    assert args.compilation_config.cudagraph_mode == CUDAGraphMode[graphs]
    assert not any("cudagraph_mode PIECEWISE" in n for n in notes)


def test_serve_leaves_eager_and_o0_alone(parser: argparse.ArgumentParser, llama: str) -> None:
    args, _ = serve(parser, llama, "--split-execution", "--enforce-eager")
    assert args.compilation_config.cudagraph_mode is None  # vLLM turns graphs off
    args, _ = serve(parser, llama, "--split-execution", "-O0")
    assert args.compilation_config.cudagraph_mode is None  # O0's default: no graphs


@pytest.mark.parametrize("graphs", ["FULL_AND_PIECEWISE", "FULL", "FULL_DECODE_ONLY"])
def test_serve_refuses_full_graphs(
    parser: argparse.ArgumentParser, llama: str, graphs: str
) -> None:
    with pytest.raises(SystemExit, match=f"cudagraph_mode {graphs}"):
        serve(parser, llama, "--split-execution", f"-cc.cudagraph_mode={graphs}")
    # with --enforce-eager vLLM captures no graph, whatever the mode says
    serve(parser, llama, "--split-execution", f"-cc.cudagraph_mode={graphs}", "--enforce-eager")


def test_serve_refuses_model_runner_v2_and_keeps_v1(
    parser: argparse.ArgumentParser, llama: str
) -> None:
    os.environ[V2_ENV] = "1"
    with pytest.raises(SystemExit, match="VLLM_USE_V2_MODEL_RUNNER=1"):
        serve(parser, llama, "--split-execution")
    os.environ[V2_ENV] = "0"
    _, notes = serve(parser, llama, "--split-execution")
    assert os.environ[V2_ENV] == "0"
    assert not any("VLLM_USE_V2_MODEL_RUNNER=0" in n for n in notes)  # nothing to choose


def test_serve_refuses_breakable_graphs_compile_and_micro_batching(
    parser: argparse.ArgumentParser, llama: str
) -> None:
    os.environ[BREAKABLE_ENV] = "1"
    with pytest.raises(SystemExit, match=BREAKABLE_ENV):
        serve(parser, llama, "--split-execution")
    del os.environ[BREAKABLE_ENV]
    with pytest.raises(SystemExit, match="STOCK_TORCH_COMPILE"):
        serve(parser, llama, "--split-execution", "-cc.mode=1")
    with pytest.raises(SystemExit, match="enable-dbo"):
        serve(parser, llama, "--split-execution", "--enable-dbo")
