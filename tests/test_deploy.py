"""deploy/: Prometheus config and alert rules (promtool), Kubernetes manifests (kubernetes-validate),
the Grafana dashboard, compose and the Dockerfile, and that all of them query only metrics the
service really exports. CPU-only; promtool comes from Debian's `prometheus` package."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from plugin_service.config import ServerSettings, env_name
from tests.test_deploy_support import (
    DASHBOARD,
    DEPLOY,
    K8S,
    K8S_VERSION,
    PROMETHEUS_DIR,
    adapter_queries,
    adapter_rules,
    alert_queries,
    alert_rules,
    dashboard_panels,
    dashboard_queries,
    exported_metric_names,
    load_yaml,
    load_yaml_docs,
    promql_metric_names,
    require_tool,
    unknown_metrics,
)

SETTINGS_ENV = {env_name(f.name) for f in fields(ServerSettings)}
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


# --- Prometheus: promtool ----------------------------------------------------------------------------------

@pytest.mark.integration  # promtool (Debian: prometheus)
def test_promtool_check_config() -> None:
    promtool = require_tool("promtool")
    result = _run([promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr  # the config really loads alerts.yml


@pytest.mark.integration  # promtool (Debian: prometheus)
def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    result = _run([promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alert_rules())} rules found" in result.stdout + result.stderr


def _promtool_unit_dir(tmp_path: Path, alerts: dict[str, Any]) -> Path:
    """alerts.test.yml beside a copy of the rules without the long annotations (promtool compares them exactly)."""
    for group in alerts["groups"]:
        for rule in group["rules"]:
            for key in ("description", "runbook"):
                rule["annotations"].pop(key)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(alerts, sort_keys=False))
    (tmp_path / "alerts.test.yml").write_text((PROMETHEUS_DIR / "alerts.test.yml").read_text())
    return tmp_path / "alerts.test.yml"


@pytest.mark.integration  # promtool (Debian: prometheus)
def test_promtool_unit_tests_of_the_alerts(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    tests = _promtool_unit_dir(tmp_path, load_yaml(PROMETHEUS_DIR / "alerts.yml"))
    result = _run([promtool, "test", "rules", str(tests)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.integration  # promtool (Debian: prometheus)
def test_promtool_unit_tests_catch_a_broken_threshold(tmp_path: Path) -> None:
    """The unit tests are not vacuous: a privacy-gain alert that can no longer fire fails them."""
    promtool = require_tool("promtool")
    alerts = load_yaml(PROMETHEUS_DIR / "alerts.yml")
    (rule,) = [r for g in alerts["groups"] for r in g["rules"] if r["alert"] == "AdvFacePrivacyGainCollapsed"]
    assert "< 1.05" in rule["expr"]
    rule["expr"] = rule["expr"].replace("< 1.05", "< 0.5")
    result = _run([promtool, "test", "rules", str(_promtool_unit_dir(tmp_path, alerts))])
    assert result.returncode != 0
    assert "AdvFacePrivacyGainCollapsed" in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing() -> None:
    tests = load_yaml(PROMETHEUS_DIR / "alerts.test.yml")
    fired = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"] if case.get("exp_alerts")}
    assert {r["alert"] for r in alert_rules()} == fired


def test_alerts_cover_the_required_conditions_with_runbooks() -> None:
    rules = alert_rules()
    for rule in rules:
        assert set(rule["annotations"]) >= {"summary", "description", "runbook"}, rule["alert"]
        assert all(len(rule["annotations"][k]) > 20 for k in ("summary", "description", "runbook")), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{rule['alert']}: needs a `for` duration"
    by_metric = {m: [r["alert"] for r in rules if m in promql_metric_names(r["expr"])] for m in (
        "advface_batches_total", "advface_queue_wait_seconds_bucket", "advface_device_memory_bytes",
        "advface_shadow_loss_gain_ratio_bucket")}
    assert all(by_metric.values()), by_metric
    assert any('up{job="advface"}' in r["expr"] for r in rules)  # service down
    (gain,) = [r for r in rules if "advface_shadow_loss_gain_ratio_bucket" in r["expr"]]
    assert "histogram_quantile(0.5" in gain["expr"] and "< 1.05" in gain["expr"]
    (errors,) = [r for r in rules if "advface_batches_total" in r["expr"]]
    assert 'code!="OK"' in errors["expr"]


# --- only metrics the service exports -----------------------------------------------------------------------

def _all_queries() -> dict[str, str]:
    return {**dashboard_queries(json.loads(DASHBOARD.read_text())), **alert_queries(), **adapter_queries()}


def test_queries_use_only_exported_metrics() -> None:
    queries = _all_queries()
    assert len(queries) > 30
    assert unknown_metrics(queries, exported_metric_names()) == {}


def test_queries_use_the_service_metrics() -> None:
    """The dashboard shows every signal the brief asks for, by the service's own names."""
    used = set().union(*(promql_metric_names(e) for e in dashboard_queries(json.loads(DASHBOARD.read_text())).values()))
    assert {
        "advface_faces_protected_total", "advface_batch_latency_seconds_bucket", "advface_queue_depth",
        "advface_queue_wait_seconds_bucket", "advface_batches_total", "advface_shadow_loss_gain_ratio_bucket",
        "advface_perturbation_norm_bucket", "advface_device_memory_bytes", "advface_batches_in_flight",
        "advface_wire_received_bytes_total", "advface_wire_sent_bytes_total", "advface_model_info",
    } <= used


# --- Grafana ------------------------------------------------------------------------------------------------

def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = list(dashboard_panels(dash))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    for p in panels:
        if p["type"] == "row":
            continue
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert 'job="$job"' in t["expr"], f"{p['title']}: select the dashboard's job"
            assert "[5m]" not in t["expr"], f"{p['title']}: use $__rate_interval"
    ds = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    (source,) = ds["datasources"]
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "datasource"]
    assert var["current"]["value"] == source["uid"] and source["type"] == "prometheus"


# --- Kubernetes ---------------------------------------------------------------------------------------------

def _k8s_docs() -> dict[tuple[str, str], dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_docs(path):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def _k8s_params() -> list[Any]:
    return [pytest.param(doc, id=f"{kind}/{name}") for (kind, name), doc in _k8s_docs().items()
            if (doc["apiVersion"], kind) not in CRD_KINDS]


@pytest.mark.parametrize("doc", _k8s_params())
def test_k8s_builtin_manifests_validate(doc: dict[str, Any]) -> None:
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_validation_rejects_a_broken_deployment() -> None:
    doc = copy.deepcopy(_k8s_docs()[("Deployment", "advface")])
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 50051}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    doc = copy.deepcopy(_k8s_docs()[("HorizontalPodAutoscaler", "advface")])
    del doc["spec"]["metrics"][0]["pods"]["metric"]["name"]  # required
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_k8s_manifests_fit_together() -> None:
    docs = _k8s_docs()
    dep = docs[("Deployment", "advface")]
    pod = dep["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9464}
    assert _matches(dep["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])

    # native gRPC probes on the gRPC port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    # GPU
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert str(container["resources"]["requests"]["nvidia.com/gpu"]) == "1"

    # settings: every variable is a real `advface serve` setting; ports agree; drain fits the grace period
    (config,) = [d for (k, _), d in docs.items() if k == "ConfigMap" and d["metadata"]["name"] == "advface-config"]
    env = {**config["data"], **{e["name"]: e["value"] for e in container.get("env", [])}}
    assert set(env) <= SETTINGS_ENV, set(env) - SETTINGS_ENV
    assert [s["configMapRef"]["name"] for s in container["envFrom"]] == ["advface-config"]
    assert int(env["ADVFACE_PORT"]) == ports["grpc"] and int(env["ADVFACE_METRICS_PORT"]) == ports["metrics"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(env["ADVFACE_DRAIN_SECONDS"]) + 5
    assert "preStop" not in container.get("lifecycle", {})

    # bundle volume: ADVFACE_BUNDLE lies under a read-only mount of the bundle claim
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (bundles,) = [n for n, v in volumes.items() if "persistentVolumeClaim" in v]
    assert mounts[bundles]["readOnly"] is True
    assert env["ADVFACE_BUNDLE"].startswith(mounts[bundles]["mountPath"].rstrip("/") + "/")
    assert ("PersistentVolumeClaim", volumes[bundles]["persistentVolumeClaim"]["claimName"]) in docs

    # headless Service selecting the pods, ports by name
    svc = docs[("Service", "advface")]
    assert svc["spec"]["clusterIP"] == "None"
    assert _matches(svc["spec"]["selector"], pod["metadata"]["labels"])
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert {p["targetPort"] for p in svc_ports.values()} <= set(ports)

    pdb = docs[("PodDisruptionBudget", "advface")]
    assert _matches(pdb["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])

    # HPA on a metric the adapter serves, for this Deployment
    hpa = docs[("HorizontalPodAutoscaler", "advface")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "advface"}
    served = {r["name"]["as"] for r in adapter_rules()}
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in served
    for rule in adapter_rules():
        assert re.search(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_k8s_custom_resources_structure() -> None:
    """ServiceMonitor and PrometheusRule are CRDs (no schema offline): check their structure and references."""
    docs = _k8s_docs()
    svc = docs[("Service", "advface")]
    sm = docs[("ServiceMonitor", "advface")]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
    assert _matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert sm["metadata"]["name"] == "advface"  # job label = Service name = `advface`, as the rules expect
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings"}
        assert ep["port"] in svc_ports and ep["path"] == "/metrics"
        assert re.fullmatch(r"\d+s", ep["interval"])

    rule = docs[("PrometheusRule", "advface")]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"], \
        "k8s/prometheusrule.yaml drifted from prometheus/alerts.yml"


def test_kustomization_lists_every_manifest() -> None:
    kust = load_yaml(K8S / "kustomization.yaml")
    listed = set(kust["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


# --- compose and Dockerfile ---------------------------------------------------------------------------------

class _ComposeLoader(yaml.SafeLoader):
    """Accepts compose's merge tags (!reset, !override) as plain values."""


_ComposeLoader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_mapping(node)
                                     if isinstance(node, yaml.MappingNode) else loader.construct_object(node))


def _compose(name: str) -> dict[str, Any]:
    return yaml.load((DEPLOY / name).read_text(), Loader=_ComposeLoader)  # noqa: S506 - a SafeLoader subclass


def test_compose_wires_service_prometheus_and_grafana() -> None:
    compose = _compose("compose.yaml")
    services = compose["services"]
    assert set(services) >= {"advface", "prometheus", "grafana"}
    svc = services["advface"]
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile" and (DEPLOY / svc["build"]["context"] / "pyproject.toml").is_file()
    assert set(svc["environment"]) <= SETTINGS_ENV
    assert any(v["target"] == svc["environment"]["ADVFACE_BUNDLE"] and v["read_only"] for v in svc["volumes"])
    assert int(svc["stop_grace_period"].rstrip("s")) > float(svc["environment"]["ADVFACE_DRAIN_SECONDS"])
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # every bind-mounted config file exists
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), volume
    # Prometheus scrapes the service by its compose name and metrics port
    scrape = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "advface"]
    assert job["static_configs"][0]["targets"] == ["advface:9464"] and "9464:9464" in svc["ports"]
    # Grafana reads the dashboards where the provisioning file points
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "advface.yaml")["providers"][0]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in services["grafana"]["volumes"]
    cpu = _compose("compose.cpu.yaml")["services"]["advface"]
    assert cpu["deploy"] == {} and cpu["environment"]["ADVFACE_DEVICE"] == "cpu"


def test_compose_files_match_the_compose_spec() -> None:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (ships the compose-spec schema) not installed")
    from importlib import resources

    import jsonschema

    schema = json.loads((resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    for name in ("compose.yaml", "compose.cpu.yaml"):
        errors = [e.message for e in validator.iter_errors(_compose(name))]
        assert errors == [], (name, errors)


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_runs_the_service_as_an_unprivileged_user() -> None:
    ins = _dockerfile_instructions(DEPLOY / "Dockerfile")
    get = lambda word: [rest for w, rest in ins if w == word]  # noqa: E731
    assert get("ARG")[0].startswith("BASE=nvidia/cuda:") and get("FROM") == ["${BASE}"]
    assert set(" ".join(get("EXPOSE")).split()) == {"50051", "9464"}
    assert get("STOPSIGNAL") == ["SIGTERM"]
    (user,) = get("USER")
    assert not user.startswith(("root", "0:", "0 ")) and user != "0"
    assert json.loads(get("ENTRYPOINT")[0]) == ["advface"] and json.loads(get("CMD")[-1]) == ["serve"]
    env = dict(re.findall(r"(ADVFACE_[A-Z_]+)=(\S+)", " ".join(get("ENV"))))
    assert set(env) <= SETTINGS_ENV and env["ADVFACE_BUNDLE"] == "/models/bundle"
    assert "python3.11" in " ".join(get("RUN"))
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ignore[0] != "!" and "*" in ignore and "!plugin_service/" in ignore  # build context: the package only


def _healthcheck_command() -> str:
    (hc,) = [rest for w, rest in _dockerfile_instructions(DEPLOY / "Dockerfile") if w == "HEALTHCHECK"]
    options, _, command = hc.partition(" CMD ")
    assert "--start-period" in options and command
    return command


def _run_healthcheck(port: int) -> int:
    env = {**os.environ, "ADVFACE_PORT": str(port),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("ADVFACE_TARGET", None)
    return subprocess.run(["sh", "-c", _healthcheck_command()], env=env, timeout=30, capture_output=True).returncode


def test_dockerfile_healthcheck_follows_grpc_health(live_server) -> None:  # noqa: ANN001 - conftest fixture
    """The image's HEALTHCHECK command, run as Docker would: healthy when SERVING, unhealthy otherwise."""
    from grpc_health.v1 import health_pb2

    from tests.helpers import free_port

    port = live_server.running.port
    assert _run_healthcheck(port) == 0
    assert _run_healthcheck(free_port()) != 0  # nothing listening
    health = live_server.running.health
    live_server.call(health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
    try:
        assert _run_healthcheck(port) != 0  # e.g. draining
    finally:
        live_server.call(health.set("", health_pb2.HealthCheckResponse.SERVING))
    assert _run_healthcheck(port) == 0


def test_docker_build_context_builds_the_package(tmp_path: Path) -> None:
    """What Dockerfile.dockerignore lets into the build context is enough for `pip install /src`."""
    import shutil
    import zipfile

    patterns = [p for p in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*"
    included = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    excluded = [p.removeprefix("**/") for p in patterns[1:] if not p.startswith("!")]
    context = tmp_path / "src"
    context.mkdir()
    for name in included:
        source = DEPLOY.parent / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns(*excluded))
        elif source.exists():
            shutil.copy2(source, context / name)
    result = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                   "-w", str(tmp_path / "wheel"), str(context)])
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
        scripts = z.read(entry_points).decode()
    assert "advface = plugin_service.cli:main" in scripts and "advface-client = advface_client.cli:main" in scripts
    assert {"advface/v1/plugin_pb2.py", "advface/v1/plugin_pb2_grpc.py", "plugin_service/server/app.py",
            "advface_client/client.py"} <= set(names)
