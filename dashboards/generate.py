"""The Grafana dashboard and the Prometheus alert rules for AdaptiveLLM, from one definition.

    python dashboards/generate.py          # writes dashboards/adaptivellm.json, alerts.yml and
                                           # alerts_test.yml next to this file
    python dashboards/generate.py --check  # exit 1 if the committed files differ

Why a script of our own and not grafanalib or grafana-foundation-sdk: the panels and alerts are
data (a title, PromQL, a unit), and the tests need exactly that data to check every query
against a real Prometheus; a few dataclasses give both, with no dependency for users who only
import the JSON. The generated files are committed: Grafana and Prometheus read them as they are.

Template variables: `datasource`, `model` (vLLM's model_name label), `instance` (the scrape
target: one replica) and `tenant`. Every AdaptiveLLM query is filtered by instance, vLLM's by
instance and model, per-tenant ones by tenant too.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
JOB = "adaptivellm"
A = '{instance=~"$instance"}'
V = '{instance=~"$instance", model_name=~"$model"}'
RATE = "$__rate_interval"


def sel(extra: str = "") -> str:
    """An AdaptiveLLM selector with extra matchers."""
    return '{instance=~"$instance"' + (f", {extra}" if extra else "") + "}"


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def q(expr: str, legend: str = "") -> Target:
    return Target(expr, legend)


def p99(metric: str, by: str = "", matchers: str = A) -> str:
    group = f"le{', ' + by if by else ''}"
    return f"histogram_quantile(0.99, sum by ({group}) (rate({metric}_bucket{matchers}[{RATE}])))"


def p50(metric: str, by: str = "", matchers: str = A) -> str:
    return p99(metric, by, matchers).replace("0.99", "0.5", 1)


def mean(metric: str, by: str = "", matchers: str = A) -> str:
    grouping = f" by ({by})" if by else ""
    return (f"sum{grouping} (rate({metric}_sum{matchers}[{RATE}])) / "
            f"sum{grouping} (rate({metric}_count{matchers}[{RATE}]))")  # fmt: skip


SWAP = sel('mode="swap"')
MET = sel('met="true"')

#: Measured swap cost per swapped victim (copy-out and copy-in seconds over swap preemptions)
#: and the predicted one; their ratio - 1 is the predictor's drift.
MEASURED_SWAP = (f"sum by (instance) (rate(adaptivellm_swap_copy_seconds_sum{A}[{RATE}])) / "
                 f"sum by (instance) (rate(adaptivellm_preemptions_total{SWAP}[{RATE}]))")  # fmt: skip
PREDICTED_SWAP = mean("adaptivellm_predicted_preemption_cost_seconds", "instance",
                      sel('mode="swap"'))  # fmt: skip

ROWS = (
    Row("Throughput and latency (vLLM)", (
        Panel("Tokens per second", "Prompt and generated tokens per second.",
              (q(f"sum(rate(vllm:prompt_tokens_total{V}[{RATE}]))", "prompt"),
               q(f"sum(rate(vllm:generation_tokens_total{V}[{RATE}]))", "generated"))),
        Panel("Latency p99", "Time to first token, time per output token and end to end.",
              (q(p99("vllm:time_to_first_token_seconds", matchers=V), "TTFT"),
               q(p99("vllm:inter_token_latency_seconds", matchers=V), "inter-token"),
               q(p99("vllm:e2e_request_latency_seconds", matchers=V), "end to end")), "s"),
        Panel("Requests in the engine", "Running and waiting requests, and KV cache use.",
              (q(f"sum(vllm:num_requests_running{V})", "running"),
               q(f"sum(vllm:num_requests_waiting{V})", "waiting"),
               q(f"max(vllm:kv_cache_usage_perc{V})", "KV cache used (0-1)"))),
    )),
    Row("Preemption: swap or recompute", (
        Panel("Preemptions by mode", "Victims per second, by how their KV cache was kept; "
              "turnaround: preempted by weighted-turnaround for a shorter waiting request.",
              (q(f"sum by (mode) (rate(adaptivellm_preemptions_total{A}[{RATE}]))", "{{mode}}"),
               q(f"sum(rate(adaptivellm_turnaround_preemptions_total{A}[{RATE}]))",
                 "turnaround"),
               q(f"sum(rate(adaptivellm_swap_fallbacks_total{A}[{RATE}]))",
                 "swap wanted, space full")), "ops"),
        Panel("Swap space and copies", "Host memory holding swapped KV blocks; blocks copied "
              "per second by direction.",
              (q(f"sum by (rank) (adaptivellm_swap_space_used_bytes{A})", "in use, rank {{rank}}"),
               q(f"sum by (direction) (rate(adaptivellm_swap_blocks_total{A}[{RATE}]))",
                 "blocks/s {{direction}}")), "bytes"),
        Panel("Swap copy time p99", "Measured time of one step's block copies.",
              (q(p99("adaptivellm_swap_copy_seconds", "direction"), "{{direction}}"),), "s"),
        Panel("Predicted against measured swap cost", "Mean predicted cost per victim, by "
              "mode, and the measured copy time per swapped victim; error = predicted / "
              "measured - 1 (the predictor-drift alert).",
              (q(mean("adaptivellm_predicted_preemption_cost_seconds", "mode"),
                 "predicted {{mode}}"),
               q(MEASURED_SWAP, "measured swap {{instance}}"),
               q(f"({PREDICTED_SWAP}) / ({MEASURED_SWAP}) - 1", "swap error")), "s"),
    )),
    Row("Scheduling and fairness", (
        Panel("Queue wait", "Arrival to first scheduled step, and the starvation bound.",
              (q(p50("adaptivellm_queue_wait_seconds"), "p50"),
               q(p99("adaptivellm_queue_wait_seconds"), "p99"),
               q(f"max(adaptivellm_max_queue_wait_seconds{A})", "--max-queue-wait-s")), "s"),
        Panel("Weighted turnaround", "Turnaround / service time of finished requests (1 = as "
              "fast as alone on an idle server).",
              (q(mean("adaptivellm_weighted_turnaround"), "mean"),
               q(p99("adaptivellm_weighted_turnaround"), "p99"))),
        Panel("Service per tenant", "Tokens computed per second for each tenant.",
              (q('sum by (tenant) (rate(adaptivellm_tenant_served_tokens_total{instance=~'
                 f'"$instance", tenant=~"$tenant"}}[{RATE}]))', "{{tenant}}"),)),
        Panel("Jain's index", "Over the tenants backlogged all through the last 5 s window, "
              "per data-parallel rank (1 = equal weighted shares).",
              (q(f"min by (rank) (adaptivellm_tenant_jain_index{A})", "rank {{rank}}"),)),
        Panel("Learned service model", "Seconds per prompt token and per output token the "
              "policy ranks requests with, learned from the engine's steps.",
              (q(f"max by (term) (adaptivellm_service_model_seconds_per_token{A})",
                 "{{term}}"),), "s"),
        Panel("Engine steps", "Steps per second, median tokens per step, output-length "
              "prediction error (median, relative).",
              (q(f"sum(rate(adaptivellm_scheduler_steps_total{A}[{RATE}]))", "steps/s"),
               q(p50("adaptivellm_step_tokens"), "tokens per step p50"),
               q(p50("adaptivellm_output_length_prediction_error"), "output length error"))),
    )),
    Row("Split execution", (
        Panel("Split sessions", "Open now, and opened per second by how they ended; "
              "times per second the planner forgot a kind's calibration (none of that kind "
              "finished for --split-calibration-stale-s).",
              (q(f"sum(adaptivellm_split_sessions_open{A})", "open"),
               q(f"sum by (outcome) (rate(adaptivellm_split_sessions_total{A}[{RATE}]))",
                 "{{outcome}}"),
               q(f"sum by (kind) (rate(adaptivellm_split_calibration_forgotten_total{A}"
                 f"[{RATE}]))", "calibration forgotten {{kind}}"))),
        Panel("Chosen split layer k", "Median and p99 of k (the client runs layers 0..k-1).",
              (q(p50("adaptivellm_split_chosen_layer"), "p50"),
               q(p99("adaptivellm_split_chosen_layer"), "p99"))),
        Panel("SLA attainment", "Share of finished split sessions that met their SLA.",
              (q(f"sum(rate(adaptivellm_split_sla_total{MET}[{RATE}])) / "
                 f"sum(rate(adaptivellm_split_sla_total{A}[{RATE}]))", "met"),), "percentunit"),
        Panel("Planner latency prediction error", "|predicted - measured| / measured "
              "latency of finished split sessions: median and p90 (the target is a median "
              "within 25%).",
              (q(p50("adaptivellm_split_latency_prediction_error"), "p50"),
               q(p99("adaptivellm_split_latency_prediction_error").replace("0.99", "0.9", 1),
                 "p90")),
              "percentunit"),
        Panel("Split step time p99 and errors", "Server time of a split step; errors by code.",
              (q(p99("adaptivellm_split_step_seconds", "kind"), "{{kind}} p99"),
               q(f"sum by (code) (rate(adaptivellm_split_errors_total{A}[{RATE}]))",
                 "error {{code}}")), "s"),
        Panel("Server work saved", "Decoder-layer passes per second computed by the server "
              "and saved by clients; forward passes by batch kind; forward seconds per second; "
              "context rows of resumed split sessions sent to the model runner and held there "
              "(not sent again); prompt rows of k = N sessions the engine never needed; "
              "sessions served whole because their split would have cost the server more "
              "(--split-cost-profile).",
              (q(f"sum by (kind) (rate(adaptivellm_split_token_layers_total{A}[{RATE}]))",
                 "{{kind}}"),
               q(f"sum by (batch) (rate(adaptivellm_split_forward_passes_total{A}[{RATE}]))",
                 "passes {{batch}}"),
               q(f"sum(rate(adaptivellm_split_forward_seconds_total{A}[{RATE}]))",
                 "forward busy"),
               q(f"sum by (kind) (rate(adaptivellm_split_context_rows_total{A}[{RATE}]))",
                 "context rows {{kind}}"),
               q(f"sum(rate(adaptivellm_split_rows_skipped_total{A}[{RATE}]))",
                 "prompt rows skipped (k = N)"),
               q(f"sum(rate(adaptivellm_split_served_whole_cheaper_total{A}[{RATE}]))",
                 "served whole, cheaper"))),
    )),
    Row("Health", (
        Panel("Internal errors", "Errors in AdaptiveLLM's own code that were contained "
              "(docs/safety.md), per second by where.",
              (q(f"sum by (where) (rate(adaptivellm_internal_errors_total{A}[{RATE}]))",
                 "{{where}}"),), "ops"),
        Panel("Up", "1 while Prometheus can scrape the replica.",
              (q(f'up{{job="{JOB}", instance=~"$instance"}}', "{{instance}}"),)),
        Panel("Build and configuration", "adaptivellm_info: versions, fairness policy, "
              "preemption mode.",
              (q(f"adaptivellm_info{A}", "{{version}} vLLM {{vllm_version}} {{fairness}} "
                 "{{preemption}}"),), kind="table"),
    )),
)  # fmt: skip


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    summary: str
    probe: str
    """The expression's data without its threshold: must return data on a live server."""
    severity: str = "warning"
    tests: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    """promtool unit tests: (input series, the alert expected after `eval_time`)."""


def starvation() -> str:
    quantile = ("histogram_quantile(0.99, sum by (instance, le) "
                "(rate(adaptivellm_queue_wait_seconds_bucket[5m])))")  # fmt: skip
    bound = "max by (instance) (adaptivellm_max_queue_wait_seconds)"
    return f"{quantile} > on (instance) 0.8 * {bound}"


PREDICTED_5M = ('sum by (instance) (rate(adaptivellm_predicted_preemption_cost_seconds_sum{mode="swap"}[10m]))'
                ' / sum by (instance) (rate(adaptivellm_predicted_preemption_cost_seconds_count{mode="swap"}[10m]))')  # fmt: skip
MEASURED_5M = ("sum by (instance) (rate(adaptivellm_swap_copy_seconds_sum[10m]))"
               ' / sum by (instance) (rate(adaptivellm_preemptions_total{mode="swap"}[10m]))')  # fmt: skip
SLA_10M = ('sum by (instance) (rate(adaptivellm_split_sla_total{met="true"}[10m]))'
           " / sum by (instance) (rate(adaptivellm_split_sla_total[10m]))")  # fmt: skip

ALERTS = (
    Alert("AdaptiveLLMStarvationRisk", starvation(), "5m",
          "Queue waits near --max-queue-wait-s: requests are about to be served as starved",
          "sum by (instance, le) (rate(adaptivellm_queue_wait_seconds_bucket[5m]))"),
    Alert("AdaptiveLLMSwapFallbacks", "sum by (instance) (rate(adaptivellm_swap_fallbacks_total[5m])) > 0",
          "10m", "Victims recomputed because the swap space is full: raise --swap-space",
          "sum by (instance) (rate(adaptivellm_swap_fallbacks_total[5m]))"),
    Alert("AdaptiveLLMPredictorDrift", f"abs(({PREDICTED_5M}) / ({MEASURED_5M}) - 1) > 0.5", "15m",
          "Predicted swap cost is more than 50% off the measured copies: rerun `adaptivellm profile`",
          f"({PREDICTED_5M}) / ({MEASURED_5M})"),
    Alert("AdaptiveLLMTenantsUnfair", "min by (instance, rank) (adaptivellm_tenant_jain_index) < 0.8",
          "5m", "Jain's index over backlogged tenants below 0.8 for 5 minutes",
          "min by (instance, rank) (adaptivellm_tenant_jain_index)"),
    Alert("AdaptiveLLMDown", f'up{{job="{JOB}"}} == 0', "1m",
          "Prometheus cannot scrape the AdaptiveLLM server (down, or its engine died)",
          f'up{{job="{JOB}"}}', severity="critical"),
    Alert("AdaptiveLLMSplitSLA", f"{SLA_10M} < 0.95", "10m",
          "Fewer than 95% of split sessions meet their SLA", SLA_10M),
    Alert("AdaptiveLLMInternalErrors",
          "sum by (instance, where) (increase(adaptivellm_internal_errors_total[5m])) > 0", "0m",
          "AdaptiveLLM contained an internal error (the engine kept serving); see the logs",
          "sum by (instance, where) (increase(adaptivellm_internal_errors_total[5m]))"),
)  # fmt: skip


def rule_tests() -> list[dict[str, Any]]:
    """promtool tests: one firing case per alert, and one that must not fire."""
    inst = 'instance="r1", job="adaptivellm"'

    def series(metric: str, labels: str, values: str) -> dict[str, str]:
        return {"series": f"{metric}{{{labels}}}", "values": values}

    summaries = {a.name: a.summary for a in ALERTS}

    def case(
        name: str, inputs: list[dict[str, str]], at: str, labels: dict[str, str] | None
    ) -> dict[str, Any]:
        """`name` at `at` fires with `labels`, or (None) does not fire."""
        alerts = [] if labels is None else [
            {"exp_labels": labels, "exp_annotations": {"summary": summaries[name]}}]  # fmt: skip
        return {
            "interval": "1m",
            "input_series": inputs,
            "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": alerts}],
        }

    def fired(labels: dict[str, str]) -> dict[str, str]:
        return labels

    buckets = [
        series("adaptivellm_queue_wait_seconds_bucket", f'{inst}, le="{le}"', v)
        for le, v in (("10", "0+0x20"), ("60", "0+10x20"), ("+Inf", "0+10x20"))
    ]
    calm = [
        series("adaptivellm_queue_wait_seconds_bucket", f'{inst}, le="{le}"', "0+10x20")
        for le in ("10", "60", "+Inf")
    ]
    bound = series("adaptivellm_max_queue_wait_seconds", f'{inst}, rank="0"', "60x20")
    base = {"instance": "r1", "severity": "warning"}
    swap_series = [
        series("adaptivellm_predicted_preemption_cost_seconds_sum", f'{inst}, mode="swap"', "0+3x40"),
        series("adaptivellm_predicted_preemption_cost_seconds_count", f'{inst}, mode="swap"', "0+1x40"),
        series("adaptivellm_swap_copy_seconds_sum", f'{inst}, direction="out"', "0+1x40"),
        series("adaptivellm_preemptions_total", f'{inst}, mode="swap"', "0+1x40"),
    ]  # fmt: skip
    return [
        case("AdaptiveLLMStarvationRisk", [*buckets, bound], "15m", fired(base)),
        case("AdaptiveLLMStarvationRisk", [*calm, bound], "15m", None),
        case("AdaptiveLLMSwapFallbacks",
             [series("adaptivellm_swap_fallbacks_total", inst, "0+2x20")], "15m", fired(base)),
        case("AdaptiveLLMSwapFallbacks",
             [series("adaptivellm_swap_fallbacks_total", inst, "5x20")], "15m", None),
        case("AdaptiveLLMPredictorDrift", swap_series, "30m", fired(base)),
        case("AdaptiveLLMTenantsUnfair",
             [series("adaptivellm_tenant_jain_index", f'{inst}, rank="0"', "0.5x10")], "7m",
             fired({**base, "rank": "0"})),
        case("AdaptiveLLMTenantsUnfair",
             [series("adaptivellm_tenant_jain_index", f'{inst}, rank="0"', "0.5 0.5 0.95x8")],
             "7m", None),
        case("AdaptiveLLMDown", [series("up", inst, "1 1 0x5")], "5m",
             fired({"instance": "r1", "job": "adaptivellm", "severity": "critical"})),
        case("AdaptiveLLMDown", [series("up", inst, "1x5")], "5m", None),
        case("AdaptiveLLMSplitSLA",
             [series("adaptivellm_split_sla_total", f'{inst}, met="true"', "0+8x30"),
              series("adaptivellm_split_sla_total", f'{inst}, met="false"', "0+2x30")],
             "20m", fired(base)),
        case("AdaptiveLLMSplitSLA",
             [series("adaptivellm_split_sla_total", f'{inst}, met="true"', "0+99x30"),
              series("adaptivellm_split_sla_total", f'{inst}, met="false"', "0+1x30")],
             "20m", None),
        case("AdaptiveLLMInternalErrors",
             [series("adaptivellm_internal_errors_total", f'{inst}, where="order_waiting"',
                     "0 0 1 1 1")], "3m", fired({**base, "where": "order_waiting"})),
        case("AdaptiveLLMInternalErrors",
             [series("adaptivellm_internal_errors_total", f'{inst}, where="order_waiting"',
                     "0x10")], "8m", None),
    ]  # fmt: skip


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard model (schema 39)."""
    panels: list[dict[str, Any]] = []
    y, pid = 0, 1
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    for row in ROWS:
        panels.append({"type": "row", "title": row.title, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})  # fmt: skip
        pid, y = pid + 1, y + 1
        for i, panel in enumerate(row.panels):
            width = 8
            panels.append({
                "type": panel.kind, "title": panel.title, "description": panel.description,
                "id": pid, "datasource": datasource,
                "gridPos": {"h": 8, "w": width, "x": (i % 3) * width, "y": y + 8 * (i // 3)},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "targets": [{"refId": chr(ord("A") + j), "datasource": datasource,
                             "expr": t.expr, "legendFormat": t.legend,
                             **({"format": "table", "instant": True} if panel.kind == "table" else {})}
                            for j, t in enumerate(panel.targets)],
            })  # fmt: skip
            pid += 1
        y += 8 * (-(-len(row.panels) // 3))

    def variable(name: str, query: str, multi: bool = True) -> dict[str, Any]:
        return {"name": name, "type": "query", "datasource": datasource, "refresh": 2,
                "query": {"query": query, "refId": name}, "definition": query,
                "includeAll": True, "multi": multi, "allValue": ".*",
                "current": {"text": "All", "value": "$__all"}}  # fmt: skip

    return {
        "title": "AdaptiveLLM",
        "uid": "adaptivellm",
        "description": "AdaptiveLLM over vLLM: throughput, preemption, fairness, split "
        "execution and health (dashboards/generate.py)",
        "tags": ["adaptivellm", "vllm"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                variable("model", "label_values(vllm:num_requests_running, model_name)"),
                variable("instance", "label_values(adaptivellm_info, instance)"),
                variable("tenant", "label_values(adaptivellm_tenant_served_tokens_total, tenant)"),
            ]
        },
        "panels": panels,
    }


def alert_rules() -> dict[str, Any]:
    return {"groups": [{"name": "adaptivellm", "rules": [
        {"alert": a.name, "expr": a.expr, "for": a.for_, "labels": {"severity": a.severity},
         "annotations": {"summary": a.summary}} for a in ALERTS]}]}  # fmt: skip


def rules_test_file() -> dict[str, Any]:
    return {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": rule_tests()}


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard query, template variables left in."""
    return [(p.title, t.expr) for row in ROWS for p in row.panels for t in p.targets]


def concrete(expr: str) -> str:
    """A dashboard query with its template variables filled in for any value."""
    return (expr.replace('"$instance"', '".+"').replace('"$model"', '".+"')
            .replace('"$tenant"', '".+"').replace("$__rate_interval", "1m"))  # fmt: skip


def files() -> dict[str, str]:
    """File name -> contents, as generated."""
    dump = {"sort_keys": False, "width": 1000, "default_flow_style": False}
    return {
        "adaptivellm.json": json.dumps(dashboard(), indent=2) + "\n",
        "alerts.yml": "# Generated by dashboards/generate.py; edit that, not this.\n"
        + yaml.safe_dump(alert_rules(), **dump),
        "alerts_test.yml": "# Generated by dashboards/generate.py; run: promtool test rules "
        "dashboards/alerts_test.yml\n" + yaml.safe_dump(rules_test_file(), **dump),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    stale = []
    for name, text in files().items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python dashboards/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
