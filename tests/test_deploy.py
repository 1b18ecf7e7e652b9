"""deploy/, checked as far as a machine without Docker allows (deploy/README.md says what is not run)."""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from .support import child_env

yaml = pytest.importorskip("yaml", reason="pyyaml is in the test extra: pip install -e '.[test]'")

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "otel-npu.json"
METRIC = "otel_npu.stage.duration"  # what the dashboard is about


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(DEPLOY / "docker-compose.yaml")


@pytest.fixture(scope="module")
def collector() -> dict:
    return load(DEPLOY / "otel-collector.yaml")


def host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition("//")[2].split("/")[0].rpartition(":")
    return host, int(port)


def test_every_file_parses():
    files = [p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json")]
    assert len(files) >= 9
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert all(doc is not None for doc in yaml.safe_load_all(path.read_text())), path


def test_compose_mounts_existing_files_and_pins_images(compose):
    services = compose["services"]
    assert set(services) == {"otel-collector", "jaeger", "tempo", "prometheus", "grafana"}
    for name, service in services.items():
        image = service["image"]
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"{name}: pin {image}"
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is not in deploy/"
        for dependency in service.get("depends_on", []):
            assert dependency in services
        for arg in service.get("command", []):  # config files named on the command line are mounted
            if "config" in arg and "=" in arg:
                path = arg.split("=", 1)[1]
                assert any(v.split(":")[1] == path for v in service.get("volumes", [])), (name, path)


def check_collector_config(config: dict, services: dict[str, set[int]]) -> None:
    """Pipelines name only defined components; OTLP/Prometheus exporters point at known services/ports."""
    for pipeline, spec in config["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for name in spec.get(kind, []):
                assert name in config.get(kind, {}), f"pipeline {pipeline} uses undefined {kind[:-1]} {name}"
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"]
    for name, exporter in config["exporters"].items():
        if name.startswith("otlp"):
            host, port = host_port(exporter["endpoint"])
            assert port in services.get(host, set()), f"exporter {name}: nothing listens on {host}:{port}"


def test_collector_pipelines_and_exporters_point_at_the_stack(collector, compose):
    tempo = load(DEPLOY / "tempo.yaml")
    tempo_otlp = host_port(tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])[1]
    listening = {"jaeger": {4317, 4318, 16686}, "tempo": {tempo_otlp, tempo["server"]["http_listen_port"]}}
    check_collector_config(collector, listening)
    receivers = collector["receivers"]["otlp"]["protocols"]
    published = {int(p.split(":")[1]) for p in compose["services"]["otel-collector"]["ports"]}
    assert {host_port(receivers[p]["endpoint"])[1] for p in ("grpc", "http")} <= published
    assert collector["exporters"]["prometheus"]["enable_open_metrics"] is True  # exemplars


def test_prometheus_scrapes_the_collectors_exporter(collector):
    prometheus = load(DEPLOY / "prometheus.yaml")
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    exporter_port = host_port(collector["exporters"]["prometheus"]["endpoint"])[1]
    assert targets == [f"otel-collector:{exporter_port}"]


def test_grafana_datasources_dashboards_and_mounts_agree(compose):
    datasources = load(DEPLOY / "grafana/provisioning/datasources/datasources.yaml")["datasources"]
    tempo = load(DEPLOY / "tempo.yaml")
    expected = {"prometheus": ("prometheus", 9090), "tempo": ("tempo", tempo["server"]["http_listen_port"]),
                "jaeger": ("jaeger", 16686)}
    uids = {d["uid"]: d for d in datasources}
    assert set(uids) == set(expected)
    for uid, (service, port) in expected.items():
        assert host_port(uids[uid]["url"]) == (service, port) and service in compose["services"]
    assert uids["prometheus"]["jsonData"]["exemplarTraceIdDestinations"][0]["datasourceUid"] == "tempo"

    providers = load(DEPLOY / "grafana/provisioning/dashboards/dashboards.yaml")["providers"]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert [p["options"]["path"] for p in providers] == [mounts["./grafana/dashboards"]]

    dashboard = json.loads(DASHBOARD.read_text())
    used = {p["datasource"]["uid"] for p in dashboard["panels"]}
    used |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert used <= set(uids)
    assert any(t.get("exemplar") for p in dashboard["panels"] for t in p["targets"])


def test_host_ports_in_the_readme_are_the_compose_files(compose):
    published = {(name, int(p.split(":")[0])) for name, s in compose["services"].items() for p in s.get("ports", [])}
    text = (DEPLOY / "README.md").read_text()
    table = text.split("## Ports on the host", 1)[1].split("\n## ", 1)[0]
    documented = {(m.group(1), int(m.group(2))) for m in re.finditer(r"^\| ([\w-]+) \| (\d+) \|", table, re.M)}
    assert documented == published
    for port in (4318, 16686, 3000):  # the ports the main README names
        assert f"localhost:{port}" in (DEPLOY.parent / "README.md").read_text() + text


def test_kubernetes_serving_pod_sends_to_the_daemonset(collector):
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes/otel-collector-daemonset.yaml").read_text()))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    daemonset = next(d for d in docs if d["kind"] == "DaemonSet")
    k8s_config = yaml.safe_load(config_map["data"]["config.yaml"])
    check_collector_config(k8s_config, {"tempo.observability.svc.cluster.local": {4317},
                                        "jaeger-collector.observability.svc.cluster.local": {4317}})
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == load(DEPLOY / "docker-compose.yaml")["services"]["otel-collector"]["image"]
    host_ports = {p["hostPort"] for p in container["ports"] if "hostPort" in p}
    assert [v["configMap"]["name"] for v in daemonset["spec"]["template"]["spec"]["volumes"]] == \
        [config_map["metadata"]["name"]]

    serving = load(DEPLOY / "kubernetes/serving-deployment.yaml")
    env = {e["name"]: e for e in serving["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["OTEL_NPU_ENABLED"]["value"] == "1"
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"]
    assert endpoint.startswith("http://$(NODE_IP):") and host_port(endpoint)[1] in host_ports
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"]["value"] == "http/protobuf" and host_port(endpoint)[1] == 4318


# -- the dashboard's queries against a real export -------------------------------------------------------

_UNITS = {"ms": "milliseconds", "s": "seconds", "us": "microseconds", "ns": "nanoseconds", "By": "bytes",
          "1": "ratio"}


def prometheus_names(name: str, unit: str, kind: str, monotonic: bool) -> set[str]:
    """What the collector's prometheus exporter (add_metric_suffixes: true) calls an OTLP metric."""
    base = re.sub(r"_+", "_", re.sub(r"[^a-zA-Z0-9_:]", "_", name))
    suffix = "" if unit.startswith("{") or not unit else _UNITS.get(unit, re.sub(r"[^a-zA-Z0-9]", "_", unit))
    if suffix == "ratio" and kind != "gauge":
        suffix = ""
    if suffix and not base.endswith("_" + suffix):
        base = f"{base}_{suffix}"
    if kind in ("histogram", "exponential_histogram", "summary"):
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return {f"{base}_total"} if kind == "sum" and monotonic else {base}


class MetricsReceiver:
    """OTLP/HTTP on loopback: records the metrics (names, units, kinds, attribute keys); accepts traces."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2

        self.metrics: dict[str, tuple[str, str, bool, set[str]]] = {}
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/metrics":
                    request = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                    for rm in request.resource_metrics:
                        for sm in rm.scope_metrics:
                            for metric in sm.metrics:
                                kind = metric.WhichOneof("data")
                                points = getattr(metric, kind).data_points
                                keys = {kv.key for p in points for kv in p.attributes}
                                monotonic = kind == "sum" and metric.sum.is_monotonic
                                old = receiver.metrics.get(metric.name, (None, None, None, set()))[3]
                                receiver.metrics[metric.name] = (metric.unit, kind, monotonic, old | keys)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def dashboard_references() -> tuple[set[str], set[str]]:
    """Metric names and label names the dashboard's PromQL (panels and variables) uses."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"] if "expr" in t]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    metrics, labels = set(), set()
    for expr in exprs:
        metrics |= set(re.findall(r"\b(otel_npu_\w+?_(?:bucket|sum|count|total))\b", expr))
        for group in re.findall(r"(?:by|ignoring|on)\s*\(([^)]*)\)", expr):
            labels |= {g.strip() for g in group.split(",") if g.strip() and g.strip() != "le"}
        labels |= set(re.findall(r"(\w+)\s*=~", expr))
        labels |= set(re.findall(r"label_values\(\w+,\s*(\w+)\)", expr))
    return metrics, labels


def test_dashboard_queries_name_metrics_the_demo_really_exports(tmp_path):
    pytest.importorskip("transformers", reason="the demo extra is not installed")
    metrics, labels = dashboard_references()
    assert metrics and labels  # the dashboard does query something
    receiver = MetricsReceiver()
    try:
        env = child_env()
        # RANK: a ranked process (as a vLLM worker is), so that the per-rank panel's label is exported too
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                   OTEL_METRICS_EXPORTER="otlp", OTEL_METRIC_EXPORT_INTERVAL="500", RANK="0")
        done = subprocess.run([sys.executable, "-m", "otel_npu", "demo", "--device", "cpu", "--model-size", "tiny",
                               "--steps", "6", "--requests", "2", "--no-progress"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    finally:
        receiver.close()
    exported = receiver.metrics
    # A demo that stopped exporting the stage metric is a regression here, not a reason to skip.
    assert METRIC in exported, (f"the demo exported no {METRIC} metric (got: {sorted(exported) or 'no metrics'}); "
                                f"the dashboard queries {sorted(metrics)}")
    problems = mismatches(exported, metrics, labels)
    assert not problems, problems


def mismatches(exported: dict, metrics: set[str], labels: set[str]) -> list[str]:
    """What the dashboard names that the export (as the collector's Prometheus exporter renders it) lacks."""
    names = set().union(*(prometheus_names(n, u, k, m) for n, (u, k, m, _) in exported.items()))
    label_names = {re.sub(r"[^a-zA-Z0-9_]", "_", key) for (_, _, _, keys) in exported.values() for key in keys}
    problems = []
    if not metrics <= names:
        problems.append(f"dashboard names metrics {sorted(metrics - names)}; the export has {sorted(names)}")
    if not labels <= label_names:
        problems.append(f"dashboard names labels {sorted(labels - label_names)}; the export has {sorted(label_names)}")
    return problems


@pytest.mark.parametrize("name, keys, ok", [
    (METRIC, ("otel_npu.stage", "otel_npu.step", "otel_npu.device", "otel_npu.rank"), True),
    (METRIC, ("otel_npu.stage", "otel_npu.step", "otel_npu.device"), False),  # no rank: the per-rank panel is empty
    ("otel_npu.stage.time", ("otel_npu.stage", "otel_npu.step", "otel_npu.device"), False),
    (METRIC, ("stage", "step", "device"), False),
])
def test_the_check_catches_a_dashboard_that_does_not_match_an_sdk_export(name, keys, ok):
    # The same receiver and rules, fed by the OpenTelemetry SDK's own OTLP/HTTP metric exporter.
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    receiver = MetricsReceiver()
    try:
        reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{receiver.endpoint}/v1/metrics"))
        provider = MeterProvider(metric_readers=[reader])
        histogram = provider.get_meter("t").create_histogram(name, unit="ms")
        histogram.record(3.5, dict(zip(keys, ("forward", "Decode", "npu:0", 0))))
        provider.shutdown()
    finally:
        receiver.close()
    assert name in receiver.metrics
    assert (not mismatches(receiver.metrics, *dashboard_references())) is ok


def test_prometheus_translation_matches_the_collectors_rules():
    assert prometheus_names("otel_npu.stage.duration", "ms", "histogram", False) == {
        "otel_npu_stage_duration_milliseconds_bucket", "otel_npu_stage_duration_milliseconds_sum",
        "otel_npu_stage_duration_milliseconds_count"}
    assert prometheus_names("otel_npu.captures", "{capture}", "sum", True) == {"otel_npu_captures_total"}
    assert prometheus_names("otel_npu.pending", "1", "gauge", False) == {"otel_npu_pending_ratio"}


def test_a_step_duration_panel_has_exemplars_that_open_traces_and_kept_slow_steps_are_listed(collector):
    """From a slow bucket to its trace. The exemplars need, end to end: a Prometheus panel asking for
    them on the step series, a Prometheus datasource that sends their trace_id to Tempo, Prometheus keeping
    them (exemplar storage) and the collector's Prometheus exporter writing them (OpenMetrics)."""
    dashboard = json.loads(DASHBOARD.read_text())
    step_panels = [p for p in dashboard["panels"] for t in p["targets"]
                   if t.get("exemplar") and p["datasource"]["uid"] == "prometheus"
                   and "otel_npu_stage=~\"$step\"" in t.get("expr", "") and "_bucket" in t["expr"]]
    assert step_panels, "a panel of whole-step durations with exemplars"
    datasources = {d["uid"]: d for d in load(DEPLOY / "grafana/provisioning/datasources/datasources.yaml")["datasources"]}
    destination = datasources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"][0]
    assert destination["name"] == "trace_id" and datasources[destination["datasourceUid"]]["type"] == "tempo"
    compose = load(DEPLOY / "docker-compose.yaml")
    assert "--enable-feature=exemplar-storage" in compose["services"]["prometheus"]["command"]
    assert collector["exporters"]["prometheus"]["enable_open_metrics"] is True
    kept = [t["query"] for p in dashboard["panels"] for t in p["targets"] if p["datasource"]["uid"] == "tempo"
            and "otel_npu.kept" in t.get("query", "")]
    assert kept == ['{ span.otel_npu.kept = "slow" }']


def test_a_panel_shows_each_ranks_stage_times_side_by_side():
    """Tensor/pipeline-parallel workers: one series per stage and rank, from the label every worker's stage
    metrics carry (``otel_npu.rank``: the vLLM plugin sets it from vLLM's world group, else ``$RANK``)."""
    dashboard = json.loads(DASHBOARD.read_text())
    ranked = [(p, t) for p in dashboard["panels"] for t in p["targets"]
              if re.search(r"by \(le, [^)]*otel_npu_rank", t.get("expr", ""))]
    assert ranked, "a panel grouping the stage histogram by rank"
    panel, target = ranked[0]
    assert "otel_npu_stage" in target["expr"] and "{{otel_npu_rank}}" in target["legendFormat"]
    assert panel["datasource"]["uid"] == "prometheus"
