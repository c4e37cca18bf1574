"""Settings: arguments win over the environment; wrong values are precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from genai_mlflow.config import ConfigError, Settings, default_spool_dir, is_disabled


def test_arguments_win_over_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("GENAI_MLFLOW_MODE", "window")
    monkeypatch.setenv("GENAI_MLFLOW_SPOOL_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("GENAI_MLFLOW_CONTENT_BOUND", "4096")
    from_env = Settings.resolve("sqlite:///x.db")
    assert from_env.mode == "window"
    assert from_env.spool_dir == tmp_path / "env"
    assert from_env.content_bound == 4096
    from_args = Settings.resolve("sqlite:///x.db", mode="call", spool_dir=str(tmp_path / "arg"))
    assert from_args.mode == "call"
    assert from_args.spool_dir == tmp_path / "arg"


def test_max_pending_bytes_from_argument_environment_or_default(monkeypatch: pytest.MonkeyPatch):
    assert Settings.resolve("sqlite:///x.db").max_pending_bytes == 32 << 20
    monkeypatch.setenv("GENAI_MLFLOW_MAX_PENDING_BYTES", str(8 << 20))
    assert Settings.resolve("sqlite:///x.db").max_pending_bytes == 8 << 20
    assert Settings.resolve("sqlite:///x.db", max_pending_bytes=4 << 20).max_pending_bytes == 4 << 20


def test_tracking_uri_resolution(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert Settings.resolve().tracking_uri == "http://mlflow.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert Settings.resolve().tracking_uri.startswith("sqlite:")


def test_one_spool_per_tracking_uri():
    assert default_spool_dir("http://a:5000") != default_spool_dir("http://b:5000")
    assert default_spool_dir("http://a:5000") == default_spool_dir("http://a:5000")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("mode", "hourly", "GENAI_MLFLOW_MODE='hourly' is not one of call, window"),
        ("spool_max_bytes", "lots", "GENAI_MLFLOW_SPOOL_MAX_BYTES='lots' is not an integer"),
        ("spool_max_bytes", 10, "GENAI_MLFLOW_SPOOL_MAX_BYTES=10 is below its minimum of 1048576"),
        ("fsync", "maybe", "GENAI_MLFLOW_FSYNC='maybe' is not a boolean"),
        ("writer", "fibre", "GENAI_MLFLOW_WRITER='fibre' is not one of thread, process"),
        ("max_pending_bytes", "32MB", "GENAI_MLFLOW_MAX_PENDING_BYTES='32MB' is not an integer"),
        ("max_pending_bytes", 4096, "GENAI_MLFLOW_MAX_PENDING_BYTES=4096 is below its minimum of 1048576"),
    ],
)
def test_wrong_values(option: str, value: object, message: str):
    with pytest.raises(ConfigError, match=message):
        Settings.resolve("sqlite:///x.db", **{option: value})


def test_unknown_option_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown option.*spool_folder.*known:.*spool_dir"):
        Settings.resolve("sqlite:///x.db", spool_folder="x")


@pytest.mark.parametrize(("value", "disabled"), [("true", True), ("1", True), ("false", False), ("", False)])
def test_kill_switch_values(value: str, disabled: bool):
    assert is_disabled({"GENAI_MLFLOW_DISABLED": value}) is disabled
