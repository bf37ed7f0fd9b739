"""Helpers shared by the deployment tests (deploy/ tree, external tools, metric names, PromQL, a Prometheus
server), and the tests of the helpers themselves. The other test_deploy*, test_prometheus* and
test_scale* modules import it as `tests.test_deploy_support` (pytest names test modules by the rootdir).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from plugin_service.server.metrics import ServiceMetrics
from tests.helpers import ROOT, poll_until

DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "advface.json"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests target (native gRPC probes are GA since 1.27)

REQUIRE_INTEGRATION = os.environ.get("ADVFACE_REQUIRE_INTEGRATION") == "1"

# A metric name in PromQL: not preceded or followed by an identifier character (so label values
# such as job="advface" and recording-rule names such as advface:x are not taken for metrics).
_METRIC = re.compile(r"(?<![A-Za-z0-9_:])advface_[A-Za-z0-9_]+(?![A-Za-z0-9_:])")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


def require_tool(name: str) -> str:
    """The tool's path; a missing tool skips the test, or fails it when ADVFACE_REQUIRE_INTEGRATION=1."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")  # nginx lives in sbin
    if path is None:
        message = (f"{name} is not installed (Debian: apt-get install -y --no-install-recommends prometheus nginx); "
                   ".ci/run installs it")
        if REQUIRE_INTEGRATION:
            pytest.fail(f"ADVFACE_REQUIRE_INTEGRATION=1 but {message}")
        pytest.skip(message)
    return path


def exported_metric_names(metrics: ServiceMetrics | None = None) -> set[str]:
    """Every series name the service's registry exports, derived from each family's type.

    Labelled families have no samples until first used, so names come from the family type
    (as the text exposition writes them), not from samples.
    """
    metrics = metrics or ServiceMetrics()
    names: set[str] = set()
    for family in metrics.registry.collect():
        base = family.name
        if family.type == "counter":
            names |= {f"{base}_total", f"{base}_created"}
        elif family.type == "histogram":
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
        elif family.type == "summary":
            names |= {base, f"{base}_sum", f"{base}_count", f"{base}_created"}
        elif family.type == "info":
            names.add(f"{base}_info")
        elif family.type == "gauge":
            names.add(base)
        else:
            raise AssertionError(f"metric family {base} has a type this check does not know: {family.type}")
    return names


def promql_metric_names(expr: str) -> set[str]:
    """The advface_ metric names a PromQL query selects (string literals, e.g. label values, left out)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def unknown_metrics(exprs: dict[str, str], exported: set[str]) -> dict[str, set[str]]:
    """For each query (by where it comes from) the advface_ names it uses that the service does not export."""
    return {where: bad for where, expr in exprs.items() if (bad := promql_metric_names(expr) - exported)}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def alert_rules(path: Path = PROMETHEUS_DIR / "alerts.yml") -> list[dict[str, Any]]:
    return [rule for group in load_yaml(path)["groups"] for rule in group["rules"]]


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def dashboard_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Every PromQL query of the dashboard, keyed by panel title and refId (and template variables)."""
    queries = {}
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            if "expr" in target:
                queries[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]
            queries[f"variable {var['name']}"] = q["query"] if isinstance(q, dict) else q
    return queries


def alert_queries(path: Path = PROMETHEUS_DIR / "alerts.yml") -> dict[str, str]:
    return {f"alert {r['alert']}": r["expr"] for r in alert_rules(path)}


def adapter_rules() -> list[dict[str, Any]]:
    (cm,) = load_yaml_docs(K8S / "prometheus-adapter-rules.yaml")
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def adapter_queries() -> dict[str, str]:
    queries = {}
    for i, rule in enumerate(adapter_rules()):
        queries[f"adapter rule {i} seriesQuery"] = rule["seriesQuery"]
        queries[f"adapter rule {i} metricsQuery"] = rule["metricsQuery"]
        queries[f"adapter rule {i} name"] = rule["name"]["as"]
    return queries


def grafana_expr_for_prometheus(expr: str, job: str = "advface", rate_interval: str = "1m") -> str:
    """A dashboard query with Grafana's variables filled in, as Grafana would send it.

    A variable's ``label_values(SELECTOR, LABEL)`` (Grafana's, not PromQL) becomes the
    equivalent ``count by (LABEL) (SELECTOR)``.
    """
    if m := re.fullmatch(r"\s*label_values\((.+),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", expr):
        expr = f"count by ({m[2]}) ({m[1]})"
    return expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval).replace("$job", job)


# --- a Prometheus server for the integration tests ----------------------------------------------------

def prometheus_config_for(targets: list[str], workdir: Path, scrape_interval: str = "1s") -> Path:
    """deploy/prometheus/prometheus.yml with the advface job pointed at ``targets`` and short intervals."""
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = scrape_interval
    config["rule_files"] = [str((PROMETHEUS_DIR / f).resolve()) for f in config.get("rule_files", [])]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "advface"]
    job["static_configs"] = [{"targets": targets}]
    job["scrape_timeout"] = scrape_interval
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class PrometheusServer:
    """The `prometheus` binary on a loopback port, with its HTTP API."""

    def __init__(self, binary: str, config: Path, port: int, workdir: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = workdir / "prometheus.log"
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    return r.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        poll_until(ready, "prometheus to be ready", timeout, interval=0.2, proc=self.proc, log=self.log)

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422 carry the PromQL error in the body
            body = json.load(e)
        return body

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.api("query", query=expr)
        if body.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


# --- tests of the helpers ---------------------------------------------------------------------------------

def _touch_every_metric(metrics: ServiceMetrics) -> None:
    from prometheus_client import Counter, Gauge, Histogram, Info

    for value in vars(metrics).values():
        if isinstance(value, Info):
            value.info({"model_version": "test"})
            continue
        if not isinstance(value, Counter | Gauge | Histogram):
            continue
        labelnames = value._labelnames  # noqa: SLF001 - prometheus_client keeps them here
        child = value.labels(*["x"] * len(labelnames)) if labelnames else value
        if isinstance(value, Counter):
            child.inc()
        elif isinstance(value, Gauge):
            child.set(1)
        else:
            child.observe(1)


def test_exported_names_equal_the_real_exposition() -> None:
    """The names derived from family types are exactly those a scrape of /metrics shows."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    metrics = ServiceMetrics()
    _touch_every_metric(metrics)
    text = generate_latest(metrics.registry).decode()
    scraped = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert scraped == exported_metric_names(metrics)
    assert {"advface_faces_protected_total", "advface_queue_wait_seconds_bucket", "advface_model_info",
            "advface_device_memory_bytes", "advface_batches_in_flight"} <= scraped


def test_metric_check_flags_names_the_service_does_not_export() -> None:
    exported = exported_metric_names()
    bad = unknown_metrics({
        "no _total": "rate(advface_faces_protected[5m])",
        "no _bucket": 'histogram_quantile(0.99, rate(advface_queue_wait_seconds{job="advface"}[5m]))',
        "typo": "advface_batches_inflight",
        "fine": 'sum(rate(advface_batches_total{job="advface", code!="OK"}[5m])) / on() advface_queue_depth',
    }, exported)
    assert bad == {"no _total": {"advface_faces_protected"}, "no _bucket": {"advface_queue_wait_seconds"},
                   "typo": {"advface_batches_inflight"}}


def test_promql_metric_names_ignore_label_values_and_recording_rules() -> None:
    expr = 'advface:gain:median > on(job) advface_queue_depth{job="advface", x="advface_in_a_string"} + advface_x_total'
    assert promql_metric_names(expr) == {"advface_queue_depth", "advface_x_total"}
