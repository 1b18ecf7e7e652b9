"""Where spans go: the application's TracerProvider, or a pipeline otel-npu builds from the ``OTEL_*`` variables.

Decided once, when otel-npu starts (the first capture in a process):

* **the application's provider** (``pipeline="auto"`` or ``"app"``; or one given to ``configure()``): when an
  SDK ``TracerProvider`` is installed (vLLM's ``init_tracer``, ``opentelemetry-instrument``, your own),
  spans go through it: its sampler, id generator, resource and span processors;
* **otel-npu's own pipeline** (otherwise, or ``pipeline="own"``), configured by the standard variables:
  ``OTEL_SDK_DISABLED``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER[_ARG]``,
  ``OTEL_TRACES_EXPORTER`` (``otlp`` default, ``console``, ``none``; comma-separated),
  ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` (``http/protobuf`` default, as the spec says; ``grpc``), and the
  ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT|HEADERS|TIMEOUT|COMPRESSION|CERTIFICATE...`` variables, which the SDK's
  exporter classes read themselves (they do not read the protocol: that choice is made here). OTLP spans are
  encoded by otel-npu itself (``encoding/``) and batched per ``OTEL_BSP_*``.

Which exporter, transport and sampler each name builds: the tables of ``registry.py``.

Invalid values are warned about once (variable, value, what is accepted) and replaced by the default.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Callable, Iterable, Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from .._version import __version__
from ..accounting import Stats
from ..config import otel as otel_config
from ..config.env import keep_known
from ..config.otel import OtelSettings
from ..record import DROPPED as _DROPPED
from ..record import Record
from ..spans import sampling as step_sampling
from ..spans import sdk
from ..spans.attributes import ATTR_LOCAL_RANK, ATTR_PID, ATTR_RANK, Limits
from ..spans.identity import IdGenerator
from ..spans.render import SpanFactory
from .. import config
from ..config import Settings
from . import redact, registry
from .encoding.otlp_json import JsonSpanEncoder
from .metrics import exporter as _metrics
from .sinks.file import JsonLinesSpanExporter
from .sinks.otlp import OtlpSink
from .sinks.sdk import SdkSink, sdk_batch_processor
from .transports import JsonLinesFileTransport

_log = logging.getLogger("otel_npu")

SCOPE_NAME = "otel_npu"


class Pipeline:
    """The spans half of a runtime: decisions (``factory``) and destinations (``sinks``).

    Per resolved capture (``emit``, resolver thread): the stage histogram always; then the sampler's decision
    (``SpanFactory.identify``). A sampled capture is handed to the sinks at once. A capture the sampler
    dropped costs nothing more — no ids, no span, no encoding — unless its step may still be exported
    (``spans/sampling.py``: slow steps, steps with detail): then it is held until its step finishes (the resolver
    emits a step after all its captures) and is exported with it, or forgotten.
    """

    #: Steps whose dropped captures are held at once, at most (each step's are released when it finishes).
    MAX_HELD_STEPS = 10_000

    def __init__(self, factory: SpanFactory, sinks: list, stats: Stats, description: str,
                 metrics: Any = None, slow: Any = None, detail_every: int = 1,
                 metrics_description: str = "none") -> None:
        self.factory = factory
        self._identify = factory.identify
        self.sinks = sinks
        self._stats = stats
        self.description = description
        #: ``metrics.MetricsExport`` / ``metrics.SdkInstruments``, or None when stage metrics are off.
        self.metrics = metrics
        self.metrics_description = metrics.description if metrics is not None else metrics_description
        self._record = metrics.record if metrics is not None else None
        #: Offers an exported span's duration as an exemplar (None: OTEL_METRICS_EXEMPLAR_FILTER=always_off).
        self._exemplar = getattr(metrics, "exemplar", None) if metrics is not None else None
        self._exemplar_all = self._exemplar if getattr(metrics, "exemplar_filter", None) == "always_on" else None
        self._slow = slow            # sampling.SlowSteps, or None (off)
        self._detail_forces = detail_every > 1
        self._hold = slow is not None or self._detail_forces
        self._held: dict[Any, list] = {}
        #: For ``stats()["sampling"]``: the sampler, which steps are kept besides, the detail budget, exemplars.
        parts = [f"sampler {getattr(factory.sampler, 'get_description', lambda: '?')()}",
                 slow.describe() if slow is not None else "slow steps not kept",
                 f"detail in 1 step in {detail_every} per name" if detail_every > 1 else "detail in every step"]
        if metrics is not None:
            parts.append(f"exemplars {getattr(metrics, 'exemplar_filter', '?')}")
        self.sampling_description = "; ".join(parts)
        if metrics is not None:
            metrics.ensure_started()

    def emit(self, r: Record) -> None:
        """Resolver thread, once per resolved capture."""
        if self.sinks:
            sampled = r.sampled
            if sampled is None:
                parent = r.parent
                if parent is not None and parent.sampled is False and parent.start is not _DROPPED:
                    r.sampled = sampled = False  # identify()'s answer, without its call: most captures here
                else:
                    sampled = self._identify(r)
        else:
            sampled = False
        # Metrics for every resolved capture: sampling decides about spans only.
        record = self._record
        if record is not None:
            record(r)
        if sampled:
            if r.is_step and self._slow is not None:
                self._slow.observe(r.name, r.end_ns - r.start_ns, r.end_ns, False)
            self._send(r)
            return
        if not self.sinks:
            self._unexported((r,))
        elif not self._hold:
            self._stats.spans_unsampled += 1
            self._unexported((r,))
        elif r.is_step:
            self._step_dropped(r)
        else:
            step = r.step
            held = self._held.get(step)
            if held is not None:  # the common case: the step's first capture opened its list
                held.append(r)
            # Only a step that begins a trace can be kept (else its parent, not exported, would be missing),
            # and only until it is done (a capture resolved after its step follows the step's decision).
            elif step is None or getattr(step, "done", False) or not _begins_trace(step) or (
                    len(self._held) >= self.MAX_HELD_STEPS):
                self._stats.spans_unsampled += 1
                self._unexported((r,))
            else:
                self._held[step] = [r]

    def _step_dropped(self, r: Record) -> None:
        """A step the sampler dropped is finished: export it with its held captures if it must be kept."""
        held = self._held.pop(r, ())
        kept = threshold = None
        if _begins_trace(r):
            if self._detail_forces and r.detail == 2:
                kept = "detail"
            if self._slow is not None:
                threshold = self._slow.observe(r.name, r.end_ns - r.start_ns, r.end_ns, kept is None)
                if threshold is not None:
                    kept = "slow"
        elif self._slow is not None:
            self._slow.observe(r.name, r.end_ns - r.start_ns, r.end_ns, False)
        if kept is None:
            self._stats.spans_unsampled += 1 + len(held)
            if self._exemplar_all is not None:
                self._unexported(held)
                self._unexported((r,))
            return
        r.kept = (kept, None if threshold is None else threshold / 1e6)
        r.sampled = True
        self.factory.rekey(held)
        for child in held:
            if child.sampled:
                self._send(child)
            else:  # under a capture that was not held (the MAX_HELD_STEPS bound): no parent to hang it on
                self._stats.spans_unsampled += 1
        self._send(r)
        self._stats.add(f"steps_kept_{kept}")

    def _send(self, r: Record) -> None:
        for sink in self.sinks:
            sink.emit(r)
        self._stats.spans_emitted += 1
        exemplar = self._exemplar
        if exemplar is not None:
            exemplar(r)

    def _unexported(self, records: Iterable[Record]) -> None:
        """Captures whose spans are not exported: exemplars without a trace, under ``always_on`` only."""
        if self._exemplar_all is not None:
            for r in records:
                self._exemplar_all(r, False)

    def export_now(self) -> None:
        """Resolver thread, when the process went idle: each sink and the metrics start sending what they hold,
        on their own threads. Never blocks (a sink that cannot start a send without waiting does nothing)."""
        for sink in self.sinks:
            export_now = getattr(sink, "export_now", None)
            if export_now is not None:
                export_now()
        if self.metrics is not None:
            export_now = getattr(self.metrics, "export_now", None)
            if export_now is not None:
                export_now()

    def flush(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        ok = True
        for sink in self.sinks:
            ok = sink.force_flush(max(0.0, deadline - time.monotonic())) and ok
        if self.metrics is not None:
            ok = self.metrics.flush(max(0.0, deadline - time.monotonic())) and ok
        return ok

    def shutdown(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for sink in self.sinks:
            try:
                sink.shutdown(max(0.0, deadline - time.monotonic()))
            except Exception:  # pragma: no cover - best effort
                _log.debug("otel-npu: shutting a sink down failed", exc_info=True)
        if self.metrics is not None:
            try:
                self.metrics.shutdown(max(0.0, deadline - time.monotonic()))
            except Exception:  # pragma: no cover - best effort
                _log.debug("otel-npu: shutting the metrics down failed", exc_info=True)


def _begins_trace(step: Record) -> bool:
    """Whether ``step`` may be kept although the sampler dropped it: it is the root of its trace (no enclosing
    capture, no valid parent span at its entry), or its parent is a span exported whatever the sampler decided
    (an engine's scheduler step says so in its trace state: ``step_sampling.PARENT_EXPORTED``)."""
    if step.parent is not None:
        return False
    if not step.parent_span_id:
        return True
    state = step.trace_state
    return bool(state) and state.get(step_sampling.PARENT_EXPORTED[0]) == step_sampling.PARENT_EXPORTED[1]


def sampler(otel: OtelSettings) -> Any:
    """The SDK sampler ``OTEL_TRACES_SAMPLER[_ARG]`` names (``registry.SAMPLERS``)."""
    name, ratio = otel.sampler
    return registry.SAMPLERS[name](ratio)


#: What an unset OTEL_TRACES_EXPORTER means (said when it names only exporters otel-npu does not know).
UNSET_TRACES_EXPORTER = "traces go over OTLP (the default)"


def trace_exporters(otel: OtelSettings) -> list[str]:
    """The ``OTEL_TRACES_EXPORTER`` names otel-npu builds (``registry.SPAN_EXPORTERS``), in order: an unknown
    one is warned about and left out, and naming only unknown ones reads as unset."""
    return keep_known("OTEL_TRACES_EXPORTER", otel.traces_exporters, registry.names(registry.SPAN_EXPORTERS),
                      unset_means=UNSET_TRACES_EXPORTER)


def resource_from_env(process_attrs: Mapping[str, Any]) -> Resource:
    """``Resource.create`` (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``) plus host and process."""
    base = {"host.name": socket.gethostname(), ATTR_PID: os.getpid()}
    for key in (ATTR_RANK, ATTR_LOCAL_RANK):
        if key in process_attrs:
            base[key] = process_attrs[key]
    return Resource.create(base)


def app_provider(settings: Settings) -> Any | None:
    """The SDK TracerProvider spans should go through, if any (see the module docstring)."""
    if settings.tracer_provider is not None:
        return settings.tracer_provider
    if settings.pipeline == "own":
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        return provider
    if settings.pipeline == "app":
        _log.warning("otel-npu: OTEL_NPU_PIPELINE=app but no SDK TracerProvider is installed (found %s); "
                     "using otel-npu's own pipeline", type(provider).__name__)
    return None


def build(settings: Settings, otel: OtelSettings, *, process_attrs: Mapping[str, Any],
          stream_label: Callable[[Any], str], to_wall: Callable[[int], int], stats: Stats) -> Pipeline:
    """The pipeline for ``settings`` and the ``OTEL_*`` settings ``otel`` (never raises for configuration
    problems: warns and degrades)."""
    redact.install_exporter_log_filter()  # before any exporter is built: they log while parsing headers
    scope = InstrumentationScope(SCOPE_NAME, __version__)
    common: dict[str, Any] = dict(stream_label=stream_label, to_wall=to_wall, const_attributes=process_attrs, stats=stats,
                  event_timeout_s=settings.event_timeout_s)

    provider = app_provider(settings)
    if provider is not None:
        if sdk.rescued:  # the limits, which this pipeline does not use, say what the SDK's import rejected
            otel.span_limits  # noqa: B018
        tracer = provider.get_tracer(SCOPE_NAME, __version__)
        if not hasattr(tracer, "span_processor"):  # a provider that is not the SDK's
            _log.warning("otel-npu: the TracerProvider %s is not an OpenTelemetry SDK provider; spans cannot "
                         "be handed to it, using otel-npu's own pipeline", type(provider).__name__)
        else:
            # Its span limits (the SDK's SpanLimits, read from the OTEL_*_LIMIT variables when it was made).
            limits = Limits.from_sdk(getattr(tracer, "_span_limits", None) or getattr(provider, "_span_limits", None))
            factory = SpanFactory(sampler=tracer.sampler, id_generator=tracer.id_generator, limits=limits, **common)
            sink = SdkSink(tracer.span_processor, tracer.resource, scope, factory, owned=False)
            return Pipeline(factory, [sink], stats, f"the application's TracerProvider ({type(provider).__name__})",
                            _build_metrics(settings, otel, process_attrs, resource_from_env(process_attrs),
                                           scope, stats), **_step_rules(settings, stats),
                            metrics_description=otel.metrics_off_reason or "none")

    factory = SpanFactory(sampler=sampler(otel), id_generator=IdGenerator(),
                          limits=Limits(**otel.span_limits), **common)
    if otel.sdk_disabled:
        return Pipeline(factory, [], stats, "none (OTEL_SDK_DISABLED=true)")
    resource = resource_from_env(process_attrs)
    sinks: list = []
    described = []
    traces_file = otel.traces_file
    if traces_file:
        try:
            # Encoded straight to OTLP/JSON (encoding/otlp_json.py): ≈ 30x cheaper than protobuf + MessageToDict.
            encoder = JsonSpanEncoder(factory, resource, scope.name, scope.version or "")
            sinks.append(OtlpSink(JsonLinesFileTransport(traces_file), encoder, stats, schedule_delay_s=1.0))
            described.append(f"file {traces_file}")
        except OSError as exc:
            _log.warning("%s=%r cannot be written (%s); no trace file", otel_config.TRACES_FILE_ENV, traces_file,
                         exc)
    context = registry.SinkContext(otel=otel, factory=factory, resource=resource, scope=scope, stats=stats)
    for name in trace_exporters(otel):
        try:
            sink, text = registry.SPAN_EXPORTERS[name](context)
        except Exception as exc:
            _log.warning("otel-npu: cannot set up the %s exporter (%s); its spans are not exported",
                         name, redact.redact(f"{type(exc).__name__}: {exc}"))
            continue
        sinks.append(sink)
        described.append(text)
    metrics = _build_metrics(settings, otel, process_attrs, resource, scope, stats)
    return Pipeline(factory, sinks, stats, "otel-npu's own: " + (", ".join(described) or "no exporter"), metrics,
                    **_step_rules(settings, stats), metrics_description=otel.metrics_off_reason or "none")


def _step_rules(settings: Settings, stats: Stats) -> dict[str, Any]:
    """Slow-step keeping and the detail budget of ``settings`` (validated there), for ``Pipeline``."""
    rule = config.parse_keep_slow(getattr(settings, "keep_slow_steps", "p99"))
    return {"slow": None if rule is None else step_sampling.SlowSteps(rule, stats),
            "detail_every": getattr(settings, "detail_every", 1)}


def _build_metrics(settings: Settings, otel: OtelSettings, process_attrs: Mapping[str, Any], resource: Resource,
                   scope: InstrumentationScope, stats: Stats) -> Any:
    """Stage metrics (``metrics/``), or None. Never raises: a failure here must not cost the spans."""
    if otel.sdk_disabled:
        return None
    try:
        built = _metrics.build(settings, otel, const_attributes=process_attrs, resource=resource, scope=scope,
                               stats=stats)
    except Exception as exc:
        _log.warning("otel-npu: cannot set up the stage metrics (%s); they are not exported",
                     redact.redact(f"{type(exc).__name__}: {exc}"))
        return None
    redact.install_exporter_log_filter()
    return built


def sdk_span_limits(otel: OtelSettings) -> Any:
    """The SDK's SpanLimits from otel-npu's validated limits (``OtelSettings.span_limits``, what doctor shows):
    a TracerProvider given none reads ``OTEL_SPAN_*_LIMIT`` and ``OTEL_*ATTRIBUTE*_LIMIT`` itself and raises
    ``ValueError`` for an invalid one."""
    from opentelemetry.sdk.trace import SpanLimits

    limits = otel.span_limits

    def sdk(value: int | None) -> int:
        return SpanLimits.UNSET if value is None else value

    return SpanLimits(max_attributes=sdk(limits["span_attributes"]), max_events=sdk(limits["events"]),
                      max_links=sdk(limits["links"]), max_span_attributes=sdk(limits["span_attributes"]),
                      max_event_attributes=sdk(limits["event_attributes"]),
                      max_link_attributes=sdk(limits["link_attributes"]),
                      max_attribute_length=sdk(limits["value_length"]),
                      max_span_attribute_length=sdk(limits["span_value_length"]))


def tracer_provider_from_env(env: Mapping[str, str] | None = None,
                             extra_attributes: Mapping[str, Any] | None = None, *,
                             wrap_exporter: Callable[[Any, str], Any] | None = None) -> TracerProvider:
    """An SDK TracerProvider configured like otel-npu's own pipeline, for an application that has none
    (the demo uses it for its request spans): resource and sampler from the ``OTEL_*`` variables, exporters
    from ``OTEL_TRACES_EXPORTER`` / ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``, plus the ``OTEL_NPU_TRACES_FILE``
    file (``env``: the process environment unless given), and ids from otel-npu's own RNG
    (``spans.identity.IdGenerator``: the application's ``random.seed()`` cannot repeat them). The caller installs it
    (``trace.set_tracer_provider``) and shuts it down. ``wrap_exporter(exporter, kind)`` (kind ``file``,
    ``console`` or ``otlp``: the ``registry.SDK_SPAN_EXPORTERS`` name), when given, may replace each span
    exporter before its processor is built (the demo counts what each one delivered)."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    otel = otel_config.read(env)
    redact.install_exporter_log_filter()
    provider = TracerProvider(resource=resource_from_env(dict(extra_attributes or {})), sampler=sampler(otel),
                              span_limits=sdk_span_limits(otel), id_generator=IdGenerator())
    if otel.sdk_disabled:
        return provider
    otel.batching  # noqa: B018  (validated, and warned about, before any exporter or the traces file exists)

    def wrap(exporter: Any, kind: str) -> Any:
        return exporter if wrap_exporter is None else wrap_exporter(exporter, kind)

    if otel.traces_file:
        provider.add_span_processor(sdk_batch_processor(wrap(JsonLinesSpanExporter(otel.traces_file), "file"),
                                                        otel, schedule_delay_ms=1000))
    for name in trace_exporters(otel):
        exporter, batched = registry.SDK_SPAN_EXPORTERS[name](otel)
        exporter = wrap(exporter, name)
        provider.add_span_processor(sdk_batch_processor(exporter, otel) if batched else SimpleSpanProcessor(exporter))
    return provider
