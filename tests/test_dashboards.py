"""The Grafana dashboard and the alert rules (dashboards/): generated files up to date, rules
valid and unit-tested with promtool, every metric family the project defines on a panel."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"


def load_generator() -> ModuleType:
    """dashboards/generate.py (a script, not a package) as a module."""
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generate() -> ModuleType:
    return load_generator()


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: `make install-dev` installs Debian's prometheus package"
    return path


def test_committed_files_are_what_the_generator_writes(generate: ModuleType) -> None:
    for name, text in generate.files().items():
        assert (DASHBOARDS / name).read_text() == text, (
            f"run python dashboards/generate.py ({name})"
        )


def test_rules_pass_promtool_check_and_unit_tests() -> None:
    check = subprocess.run([promtool(), "check", "rules", "alerts.yml"], cwd=DASHBOARDS,
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 7 rules found" in check.stdout
    test = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=DASHBOARDS,
                          capture_output=True, text=True)  # fmt: skip
    assert test.returncode == 0, test.stdout + test.stderr


def test_a_broken_rule_test_fails(generate: ModuleType, tmp_path: Path) -> None:
    """The unit tests can fail: with a threshold moved, promtool reports a failure."""
    rules = (DASHBOARDS / "alerts.yml").read_text().replace("< 0.8", "< 0.3")
    (tmp_path / "alerts.yml").write_text(rules)
    shutil.copy(DASHBOARDS / "alerts_test.yml", tmp_path / "alerts_test.yml")
    test = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=tmp_path,
                          capture_output=True, text=True)  # fmt: skip
    assert test.returncode != 0 and "AdaptiveLLMTenantsUnfair" in test.stdout + test.stderr


def test_every_alert_has_a_firing_and_a_quiet_case(generate: ModuleType) -> None:
    cases: dict[str, set[bool]] = {}
    for case in generate.rule_tests():
        for check in case["alert_rule_test"]:
            cases.setdefault(check["alertname"], set()).add(bool(check["exp_alerts"]))
    assert set(cases) == {a.name for a in generate.ALERTS}
    assert all(True in fired for fired in cases.values())
    quiet = {name for name, fired in cases.items() if False in fired}
    assert quiet >= {a.name for a in generate.ALERTS} - {"AdaptiveLLMPredictorDrift"}


def project_metric_families() -> set[str]:
    """Every metric family adaptivellm/metrics.py defines, by its exported base name."""
    text = (ROOT / "adaptivellm" / "metrics.py").read_text()
    return {f"adaptivellm_{name}" for name in re.findall(r'f"\{PREFIX\}([a-z_]+)"', text)}


def test_every_metric_family_is_on_a_panel(generate: ModuleType) -> None:
    families = project_metric_families()
    assert len(families) >= 25  # the parse found them
    queries = " ".join(expr for _, expr in generate.panel_queries())
    suffix = "(_total|_bucket|_sum|_count)?"
    missing = [f for f in sorted(families) if not re.search(rf"\b{f}{suffix}\b", queries)]
    assert not missing, f"metric families on no panel: {missing}"


def test_dashboard_has_the_template_variables_and_valid_layout() -> None:
    model = json.loads((DASHBOARDS / "adaptivellm.json").read_text())
    names = [v["name"] for v in model["templating"]["list"]]
    assert names == ["datasource", "model", "instance", "tenant"]
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    for panel in model["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] for t in panel["targets"])
            assert all("$instance" in t["expr"] for t in panel["targets"]), panel["title"]
