"""``opentelemetry-instrument`` finds the instrumentor through its entry point, with no code change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from genai_mlflow.testing.openai_server import OpenAIServer

APP = textwrap.dedent(
    """
    import json, sys
    import openai
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    # The app's own tracing set-up; it knows nothing of genai-mlflow.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    client = openai.OpenAI(base_url=sys.argv[1], api_key="k", max_retries=0)
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    print(json.dumps({
        "answer": answer.choices[0].message.content,
        "spans": [
            {"name": s.name, "scope": s.instrumentation_scope.name, "attributes": dict(s.attributes)}
            for s in exporter.get_finished_spans()
        ],
    }))
    """
)


def test_launcher_instruments_an_unmodified_app(server: OpenAIServer, tmp_path: Path):
    app = tmp_path / "app.py"
    app.write_text(APP)
    launcher = Path(sys.executable).with_name("opentelemetry-instrument")
    env = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "GENAI_MLFLOW_DISABLED": "",
        # Only the instrumentor's discovery is under test here: no configurator sets up the SDK
        # (this package's own distro would send the calls to MLflow; tests/integration covers that).
        "OTEL_PYTHON_CONFIGURATOR": "none",
    }
    env.pop("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", None)
    done = subprocess.run(
        [str(launcher), sys.executable, str(app), server.base_url],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    output = json.loads(done.stdout.strip().splitlines()[-1])
    assert output["answer"]
    # Other OpenAI instrumentations installed beside this one may add spans of their own.
    [span] = [s for s in output["spans"] if s["scope"].startswith("genai_mlflow.")]
    assert span["name"] == "chat gpt-4o-mini"
    assert span["attributes"]["gen_ai.provider.name"] == "openai"
    assert span["attributes"]["gen_ai.usage.input_tokens"] > 0
