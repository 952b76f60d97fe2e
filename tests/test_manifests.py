"""The Kubernetes manifests in deploy/kubernetes: not run here (no cluster), so checked against
the service itself: the routes their probes name answer on a real `bentoml serve`, the metrics
their scaler names are ones the service exports, their SOTA_SERVE_* values are valid settings,
and their ports agree."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sota_serve.serving.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
#: the series a Prometheus client library exports for each metric type
SUFFIXES = {"Counter": ("_total",), "Histogram": ("_bucket", "_sum", "_count"), "Gauge": ("",),
            "Summary": ("_sum", "_count")}
DEFAULT_PORT = 3000  # BentoML's, when BENTOML_PORT is not set
METRIC = re.compile(r"\b((?:sota_serve|bentoml)_[a-z0-9_]+)\b")


def documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents() if doc["kind"] == kind]


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair in a parsed manifest, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for key, value in walk(doc) if key == "containers" for c in value]


def probe_paths() -> set[str]:
    paths = {value["httpGet"]["path"] for doc in documents() for key, value in walk(doc) if key in PROBES}
    paths |= {value for doc in documents() for key, value in walk(doc) if key == "prometheus.io/path"}
    return paths


def scaler_queries() -> list[str]:
    return [t["metadata"]["query"] for doc in by_kind("ScaledObject") for t in doc["spec"]["triggers"]]


def declared_metrics() -> set[str]:
    """The series of the metrics bento/metrics.py declares (``bentoml.metrics.<Type>(name=...)``)."""
    tree = ast.parse((ROOT / "bento" / "metrics.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and ast.unparse(node.func.value) == "bentoml.metrics" and node.func.attr in SUFFIXES):
            name = next(k.value.value for k in node.keywords if k.arg == "name")
            names |= {name + suffix for suffix in SUFFIXES[node.func.attr]}
    return names


def test_every_manifest_parses_and_names_its_kind():
    kinds = {doc["kind"] for doc in documents()}
    assert {"Deployment", "Service", "ScaledObject", "InferenceService", "RayService"} <= kinds
    for doc in documents():
        assert doc["apiVersion"] and doc["metadata"]["name"], doc
    for ray in by_kind("RayService"):  # its Serve config is YAML inside YAML
        serve = yaml.safe_load(ray["spec"]["serveConfigV2"])
        for app in serve["applications"]:
            assert re.fullmatch(r"[\w.]+:\w+", app["import_path"]) and app["route_prefix"] == "/"


def test_the_probes_are_the_v2_health_routes():
    for doc in by_kind("Deployment") + by_kind("InferenceService"):
        for c in containers(doc):
            assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
            assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
            assert c["resources"]["requests"] and c["resources"]["limits"]


def test_probe_ports_are_the_port_the_server_listens_on():
    for doc in by_kind("Deployment") + by_kind("InferenceService"):
        for c in containers(doc):
            env = {e["name"]: e["value"] for e in c.get("env", [])}
            listens = int(env.get("BENTOML_PORT", DEFAULT_PORT))
            ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
            assert listens in ports.values(), f"{c['name']}: the server listens on {listens}, not on {ports}"
            for key in PROBES:
                if key in c:
                    port = c[key]["httpGet"]["port"]
                    assert ports.get(port, port) == listens, f"{c['name']} {key} probes port {port}"


def test_service_targets_the_containers_port():
    names = {p["name"] for doc in by_kind("Deployment") for c in containers(doc) for p in c["ports"]}
    for service in by_kind("Service"):
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names


def test_sota_serve_settings_are_valid():
    for doc in documents():
        for c in containers(doc):
            values = {e["name"].removeprefix("SOTA_SERVE_").lower(): e["value"]
                      for e in c.get("env", []) if e["name"].startswith("SOTA_SERVE_")}
            unknown = set(values) - set(Settings.model_fields)
            assert not unknown, f"{c['name']}: no setting {sorted(unknown)}"
            Settings(**values)  # raises on a value out of range


def test_scaler_names_the_services_own_metrics():
    named = {m for query in scaler_queries() for m in METRIC.findall(query)}
    ours = {m for m in named if m.startswith("sota_serve_")}
    assert ours, "the scaler should use the service's own metrics"
    assert ours <= declared_metrics(), f"not declared in bento/metrics.py: {sorted(ours - declared_metrics())}"


@pytest.mark.slow
def test_probes_and_metrics_against_a_running_server(server, photos):
    for path in sorted(probe_paths()):
        answer = httpx.get(f"{server.url}{path}", timeout=10)
        assert answer.status_code == 200, f"{path}: {answer.status_code} {answer.text[:200]}"
    # a request, so that the request and batch metrics have series on /metrics
    files = {"image": (photos[0].name, photos[0].read_bytes(), "image/jpeg")}
    assert httpx.post(f"{server.url}/classify", files=files, timeout=60).status_code == 200
    exported = {s.name for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
                for s in family.samples}
    named = {m for query in scaler_queries() for m in METRIC.findall(query)}
    missing = {m for m in named if m not in exported and m not in declared_metrics()}
    assert not missing, f"the scaler names metrics the service does not export: {sorted(missing)}"
    # the declared histograms really are exported under those names
    assert "sota_serve_batch_seconds_sum" in exported
