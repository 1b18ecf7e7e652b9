"""A real trace UI: Arize Phoenix receives the demo's OTLP export, and its REST API gives the spans back.

Phoenix is large (≈ 850 MB, ≈ 2 min to install) and pins its own dependencies, so it lives in its own venv
and is reached over HTTP only: ``.ci/run`` installs it into ``.venv-phoenix`` and sets ``OTEL_NPU_PHOENIX``
(and ``OTEL_NPU_REQUIRE_PHOENIX=1``, so that a missing Phoenix fails CI instead of skipping). Elsewhere the
test skips when no ``phoenix`` executable is found. Run it alone with ``python -m pytest -q -m phoenix``.

With ``OTEL_NPU_SCREENSHOT=PATH`` (and Debian's ``chromium`` installed) it also saves a screenshot of a
Decode step's trace in Phoenix's UI: that is how ``docs/phoenix-trace.png`` was made.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from otel_npu.cli import tracefile

from .support import child_env, free_port, missing

# Phoenix starts in ≈ 10-60 s and ingests asynchronously (its deadlines below are 180 s and 120 s).
pytestmark = [pytest.mark.phoenix, pytest.mark.slow, pytest.mark.timeout(600)]

PROJECT = "otel-npu-phoenix-test"
STEPS, REQUESTS = 8, 3


def phoenix_executable() -> str | None:
    configured = os.environ.get("OTEL_NPU_PHOENIX", "").strip()
    if configured:
        return configured
    return shutil.which("phoenix")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory):
    exe = phoenix_executable()
    if exe is None or not os.path.exists(exe) and shutil.which(exe) is None:
        missing("phoenix", f"Arize Phoenix is not installed (OTEL_NPU_PHOENIX={exe!r}): pip install arize-phoenix "
                           "into a separate venv and set OTEL_NPU_PHOENIX=<venv>/bin/phoenix (.ci/run does)")
    workdir = tmp_path_factory.mktemp("phoenix")
    port, grpc_port = free_port(), free_port()
    env = child_env(PHOENIX_WORKING_DIR=str(workdir), PHOENIX_PORT=str(port),
               PHOENIX_GRPC_PORT=str(grpc_port), PHOENIX_HOST="127.0.0.1", PHOENIX_TELEMETRY_ENABLED="false")
    log = open(workdir / "phoenix.log", "wb")
    proc = subprocess.Popen([exe, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # a deadline for start-up, not a measurement
    try:
        while True:
            try:
                get_json(f"{base}/v1/projects")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"phoenix serve did not come up: {(workdir / 'phoenix.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def phoenix_spans(base: str) -> list[dict]:
    """Every span Phoenix holds for PROJECT; none while Phoenix has not yet created the project.

    Phoenix creates a project when it inserts the project's first span, and inserts asynchronously (in batches,
    after the export has been acknowledged), so until then the project's URL answers 404.
    """
    out, cursor = [], None
    while True:
        query = {"limit": 1000} | ({"cursor": cursor} if cursor else {})
        try:
            page = get_json(f"{base}/v1/projects/{PROJECT}/spans?{urllib.parse.urlencode(query)}")
        except urllib.error.HTTPError as error:
            if error.code == 404 and cursor is None:
                return []
            raise
        out.extend(page["data"])
        cursor = page.get("next_cursor")
        if not cursor:
            return out


def epoch_us(text: str) -> int:
    moment = datetime.datetime.fromisoformat(text)
    return (moment - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)) // datetime.timedelta(microseconds=1)


def test_phoenix_shows_the_demo_spans_with_their_nesting_and_device_times(phoenix, tmp_path):
    traces_file = tmp_path / "demo.jsonl"
    env = child_env(OTEL_METRICS_EXPORTER="none", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{phoenix}/v1/traces",
               OTEL_RESOURCE_ATTRIBUTES=f"openinference.project.name={PROJECT}",
               OTEL_NPU_TRACES_FILE=str(traces_file), OTEL_BSP_SCHEDULE_DELAY="200")
    done = subprocess.run(
        [sys.executable, "-m", "otel_npu", "demo", "--device", "cpu", "--model-size", "tiny", "--steps", str(STEPS),
         "--requests", str(REQUESTS), "--per-layer", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"exported over OTLP (http/protobuf) to {phoenix}/v1/traces" in done.stdout

    # What the demo exported, from the file written by the same provider at the same time.
    exported = {s.span_id: s for s in tracefile.read(str(traces_file))}
    deadline = time.monotonic() + 120  # Phoenix ingests asynchronously; a deadline, not a measurement
    while True:
        got = {s["context"]["span_id"]: s for s in phoenix_spans(phoenix)}
        if len(got) >= len(exported) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(got) == set(exported)

    names = {s["name"] for s in got.values()}
    assert {"llm_request", "Prefill", "Decode", "prepare input", "forward", "post process", "sample",
            "layers.0", "layers.0.self_attn", "layers.1.mlp"} <= names
    assert sum(s["name"] == "llm_request" for s in got.values()) == REQUESTS
    for span_id, span in got.items():
        mine = exported[span_id]
        assert (span["parent_id"] or "") == mine.parent_id
        assert span["context"]["trace_id"] == mine.trace_id
        # Phoenix keeps microseconds: its times are the exported device times, truncated
        assert abs(epoch_us(span["start_time"]) - mine.start_ns // 1000) <= 1
        assert abs(epoch_us(span["end_time"]) - mine.end_ns // 1000) <= 1
    by_id = got
    for span in got.values():
        if span["name"] in ("prepare input", "forward", "post process", "sample"):
            step = by_id[span["parent_id"]]
            assert step["name"] in ("Prefill", "Decode")
            assert span["attributes"]["otel_npu.step"] == step["name"]
            assert span["attributes"]["otel_npu.device"] == "cpu"
            assert epoch_us(step["start_time"]) <= epoch_us(span["start_time"])
            assert epoch_us(span["end_time"]) <= epoch_us(step["end_time"])
        if span["name"] == "layers.0.self_attn":
            layer = by_id[span["parent_id"]]
            assert layer["name"] == "layers.0" and by_id[layer["parent_id"]]["name"] == "forward"

    screenshot = os.environ.get("OTEL_NPU_SCREENSHOT", "").strip()
    if screenshot:
        decodes = sorted((s for s in got.values() if s["name"] == "Decode"),
                         key=lambda s: epoch_us(s["end_time"]) - epoch_us(s["start_time"]))
        decode = decodes[len(decodes) // 2]  # a typical one: the median duration
        take_screenshot(f"{phoenix}/redirects/traces/{decode['context']['trace_id']}", Path(screenshot))


def take_screenshot(url: str, out: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "OTEL_NPU_SCREENSHOT needs Debian's chromium (apt-get install -y chromium)"
    profile = out.parent / ".chromium-profile"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=8000",
                    f"--screenshot={out}", url], check=True, capture_output=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    assert out.stat().st_size > 10_000
