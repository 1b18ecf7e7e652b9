"""The new-user paper cuts of the ``otel-npu`` command, run as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest

import otel_npu
from otel_npu.cli import main

from .support import child_env, free_port


def cli(*args: str, prelude: str = "", timeout: float = 300, cwd=None, **env: str) -> subprocess.CompletedProcess:
    """``otel-npu ARGS`` in a fresh process with no OTEL_* variables (``prelude``: Python run first)."""
    clean = child_env()
    clean.update(env)
    code = f"import sys\n{prelude}\nfrom otel_npu.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=clean, cwd=cwd)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"otel-npu {otel_npu.__version__}"


@pytest.mark.parametrize("value", ["abc", "0", "1.5"])
def test_demo_counts_say_what_is_accepted(value, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--steps", value])
    err = capsys.readouterr().err
    assert f"argument --steps: must be a whole number of at least 1, got {value!r}" in err, err
    assert "_positive" not in err


def test_demo_without_the_demo_extra_says_which_extra_to_install(tmp_path):
    done = cli("demo", "--steps", "1", prelude="sys.modules['transformers'] = None", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr, done.stderr
    assert "pip install 'otel-npu[demo]'" in done.stderr and "transformers" in done.stderr
    assert not list(tmp_path.glob("*.jsonl"))


def test_doctor_refuses_a_timeout_that_is_not_a_positive_number(capsys):
    for value in ("-1", "0", "nan", "inf", "abc"):
        with pytest.raises(SystemExit):
            main(["doctor", "--send-test-span", "--timeout", value])
        err = capsys.readouterr().err
        assert f"argument --timeout: must be a positive number of seconds, got {value!r}" in err, err


def test_doctor_shows_no_private_class_names():
    port = free_port()
    done = cli("doctor", "--send-test-span", "--timeout", "4", OTEL_NPU_ENABLED="1",
               OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "NOT accepted" in done.stdout
    assert "_ExportError" not in done.stdout + done.stderr and "_MetricsExportError" not in done.stdout


def test_importing_and_capturing_without_numpy_prints_no_numpy_warning(tmp_path):
    code = ("import sys\nsys.modules['numpy'] = None\nimport otel_npu\n"
            "with otel_npu.capture('forward'):\n    pass\nprint(otel_npu.stats()['device'])")
    env = child_env()
    env.update(OTEL_NPU_ENABLED="1", OTEL_TRACES_EXPORTER="none")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cpu"
    assert "NumPy" not in done.stderr, done.stderr


def test_demo_with_a_bad_switch_and_an_unknown_exporter_is_consistent(tmp_path):
    done = cli("demo", "--device", "cpu", "--model-size", "tiny", "--steps", "1", "--requests", "1",
               "--no-progress", cwd=tmp_path, OTEL_NPU_ENABLED="maybe", OTEL_TRACES_EXPORTER="bogus")
    assert done.returncode == 0, done.stderr
    out, err = done.stdout, done.stderr
    assert "1 request, up to 1 step," in out, out  # not "1 requests", "1 steps"
    assert "1 torch thread (the default:" in out, out
    # OTEL_NPU_ENABLED: a warning that does not contradict what happens next
    assert "stays disabled" not in err or "unless" in err, err
    assert "the demo enables otel-npu itself" in out
    # OTEL_TRACES_EXPORTER=bogus: said once, and the traces are not lost
    assert (out + err).count("'bogus'") == 1, out + err
    assert "went nowhere" not in out
    files = list(tmp_path.glob("otel-npu-traces-*.jsonl"))
    assert len(files) == 1 and f"Traces written to {files[0].name}." in out


@pytest.mark.parametrize("flag, env, expected", [
    (None, {}, (1, "the default")),
    (None, {"OMP_NUM_THREADS": "2"}, (2, "OMP_NUM_THREADS")),
    (3, {"OMP_NUM_THREADS": "2"}, (3, "--threads")),
    (None, {"OMP_NUM_THREADS": "lots"}, (1, "the default")),
])
def test_demo_thread_count_is_chosen_deliberately(flag, env, expected):
    # torch's default (a thread per core) fought other load on 2 busy CPU cores (28 s instead of under 10 s).
    from otel_npu.cli import demo

    threads, why = demo.choose_threads(flag, env)
    assert (threads, why.split(":")[0]) == expected


def test_doctor_shows_the_span_limits_and_refuses_invalid_ones():
    done = cli("doctor", OTEL_NPU_ENABLED="1", OTEL_TRACES_EXPORTER="none", OTEL_SPAN_LINK_COUNT_LIMIT="4",
               OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT="100")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "span limits:" in done.stdout and "links 4, attributes 128" in done.stdout
    assert "value length 100" in done.stdout
    done = cli("doctor", OTEL_NPU_ENABLED="1", OTEL_TRACES_EXPORTER="none", OTEL_SPAN_LINK_COUNT_LIMIT="many")
    assert done.returncode == 2
    assert "OTEL_SPAN_LINK_COUNT_LIMIT='many' is not valid" in done.stdout
