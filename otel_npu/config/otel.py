"""The standard ``OTEL_*`` variables otel-npu interprets, and the few others its spans carry.

Read when the runtime starts (``read()``: one snapshot of the environment, so that a plugin may still set
variables before the first capture), not at import. ``OtelSettings`` hands them to ``export``/``spans``
typed and validated: each is read, checked (one warning per invalid value, in the style of ``env.py``) and
converted on first use, so that a variable the chosen pipeline does not use is not looked at (the
application's TracerProvider brings its own sampler and limits).

Which names the exporter variables may list (``OTEL_TRACES_EXPORTER``, ``OTEL_METRICS_EXPORTER``) is for the
exporter tables to say (``export/registry.py``): here they are read as written.

The OpenTelemetry SDK's exporter classes read the ``OTEL_EXPORTER_OTLP_*`` endpoint, header, compression and
certificate variables themselves; otel-npu reads them here only to describe them (``otel-npu doctor``), to
keep header values out of its logs (``export/redact.py``), and for the choices the SDK leaves to its caller
(protocol, timeout bounds).
"""

from __future__ import annotations

import functools
import re
import time
import urllib.parse
from typing import Any, Mapping, MutableMapping

from .env import env_choice, env_flag, env_names, env_number, get, invalid, process_env

#: Also write spans to this file, as OTLP/JSON lines (one ExportTraceServiceRequest per line).
TRACES_FILE_ENV = "OTEL_NPU_TRACES_FILE"
#: ``OTEL_TRACES_SAMPLER`` values of the specification that otel-npu's own pipeline builds.
SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")
PROTOCOLS = ("http/protobuf", "grpc")
#: ``OTEL_METRICS_EXEMPLAR_FILTER`` values (the SDK's): exemplars from exported spans only, from every capture
#: (those not exported carry no trace), or none.
EXEMPLAR_FILTERS = ("trace_based", "always_on", "always_off")
#: Variables that say where traces go over OTLP (when one is set, a collector is configured).
TRACES_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
#: Variables that point the stage metrics at a collector even when ``OTEL_METRICS_EXPORTER`` is unset.
METRICS_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
#: Header variables whose values are secrets (tokens), for every signal.
HEADER_VARS = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
               "OTEL_EXPORTER_OTLP_METRICS_HEADERS", "OTEL_EXPORTER_OTLP_LOGS_HEADERS")

OTLP_TIMEOUT_MAX_S = 3_600.0
OTLP_TIMEOUT_DEFAULT_S = 10.0
#: ``OTEL_BSP_*``: otel-npu's defaults (larger than the BatchSpanProcessor's 2048 / 512: a stage span per
#: capture comes at thousands per second, and each HTTP request costs ≈ 2 ms of Python, so 2048 spans per
#: request cost ≈ 1.7 µs each against ≈ 3.7 µs at 512), and the accepted ranges (the queue's memory, and a
#: delay a timer accepts).
#: ``OTEL_BSP_EXPORT_TIMEOUT`` keeps the specification's default: the SDK's BatchSpanProcessor (1.45) stores
#: it and does not use it, and otel-npu's exports are bounded by ``OTEL_EXPORTER_OTLP_TIMEOUT``; it is read
#: here so that an invalid value gets the one warning, and is passed to the SDK, which would otherwise read
#: it itself (a traceback on stderr for a value that is not a number, nothing said for one below 1).
BSP_DEFAULTS = {"OTEL_BSP_MAX_QUEUE_SIZE": 8192, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 2048,
                "OTEL_BSP_SCHEDULE_DELAY": 5000, "OTEL_BSP_EXPORT_TIMEOUT": 30000}
BSP_MAX = {"OTEL_BSP_MAX_QUEUE_SIZE": 10_000_000, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 10_000_000,
           "OTEL_BSP_SCHEDULE_DELAY": 3_600_000, "OTEL_BSP_EXPORT_TIMEOUT": 3_600_000}
#: ``OTEL_METRIC_EXPORT_INTERVAL`` / ``_TIMEOUT``: defaults and accepted ranges, in ms (a day, an hour).
METRIC_MS_DEFAULTS = {"OTEL_METRIC_EXPORT_INTERVAL": 60000, "OTEL_METRIC_EXPORT_TIMEOUT": 30000}
METRIC_MS_MAX = {"OTEL_METRIC_EXPORT_INTERVAL": 86_400_000, "OTEL_METRIC_EXPORT_TIMEOUT": 3_600_000}
#: The span limits' defaults (the specification's).
LIMIT_DEFAULT = 128
#: The span limit variables of the specification the OpenTelemetry SDK reads (``span_limits`` below).
SDK_LIMIT_VARS = ("OTEL_ATTRIBUTE_COUNT_LIMIT", "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
                  "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_EVENT_COUNT_LIMIT", "OTEL_SPAN_LINK_COUNT_LIMIT",
                  "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT")


def read(env: Mapping[str, str] | None = None) -> "OtelSettings":
    """The ``OTEL_*`` settings of this process as they are now (when the runtime starts)."""
    return OtelSettings(env)


class OtelSettings:
    """Typed, validated ``OTEL_*`` settings over one snapshot of the environment (see the module docstring).
    Each attribute is read once, on first use."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env: dict[str, str] = dict(process_env() if env is None else env)
        self._protocols: dict[str, str] = {}
        #: ``OTEL_EXPORTER_OTLP_PROTOCOL`` / ``_TIMEOUT`` as read, by variable: the general one serves both
        #: signals, and is read (and an invalid value warned about) once.
        self._read: dict[str, Any] = {}
        self._endpoints_warned: set[str] = set()

    def raw(self, name: str) -> str:
        """A variable as written (stripped; ``""`` when unset), for descriptions (never parsed by the caller)."""
        return self._env.get(name, "").strip()

    @functools.cached_property
    def sdk_disabled(self) -> bool:
        """``OTEL_SDK_DISABLED=true``: no spans, no metrics from otel-npu's own pipeline."""
        return env_flag(self._env, "OTEL_SDK_DISABLED")

    @functools.cached_property
    def sampler(self) -> tuple[str, float]:
        """``(OTEL_TRACES_SAMPLER, ratio)``: the ratio of a ``*traceidratio`` sampler (``OTEL_TRACES_SAMPLER_ARG``,
        default 1.0), else 1.0."""
        name = env_choice(self._env, "OTEL_TRACES_SAMPLER", SAMPLERS, "parentbased_always_on")
        ratio = 1.0
        if name.endswith("traceidratio"):
            raw = self._env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
            try:
                ratio = float(raw) if raw else 1.0
                if not 0.0 <= ratio <= 1.0:
                    raise ValueError
            except ValueError:
                invalid("OTEL_TRACES_SAMPLER_ARG", raw, f"numbers from 0 to 1 (for {name})", "using 1.0")
                ratio = 1.0
        return name, ratio

    def protocol(self, signal: str = "TRACES") -> str:
        """``OTEL_EXPORTER_OTLP_{signal}_PROTOCOL``, else ``OTEL_EXPORTER_OTLP_PROTOCOL``, else http/protobuf
        (the specification's default; the exporter classes do not read these: the caller chooses)."""
        found = self._protocols.get(signal)
        if found is None:
            found = self._protocols[signal] = protocol(self._env, signal, read=self._read)
        return found

    @functools.cached_property
    def traces_exporters(self) -> tuple[str, ...]:
        """``OTEL_TRACES_EXPORTER`` as written (default ``otlp``); ``export/registry.py`` keeps the known ones."""
        return env_names(self._env, "OTEL_TRACES_EXPORTER", "otlp")

    @functools.cached_property
    def metrics_off_reason(self) -> str | None:
        """Why the stage metrics are not exported by default here (``None``: they go over OTLP by default).

        ``OTEL_METRICS_EXPORTER`` unset means ``otlp`` only where there is a collector to send to: an OTLP
        endpoint is set, or the traces go over OTLP (``OTEL_TRACES_EXPORTER`` unset or naming ``otlp``). A run
        whose traces go to the console or a file only has no collector: sending metrics to localhost:4318
        there would cost a warning and the export time-out at every flush and at exit, for nothing."""
        return metrics_off_reason(self._env)

    @functools.cached_property
    def metrics_exporters(self) -> tuple[str, ...]:
        """``OTEL_METRICS_EXPORTER`` as written (default ``otlp``); ``()`` when ``metrics_off_reason``."""
        if self.metrics_off_reason is not None:
            return ()
        return env_names(self._env, "OTEL_METRICS_EXPORTER", "otlp")

    @functools.cached_property
    def traces_file(self) -> str:
        """``OTEL_NPU_TRACES_FILE``: the path, or ``""``."""
        return self.raw(TRACES_FILE_ENV)

    def bsp(self, name: str) -> int:
        """An ``OTEL_BSP_*`` number (``BSP_DEFAULTS``), validated against ``BSP_MAX``."""
        in_ms = name in ("OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_EXPORT_TIMEOUT")
        what = "whole numbers of milliseconds" if in_ms else "whole numbers"
        return int(env_number(self._env, name, BSP_DEFAULTS[name], BSP_MAX[name], what, integer=True))

    @functools.cached_property
    def _bsp_values(self) -> tuple[int, int, int, int]:
        return (self.bsp("OTEL_BSP_MAX_QUEUE_SIZE"), self.bsp("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
                self.bsp("OTEL_BSP_SCHEDULE_DELAY"), self.bsp("OTEL_BSP_EXPORT_TIMEOUT"))

    @property
    def batching(self) -> tuple[int, int, float]:
        """``(max queue size, max export batch size, schedule delay in s)`` of otel-npu's span export, and of
        every SDK BatchSpanProcessor otel-npu builds. The batch is at most the queue: a larger one could never
        fill, and the SDK's BatchSpanProcessor refuses it (``ValueError``)."""
        queue, batch, delay_ms, _ = self._bsp_values
        return queue, min(batch, queue), delay_ms / 1000.0

    @property
    def bsp_export_timeout_ms(self) -> int:
        """``OTEL_BSP_EXPORT_TIMEOUT``, validated (``BSP_DEFAULTS``), for the SDK BatchSpanProcessors otel-npu
        builds. Read with ``batching``, so that an invalid value is warned about wherever the batching is."""
        return self._bsp_values[3]

    @property
    def batch_capped(self) -> bool:
        """``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` is above the queue's size (``batching`` uses the queue's)."""
        queue, batch, _, _ = self._bsp_values
        return batch > queue

    @functools.cached_property
    def span_limits(self) -> dict[str, int | None]:
        """``OTEL_SPAN_*_LIMIT``, ``OTEL_LINK_*``, ``OTEL_EVENT_*`` and ``OTEL_ATTRIBUTE_*`` as the SDK reads them
        (a specific variable over the general one over the default; ``unset``: no limit, ``None``), as the
        keyword arguments of ``spans.Limits``. An invalid value is warned about once and replaced by the
        default (the SDK raises instead)."""
        return span_limits(self._env)

    def metric_ms(self, name: str) -> float:
        """``OTEL_METRIC_EXPORT_INTERVAL`` / ``_TIMEOUT`` in seconds (written in ms)."""
        return env_number(self._env, name, METRIC_MS_DEFAULTS[name] / 1000.0, METRIC_MS_MAX[name],
                          "a number of milliseconds", scale=1e-3)

    @functools.cached_property
    def exemplar_filter(self) -> str:
        """``OTEL_METRICS_EXEMPLAR_FILTER`` (default ``trace_based``, as the SDK)."""
        return env_choice(self._env, "OTEL_METRICS_EXEMPLAR_FILTER", EXEMPLAR_FILTERS, "trace_based")

    @functools.cached_property
    def ranks(self) -> dict[str, int]:
        """``RANK`` and ``LOCAL_RANK`` (as set by torchrun, vLLM and other launchers), where they are integers."""
        out = {}
        for var in ("RANK", "LOCAL_RANK"):
            raw = self._env.get(var, "").strip()
            if raw.lstrip("-").isdigit():
                out[var] = int(raw)
        return out

    def otlp_timeout_s(self, signal: str) -> float | None:
        return otlp_timeout_s(self._env, signal, read=self._read)

    def otlp_option(self, signal: str, name: str) -> str:
        return otlp_option(self._env, signal, name)

    def proxied(self, url: str) -> bool:
        """Whether an HTTP client that honours the ``*_proxy`` variables (``requests``, ``urllib``) would send a
        request for ``url`` through a proxy: one is set for its scheme (or ``all_proxy``) and ``no_proxy`` does
        not exempt its host. Lower-case names win over upper-case ones, as in ``urllib``."""
        import urllib.request  # not at import: it brings http.client and email with it

        parsed = urllib.parse.urlsplit(url)
        proxies: dict[str, str] = {}
        for upper in (True, False):  # upper case first, so that lower case overrides it
            for name, value in self._env.items():
                if value and name.lower().endswith("_proxy") and (name.isupper() if upper else name.islower()):
                    proxies[name[:-6].lower()] = value
        if not (proxies.get(parsed.scheme) or proxies.get("all")):
            return False
        return not urllib.request.proxy_bypass_environment(parsed.hostname or "", proxies)

    def otlp_endpoint(self, signal: str, protocol: str) -> str | None:
        """See ``otlp_endpoint``: each invalid variable is warned about once."""
        return otlp_endpoint(self._env, signal, protocol, warned=self._endpoints_warned)


def protocol(env: Mapping[str, str], signal: str = "TRACES", *, read: dict[str, Any] | None = None) -> str:
    """See ``OtelSettings.protocol``. ``read``: variables already read (and warned about), by name."""
    for var in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        raw = env.get(var, "").strip().lower()
        if raw:
            if read is not None and var in read:
                return read[var]
            value = env_choice(env, var, PROTOCOLS, "http/protobuf")
            if read is not None:
                read[var] = value
            return value
    return "http/protobuf"


def metrics_off_reason(env: Mapping[str, str]) -> str | None:
    """See ``OtelSettings.metrics_off_reason``."""
    if env.get("OTEL_METRICS_EXPORTER", "").strip():
        return None
    if any(env.get(var, "").strip() for var in METRICS_ENDPOINT_VARS):
        return None
    traces = set(env_names(env, "OTEL_TRACES_EXPORTER", "otlp"))
    if "otlp" in traces and "none" not in traces:
        return None
    return ("none (OTEL_METRICS_EXPORTER is unset and nothing goes to a collector: traces go to "
            f"{'the console' if 'console' in traces and 'none' not in traces else 'no OTLP exporter'}; set "
            "OTEL_METRICS_EXPORTER=console to print the stage metrics, or otlp with an endpoint)")


def span_limits(env: Mapping[str, str]) -> dict[str, int | None]:
    """See ``OtelSettings.span_limits``."""
    missing: Any = object()

    def limit(var: str, fallback: Any) -> Any:
        raw = env.get(var, "").strip().lower()
        if not raw:
            return fallback
        if raw == "unset":
            return None
        try:
            value = int(raw, 10)
            if value < 0:
                raise ValueError
            return value
        except ValueError:
            invalid(var, env.get(var), "whole numbers from 0 (or 'unset' for no limit)", "using the default")
            return fallback

    general = limit("OTEL_ATTRIBUTE_COUNT_LIMIT", missing)
    count = LIMIT_DEFAULT if general is missing or general is None else general
    length = limit("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", None)
    return {"span_attributes": limit("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", count),
            "links": limit("OTEL_SPAN_LINK_COUNT_LIMIT", LIMIT_DEFAULT),
            "link_attributes": limit("OTEL_LINK_ATTRIBUTE_COUNT_LIMIT", count),
            "events": limit("OTEL_SPAN_EVENT_COUNT_LIMIT", LIMIT_DEFAULT),
            "event_attributes": limit("OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", count),
            "span_value_length": limit("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", length),
            "value_length": length}


def otlp_timeout_s(env: Mapping[str, str] | None, signal: str, *, read: dict[str, Any] | None = None) -> float | None:
    """``OTEL_EXPORTER_OTLP_{signal}_TIMEOUT``, else ``OTEL_EXPORTER_OTLP_TIMEOUT`` (seconds, as the Python SDK
    reads them), validated: ``None`` when neither is set (the exporter's own default), the default 10 s after
    one warning when the value is not a number above 0 up to an hour (0, -1, nan, inf, 1e23 made every
    export fail at once, or never time out). ``read``: variables already read (and warned about), by name."""
    env = process_env() if env is None else env
    for var in (f"OTEL_EXPORTER_OTLP_{signal}_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        if env.get(var, "").strip():
            if read is not None and var in read:
                return read[var]
            value = env_number(env, var, OTLP_TIMEOUT_DEFAULT_S, OTLP_TIMEOUT_MAX_S, "a number of seconds")
            if read is not None:
                read[var] = value
            return value
    return None


def otlp_option(env: Mapping[str, str] | None, signal: str, name: str) -> str:
    """``OTEL_EXPORTER_OTLP_{signal}_{name}``, else ``OTEL_EXPORTER_OTLP_{name}``, as written (``""``: unset):
    ``ENDPOINT``, ``HEADERS``, ``CERTIFICATE``, ``COMPRESSION``..., which the SDK's exporters read themselves."""
    return get(env, f"OTEL_EXPORTER_OTLP_{signal}_{name}") or get(env, f"OTEL_EXPORTER_OTLP_{name}")


#: The OTLP endpoints a variable with another scheme than http/https falls back to (the specification's).
OTLP_DEFAULT_ENDPOINTS = {"grpc": "http://localhost:4317", "http/protobuf": "http://localhost:4318"}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def otlp_endpoint(env: Mapping[str, str] | None, signal: str, protocol: str, *, warn: bool = True,
                  warned: set[str] | None = None) -> str | None:
    """The endpoint to give ``signal``'s (``TRACES``/``METRICS``) SDK exporter when the variable in force for it
    (``OTEL_EXPORTER_OTLP_{signal}_ENDPOINT``, else ``OTEL_EXPORTER_OTLP_ENDPOINT``) is not a URL with an
    ``http://`` or ``https://`` scheme, as the specification requires, after one warning saying how to write
    it; ``None`` when the exporter may read the variable itself. Without a scheme (``localhost:4318``: the HTTP
    exporter failed every export with InvalidSchema) ``http://`` is put in front; another scheme means the
    default endpoint. ``warned``: variables already warned about (the base one serves both signals)."""
    for var in (f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        raw = get(env, var)
        if not raw:
            continue
        scheme = _SCHEME.match(raw)
        if scheme and scheme.group(1).lower() in ("http", "https"):
            return None
        if scheme:
            used = OTLP_DEFAULT_ENDPOINTS.get(protocol, OTLP_DEFAULT_ENDPOINTS["http/protobuf"])
            accepted, using = "URLs that start with http:// or https://", f"using the default {used!r}"
        else:
            used = "http://" + raw
            accepted = (f"URLs that start with http:// or https:// (write {used!r}, or 'https://{raw}' for "
                        "TLS)")
            using = f"using {used!r}"
        if warn and (warned is None or var not in warned):
            invalid(var, raw, accepted, using)
            if warned is not None:
                warned.add(var)
        if var == "OTEL_EXPORTER_OTLP_ENDPOINT" and protocol != "grpc":  # a base URL: the signal's path follows
            used = used.rstrip("/") + f"/v1/{signal.lower()}"
        return used
    return None


def header_values(env: Mapping[str, str] | None = None) -> list[str]:
    """The values of every ``HEADER_VARS`` variable, as written now (read at each call: an application may
    set them after otel-npu started, for its own exporters)."""
    env = process_env() if env is None else env
    return [env.get(var, "") for var in HEADER_VARS]


def use_traces_file_unless_configured(env: MutableMapping[str, str] | None = None) -> str | None:
    """For a program run without any exporter configured (no ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``, no
    ``OTEL_TRACES_EXPORTER``) where a collector at localhost is not to be assumed (the demo, the examples):
    set ``OTEL_TRACES_EXPORTER=none``, the stage metrics off unless configured, and ``OTEL_NPU_TRACES_FILE``
    to a new ``./otel-npu-traces-<date>-<time>.jsonl``, whose path is returned. Returns ``None`` (changing
    nothing but the exporter, when a file is named) when the environment already says where traces go.
    ``env`` defaults to the process environment, which it changes."""
    env = process_env() if env is None else env
    if any(env.get(var, "").strip() for var in TRACES_ENDPOINT_VARS) or env.get("OTEL_TRACES_EXPORTER", "").strip():
        return None
    env["OTEL_TRACES_EXPORTER"] = "none"
    # No collector either for the stage metrics (without this they would be retried against localhost:4318:
    # a warning, and every flush and the exit held up by the export time-out).
    if not env.get("OTEL_METRICS_EXPORTER", "").strip() and not env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip():
        env["OTEL_METRICS_EXPORTER"] = "none"
    if env.get(TRACES_FILE_ENV, "").strip():
        return None
    path = f"otel-npu-traces-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    env[TRACES_FILE_ENV] = path
    return path


def metrics_follow_traces(env: MutableMapping[str, str], default_protocol: str = "grpc") -> None:
    """Stage metrics go where the traces go when no metrics endpoint is configured: to
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (over ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``, else ``default_protocol``;
    an HTTP ``.../v1/traces`` path becomes ``.../v1/metrics``). For an engine whose own tracing puts its endpoint
    there (vLLM's ``--otlp-traces-endpoint``): without this, otel-npu's metrics would go to the OTLP default
    (``localhost:4318``). Changes ``env``; call it before otel-npu starts."""
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if not traces or env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip() or default_protocol
    if protocol != "grpc" and traces.rstrip("/").endswith("/v1/traces"):
        traces = traces.rstrip("/")[: -len("traces")] + "metrics"
    env["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"] = traces
    env.setdefault("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", protocol)
