"""An instrumented app for the end-to-end test: the real ``openai`` client, an OpenAI-compatible
server, and the OpenTelemetry SDK's OTLP/HTTP exporter sending every span to the collector.

    python -m tests.collector.instrumented_app --style scope|resource|official --persona P --calls N
        --collector URL --token T --openai-url URL

Styles:

- ``scope``: this project's instrumentor, the persona from ``genai_mlflow.persona()`` (baggage);
- ``resource``: this project's instrumentor, each call inside a web request span (the local root),
  the persona from the resource attribute ``gen_ai.agent.name``;
- ``official``: the official OpenTelemetry instrumentation (``opentelemetry-instrumentation-genai-openai``),
  the persona from the resource.
"""

from __future__ import annotations

import argparse
import sys

import openai
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--style", choices=("scope", "resource", "official"), required=True)
    parser.add_argument("--persona", required=True)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--collector", required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("--openai-url", required=True)
    args = parser.parse_args()

    attributes = {"service.name": f"app-{args.style}"}
    if args.style != "scope":
        attributes["gen_ai.agent.name"] = args.persona
    provider = TracerProvider(resource=Resource.create(attributes))
    exporter = OTLPSpanExporter(
        endpoint=args.collector.rstrip("/") + "/v1/traces",
        headers={"Authorization": f"Bearer {args.token}"} if args.token else None,
        compression=Compression.Gzip,
    )
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))

    if args.style == "official":
        from opentelemetry.instrumentation.genai.openai import OpenAIInstrumentor as Official

        Official().instrument(tracer_provider=provider)
    else:
        from genai_mlflow import OpenAIInstrumentor

        OpenAIInstrumentor().instrument(tracer_provider=provider, capture_content=True)

    import genai_mlflow

    tracer = provider.get_tracer("tests.collector.instrumented_app")
    client = openai.OpenAI(base_url=args.openai_url, api_key="test-key", max_retries=0)
    for i in range(args.calls):
        messages = [{"role": "user", "content": f"Question {i} from {args.persona}"}]
        if args.style == "scope":
            with genai_mlflow.persona(args.persona):
                client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
        else:
            with tracer.start_as_current_span(f"GET /ask/{i}", kind=SpanKind.SERVER):
                client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
    provider.shutdown()  # exports what is left
    return 0


if __name__ == "__main__":
    sys.exit(main())
