"""Reading one environment variable: the parsers every setting goes through, with one message style.

An invalid value logs one warning that names the variable, the value as written, what is accepted and what
is used instead (``VAR='value' is not valid: accepted values are ...; using ...``), and the default is used:
a typo in a deployment must never crash the program being observed. Nothing here raises for a bad value.

``process_env()`` is the process environment itself: the only reference to ``os.environ`` in otel-npu. It is
for code that hands settings on to readers that are not otel-npu's (the OpenTelemetry SDK's exporter
classes read their own ``OTEL_EXPORTER_OTLP_*`` variables) or to a program otel-npu runs (the demo).
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, MutableMapping

_log = logging.getLogger("otel_npu")

_TRUE = ("1", "true")
_FALSE = ("0", "false")


def process_env() -> MutableMapping[str, str]:
    """The process environment (``os.environ``): read it through the functions of ``config``."""
    return os.environ


def get(env: Mapping[str, str] | None, name: str) -> str:
    """``name``'s value, stripped; ``""`` when unset."""
    return (process_env() if env is None else env).get(name, "").strip()


def invalid(name: str, raw: str | None, accepted: str, using: str) -> None:
    """The one warning of an invalid value: ``NAME='raw' is not valid: accepted values are ...; using ...``."""
    _log.warning("%s=%r is not valid: accepted values are %s; %s", name, raw, accepted, using)


def parse_bool(raw: str) -> bool | None:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def env_bool(env: Mapping[str, str], name: str, default: bool, consequence: str) -> bool:
    """``name`` as 1/0/true/false (any case); else ``default`` after one warning ending in ``consequence``."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    parsed = parse_bool(raw)
    if parsed is None:
        invalid(name, raw, "1, 0, true, false (any case)", consequence)
        return default
    return parsed


def env_flag(env: Mapping[str, str], name: str) -> bool:
    """A flag of the OpenTelemetry specification (``OTEL_SDK_DISABLED``): true only when it says ``true``."""
    return env.get(name, "").strip().lower() == "true"


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
        invalid(name, raw, f"{what} from {low} to {f'{high:g}' if not integer else high}",
                f"using the default {f'{default / scale:g}' if scale != 1.0 else f'{default:g}'}")
        return default
    return value * scale


def env_choice(env: Mapping[str, str], name: str, accepted: tuple[str, ...], default: str) -> str:
    """``name`` (any case) if it is one of ``accepted``; else ``default`` after one warning."""
    raw = env.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value not in accepted:
        invalid(name, raw, ", ".join(accepted), f"using {default}")
        return default
    return value


def env_names(env: Mapping[str, str], name: str, default: str) -> tuple[str, ...]:
    """The names listed in ``name`` (comma-separated, any case; ``default`` when unset), in order, without
    duplicates. Which names are known is for the table that builds them to say (``keep_known``)."""
    raw = env.get(name, "").strip().lower() or default
    names: list[str] = []
    for item in (part.strip() for part in raw.split(",")):
        if item and item not in names:
            names.append(item)
    return tuple(names)


def unknown_name_message(name: str, item: str, accepted: tuple[str, ...], consequence: str, *,
                         who: str = "otel-npu does not know", hint: str = "") -> str:
    """One wording for a name in ``name`` that otel-npu does not know, wherever it is read (library, demo)."""
    return f"{name} names {item!r}, which {who} (accepted values are {', '.join(accepted)}){hint}: {consequence}"


def keep_known(name: str, names: tuple[str, ...], accepted: tuple[str, ...], *,
               who: str = "otel-npu does not know", hint: str = "", unset_means: str | None = None,
               unset_value: str = "otlp") -> list[str]:
    """``names`` (from ``env_names``) that are in ``accepted``, in order; an unknown one is left out, with one
    warning saying so; ``[]`` when ``none`` is among them. With ``unset_means`` (what the variable's absence
    means, for the warning), a variable that names nothing known at all reads as unset (``unset_value``):
    the OpenTelemetry specification's rule for a value an implementation does not recognise."""
    known = [item for item in names if item in accepted]
    unknown = [item for item in names if item not in accepted]
    as_unset = unset_means is not None and not known
    for item in unknown:
        if as_unset:
            consequence = f"ignored, as if {name} were not set: {unset_means}"
        elif known:
            consequence = f"ignored; using {', '.join(known)}"
        else:
            consequence = "ignored"
        _log.warning("%s", unknown_name_message(name, item, accepted, consequence, who=who, hint=hint))
    if as_unset and unknown:
        known = [unset_value]
    return [] if "none" in known else known