"""``otel-npu doctor``: run as a user would (the installed command, a fresh process, its environment)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from .collector import Collector
from .otlp_receiver import HttpReceiver, attributes
from .support import child_env, free_port


def doctor(*args: str, **env: str) -> subprocess.CompletedProcess:
    command = shutil.which("otel-npu") or ""
    argv = [command] if command else [sys.executable, "-m", "otel_npu"]
    clean = child_env()
    clean.update(env)
    return subprocess.run(argv + ["doctor", *args], capture_output=True, text=True, timeout=120, env=clean)


def fields(out: str) -> dict[str, str]:
    found = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and not key.startswith(" " * 4):
            found.setdefault(key.strip(), value.strip())
    return found


def test_doctor_says_what_would_happen_and_hides_header_values():
    result = doctor(OTEL_NPU_ENABLED="1", OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
                    OTEL_EXPORTER_OTLP_ENDPOINT="http://collector.example:4317",
                    OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer%20tok-5e1f0d9c",
                    OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0.01",
                    OTEL_SERVICE_NAME="decode-worker", RANK="2")
    assert result.returncode == 0, result.stdout + result.stderr
    out = fields(result.stdout)
    assert out["enabled"] == "yes (OTEL_NPU_ENABLED='1')"
    assert out["device"] == "cpu (auto)"
    reasons = [line.split(":", 1)[1].strip() for line in result.stdout.splitlines()
               if line.strip().startswith("not used:")]
    assert [r.split(":")[0] for r in reasons] == ["npu", "cuda"], "why not NPU, why not CUDA"
    assert all(len(r.split(":", 1)[1].strip()) > 10 for r in reasons), reasons
    assert out["traces exporter"] == "otlp" and out["metrics exporter"] == "otlp"
    assert "collector.example:4317" in out["endpoint"] and out["protocol"] == "grpc"
    assert out["headers"] == "authorization (values hidden)"
    assert "TraceIdRatioBased{0.01}" in out["sampler"] and "ParentBased" in out["sampler"]
    assert "service.name=decode-worker" in out["resource"] and "otel_npu.rank=2" in out["resource"]
    assert "configuration: valid" in result.stdout
    assert "tok-5e1f0d9c" not in result.stdout + result.stderr


def test_doctor_when_disabled_says_why_and_how():
    result = doctor()
    assert result.returncode == 0
    assert fields(result.stdout)["enabled"].startswith("no (off by default: set OTEL_NPU_ENABLED=1")


def test_invalid_configuration_exits_non_zero_naming_each_problem():
    result = doctor(OTEL_NPU_ENABLED="maybe", OTEL_EXPORTER_OTLP_PROTOCOL="http/json",
                    OTEL_METRICS_EXPORTER="prometheus")
    assert result.returncode == 2, result.stdout
    problems = result.stdout.split("configuration problems")[1]
    assert "OTEL_NPU_ENABLED='maybe' is not valid: accepted values are 1, 0, true, false" in problems
    assert "OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is not valid: accepted values are http/protobuf, grpc" \
        in problems
    assert "OTEL_METRICS_EXPORTER names 'prometheus'" in problems


def test_explicitly_named_unusable_device_is_a_problem():
    result = doctor(OTEL_NPU_ENABLED="1", OTEL_NPU_DEVICE="npu")
    assert result.returncode == 2
    assert "NOT USABLE" in fields(result.stdout)["device"]


def test_test_span_accepted_by_a_real_collector(tmp_path):
    receiver = HttpReceiver()
    collector = Collector(receiver.endpoint, "http", tmp_path).start()
    try:
        result = doctor("--send-test-span", OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint("grpc"),
                        OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_TRACES_SAMPLER="always_off")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "test span: accepted" in result.stdout and "stage metrics accepted too" in result.stdout
        (resource, span), = receiver.wait_for(1)
        assert span.name == "otel-npu doctor" and attributes(span.attributes)["otel_npu.doctor"] is True
    finally:
        collector.stop()
        receiver.close()


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_test_span_refused_says_why_and_exits_1(protocol):
    result = doctor("--send-test-span", "--timeout", "2", OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
                    OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1, result.stdout + result.stderr
    line = [l for l in result.stdout.splitlines() if l.startswith("test span:")][0]
    assert "NOT accepted" in line and ("refused" in line.lower() or "unavailable" in line.lower()), line


@pytest.mark.parametrize("var, raw", [("OTEL_EXPORTER_OTLP_TIMEOUT", "0"), ("OTEL_EXPORTER_OTLP_TIMEOUT", "nan"),
                                      ("OTEL_EXPORTER_OTLP_TIMEOUT", "1e23"), ("OTEL_NPU_POLL_INTERVAL_MS", "1e16"),
                                      ("OTEL_BSP_SCHEDULE_DELAY", "99999999999999999999999"),
                                      ("OTEL_METRIC_EXPORT_INTERVAL", "1e23")])
def test_out_of_range_numbers_are_configuration_problems(var, raw):
    result = doctor(OTEL_NPU_ENABLED="1", OTEL_METRICS_EXPORTER="otlp", **{var: raw})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "configuration: valid" not in result.stdout
    problems = result.stdout.split("configuration problems")[1]
    assert f"{var}={raw!r} is not valid" in problems and " to " in problems
    assert problems.count(f"{var}=") == 1, "one problem, said once"
