"""``genai-mlflow collector``: an OTLP/HTTP receiver that writes GenAI spans from any service to
MLflow, through the same spool and writer as spans ended in an app.

- ``otlp``: read and check export requests (pure);
- ``legacy``: older GenAI attribute styles to the current conventions (pure);
- ``gate``: which spans to write (those of traces with a GenAI span);
- ``ingest``: a request to a spool record;
- ``metrics`` / ``metering``: Prometheus metrics, and the writer's MLflow calls measured;
- ``service``: the pipeline, load shedding, health and the answers; ``app``: the HTTP server.
"""

from .app import CollectorServer, run_collector
from .config import CollectorConfig

__all__ = ["CollectorConfig", "CollectorServer", "run_collector"]
