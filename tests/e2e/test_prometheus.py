"""A real Prometheus scraping a live `adaptivellm serve` under a short load
(dashboards/snapshot.py): every dashboard query and every alert expression returns data through
Prometheus's HTTP API, the rules load healthy, and the key panels render."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

SNAPSHOT = Path(__file__).resolve().parents[2] / "dashboards" / "snapshot.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("dashboards_snapshot", SNAPSHOT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    folder = tmp_path_factory.mktemp("snapshot")
    result: dict[str, Any] = module.run(25.0, folder / "panels.png", folder / "work")
    return result


def test_the_load_ran(report: dict[str, Any]) -> None:
    assert report["requests"] > 0
    assert report["split"].get("tokens") == 6 and report["split"].get("refused")


def test_every_dashboard_query_returns_data(report: dict[str, Any]) -> None:
    empty = [(p["panel"], p["expr"]) for p in report["panels"] if not p["series"]]
    assert not empty, empty


def test_every_alert_is_valid_loaded_and_sees_data(report: dict[str, Any]) -> None:
    for alert in report["alerts"]:
        assert alert["valid"], alert
        assert alert["probe_series"] > 0, alert
    assert report["rules"] and set(report["rules"].values()) == {"ok"}, report["rules"]
    assert len(report["rules"]) == len(report["alerts"]) == 7


def test_key_panels_render(report: dict[str, Any]) -> None:
    png = Path(report["png"])
    assert png.exists() and png.stat().st_size > 10_000
