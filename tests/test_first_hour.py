"""What a new user meets in the first hour, tried as they would: bad settings never crash the demo or the
library, the demo says what it did and did not deliver, doctor catches an endpoint written without its
scheme, and an unknown exporter means the same thing everywhere."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

import otel_npu

from .otlp_receiver import HttpReceiver
from .support import child_env, free_port

DEMO = ["demo", "--device", "cpu", "--model-size", "tiny", "--steps", "4", "--requests", "2", "--no-progress"]


def cli(*args: str, cwd, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otel_npu", *args], cwd=cwd, env=child_env(**env),
                          capture_output=True, text=True, timeout=timeout, check=False)


def problem_lines(doctor_output: str) -> list[str]:
    """The lines under doctor's "configuration problems" heading, without the "  - " bullet."""
    return [line.strip()[2:] for line in doctor_output.splitlines() if line.startswith("  - ")]


BSP_CASES = [("OTEL_BSP_MAX_QUEUE_SIZE", "-1"), ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
             ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "-1"), ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "100000"),
             # The SDK's BatchSpanProcessor reads this one itself when not given it: a traceback on stderr for
             # 'abc', and no word at all for -1, while doctor said "configuration: valid".
             ("OTEL_BSP_EXPORT_TIMEOUT", "abc"), ("OTEL_BSP_EXPORT_TIMEOUT", "-1")]
# The SDK's TracerProvider reads these itself when not given SpanLimits, and raises for an invalid one.
LIMIT_CASES = [("OTEL_SPAN_LINK_COUNT_LIMIT", "abc"), ("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "-1"),
               ("OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", "1.5"), ("OTEL_SPAN_LINK_COUNT_LIMIT", "-2")]
# ``import opentelemetry.sdk.trace`` itself raises ValueError for an invalid OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT (a
# module-level constant of the SDK's, 1.45): ``import otel_npu``, the demo and doctor all failed so.
SDK_IMPORT_CASES = [("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "-5")]


@pytest.mark.parametrize("var, value", BSP_CASES + LIMIT_CASES + SDK_IMPORT_CASES)
def test_no_batch_or_limit_setting_crashes_the_demo_and_the_warning_is_doctors(var, value, tmp_path):
    doctor = cli("doctor", cwd=tmp_path, **{var: value})
    problems = problem_lines(doctor.stdout)
    done = cli(*DEMO, cwd=tmp_path, **{var: value})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (traces,) = tmp_path.glob("otel-npu-traces-*.jsonl")
    assert traces.stat().st_size > 0, "an empty traces file left behind"
    for problem in problems:  # what doctor reports, the demo warns about in the same words
        assert problem in done.stderr, (problem, done.stderr[-3000:])
    if value != "100000":
        assert problems and f"{var}='{value}' is not valid" in problems[0], doctor.stdout


@pytest.mark.parametrize("var, value", BSP_CASES + LIMIT_CASES)
def test_no_batch_or_limit_setting_crashes_the_library(var, value, tmp_path, monkeypatch):
    monkeypatch.setenv(var, value)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_NPU_TRACES_FILE", str(tmp_path / "t.jsonl"))
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    with otel_npu.capture("forward"):
        pass
    assert otel_npu.flush(10.0)
    assert otel_npu.stats()["spans_emitted"] == 1
    otel_npu.shutdown(5.0)
    assert (tmp_path / "t.jsonl").read_text().strip()


# Every span limit variable of the specification, as the OpenTelemetry SDK reads them.
SDK_LIMIT_VARS = ("OTEL_ATTRIBUTE_COUNT_LIMIT", "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
                  "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_EVENT_COUNT_LIMIT", "OTEL_SPAN_LINK_COUNT_LIMIT",
                  "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT")
# A program of otel-npu's user, in a process of its own: the SDK's import runs with the variable set.
LIBRARY_USER = """
import os, sys
import otel_npu
assert "opentelemetry.sdk.trace" not in sys.modules, "import otel_npu imported the OpenTelemetry SDK"
otel_npu.configure(enabled=True, device="cpu", pipeline="own")
with otel_npu.capture("forward"):
    pass
assert otel_npu.flush(10.0)
assert otel_npu.stats()["spans_emitted"] == 1, otel_npu.stats()
otel_npu.shutdown(5.0)
var, value = sys.argv[1:]
assert os.environ[var] == value, "the process environment changed"
from opentelemetry.sdk.trace import SpanLimits
try:  # an application's own SpanLimits reads the variable as the SDK always does
    SpanLimits()
except ValueError as exc:
    print("SpanLimits:", exc)
"""


@pytest.mark.parametrize("value", ["-5", "abc", "unset"])
@pytest.mark.parametrize("var", SDK_LIMIT_VARS)
def test_no_limit_setting_crashes_the_import_or_the_library(var, value, tmp_path):
    """``import opentelemetry.sdk.trace`` raises for an OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT that is not a whole
    number (the SDK 1.45 reads no limit from an empty value, not from ``unset``, which otel-npu accepts), and
    ``import otel_npu`` imported it: the program failed at its import line."""
    traces = tmp_path / "t.jsonl"
    done = subprocess.run([sys.executable, "-c", LIBRARY_USER, var, value], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False,
                          env=child_env(**{var: value}, OTEL_TRACES_EXPORTER="none", OTEL_NPU_TRACES_FILE=str(traces)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert traces.read_text().strip(), "no span written"
    warning = (f"{var}={value!r} is not valid: accepted values are whole numbers from 0 (or 'unset' for no limit); "
               "using the default")
    assert done.stderr.count(warning) == (0 if value == "unset" else 1), done.stderr
    if value != "unset":
        assert f"SpanLimits: {var} must be a non-negative integer" in done.stdout, done.stdout


def test_the_demo_says_what_it_could_not_deliver(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = cli(*DEMO, cwd=tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=dead, OTEL_EXPORTER_OTLP_TIMEOUT="1")
    out = done.stdout
    assert done.returncode == 1, (done.returncode, out, done.stderr[-3000:])
    assert "Traces exported" not in out, out
    spans = int(out.split(" spans\n")[0].rsplit(";", 1)[1])  # "served ... in 1.2 s; 27 spans"
    assert f"Traces NOT exported over OTLP (http/protobuf) to {dead}/v1/traces: {spans} of {spans} spans lost" in out, out
    assert dead in out and "export_failed" in out, out
    assert "Stage metrics were not delivered" in out, out


def test_the_demo_says_what_it_delivered(tmp_path):
    receiver = HttpReceiver()
    try:
        done = cli(*DEMO, cwd=tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        out = done.stdout
        assert done.returncode == 0, (out, done.stderr[-3000:])
        spans = int(out.split(" spans\n")[0].rsplit(";", 1)[1])
        assert len(receiver.spans()) == spans
        assert (f"Traces exported over OTLP (http/protobuf) to {receiver.endpoint}/v1/traces: all {spans} spans "
                "delivered." in out), out
    finally:
        receiver.close()


@pytest.mark.parametrize("var", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                                 "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"])
def test_doctor_rejects_an_endpoint_without_its_scheme_and_says_how_to_write_it(var, tmp_path):
    done = cli("doctor", cwd=tmp_path, **{var: "localhost:4318"})
    assert done.returncode == 2, done.stdout
    (problem,) = [p for p in problem_lines(done.stdout) if p.startswith(var + "=")]
    assert "'localhost:4318' is not valid" in problem and "http://localhost:4318" in problem, problem
    assert "https://" in problem, problem


def test_the_library_warns_about_an_endpoint_without_its_scheme_as_doctor_does(tmp_path, monkeypatch, caplog):
    doctor = cli("doctor", cwd=tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT="localhost:4318")
    (problem,) = problem_lines(doctor.stdout)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    caplog.set_level(logging.WARNING, logger="otel_npu")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own", shutdown_timeout_s=1.0)
    with otel_npu.capture("forward"):
        pass
    otel_npu.shutdown(1.0)
    assert problem in caplog.text, (problem, caplog.text)


@pytest.mark.parametrize("var, value, accepted", [
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "bogus", "http/protobuf, grpc"),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "nan", "a number of seconds")])
def test_a_variable_both_signals_read_is_warned_about_once(var, value, accepted, monkeypatch, caplog):
    """The general OTLP variables serve the traces and the stage metrics: each signal read it, and warned."""
    monkeypatch.setenv(var, value)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    caplog.set_level(logging.WARNING, logger="otel_npu")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own", shutdown_timeout_s=1.0)
    with otel_npu.capture("forward"):
        pass
    assert "otlp" in otel_npu.stats()["metrics"], otel_npu.stats()  # both signals go over OTLP
    otel_npu.shutdown(1.0)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{var}={value!r} is not valid")]
    assert len(said) == 1 and accepted in said[0], said


# The OpenTelemetry specification's rule for a value an implementation does not recognise: warn, and ignore
# the setting as if it were not set. The library's default then is OTLP; the demo's is a traces file.
UNKNOWN = ("OTEL_TRACES_EXPORTER names 'jaeger', which otel-npu does not know (accepted values are otlp, console, "
           "none): ignored, as if OTEL_TRACES_EXPORTER were not set")


def test_an_unknown_exporter_in_the_library_is_as_if_unset_and_said(receiver, monkeypatch, caplog):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jaeger")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    caplog.set_level(logging.WARNING, logger="otel_npu")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    with otel_npu.capture("forward"):
        pass
    assert otel_npu.flush(10.0)
    assert [s.name for _, s in receiver.wait_for(1)] == ["forward"]
    assert f"{UNKNOWN}: traces go over OTLP (the default)" in caplog.text, caplog.text


def test_an_unknown_exporter_in_the_demo_is_as_if_unset_and_said_in_the_same_words(tmp_path):
    done = cli(*DEMO, cwd=tmp_path, OTEL_TRACES_EXPORTER="jaeger")
    assert done.returncode == 0, done.stderr[-3000:]
    both = done.stdout + done.stderr
    assert both.count(UNKNOWN) == 1 and f"{UNKNOWN}: the demo writes its traces to a file" in both, both
    (traces,) = tmp_path.glob("otel-npu-traces-*.jsonl")  # the demo's default when nothing is named: a file
    assert json.loads(traces.read_text().splitlines()[0])["resourceSpans"]


def test_a_command_piped_into_head_ends_quietly(tmp_path):
    """``otel-npu summary FILE | head -3`` printed a BrokenPipeError traceback once head had its lines (a table
    longer than the pipe's buffer)."""
    traces = tmp_path / "t.jsonl"
    spans = [{"traceId": f"{n + 1:032x}", "spanId": f"{n + 1:016x}", "name": f"Step{n}", "kind": 1,
              "startTimeUnixNano": "1000", "endTimeUnixNano": "2000",
              "attributes": [{"key": "otel_npu.kind", "value": {"stringValue": "step"}}]} for n in range(3000)]
    line = {"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"scope": {"name": "otel_npu"},
                                                                               "spans": spans}]}]}
    traces.write_text(json.dumps(line) + "\n")
    done = subprocess.run(f"{sys.executable} -m otel_npu summary {traces} | head -1", shell=True, cwd=tmp_path,
                          env=child_env(), capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.startswith(str(traces)), done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
