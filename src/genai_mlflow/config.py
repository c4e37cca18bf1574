"""Settings read from the environment, parsed in one place with precise errors."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genai_mlflow import semconv as sc

logger = logging.getLogger("genai_mlflow")

# Values opentelemetry-util-genai accepts for OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT,
# plus the older true/false. Event-only modes put no content on spans.
_CONTENT_ON = frozenset({"true", "span_only", "span_and_event"})
_CONTENT_OFF = frozenset({"false", "no_content", "event_only"})


def parse_capture_content(value: str | None) -> bool | None:
    """True or False for a recognised value, None when unset or unrecognised (with a warning)."""
    if value is None or not value.strip():
        return None
    normalised = value.strip().lower()
    if normalised in _CONTENT_ON:
        return True
    if normalised in _CONTENT_OFF:
        return False
    logger.warning(
        "Ignoring %s=%r: expected one of true, false, %s",
        sc.ENV_CAPTURE_CONTENT,
        value,
        ", ".join(sorted(v.upper() for v in (_CONTENT_ON | _CONTENT_OFF) - {"true", "false"})),
    )
    return None


def resolve_capture_content(explicit: bool | None, default: bool) -> bool:
    """An explicit argument wins, then the environment, then the caller's default."""
    if explicit is not None:
        return explicit
    from_env = parse_capture_content(os.environ.get(sc.ENV_CAPTURE_CONTENT))
    return default if from_env is None else from_env


# ---------------------------------------------------------------------------------------------
# Exporter settings: every GENAI_MLFLOW_* variable, with its argument twin in instrument().

ENV_DISABLED = "GENAI_MLFLOW_DISABLED"
ENV_MODE = "GENAI_MLFLOW_MODE"
ENV_SPOOL_DIR = "GENAI_MLFLOW_SPOOL_DIR"
ENV_SPOOL_MAX_BYTES = "GENAI_MLFLOW_SPOOL_MAX_BYTES"
ENV_FSYNC = "GENAI_MLFLOW_FSYNC"
ENV_PRICES = "GENAI_MLFLOW_PRICES"
ENV_CONTENT_BOUND = "GENAI_MLFLOW_CONTENT_BOUND"
ENV_MAX_VALUE_BYTES = "GENAI_MLFLOW_MAX_VALUE_BYTES"
ENV_APP_VERSION = "GENAI_MLFLOW_APP_VERSION"
ENV_WRITER = "GENAI_MLFLOW_WRITER"
ENV_WORKERS = "GENAI_MLFLOW_WORKERS"
ENV_MAX_PENDING_BYTES = "GENAI_MLFLOW_MAX_PENDING_BYTES"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"

MODES = ("call", "window")
WRITERS = ("thread", "process")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


class ConfigError(ValueError):
    """A setting has a value that cannot work; the message names the setting and the fix."""


def is_disabled(environ: Mapping[str, str] | None = None) -> bool:
    return _bool(ENV_DISABLED, (environ if environ is not None else os.environ).get(ENV_DISABLED), False)


def _bool(name: str, raw: str | None, default: bool) -> bool:
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean: use true or false")


def _int(name: str, raw: Any, default: int, minimum: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} is below its minimum of {minimum}")
    return value


def _choice(name: str, raw: str | None, choices: tuple[str, ...], default: str) -> str:
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return value


def default_tracking_uri() -> str:
    """MLflow's own resolution: MLFLOW_TRACKING_URI, else the embedded sqlite:///mlflow.db."""
    from mlflow.tracking._tracking_service.utils import get_tracking_uri

    return str(get_tracking_uri())


def default_spool_dir(tracking_uri: str) -> Path:
    """One spool per tracking URI, so that a writer never sends records to the wrong server."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]
    return base / "genai-mlflow" / "spool" / digest


@dataclass(frozen=True)
class Settings:
    """Everything the exporter needs, resolved from arguments, then the environment, then defaults."""

    tracking_uri: str
    mode: str = "call"
    spool_dir: Path = field(default_factory=Path)
    spool_max_bytes: int = 1 << 30
    fsync: bool = False
    prices: str | None = None
    content_bound: int = 16 * 1024
    max_value_bytes: int = 1024 * 1024
    app_version: str | None = None
    writer: str = "thread"
    workers: int = 8
    max_pending_bytes: int = 32 << 20

    @classmethod
    def resolve(cls, tracking_uri: str | None = None, **options: Any) -> Settings:
        env = os.environ
        unknown = set(options) - _OPTION_NAMES
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_OPTION_NAMES))}"
            )
        uri = tracking_uri or default_tracking_uri()

        def pick(name: str, env_name: str) -> Any:
            value = options.get(name)
            return env.get(env_name) if value is None else value

        spool_dir = pick("spool_dir", ENV_SPOOL_DIR)
        return cls(
            tracking_uri=uri,
            mode=_choice(ENV_MODE, pick("mode", ENV_MODE), MODES, "call"),
            spool_dir=Path(spool_dir).expanduser() if spool_dir else default_spool_dir(uri),
            spool_max_bytes=_int(
                ENV_SPOOL_MAX_BYTES, pick("spool_max_bytes", ENV_SPOOL_MAX_BYTES), 1 << 30, 1 << 20
            ),
            fsync=_bool(ENV_FSYNC, _str_or_none(pick("fsync", ENV_FSYNC)), False),
            prices=pick("prices", ENV_PRICES) or None,
            content_bound=_int(ENV_CONTENT_BOUND, pick("content_bound", ENV_CONTENT_BOUND), 16 * 1024, 1024),
            max_value_bytes=_int(
                ENV_MAX_VALUE_BYTES, pick("max_value_bytes", ENV_MAX_VALUE_BYTES), 1024 * 1024, 1024
            ),
            app_version=pick("app_version", ENV_APP_VERSION) or None,
            writer=_choice(ENV_WRITER, pick("writer", ENV_WRITER), WRITERS, "thread"),
            workers=_int(ENV_WORKERS, pick("workers", ENV_WORKERS), 8, 1),
            max_pending_bytes=_int(
                ENV_MAX_PENDING_BYTES, pick("max_pending_bytes", ENV_MAX_PENDING_BYTES), 32 << 20, 1 << 20
            ),
        )


def _str_or_none(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_OPTION_NAMES = frozenset(
    {
        "mode",
        "spool_dir",
        "spool_max_bytes",
        "fsync",
        "prices",
        "content_bound",
        "max_value_bytes",
        "app_version",
        "writer",
        "workers",
        "max_pending_bytes",
    }
)
