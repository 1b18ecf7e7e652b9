"""Keeping exporter header values (tokens) out of logs and error texts, and the SDK exporters' own log lines
out of the way of otel-npu's single rate-limited warning.

* ``redact(text)`` replaces every header value configured in ``OTEL_EXPORTER_OTLP_[TRACES_|METRICS_|LOGS_]HEADERS``
  (as written, URL-decoded, and each long word of it, such as the token after ``Bearer``) with ``***``.
  Every error text otel-npu keeps or logs goes through it.
* ``install_exporter_log_filter()`` puts a filter on the SDK's ``opentelemetry.exporter*`` loggers. A record
  logged from one of otel-npu's own threads (names starting ``otel-npu``: the exporter, metrics and doctor
  threads) is not passed on: otel-npu counts each failed batch itself and says so in one warning per minute
  (``Stats.report``), where the SDK would log one or more lines per failed batch and retry (every few seconds
  while a collector is down). Its text is kept, redacted, as the failure's detail (``last_message``) and logged
  at DEBUG on the ``otel_npu`` logger. Records from the application's own exporters pass, with header values
  redacted.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from typing import Mapping

from ..config.otel import header_values

MASK = "***"
#: Shorter values are not masked: they are not secrets, and masking them would garble every message.
MIN_SECRET = 4

_log = logging.getLogger("otel_npu")
_last: dict[str, str] = {}
_installed: set[str] = set()
_install_lock = threading.Lock()


def header_names(raw: str) -> list[str]:
    """The header names in an ``OTEL_EXPORTER_OTLP_HEADERS`` value (never the values)."""
    names = []
    for part in raw.split(","):
        if "=" in part:
            names.append(urllib.parse.unquote(part.split("=", 1)[0]).strip())
    return [n for n in names if n]


def secrets(env: Mapping[str, str] | None = None) -> list[str]:
    """Every header value to mask, longest first.

    An entry without ``=`` (``Authorization: Bearer SECRET``, a common mistake, which the SDK's parser logs
    as it is) is masked whole, and each of its words, except a first word ending in ``:`` (the header name
    written HTTP style): what it holds cannot be told apart from a value."""
    found: set[str] = set()
    for header in header_values(env):
        for part in header.split(","):
            if "=" in part:
                raw = part.split("=", 1)[1].strip()
                words_from = 0
            else:
                raw = part.strip()
                words_from = 1 if raw.split(None, 1)[0:1] and raw.split(None, 1)[0].endswith(":") else 0
            for value in (raw, urllib.parse.unquote(raw), urllib.parse.unquote_plus(raw)):
                found.add(value)
                found.update(value.split()[words_from:])
                if words_from:
                    found.add(value.split(None, 1)[1] if len(value.split(None, 1)) > 1 else "")
    return sorted((s for s in found if len(s) >= MIN_SECRET), key=len, reverse=True)


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    for secret in secrets(env):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def last_message(thread_name: str | None = None) -> str | None:
    """The last SDK exporter log line suppressed on ``thread_name`` (default: this thread), and forget it."""
    return _last.pop(thread_name or threading.current_thread().name, None)


class _ExporterLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the SDK's business, not ours
            return True
        clean = redact(message)
        if (record.threadName or "").startswith("otel-npu"):
            _last[record.threadName] = clean
            _log.debug("otel-npu: %s said: %s", record.name, clean)
            return False
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and secrets():
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


_FILTER = _ExporterLogFilter()

#: Loggers filtered even before their modules are imported (``getLogger`` returns the same object then), so
#: that nothing an exporter logs while it is being built escapes: the SDK's header parser
#: (``opentelemetry.util.re``) logs a malformed ``OTEL_EXPORTER_OTLP_HEADERS`` entry *with its value*.
KNOWN_LOGGERS = (
    "opentelemetry.util.re",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.common.http",
)


def install_exporter_log_filter() -> None:
    """Filter the known exporter loggers and every ``opentelemetry.exporter*`` logger created so far.
    Idempotent; cheap enough to call before and after building exporters."""
    with _install_lock:
        names = set(KNOWN_LOGGERS)
        names.update(name for name, logger in list(logging.root.manager.loggerDict.items())
                     if name.startswith("opentelemetry.exporter") and isinstance(logger, logging.Logger))
        for name in names - _installed:
            logging.getLogger(name).addFilter(_FILTER)
            _installed.add(name)
