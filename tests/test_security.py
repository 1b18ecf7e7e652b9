"""Security: TLS through the standard certificate variable, and header values (tokens) kept out of every log
line and error text otel-npu or the SDK exporters produce."""

from __future__ import annotations

import logging
import shutil
import subprocess

import pytest
import requests

import otel_npu
from otel_npu.export import redact

from .otlp_receiver import GrpcReceiver, HttpReceiver
from .support import child_env, free_port, missing


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost / 127.0.0.1: (cert file, key file)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        missing("openssl", "the openssl command is needed to make a self-signed certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(cert), str(key)


@pytest.fixture(params=["http/protobuf", "grpc"])
def tls_receiver(request, certificate):
    receiver = (HttpReceiver if request.param == "http/protobuf" else GrpcReceiver)(tls=certificate)
    yield request.param, receiver
    otel_npu.shutdown(5.0)
    receiver.close()


def test_tls_with_the_certificate_variable(tls_receiver, certificate, monkeypatch):
    protocol, receiver = tls_receiver
    assert receiver.endpoint.startswith("https://")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", certificate[0])
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    # Many hosts set this (this one does): requests would let it override the certificate variable.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    with otel_npu.capture("forward"):
        pass
    assert otel_npu.flush(10.0)
    assert [span.name for _, span in receiver.wait_for(1)] == ["forward"]
    assert receiver.wait_for_metric("otel_npu.stage.duration") is not None
    assert otel_npu.stats()["dropped_total"] == 0


def test_tls_without_the_certificate_is_refused_and_counted(tls_receiver, monkeypatch):
    """The self-signed certificate is really checked: without the variable the export fails (counted)."""
    protocol, receiver = tls_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_CERTIFICATE", raising=False)
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    with otel_npu.capture("forward"):
        pass
    otel_npu.flush(5.0)
    assert receiver.spans() == []
    assert otel_npu.stats()["dropped"]["export_failed"] == 1


TOKEN = "tok-3f9a1c7e5b"
API_KEY = "key-8d2e6b4a0c"
MALFORMED = "pw-77c1d0e2aa"


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_header_values_never_appear_in_logs_or_errors(protocol, monkeypatch, caplog, capfd):
    receiver = HttpReceiver()
    receiver.status, receiver.echo_headers = 401, True  # refuses, and echoes the request headers back
    endpoint = receiver.endpoint if protocol == "http/protobuf" else f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    # The last entry is malformed (a space in the name): the SDK's parser logs such an entry, value and all.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS",
                       f"authorization=Bearer%20{TOKEN},x-api-key={API_KEY},bad name={MALFORMED}")
    caplog.set_level(logging.DEBUG)  # every logger, every level
    try:
        otel_npu.configure(enabled=True, device="cpu", pipeline="own")
        for _ in range(3):
            with otel_npu.capture("forward"):
                pass
        otel_npu.flush(5.0)
        stats = otel_npu.stats()
        otel_npu.shutdown(5.0)
    finally:
        receiver.close()
    assert stats["dropped"]["export_failed"] == 3
    texts = [record.getMessage() for record in caplog.records]
    texts += [caplog.text, str(stats), capfd.readouterr().err]
    everything = "\n".join(texts)
    assert "lost data" in everything and "export_failed" in everything, "the failure is reported"
    for secret in (TOKEN, API_KEY, MALFORMED):
        assert secret not in everything, f"{secret} leaked"


def test_the_echoing_receiver_really_gets_the_token(monkeypatch):
    """Guards the test above: the header is sent, so its absence from the logs is the redaction's doing."""
    receiver = HttpReceiver()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"authorization=Bearer%20{TOKEN}")
        otel_npu.configure(enabled=True, device="cpu", pipeline="own")
        with otel_npu.capture("forward"):
            pass
        assert otel_npu.flush(5.0)
        headers = {k.lower(): v for k, v in receiver.headers[0].items()}
        assert headers["authorization"] == f"Bearer {TOKEN}"
    finally:
        otel_npu.shutdown(5.0)
        receiver.close()


def test_redact_masks_raw_decoded_and_inner_words():
    env = {"OTEL_EXPORTER_OTLP_TRACES_HEADERS": f"authorization=Bearer%20{TOKEN}", "OTEL_EXPORTER_OTLP_HEADERS": "a=b"}
    text = f"sent Bearer%20{TOKEN} / Bearer {TOKEN} / {TOKEN} / a=b"
    masked = redact.redact(text, env)
    assert TOKEN not in masked and masked.count(redact.MASK) == 3
    assert masked.endswith("a=b"), "values shorter than 4 characters are not secrets"
    assert redact.header_names(env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"]) == ["authorization"]


NO_EQUALS = "sk-0c4f9e2b7d"


def test_a_header_entry_without_equals_never_prints_its_secret(monkeypatch, caplog, capfd):
    """``Authorization: Bearer SECRET`` (a colon, not ``=``): the SDK's parser logs the entry as it is."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"Authorization: Bearer {NO_EQUALS}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    caplog.set_level(logging.DEBUG)
    for protocol in ("http/protobuf", "grpc"):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        otel_npu.configure(enabled=True, device="cpu", pipeline="own")
        with otel_npu.capture("forward"):
            pass
        otel_npu.flush(2.0)
        otel_npu.shutdown(2.0)
    everything = "\n".join([r.getMessage() for r in caplog.records] + [caplog.text, capfd.readouterr().err])
    assert "Header format invalid" in everything, "the SDK complained (the test would be empty without it)"
    assert NO_EQUALS not in everything
    masked = redact.redact(f"x Bearer {NO_EQUALS} y")
    assert NO_EQUALS not in masked and masked.startswith("x ***") and masked.endswith(" y")


def test_doctor_never_prints_a_secret_of_an_entry_without_equals():
    import subprocess
    import sys

    env = child_env(OTEL_METRICS_EXPORTER="none", OTEL_EXPORTER_OTLP_HEADERS=f"Authorization: Bearer {NO_EQUALS}")
    out = subprocess.run([sys.executable, "-m", "otel_npu", "doctor"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert NO_EQUALS not in out.stdout + out.stderr
