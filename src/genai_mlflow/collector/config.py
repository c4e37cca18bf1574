"""The collector's own settings, from arguments, then ``GENAI_MLFLOW_COLLECTOR_*``, then defaults.

Where spans go (tracking URI, spool directory and bound, mode, workers, prices...) is the
exporter's ``Settings``, read the same way as in an app.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from genai_mlflow.config import ConfigError

ENV_PREFIX = "GENAI_MLFLOW_COLLECTOR_"
ENV_TOKEN = ENV_PREFIX + "TOKEN"

DEFAULT_PORT = 4318
DEFAULT_MAX_BODY_BYTES = 16 << 20
DEFAULT_GRACE_S = 25.0


@dataclass(frozen=True)
class CollectorConfig:
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    token: str | None = None  # bearer token that POST /v1/traces requires; None: no auth
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # per request, on the wire and once decompressed
    max_inflight: int = 4  # export requests processed at once; more are answered 429
    max_connections: int = 256  # open connections; more are answered 503 and closed
    max_rps: float = 0.0  # export requests per second (token bucket); 0: no limit
    spool_high_water: float = 0.9  # fraction of the spool bound past which requests get 503
    grace_s: float = DEFAULT_GRACE_S  # on SIGTERM: time to finish requests and flush to MLflow
    read_timeout_s: float = 30.0  # a client that sends nothing for this long is disconnected
    held_max_bytes: int = 32 << 20  # spans waiting for their trace's GenAI span (see gate.py)
    # Resident memory past which requests get 503 while a backlog waits; 0: 80% of the
    # container's memory limit (cgroup), or no limit outside a container.
    max_memory_bytes: int = 0

    @classmethod
    def resolve(cls, environ: Mapping[str, str] | None = None, **arguments: Any) -> CollectorConfig:
        """Arguments that are not None win over ``GENAI_MLFLOW_COLLECTOR_<NAME>`` variables."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, default in cls.__dataclass_fields__.items():
            raw = arguments.pop(name, None)
            source = f"--{name.replace('_', '-')}"
            if raw is None:
                raw = env.get(ENV_PREFIX + name.upper()) or None
                source = ENV_PREFIX + name.upper()
            if raw is None:
                continue
            values[name] = _convert(
                source, raw, type(default.default) if default.default is not None else str
            )
        if arguments:
            raise ConfigError(f"unknown collector option(s): {', '.join(sorted(arguments))}")
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port {self.port} is not a TCP port")
        for name in ("max_body_bytes", "max_inflight", "max_connections", "held_max_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_rps < 0 or self.grace_s < 0 or self.read_timeout_s <= 0 or self.max_memory_bytes < 0:
            raise ConfigError("max_rps, grace and max_memory_bytes must be >= 0, and read_timeout_s > 0")
        if not 0 < self.spool_high_water <= 1:
            raise ConfigError(f"spool_high_water must be in (0, 1], not {self.spool_high_water}")


def _convert(source: str, raw: Any, kind: type) -> Any:
    if isinstance(raw, kind):
        return raw
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}={raw!r} is not a {kind.__name__}") from None
    return str(raw)
