"""``otel-npu doctor``: what otel-npu would do in this environment, and (``--send-test-span``) whether the
collector accepts a span.

Reads the same variables, with the same code, as a process that imports otel-npu: enabled or not and why,
the device (and why not NPU/CUDA), where spans and stage metrics go (exporter, protocol, endpoint, header
*names*, timeout, compression, certificate), the sampler and the resource. Header values are never printed.

Exit status: 0 when the configuration is valid (and, with ``--send-test-span``, the span was accepted); 2 when
a variable is invalid (each problem is printed: what was wrong and what is accepted); 1 when the test span was
not accepted. Inside an application, an SDK TracerProvider or MeterProvider it installs takes precedence over
the exporters shown here (``OTEL_NPU_PIPELINE``): the doctor, a separate process, cannot see those.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import Any

HELP = "show what otel-npu would do here (enabled, device, exporters, sampler, resource); optionally send a test span"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--send-test-span", action="store_true",
                        help="send one span (and the stage metrics) through the configured exporters and say "
                             "whether the collector accepted it")
    parser.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                        help="how long --send-test-span waits for the collector (default 10)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


class _Collect(logging.Handler):
    """Collects the warnings the configuration code logs: each one is a configuration problem."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.problems: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        from otel_npu.export.redact import redact

        problem = redact(record.getMessage())
        if problem not in self.problems:  # a variable read for traces and for metrics is one problem
            self.problems.append(problem)


def _enabled_reason(otel: Any, settings: Any) -> str:
    from otel_npu import config

    for var in (config.ENV_ENABLED, config.ENV_ENABLED_ALIAS):
        raw = otel.raw(var)
        if raw:
            return f"{var}={raw!r}"
    return f"off by default: set {config.ENV_ENABLED}=1 (or call otel_npu.configure(enabled=True))"


def _otlp_details(signal: str, protocol: str, otel: Any) -> list[tuple[str, str]]:
    """Endpoint and options of the SDK's OTLP exporter for ``signal`` (built, not connected)."""
    from otel_npu.export.redact import header_names

    if signal == "traces":
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Exporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Exporter
    else:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as Exporter
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as Exporter
    from otel_npu import config

    upper = signal.upper()
    timeout = otel.otlp_timeout_s(upper)  # an out-of-range value is a problem (warned), 10 s is used
    fixed = otel.otlp_endpoint(upper, protocol)  # not a URL: a problem (warned), and what is used instead
    exporter = Exporter(**({} if timeout is None else {"timeout": timeout}),
                        **({} if fixed is None else {"endpoint": fixed}))
    try:
        endpoint = str(getattr(exporter, "_endpoint", "?"))
    finally:
        exporter.shutdown()

    def var(name: str) -> str:
        return otel.otlp_option(upper, name)

    names = header_names(var("HEADERS"))
    certificate = var("CERTIFICATE")
    out = [("endpoint", endpoint), ("protocol", protocol),
           ("headers", ", ".join(names) + " (values hidden)" if names else "none"),
           ("timeout", f"{config.OTLP_TIMEOUT_DEFAULT_S if timeout is None else timeout:g} s"),
           ("compression", var("COMPRESSION") or "none")]
    if certificate:
        state = "" if os.path.isfile(certificate) else "  <- NOT FOUND"
        out.append(("certificate", certificate + state))
    return out


def describe(env: Any = None) -> tuple[list[tuple[str, str]], list[str]]:
    """``(lines, problems)``: what otel-npu would do, and what is wrong with the configuration (``env``: the
    process environment unless given)."""
    from otel_npu import config, devices
    from otel_npu.devices.base import DeviceUnavailable
    from otel_npu.export.metrics import exporter as metrics
    from otel_npu.export import pipeline as telemetry
    from otel_npu.spans.attributes import process_attributes

    collect = _Collect()
    loggers = [logging.getLogger("otel_npu"), logging.getLogger("opentelemetry.util.re")]
    for logger in loggers:
        logger.addHandler(collect)
    lines: list[tuple[str, str]] = []
    try:
        from otel_npu.export import redact

        redact.install_exporter_log_filter()
        settings = config.from_env(env)
        otel = config.otel.read(env)
        lines.append(("enabled", ("yes" if settings.enabled else "no") + f" ({_enabled_reason(otel, settings)})"))

        label = "?"
        try:
            backend, passed_over = devices.select(settings.device)
            label = backend.label()
            lines.append(("device", f"{label} ({settings.device})"))
            for reason in passed_over:
                lines.append(("  not used", reason))
            backend.close()
        except DeviceUnavailable as exc:
            collect.problems.append(f"OTEL_NPU_DEVICE={settings.device!r}: that device is not usable: {exc}")
            lines.append(("device", f"{settings.device}: NOT USABLE ({exc})"))
        lines.append(("pipeline", f"{settings.pipeline} (an SDK TracerProvider/MeterProvider the application "
                                  "installs is used instead of the exporters below, unless 'own')"))

        if otel.sdk_disabled:
            lines.append(("traces", "none (OTEL_SDK_DISABLED=true)"))
            lines.append(("metrics", "none (OTEL_SDK_DISABLED=true)"))
        else:
            trace_exporters = telemetry.trace_exporters(otel)
            lines.append(("traces exporter", ", ".join(trace_exporters) or "none"))
            if "otlp" in trace_exporters:
                protocol = otel.protocol("TRACES")
                lines += [(f"  {k}", v) for k, v in _otlp_details("traces", protocol, otel)]
                queue, batch, delay_s = otel.batching
                capped = " (OTEL_BSP_MAX_EXPORT_BATCH_SIZE is above the queue's size: capped)" if otel.batch_capped else ""
                lines.append(("  batching", f"queue {queue}, batch {batch}, every {delay_s * 1000:g} ms "
                                            f"(OTEL_BSP_*){capped}"))
            traces_file, file_var = otel.traces_file, config.otel.TRACES_FILE_ENV
            lines.append(("traces file", f"{traces_file} ({file_var}, OTLP/JSON lines)"
                          if traces_file else f"none ({file_var} unset)"))
            lines.append(("sampler", telemetry.sampler(otel).get_description()))
            from otel_npu.spans.attributes import Limits

            limits = Limits(**otel.span_limits)

            def limit(value: Any) -> str:
                return "none" if value is None else str(value)

            lines.append(("span limits", f"links {limit(limits.links)}, attributes {limit(limits.span_attributes)}, "
                                         f"link attributes {limit(limits.link_attributes)}, value length "
                                         f"{limit(limits.span_value_length)} (OTEL_SPAN_*_LIMIT, OTEL_ATTRIBUTE_*)"))
            metric_exporters = metrics.exporter_names(otel)
            lines.append(("metrics exporter", ", ".join(metric_exporters) or otel.metrics_off_reason or "none"))
            if "otlp" in metric_exporters:
                protocol = otel.protocol("METRICS")
                lines += [(f"  {k}", v) for k, v in _otlp_details("metrics", protocol, otel)]
            interval = otel.metric_ms("OTEL_METRIC_EXPORT_INTERVAL")
            lines.append(("  interval", f"{interval:g} s"))
            export_timeout = otel.metric_ms("OTEL_METRIC_EXPORT_TIMEOUT")
            lines.append(("  export timeout", f"{export_timeout:g} s"))
        resource = telemetry.resource_from_env(process_attributes(label, otel.ranks))
        lines.append(("resource", ", ".join(f"{k}={v}" for k, v in sorted(resource.attributes.items()))))
    finally:
        for logger in loggers:
            logger.removeHandler(collect)
    return lines, collect.problems


def send_test_span(timeout_s: float) -> tuple[bool, str]:
    """One span through otel-npu's own pipeline, as configured; ``(accepted, what happened)``."""
    import otel_npu
    from otel_npu import runtime

    from otel_npu import config

    result: dict[str, Any] = {}
    # The test span must be sent whatever the sampler says, and an export attempt must end (with its reason)
    # within the time given, rather than retry for OTEL_EXPORTER_OTLP_TIMEOUT.
    env = config.process_env()
    env["OTEL_TRACES_SAMPLER"] = "always_on"
    for signal in ("TRACES", "METRICS"):
        configured = config.otlp_timeout_s(env, signal) or config.OTLP_TIMEOUT_DEFAULT_S
        limit = min(configured, timeout_s / 2)
        env[f"OTEL_EXPORTER_OTLP_{signal}_TIMEOUT"] = f"{limit:g}"
    # What went wrong is printed below; otel-npu's own warnings would only repeat it.
    logging.getLogger("otel_npu").setLevel(logging.ERROR)

    def send() -> None:  # an otel-npu thread: the SDK exporters' own log lines become the error detail
        otel_npu.configure(enabled=True, device="cpu", pipeline="own")
        with otel_npu.capture("otel-npu doctor", attributes={"otel_npu.doctor": True}):
            pass
        flushed = otel_npu.flush(timeout_s)
        rt = runtime.current()
        result.update(flushed=flushed, stats=otel_npu.stats(),
                      errors=dict(rt.stats.first_error) if rt is not None else {})
        otel_npu.shutdown(min(timeout_s, 5.0))

    thread = threading.Thread(target=send, name="otel-npu-doctor", daemon=True)
    thread.start()
    thread.join(timeout_s + 10.0)
    if not result:
        return False, f"no answer within {timeout_s:g} s"
    stats = result["stats"]
    if stats.get("spans_emitted", 0) == 0:
        return False, f"no span was sent: spans go to {stats.get('pipeline')}"
    if stats.get("spans_exported", 0) >= 1 and not stats.get("dropped"):
        where = stats.get("pipeline", "")
        metrics_note = ("; stage metrics accepted too" if stats.get("metrics_exported")
                        else "; stage metrics NOT accepted" if stats.get("metrics_export_failed") else "")
        return True, f"accepted ({where}){metrics_note}"
    if not result["flushed"]:
        return False, f"not confirmed within {timeout_s:g} s (a slow or silent collector)"
    errors = "; ".join(f"{k}: {v}" for k, v in result["errors"].items()) or "no detail"
    return False, f"NOT accepted: {errors}"


def run(args: argparse.Namespace) -> int:
    lines, problems = describe()
    width = max(len(k) for k, _ in lines) + 1
    for key, value in lines:
        print(f"{key + ':':<{width}} {value}")
    status = 0
    if problems:
        print(f"\nconfiguration problems ({len(problems)}):")
        for problem in problems:
            print(f"  - {problem}")
        status = 2
    else:
        print("\nconfiguration: valid")
    if args.send_test_span:
        accepted, detail = send_test_span(args.timeout)
        print(f"test span: {detail}")
        if not accepted and status == 0:
            status = 1
    sys.stdout.flush()
    return status
