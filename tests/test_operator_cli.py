"""`kubellm-operator`: --help documents every setting with its environment variable; flags beat the environment."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from model_operator import __main__ as entry_point

SETTINGS = {  # flag -> the environment variable the chart sets for it
    "--namespaces": entry_point.WATCH_NAMESPACES_ENV,
    "--health-address": entry_point.HEALTH_ADDRESS_ENV,
    "--health-port": entry_point.HEALTH_PORT_ENV,
    "--log-level": entry_point.LOG_LEVEL_ENV,
}


def test_help_prints_usage_and_exits_0(tmp_path):
    """The installed console script; it must not start the operator (no cluster here)."""
    script = pathlib.Path(sys.executable).parent / "kubellm-operator"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "KUBECONFIG": str(tmp_path / "none")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: kubellm-operator")
    for flag, variable in SETTINGS.items():
        assert flag in done.stdout and variable in done.stdout, flag
    assert "KUBELLM_DEFAULT_ENGINE_IMAGE" in done.stdout


def test_defaults_keep_the_pod_layout():
    settings = entry_point.parse_settings([], {})
    assert settings == entry_point.Settings([], "0.0.0.0", 8080, "INFO")
    assert settings.liveness_endpoint == "http://0.0.0.0:8080/healthz"


def test_environment_then_flags():
    environ = {entry_point.WATCH_NAMESPACES_ENV: "a, b", entry_point.HEALTH_ADDRESS_ENV: "127.0.0.1",
               entry_point.HEALTH_PORT_ENV: "9000", entry_point.LOG_LEVEL_ENV: "warning"}
    assert entry_point.parse_settings([], environ) == entry_point.Settings(["a", "b"], "127.0.0.1", 9000, "WARNING")
    flags = ["--namespaces", "c", "--health-address", "::1", "--health-port", "9100", "--log-level", "DEBUG"]
    settings = entry_point.parse_settings(flags, environ)
    assert settings == entry_point.Settings(["c"], "::1", 9100, "DEBUG")
    assert settings.liveness_endpoint == "http://[::1]:9100/healthz"


@pytest.mark.parametrize("argv,environ,fragment", [
    (["--health-port", "0"], {}, "not a TCP port"),
    ([], {entry_point.HEALTH_PORT_ENV: "http"}, "not a TCP port"),
    (["--log-level", "verbose"], {}, "not one of DEBUG"),
    (["--namespace", "a"], {}, "unrecognized arguments"),
])
def test_bad_settings_exit_2_with_a_message(argv, environ, fragment, capsys):
    with pytest.raises(SystemExit) as exited:
        entry_point.parse_settings(argv, environ)
    assert exited.value.code == 2
    assert fragment in capsys.readouterr().err
