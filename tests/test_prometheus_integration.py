"""A real Prometheus (Debian's `prometheus` binary) scraping a live service with deploy/'s config and
alert rules: the counters reach Prometheus, every alert rule evaluates, every dashboard query runs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import numpy as np
import pytest
from advface_client.client import GuardClient

from tests.helpers import LiveServer, free_port, poll_until, scraped_sum
from tests.test_deploy_support import (
    DASHBOARD,
    PrometheusServer,
    alert_rules,
    dashboard_queries,
    grafana_expr_for_prometheus,
    prometheus_config_for,
    require_tool,
)

pytestmark = pytest.mark.integration

FEATURE_SHAPE = (64, 77, 77)
BATCHES, FACES = 3, 2
# Dashboard queries that are rightly empty while nothing has failed.
EMPTY_WHEN_NO_ERRORS = ('code!="OK"',)


@pytest.fixture(scope="module")
def prometheus(live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    binary = require_tool("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    target = live_server.metrics_url.removeprefix("http://").removesuffix("/metrics")
    config = prometheus_config_for([target], workdir)
    server = PrometheusServer(binary, config, free_port(), workdir)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _faces_counter(metrics_url: str) -> float:
    """advface_faces_protected_total summed over protectors, read from the service's own /metrics."""
    return scraped_sum(metrics_url, "advface_faces_protected_total")


def _scalar(prom: PrometheusServer, expr: str) -> float | None:
    result = prom.query(expr)
    return float(result[0]["value"][1]) if result else None


def _wait_for(predicate, timeout: float, what: str):  # noqa: ANN001, ANN202
    """Prometheus scrapes every second: re-ask it twice a second."""
    return poll_until(predicate, what, timeout, interval=0.5)


def test_prometheus_scrapes_the_service(prometheus: PrometheusServer, live_server: LiveServer) -> None:
    # the scrape target is up under the job name the rules and dashboard use
    _wait_for(lambda: _scalar(prometheus, 'up{job="advface"}') == 1, 20, 'up{job="advface"} == 1')

    before = _faces_counter(live_server.metrics_url)
    rng = np.random.default_rng(0)
    batches = [(f"prom-{i}", rng.standard_normal((FACES, *FEATURE_SHAPE), dtype=np.float32)) for i in range(BATCHES)]
    with GuardClient(live_server.address) as client:
        results = list(client.protect_stream(batches))
        info = client.info()
    assert [r.batch_id for r in results] == [b for b, _ in batches]
    assert all(r.error is None for r in results)
    expected = before + BATCHES * FACES
    assert _faces_counter(live_server.metrics_url) == expected

    _wait_for(lambda: _scalar(prometheus, 'sum(advface_faces_protected_total{job="advface"})') == expected,
              30, f"advface_faces_protected_total to reach {expected}")
    batches_ok = _scalar(prometheus, 'sum(advface_batches_total{job="advface", method="ProtectStream", code="OK"})')
    assert batches_ok is not None and batches_ok >= BATCHES

    # the served bundle's version is visible in Prometheus, as GetModelInfo reports it
    (model,) = prometheus.query('advface_model_info{job="advface"}')
    assert model["metric"]["model_version"] == info.model_version
    assert model["metric"]["device"] == info.device


def test_alert_rules_load_and_evaluate(prometheus: PrometheusServer) -> None:
    """Prometheus loads deploy/prometheus/alerts.yml and evaluates every rule without error."""
    expected = {r["alert"] for r in alert_rules()}

    def evaluated() -> dict[str, dict] | None:
        body = prometheus.api("rules", type="alert")
        rules = {r["name"]: r for g in body["data"]["groups"] for r in g["rules"]}
        done = set(rules) == expected and not any(r.get("lastEvaluation", "0001").startswith("0001")
                                                  for r in rules.values())  # 0001-01-01: not evaluated yet
        return rules if done else None

    rules = _wait_for(evaluated, 20, "every alert rule to be evaluated")
    assert {name: r["health"] for name, r in rules.items()} == dict.fromkeys(expected, "ok"), \
        {name: r.get("lastError") for name, r in rules.items()}
    # a healthy single replica: neither the service nor the replica is reported down
    assert rules["AdvFaceServiceDown"]["state"] == "inactive"
    assert rules["AdvFaceReplicaDown"]["state"] == "inactive"


def test_dashboard_queries_run_and_show_data(prometheus: PrometheusServer, live_server: LiveServer) -> None:
    """Every dashboard query is valid PromQL for this Prometheus and, after traffic, returns data."""
    queries = {where: grafana_expr_for_prometheus(expr, rate_interval="30s")
               for where, expr in dashboard_queries(json.loads(DASHBOARD.read_text())).items()}
    with GuardClient(live_server.address) as client:  # fresh traffic inside the rate window
        rng = np.random.default_rng(1)
        list(client.protect_stream((f"dash-{i}", rng.standard_normal((FACES, *FEATURE_SHAPE), dtype=np.float32))
                                   for i in range(2)))

    def empty_queries() -> set[str]:
        return {where for where, expr in queries.items()
                if not any(s in expr for s in EMPTY_WHEN_NO_ERRORS) and not prometheus.query(expr)}

    # rate() needs two samples of the new series in its window: give the 1 s scrapes a few seconds
    deadline = time.monotonic() + 20
    while (empty := empty_queries()) and time.monotonic() < deadline:
        time.sleep(1)
    assert empty == set()
    for where, expr in queries.items():  # the rightly empty ones still parse and run
        prometheus.query(expr)


def test_prometheus_query_errors_are_reported(prometheus: PrometheusServer) -> None:
    """The helper above does not swallow PromQL errors (so 'runs' means something)."""
    with pytest.raises(AssertionError, match="bad_data|parse"):
        prometheus.query("sum(rate(advface_faces_protected_total[5m])")


def test_temp_config_keeps_the_deploy_rules(prometheus: PrometheusServer) -> None:
    body = prometheus.api("status/config")
    assert "alerts.yml" in body["data"]["yaml"] and "job_name: advface" in body["data"]["yaml"]
