"""A real (tiny, seconds) profile -> train -> save -> load round trip, and the store's failure
modes: missing, garbage, truncated, wrong version and other-model profiles."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from adaptivellm.predictors.analytic import AnalyticPredictor
from adaptivellm.predictors.features import ModelShape, PreemptionFeatures
from adaptivellm.predictors.predictor import ProfilePredictor, load_predictor
from adaptivellm.predictors.profiler import ProfileGrid, profile
from adaptivellm.predictors.store import (
    Profile,
    ProfileError,
    ProfileKey,
    find_profile,
    load_profile,
    profile_path,
    save_profile,
)
from adaptivellm.predictors.train import KINDS, fit

# head_dim 32, two layers: one recompute step takes well under a millisecond.
TINY = ModelShape(
    num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=32,
    intermediate_size=128,
)  # fmt: skip
GRID = ProfileGrid(num_tokens=(16, 32, 64, 128, 256, 512), reps=3)
KEY = ProfileKey.for_shape(TINY, "cpu", "float32", model="tiny", vllm_version="0.32.0")


@pytest.fixture(scope="module")
def tiny_profile() -> Profile:
    result = profile(TINY, "float32", "cpu", GRID, progress=False, threads=1)
    samples = {"swap": result.swap, "recompute": result.recompute}
    costs = {kind: fit(kind, samples[kind]) for kind in KINDS}
    return Profile(KEY, TINY, costs, samples, {"command": "test"})


def test_profile_measures_the_grid(tiny_profile: Profile) -> None:
    """6 sizes, each measured for swap and for recompute; all timings positive and finite."""
    assert len(tiny_profile.samples["swap"]) == 6
    assert len(tiny_profile.samples["recompute"]) == 6
    for samples in tiny_profile.samples.values():
        assert all(0 < s.seconds < 10 for s in samples)
    for cost in tiny_profile.costs.values():
        assert math.isfinite(cost.mape) and cost.mape >= 0
        assert cost.n_test >= 1 and cost.n_train + cost.n_test >= 5


def test_swap_can_be_measured_at_its_own_sizes() -> None:
    """Swap sizes default to the recompute sizes, as in the standard grids, so
    oracle_agreement has every size to compare at; a grid may measure swap at others."""
    grid = ProfileGrid(num_tokens=(16, 64), reps=1, swap_num_tokens=(16, 32, 64))
    result = profile(TINY, "float32", "cpu", grid, progress=False, threads=1)
    assert [s.features.num_tokens for s in result.swap] == [16, 32, 64]
    assert [s.features.num_tokens for s in result.recompute] == [16, 64]
    assert GRID.swap_sizes == GRID.num_tokens
    for quick in (True, False):
        default = ProfileGrid.default(quick=quick)
        assert default.swap_sizes == default.num_tokens
        assert len(default.num_tokens) == (46 if quick else 82)
    with pytest.raises(ValueError, match="swap_num_tokens"):
        ProfileGrid(num_tokens=(16,), swap_num_tokens=(0, 16))


def test_round_trip_gives_same_predictions(tiny_profile: Profile, tmp_path: Path) -> None:
    path = save_profile(tiny_profile, profile_path(KEY, tmp_path))
    loaded = load_profile(path, expect=KEY)
    assert loaded.key == KEY and loaded.shape == TINY
    assert loaded.samples == tiny_profile.samples
    before, after = ProfilePredictor(tiny_profile), load_predictor(KEY, directory=tmp_path)
    assert isinstance(after, ProfilePredictor) and after.source == f"profile:{path}"
    for n in (16, 100, 300, 2000):
        f = PreemptionFeatures.for_victim(TINY, n, 16)
        assert after.swap_s(f) == before.swap_s(f) > 0
        assert after.recompute_s(f) == before.recompute_s(f) > 0


def test_profile_without_vllm_matches_any_vllm(tiny_profile: Profile, tmp_path: Path) -> None:
    """A torch-only profile (vLLM 'none') serves a vLLM key; the exact version is preferred."""
    save_profile(
        replace(tiny_profile, key=replace(KEY, vllm_version="none")), None
    ) if False else None
    torch_only = replace(tiny_profile, key=replace(KEY, vllm_version="none"))
    save_profile(torch_only, profile_path(torch_only.key, tmp_path))
    found = find_profile(KEY, tmp_path)
    assert found is not None and found.key.vllm_version == "none"
    save_profile(tiny_profile, profile_path(KEY, tmp_path))
    found = find_profile(KEY, tmp_path)
    assert found is not None and found.key.vllm_version == "0.32.0"
    assert find_profile(replace(KEY, dtype="bfloat16"), tmp_path) is None


def test_missing_profile_falls_back_to_analytic(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        predictor = load_predictor(KEY, directory=tmp_path)
    assert isinstance(predictor, AnalyticPredictor)
    assert "No cost profile" in caplog.text and "adaptivellm profile" in caplog.text
    f = PreemptionFeatures.for_victim(TINY, 64, 16)
    assert predictor.swap_s(f) > 0 and predictor.recompute_s(f) > 0


def _corrupt(tiny_profile: Profile, tmp_path: Path, how: str) -> Path:
    path = save_profile(tiny_profile, profile_path(KEY, tmp_path))
    text = path.read_text()
    data = json.loads(text)
    if how == "garbage":
        path.write_bytes(b"\x00\xffnot json")
    elif how == "truncated":
        path.write_text(text[: len(text) // 2])
    elif how == "version":
        path.write_text(json.dumps({**data, "version": 999}))
    elif how == "version-1":  # also measured recompute beside other batch tokens
        for sample in data["samples"]["recompute"]:
            sample["batch_tokens"] = 0
        path.write_text(json.dumps({**data, "version": 1}))
    elif how == "other-model":
        path.write_text(json.dumps({**data, "key": {**data["key"], "config_hash": "0" * 12}}))
    elif how == "bad-booster":
        data["costs"]["swap"]["booster_json"] = '{"learner": 3}'
        path.write_text(json.dumps(data))
    elif how == "missing-field":
        del data["costs"]["recompute"]
        path.write_text(json.dumps(data))
    return path


CORRUPTIONS = ["garbage", "truncated", "version", "version-1", "other-model", "bad-booster",
               "missing-field"]  # fmt: skip


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_profile_raises(tiny_profile: Profile, tmp_path: Path, how: str) -> None:
    path = _corrupt(tiny_profile, tmp_path, how)
    with pytest.raises(ProfileError):
        load_profile(path, expect=KEY)
    with pytest.raises(ProfileError):
        find_profile(KEY, tmp_path)


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_profile_falls_back_with_warning(
    tiny_profile: Profile, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    _corrupt(tiny_profile, tmp_path, how)
    with caplog.at_level(logging.WARNING):
        predictor = load_predictor(KEY, directory=tmp_path)
    assert isinstance(predictor, AnalyticPredictor)
    assert "Cannot use the cost profile" in caplog.text


def test_load_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no profile"):
        load_profile(tmp_path / "absent.json")


def test_profiler_training_and_store_import_no_vllm() -> None:
    """The torch backend runs on GPU machines without vLLM: it must never import it."""
    code = (
        "import sys\n"
        "import adaptivellm.predictors.cli, adaptivellm.predictors.profiler\n"
        "import adaptivellm.predictors.train, adaptivellm.predictors.predictor\n"
        "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_quick_profile_of_a_config(tmp_path: Path) -> None:
    """The standalone CLI on a tiny config.json: prints the table, writes profile and summary."""
    config = {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 128}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    out, summary = tmp_path / "p.json", tmp_path / "s.json"
    from adaptivellm.predictors import cli

    args = [str(tmp_path), "--quick", "--reps", "1", "--out", str(out),
            "--summary", str(summary), "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    data = json.loads(summary.read_text())
    assert set(data["mape"]) == {"swap", "recompute"}
    assert load_profile(out).shape.num_layers == 1
