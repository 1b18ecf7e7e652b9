"""Configuration: the only code in otel-npu that reads the environment.

* ``Settings`` (this module): the ``OTEL_NPU_*`` variables (and the seed's switch), read once at import
  (``from_env``) or given to ``configure()``;
* ``otel.py``: the standard ``OTEL_*`` variables otel-npu interprets, ``OTEL_NPU_TRACES_FILE``, ``RANK`` and
  ``LOCAL_RANK``, read when the runtime starts (so that a plugin may still set them before the first capture);
* ``env.py``: the parsers every variable goes through, with one message style.

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
import re
from typing import Any, Callable, Mapping

from ..devices import registry
from ..devices.base import DeviceBackend
from . import otel
from .env import env_bool, env_choice, env_number, invalid, process_env
from .otel import OTLP_TIMEOUT_DEFAULT_S, otlp_timeout_s

#: Environment variables otel-npu reads (the standard ``OTEL_*`` ones: ``otel.py``).
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
#: Read once, when otel_npu is imported (``_compiled.py``): run the background modules as pure Python even
#: where their compiled twins are built.
ENV_PURE_PYTHON = "OTEL_NPU_PURE_PYTHON"

#: ``OTEL_NPU_DEVICE`` / ``configure(device=...)``: ``auto`` or a kind of ``devices/registry.py``.
DEVICES = ("auto", *registry.KINDS)
PIPELINES = ("auto", "app", "own")
_STAYS_OFF = "otel-npu stays disabled unless the program enables it (otel_npu.configure(enabled=True))"


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
    #: recent steps of the same name) or a duration (``"25ms"``). See ``spans/sampling.py``.
    keep_slow_steps: str = "p99"
    #: Detail captures (``instrument_module``, ``capture(detail=True)``) in one step in this many per name.
    detail_every: int = 1
    #: Attributes every span and every stage metric of this process carries, besides otel-npu's own (an
    #: engine integration sets the worker's ranks here: ``vllm.tp_rank``...). Read when otel-npu starts.
    attributes: Mapping[str, Any] = dataclasses.field(default_factory=dict)


#: Accepted ranges of the numeric settings (above the low end, up to the high end). The high ends keep every
#: value one that threads, timers and exporters accept (a wait longer than threading.TIMEOUT_MAX raises
#: OverflowError in a background thread) and one that makes sense.
MAX_PENDING_MAX = 10_000_000
EVENT_TIMEOUT_MAX_S = 86_400.0  # a day
POLL_INTERVAL_MAX_S = 60.0
SHUTDOWN_TIMEOUT_MAX_S = 3_600.0
DETAIL_EVERY_MAX = 1_000_000


#: ``OTEL_NPU_KEEP_SLOW_STEPS``: what is accepted (``parse_keep_slow``).
ACCEPTED_KEEP = "off, p99, p999, or a duration such as 25ms, 0.5s, 800us (a bare number is milliseconds)"
_PERCENTILES = {"p99": 0.99, "p999": 0.999}
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|us|µs)?\s*$", re.IGNORECASE)
_UNIT_NS = {None: 1e6, "ms": 1e6, "s": 1e9, "us": 1e3, "µs": 1e3}


def parse_keep_slow(raw: Any) -> tuple[str, float] | None:
    """``"off"`` -> None; ``"p99"`` -> ("p99", 0.99); ``"25ms"`` -> ("threshold", 25e6 ns). Raises ValueError."""
    if not isinstance(raw, str):
        raise ValueError(f"expected a str ({ACCEPTED_KEEP}), got {type(raw).__name__}")
    text = raw.strip().lower()
    if text in ("off", "none", "false", "0"):
        return None
    if text in _PERCENTILES:
        return text, _PERCENTILES[text]
    match = _DURATION.match(text)
    if match:
        value = float(match.group(1)) * _UNIT_NS[match.group(2) and match.group(2).lower()]
        if 0 < value < 1e15:
            return "threshold", value
    raise ValueError(f"{raw!r} is not valid: accepted values are {ACCEPTED_KEEP}")


def pure_python_from_env(env: Mapping[str, str] | None = None) -> bool:
    """``OTEL_NPU_PURE_PYTHON``: true to load the pure-Python modules instead of the compiled core (``_compiled``).
    An invalid value warns and leaves the compiled core on."""
    return env_bool(process_env() if env is None else env, ENV_PURE_PYTHON, False,
                    "the compiled core is used where it is built")


def _keep_slow_from_env(env: Mapping[str, str]) -> str:
    """``OTEL_NPU_KEEP_SLOW_STEPS`` as written, or p99 (after one warning when invalid)."""
    raw = env.get(ENV_KEEP_SLOW, "")
    if raw.strip():
        try:
            parse_keep_slow(raw)
            return raw.strip()
        except ValueError:
            invalid(ENV_KEEP_SLOW, raw, ACCEPTED_KEEP, "using p99")
    return "p99"


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Read the ``OTEL_NPU_*`` variables once and return validated settings (never raises)."""
    env = process_env() if env is None else env
    # OTEL_NPU_ENABLED wins when set; the seed's variable counts only when it is not. An invalid
    # value of whichever is used warns and leaves otel-npu off.
    via_alias = False
    if env.get(ENV_ENABLED, "").strip():
        enabled = env_bool(env, ENV_ENABLED, False, _STAYS_OFF)
    else:
        enabled = env_bool(env, ENV_ENABLED_ALIAS, False, _STAYS_OFF)
        via_alias = bool(enabled)
    # The seed printed its duration lines whenever its variable was set: keep that for people migrating.
    log_durations = env_bool(env, ENV_LOG_DURATIONS, via_alias, "duration lines stay off")
    device = env_choice(env, ENV_DEVICE, DEVICES, "auto")
    pipeline = env_choice(env, ENV_PIPELINE, PIPELINES, "auto")
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
        keep_slow_steps=_keep_slow_from_env(env),
        detail_every=int(env_number(env, ENV_DETAIL_EVERY, defaults.detail_every, DETAIL_EVERY_MAX, "whole numbers",
                                    integer=True)),
    )


_ARG_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "enabled": (lambda v: isinstance(v, bool), "True or False"),
    "device": (lambda v: (isinstance(v, str) and v in DEVICES) or _is_backend(v),
               f"{', '.join(map(repr, DEVICES))} or a DeviceBackend (e.g. otel_npu.testing.SimDevice)"),
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
    "detail_every": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= DETAIL_EVERY_MAX,
                     f"an int from 1 to {DETAIL_EVERY_MAX}"),
    "attributes": (lambda v: _valid_attributes(v), "a mapping of non-empty str keys to str, bool, int or float"),
}


def _valid_attributes(v: Any) -> bool:
    return isinstance(v, Mapping) and all(
        isinstance(k, str) and k and isinstance(x, (str, bool, int, float)) for k, x in v.items())


def _valid_keep(v: Any) -> bool:
    try:
        parse_keep_slow(v)
    except ValueError:
        return False
    return True


def _positive_number(v: Any, high: float = float("inf")) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= high and v != float("inf")


def _is_backend(v: Any) -> bool:
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
        applied[key] = dict(value) if key == "attributes" else value
    return dataclasses.replace(base, **applied)


__all__ = ["Settings", "from_env", "override", "parse_keep_slow", "env_number", "otlp_timeout_s", "process_env",
           "otel", "OTLP_TIMEOUT_DEFAULT_S"]
