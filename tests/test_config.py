"""Configuration: read once, invalid environment values warn and never crash, invalid arguments raise."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

import otel_npu
from otel_npu import config, runtime


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("raw, expected", [("1", True), ("TRUE", True), (" true ", True), ("0", False),
                                           ("False", False), ("", False)])
def test_enabled_values(raw, expected, caplog):
    assert config.from_env({"OTEL_NPU_ENABLED": raw}).enabled is expected
    assert warnings_of(caplog) == []


def test_invalid_enabled_value_warns_once_and_stays_off(caplog):
    settings = config.from_env({"OTEL_NPU_ENABLED": "yes please"})
    assert settings.enabled is False
    (message,) = warnings_of(caplog)
    assert "OTEL_NPU_ENABLED='yes please'" in message
    assert "1, 0, true, false" in message and "stays disabled" in message


def test_invalid_enabled_value_is_not_rescued_by_the_alias(caplog):
    settings = config.from_env({"OTEL_NPU_ENABLED": "on", "VLLM_ASCEND_MODEL_EXECUTE_TIME_OBSERVE": "1"})
    assert settings.enabled is False


def test_the_seeds_variable_enables_and_keeps_its_log_lines():
    settings = config.from_env({"VLLM_ASCEND_MODEL_EXECUTE_TIME_OBSERVE": "1"})
    assert settings.enabled and settings.log_durations
    quiet = config.from_env({"VLLM_ASCEND_MODEL_EXECUTE_TIME_OBSERVE": "1", "OTEL_NPU_LOG_DURATIONS": "0"})
    assert quiet.enabled and not quiet.log_durations
    assert not config.from_env({"OTEL_NPU_ENABLED": "0", "VLLM_ASCEND_MODEL_EXECUTE_TIME_OBSERVE": "1"}).enabled


@pytest.mark.parametrize("var, raw, field, default", [
    ("OTEL_NPU_MAX_PENDING", "-5", "max_pending", 100_000),
    ("OTEL_NPU_MAX_PENDING", "1e3", "max_pending", 100_000),
    ("OTEL_NPU_EVENT_TIMEOUT_S", "soon", "event_timeout_s", 60.0),
    ("OTEL_NPU_EVENT_TIMEOUT_S", "nan", "event_timeout_s", 60.0),
    ("OTEL_NPU_POLL_INTERVAL_MS", "0", "poll_interval_s", 0.1),
    ("OTEL_NPU_DEVICE", "tpu", "device", "auto"),
    ("OTEL_NPU_PIPELINE", "sdk", "pipeline", "auto"),
])
def test_invalid_values_fall_back_with_a_warning_naming_variable_value_and_accepted(var, raw, field, default,
                                                                                    caplog):
    settings = config.from_env({"OTEL_NPU_ENABLED": "1", var: raw})
    assert getattr(settings, field) == default
    assert settings.enabled
    (message,) = warnings_of(caplog)
    assert var in message and repr(raw) in message and "accepted" in message


def test_valid_values_are_taken():
    settings = config.from_env({"OTEL_NPU_ENABLED": "1", "OTEL_NPU_MAX_PENDING": "500",
                                "OTEL_NPU_EVENT_TIMEOUT_S": "2.5", "OTEL_NPU_POLL_INTERVAL_MS": "20",
                                "OTEL_NPU_DEVICE": "CPU", "OTEL_NPU_PIPELINE": "own",
                                "OTEL_NPU_SHUTDOWN_TIMEOUT_S": "1"})
    assert (settings.max_pending, settings.event_timeout_s, settings.poll_interval_s) == (500, 2.5, 0.02)
    assert (settings.device, settings.pipeline, settings.shutdown_timeout_s) == ("cpu", "own", 1.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "tpu"}, r"configure\(device='tpu'\) is not valid: expected 'auto', 'npu', 'cuda', 'cpu'"),
    ({"max_pending": 0}, r"configure\(max_pending=0\) is not valid: expected an int from 1 to 10000000"),
    ({"enabled": "yes"}, r"configure\(enabled='yes'\) is not valid: expected True or False"),
    ({"event_timeout_s": -1}, r"configure\(event_timeout_s=-1\)"),
    ({"pipeline": "sdk"}, r"configure\(pipeline='sdk'\) is not valid: expected 'auto', 'app' or 'own'"),
])
def test_configure_rejects_bad_arguments_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        otel_npu.configure(**kwargs)
    assert not otel_npu.enabled()


def test_configure_rejects_unknown_arguments():
    with pytest.raises(TypeError):
        otel_npu.configure(colour="blue")


def test_environment_is_read_once_at_import_and_a_bad_value_never_crashes_the_program():
    code = ("import otel_npu, os\n"
            "os.environ['OTEL_NPU_ENABLED'] = '0'\n"  # too late: read once, at import
            "with otel_npu.capture('x'):\n    pass\n"
            "print('enabled', otel_npu.enabled())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"OTEL_NPU_ENABLED": "1", "OTEL_NPU_DEVICE": "cpu", "OTEL_TRACES_EXPORTER": "none",
                              "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "enabled True" in out.stdout
    bad = subprocess.run([sys.executable, "-c", "import otel_npu\nwith otel_npu.capture('x'):\n    pass\n"
                          "print('ran', otel_npu.enabled())"], capture_output=True, text=True, timeout=120,
                         env={"OTEL_NPU_ENABLED": "perhaps", "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 0 and "ran False" in bad.stdout
    assert bad.stderr.count("OTEL_NPU_ENABLED='perhaps' is not valid") == 1


# -- out-of-range numbers: one warning naming variable, value and range, then the default --------------------
@pytest.mark.parametrize("var, raw, field, default", [
    ("OTEL_NPU_POLL_INTERVAL_MS", "1e16", "poll_interval_s", 0.1),
    ("OTEL_NPU_POLL_INTERVAL_MS", "inf", "poll_interval_s", 0.1),
    ("OTEL_NPU_EVENT_TIMEOUT_S", "1e300", "event_timeout_s", 60.0),
    ("OTEL_NPU_SHUTDOWN_TIMEOUT_S", "1e12", "shutdown_timeout_s", 5.0),
    ("OTEL_NPU_MAX_PENDING", "99999999999999999999999", "max_pending", 100_000),
])
def test_out_of_range_values_fall_back_with_a_warning_naming_the_range(var, raw, field, default, caplog):
    settings = config.from_env({"OTEL_NPU_ENABLED": "1", var: raw})
    assert getattr(settings, field) == default
    (message,) = warnings_of(caplog)
    assert var in message and repr(raw) in message and " to " in message and "default" in message


@pytest.mark.parametrize("var, raw, read", [
    ("OTEL_BSP_SCHEDULE_DELAY", "99999999999999999999999",
     lambda env: config.otel.read(env).bsp("OTEL_BSP_SCHEDULE_DELAY")),
    ("OTEL_BSP_MAX_QUEUE_SIZE", "1e3", lambda env: config.otel.read(env).bsp("OTEL_BSP_MAX_QUEUE_SIZE")),
    ("OTEL_METRIC_EXPORT_INTERVAL", "1e23", lambda env: config.otel.read(env).metric_ms("OTEL_METRIC_EXPORT_INTERVAL")),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "0", lambda env: config.otlp_timeout_s(env, "TRACES")),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "-1", lambda env: config.otlp_timeout_s(env, "TRACES")),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "nan", lambda env: config.otlp_timeout_s(env, "TRACES")),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "inf", lambda env: config.otlp_timeout_s(env, "METRICS")),
    ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1e23", lambda env: config.otlp_timeout_s(env, "TRACES")),
])
def test_out_of_range_otel_variables_fall_back_with_one_warning(var, raw, read, caplog):
    value = read({var: raw})
    assert 0 < value < 1e7  # the default, which threading and the exporters accept
    (message,) = warnings_of(caplog)
    assert var in message and repr(raw) in message and " to " in message and "default" in message


def test_an_out_of_range_poll_interval_does_not_kill_the_resolver(monkeypatch, caplog):
    monkeypatch.setenv("OTEL_NPU_POLL_INTERVAL_MS", "1e16")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "99999999999999999999999")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    runtime.set_settings(config.from_env({**os.environ, "OTEL_NPU_ENABLED": "1"}))
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    with otel_npu.capture("x"):
        pass
    assert otel_npu.flush(5.0)
    assert otel_npu.stats()["resolved"] == 1 and otel_npu.stats()["resolver_alive"]


@pytest.mark.parametrize("kwargs", [{"poll_interval_s": 1e13}, {"event_timeout_s": 1e300},
                                    {"shutdown_timeout_s": 1e12}, {"max_pending": 10**20}])
def test_configure_refuses_out_of_range_numbers_naming_the_range(kwargs):
    (key, value), = kwargs.items()
    with pytest.raises(ValueError, match=rf"configure\({key}=.*\) is not valid: expected .* to "):
        otel_npu.configure(**kwargs)
