"""LLM calls with known figures, landed in MLflow through genai-mlflow's own pipeline: SDK spans
with the times, tokens and labels the instrumentation would give them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode

from genai_mlflow import semconv as sc
from genai_mlflow.config import Settings
from genai_mlflow.setup import Pipeline


@dataclass(frozen=True)
class Call:
    start_ns: int
    latency_ms: float
    input_tokens: int
    output_tokens: int
    ok: bool = True
    ttft_ms: float | None = None
    model: str = "gpt-4o-mini"
    labels: Mapping[str, str] = field(default_factory=dict)


def calls(
    rng: np.random.Generator,
    n: int,
    *,
    start_ns: int,
    labels: Mapping[str, str],
    output_mean: float,
    latency_median_ms: float,
    error_rate: float = 0.0,
    latency_sigma: float = 0.25,
) -> list[Call]:
    """``n`` calls one second apart: Poisson output tokens, lognormal latency, Bernoulli errors."""
    return [
        Call(
            start_ns=start_ns + i * 1_000_000_000,
            latency_ms=float(rng.lognormal(np.log(latency_median_ms), latency_sigma)),
            input_tokens=int(rng.integers(80, 120)),
            output_tokens=int(rng.poisson(output_mean)),
            ok=bool(rng.random() >= error_rate),
            labels=labels,
        )
        for i in range(n)
    ]


def land(tracking_uri: str, spool_dir: Path, persona: str, made: Iterable[Call]) -> None:
    """Each call as a standalone traced LLM call of ``persona``; returns once all have landed."""
    # Mode window: traces land in batches, and the comparison reads only traces.
    pipeline = Pipeline.build(Settings.resolve(tracking_uri, spool_dir=str(spool_dir), mode="window"))
    provider = TracerProvider(resource=Resource.create({"service.name": "synthetic"}))
    provider.add_span_processor(pipeline.processor)
    tracer = provider.get_tracer("synthetic")
    try:
        for call in made:
            attributes: dict[str, str | int | float] = {
                sc.GEN_AI_OPERATION_NAME: sc.OP_CHAT,
                sc.GEN_AI_PROVIDER_NAME: sc.PROVIDER_OPENAI,
                sc.GEN_AI_REQUEST_MODEL: call.model,
                sc.GEN_AI_RESPONSE_MODEL: call.model,
                sc.GEN_AI_AGENT_NAME: persona,
                sc.GEN_AI_USAGE_INPUT_TOKENS: call.input_tokens,
                sc.GEN_AI_USAGE_OUTPUT_TOKENS: call.output_tokens,
                **call.labels,
            }
            if call.ttft_ms is not None:
                attributes[sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = call.ttft_ms / 1000.0
            span = tracer.start_span(
                f"chat {call.model}", kind=SpanKind.CLIENT, start_time=call.start_ns, attributes=attributes
            )
            if not call.ok:
                span.set_attribute(sc.ERROR_TYPE, "InternalServerError")
                span.set_status(Status(StatusCode.ERROR, "server error"))
            span.end(end_time=call.start_ns + int(call.latency_ms * 1_000_000))
        assert pipeline.flush(300), "the synthetic calls did not land"
    finally:
        pipeline.shutdown()
        provider.shutdown()
