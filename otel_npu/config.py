"""Settings: read once from the environment (or given to ``configure()``), validated, never fatal.

Two kinds of bad input, two behaviours:

* an invalid **environment variable** logs one warning that names the variable, the value and what is
  accepted, and falls back (``OTEL_NPU_ENABLED`` falls back to *off*): a typo in a deployment must never
  crash the program being observed;
* an invalid **argument to** ``configure()`` raises ``ValueError``/``TypeError`` at once, naming the argument:
  that is a programming error and is best found at the call site.

Nothing here is read on the hot path: ``capture()`` only sees the result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping

_log = logging.getLogger("otel_npu")

#: Environment variables otel-npu reads (the standard ``OTEL_*`` ones are read in ``export/pipeline.py``).
ENV_ENABLED = "OTEL_NPU_ENABLED"
ENV_ENABLED_ALIAS = "VLLM_ASCEND_MODEL_EXECUTE_TIME_OBSERVE"  # the seed's variable, honoured as an alias
ENV_DEVICE = "OTEL_NPU_DEVICE"
ENV_MAX_PENDING = "OTEL_NPU_MAX_PENDING"
ENV_EVENT_TIMEOUT = "OTEL_NPU_EVENT_TIMEOUT_S"
ENV_LOG_DURATIONS = "OTEL_NPU_LOG_DURATIONS"
ENV_POLL_INTERVAL = "OTEL_NPU_POLL_INTERVAL_MS"
ENV_SHUTDOWN_TIMEOUT = "OTEL_NPU_SHUTDOWN_TIMEOUT_S"
ENV_PIPELINE = "OTEL_NPU_PIPELINE"
ENV_KEEP_SLOW = "OTEL_NPU_KEEP_SLOW_STEPS"
ENV_DETAIL_EVERY = "OTEL_NPU_DETAIL_EVERY"

DEVICES = ("auto", "npu", "cuda", "cpu")
PIPELINES = ("auto", "app", "own")
_TRUE = ("1", "true")
_STAYS_OFF = "otel-npu stays disabled unless the program enables it (otel_npu.configure(enabled=True))"
_FALSE = ("0", "false")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything otel-npu needs to start. Immutable: ``configure()`` builds a new one."""

    #: Master switch. Off by default: ``capture``/``step`` then cost one call and create nothing.
    enabled: bool = False
    #: ``"auto"`` (npu > cuda > cpu), ``"npu"``, ``"cuda"``, ``"cpu"``, or a ``DeviceBackend`` instance
    #: (for example ``otel_npu.testing.SimDevice``).
    device: Any = "auto"
    #: Captures waiting for their device events, at most. Past it new captures are dropped and counted.
    max_pending: int = 100_000
    #: A capture whose events have not completed after this many seconds becomes an ERROR span.
    event_timeout_s: float = 60.0
    #: Log the seed's ``Profile execute duration [...]`` line at each step end and compat pop.
    log_durations: bool = False
    #: How often the resolver wakes up to look for finished events when nobody is waiting on it.
    poll_interval_s: float = 0.1
    #: Bound on the flush done at interpreter exit.
    shutdown_timeout_s: float = 5.0
    #: ``"auto"``: the application's SDK TracerProvider if one is installed, else otel-npu's own
    #: pipeline built from the ``OTEL_*`` variables; ``"app"``: always the global provider;
    #: ``"own"``: always otel-npu's own pipeline.
    pipeline: str = "auto"
    #: An SDK ``TracerProvider`` to send spans through, instead of looking one up.
    tracer_provider: Any = None
    #: Steps the sampler dropped that are exported anyway when slow: ``"off"``, ``"p99"``, ``"p999"`` (of the
    #: recent steps of the same name) or a duration (``"25ms"``). See ``sampling.py``.
    keep_slow_steps: str = "p99"
    #: Detail captures (``instrument_module``, ``capture(detail=True)``) in one step in this many per name.
    detail_every: int = 1


def _parse_bool(raw: str) -> bool | None:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def _env_bool(env: Mapping[str, str], name: str, default: bool, consequence: str) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    parsed = _parse_bool(raw)
    if parsed is None:
        _log.warning(
            "%s=%r is not valid: accepted values are 1, 0, true, false (any case); %s",
            name, raw, consequence,
        )
        return default
    return parsed


#: Accepted ranges of the numeric settings (above the low end, up to the high end). The high ends keep every
#: value one that threads, timers and exporters accept (a wait longer than threading.TIMEOUT_MAX raises
#: OverflowError in a background thread) and one that makes sense.
MAX_PENDING_MAX = 10_000_000
EVENT_TIMEOUT_MAX_S = 86_400.0  # a day
POLL_INTERVAL_MAX_S = 60.0
SHUTDOWN_TIMEOUT_MAX_S = 3_600.0
OTLP_TIMEOUT_MAX_S = 3_600.0
OTLP_TIMEOUT_DEFAULT_S = 10.0


def env_number(env: Mapping[str, str], name: str, default: float, high: float, what: str, *,
               integer: bool = False, scale: float = 1.0) -> float:
    """``name`` read from ``env``: a number above 0 and at most ``high`` (a whole number if ``integer``), times
    ``scale``; else ``default`` after one warning naming the variable, the value and the accepted range."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value: float | None = int(raw.strip(), 10) if integer else float(raw.strip())
    except (ValueError, OverflowError):
        value = None
    if value is None or not 0 < value <= high:  # NaN fails both comparisons
        low = "1" if integer else "above 0"
        _log.warning("%s=%r is not valid: accepted values are %s from %s to %s; using the default %s",
                     name, raw, what, low, f"{high:g}" if not integer else high,
                     f"{default / scale:g}" if scale != 1.0 else f"{default:g}")
        return default
    return value * scale


def _env_number(env: Mapping[str, str], name: str, default: float, convert: Callable[[str], float],
                 what: str, scale: float = 1.0, high: float = float("inf")) -> float:
    return env_number(env, name, default, high, what, integer=convert is _strict_int, scale=scale)


def otlp_timeout_s(env: Mapping[str, str] | None, signal: str) -> float | None:
    """``OTEL_EXPORTER_OTLP_{signal}_TIMEOUT``, else ``OTEL_EXPORTER_OTLP_TIMEOUT`` (seconds, as the Python SDK
    reads them), validated: ``None`` when neither is set (the exporter's own default), the default 10 s after
    one warning when the value is not a number above 0 up to an hour (0, -1, nan, inf, 1e23 made every
    export fail at once, or never time out)."""
    env = os.environ if env is None else env
    for var in (f"OTEL_EXPORTER_OTLP_{signal}_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        if env.get(var, "").strip():
            return env_number(env, var, OTLP_TIMEOUT_DEFAULT_S, OTLP_TIMEOUT_MAX_S, "a number of seconds")
    return None


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Read the ``OTEL_NPU_*`` variables once and return validated settings (never raises)."""
    env = os.environ if env is None else env
    # OTEL_NPU_ENABLED wins when set; the seed's variable counts only when it is not. An invalid
    # value of whichever is used warns and leaves otel-npu off.
    via_alias = False
    if env.get(ENV_ENABLED, "").strip():
        enabled = _env_bool(env, ENV_ENABLED, False, _STAYS_OFF)
    else:
        enabled = _env_bool(env, ENV_ENABLED_ALIAS, False, _STAYS_OFF)
        via_alias = bool(enabled)
    # The seed printed its duration lines whenever its variable was set: keep that for people migrating.
    log_durations = _env_bool(env, ENV_LOG_DURATIONS, via_alias, "duration lines stay off")

    device = env.get(ENV_DEVICE, "auto").strip().lower() or "auto"
    if device not in DEVICES:
        _log.warning("%s=%r is not valid: accepted values are %s; using auto",
                     ENV_DEVICE, env.get(ENV_DEVICE), ", ".join(DEVICES))
        device = "auto"
    pipeline = env.get(ENV_PIPELINE, "auto").strip().lower() or "auto"
    if pipeline not in PIPELINES:
        _log.warning("%s=%r is not valid: accepted values are %s; using auto",
                     ENV_PIPELINE, env.get(ENV_PIPELINE), ", ".join(PIPELINES))
        pipeline = "auto"

    from .sampling import settings_from_env

    keep_slow, detail_every = settings_from_env(env)  # validated: the raw value, or the default
    defaults = Settings()
    return Settings(
        enabled=bool(enabled),
        device=device,
        max_pending=int(env_number(env, ENV_MAX_PENDING, defaults.max_pending, MAX_PENDING_MAX,
                                   "whole numbers", integer=True)),
        event_timeout_s=env_number(env, ENV_EVENT_TIMEOUT, defaults.event_timeout_s, EVENT_TIMEOUT_MAX_S,
                                   "a number of seconds"),
        log_durations=bool(log_durations),
        poll_interval_s=env_number(env, ENV_POLL_INTERVAL, defaults.poll_interval_s, POLL_INTERVAL_MAX_S * 1e3,
                                   "a number of milliseconds", scale=1e-3),
        shutdown_timeout_s=env_number(env, ENV_SHUTDOWN_TIMEOUT, defaults.shutdown_timeout_s,
                                      SHUTDOWN_TIMEOUT_MAX_S, "a number of seconds"),
        pipeline=pipeline,
        keep_slow_steps=keep_slow,
        detail_every=detail_every,
    )


def exporter_names(env: Mapping[str, str], var: str, accepted: tuple[str, ...], *, who: str = "otel-npu does not know",
                   hint: str = "") -> list[str]:
    """The exporters named in ``var`` (comma-separated, any case, default ``otlp``), in order, without
    duplicates; ``[]`` when ``none`` is among them. An unknown name is warned about and skipped."""
    raw = env.get(var, "").strip().lower() or "otlp"
    names: list[str] = []
    for name in (part.strip() for part in raw.split(",")):
        if not name:
            continue
        if name not in accepted:
            _log.warning("%s names %r, which %s: accepted values are %s%s; ignored",
                         var, name, who, ", ".join(accepted), hint)
            continue
        if name not in names:
            names.append(name)
    return [] if "none" in names else names


def _strict_int(raw: str) -> int:
    return int(raw, 10)


_ARG_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "enabled": (lambda v: isinstance(v, bool), "True or False"),
    "device": (lambda v: (isinstance(v, str) and v in DEVICES) or _is_backend(v),
               "'auto', 'npu', 'cuda', 'cpu' or a DeviceBackend (e.g. otel_npu.testing.SimDevice)"),
    "max_pending": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_PENDING_MAX,
                    f"an int from 1 to {MAX_PENDING_MAX}"),
    "event_timeout_s": (lambda v: _positive_number(v, EVENT_TIMEOUT_MAX_S),
                        f"a number of seconds above 0 to {EVENT_TIMEOUT_MAX_S:g}"),
    "log_durations": (lambda v: isinstance(v, bool), "True or False"),
    "poll_interval_s": (lambda v: _positive_number(v, POLL_INTERVAL_MAX_S),
                        f"a number of seconds above 0 to {POLL_INTERVAL_MAX_S:g}"),
    "shutdown_timeout_s": (lambda v: _positive_number(v, SHUTDOWN_TIMEOUT_MAX_S),
                           f"a number of seconds above 0 to {SHUTDOWN_TIMEOUT_MAX_S:g}"),
    "pipeline": (lambda v: v in PIPELINES, "'auto', 'app' or 'own'"),
    "tracer_provider": (lambda v: hasattr(v, "get_tracer"), "an OpenTelemetry SDK TracerProvider"),
    "keep_slow_steps": (lambda v: _valid_keep(v), "'off', 'p99', 'p999' or a duration such as '25ms'"),
    "detail_every": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1_000_000,
                     "an int from 1 to 1000000"),
}


def _valid_keep(v: Any) -> bool:
    from .sampling import parse_keep_slow

    try:
        parse_keep_slow(v)
    except ValueError:
        return False
    return True


def _positive_number(v: Any, high: float = float("inf")) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= high and v != float("inf")


def _is_backend(v: Any) -> bool:
    from .devices.base import DeviceBackend  # local: config must not import devices at import time

    return isinstance(v, DeviceBackend) or callable(getattr(v, "otel_npu_backend", None))


def override(base: Settings, **changes: Any) -> Settings:
    """Return ``base`` with ``changes`` applied; ``None`` means "keep". Raises on invalid arguments."""
    applied = {}
    for key, value in changes.items():
        if key not in _ARG_CHECKS:
            raise TypeError(f"configure() got an unknown argument {key!r}; accepted: {', '.join(_ARG_CHECKS)}")
        if value is None:
            continue
        check, accepted = _ARG_CHECKS[key]
        if not check(value):
            raise ValueError(f"configure({key}={value!r}) is not valid: expected {accepted}")
        applied[key] = value
    return dataclasses.replace(base, **applied)
