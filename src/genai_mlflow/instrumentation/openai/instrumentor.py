"""``OpenAIInstrumentor``: patches the official ``openai`` client (1.66+, 2.x, 3.x) with wrapt."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Collection, Iterator
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.metrics import get_meter
from opentelemetry.trace import get_tracer
from wrapt import FunctionWrapper, wrap_function_wrapper

from genai_mlflow import semconv as sc
from genai_mlflow.config import ENV_APP_VERSION, resolve_capture_content

from .attributes import DEFAULT_MAX_VALUE_BYTES, ContentPolicy
from .call import Instruments
from .finisher import FINISHER
from .views import TracedView
from .wrappers import Endpoint, Tracing, make_wrapper

logger = logging.getLogger("genai_mlflow.instrumentation")

_INSTRUMENTS = ("openai >= 1.66, < 4",)
_SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"


def _endpoints() -> Iterator[Endpoint]:
    for module, cls, methods, kind in (
        ("openai.resources.chat.completions", "Completions", ("create", "parse"), "chat"),
        ("openai.resources.beta.chat.completions", "Completions", ("parse",), "chat"),  # 1.x only
        ("openai.resources.responses", "Responses", ("create", "parse"), "responses"),
        ("openai.resources.embeddings", "Embeddings", ("create",), "embeddings"),
        ("openai.resources.completions", "Completions", ("create",), "completions"),
    ):
        for method in methods:
            yield Endpoint(module, cls, method, kind, is_async=False)
            yield Endpoint(module, "Async" + cls, method, kind, is_async=True)


# The cached properties that hold bound methods captured when first read.
_VIEWS = ("with_raw_response", "with_streaming_response")
# Other instrumentations of the same client, by module and class.
_OTHER_INSTRUMENTORS = (
    ("opentelemetry.instrumentation.openai_v2", "OpenAIInstrumentor"),
    ("opentelemetry.instrumentation.genai.openai", "OpenAIInstrumentor"),
    ("opentelemetry.instrumentation.openai", "OpenAIInstrumentor"),
    ("openinference.instrumentation.openai", "OpenAIInstrumentor"),
)


def _resolve(endpoint: Endpoint) -> type | None:
    try:
        module = importlib.import_module(endpoint.module)
    except ImportError:
        return None
    owner = getattr(module, endpoint.cls, None)
    if isinstance(owner, type) and endpoint.method in owner.__dict__:
        return owner
    return None


class OpenAIInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Traces the OpenAI client's chat, responses, embeddings and legacy completions calls.

    ``instrument()`` takes ``tracer_provider``, ``meter_provider``, ``capture_content`` (overrides
    ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``; off by default), ``redact`` (a function
    applied to every text before it goes on a span), ``max_value_bytes`` (per attribute value) and
    ``app_version`` (put on every span; default ``GENAI_MLFLOW_APP_VERSION``).
    """

    _warned_other = False
    # Class-level: BaseInstrumentor is a singleton whose __init__ runs on every construction.
    _patched: list[tuple[type, str]] = []
    _views: list[tuple[type, str, Any]] = []

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    def _instrument(self, **kwargs: Any) -> None:
        from genai_mlflow import __version__

        policy = ContentPolicy(
            capture=resolve_capture_content(kwargs.get("capture_content"), default=False),
            max_value_bytes=int(kwargs.get("max_value_bytes") or DEFAULT_MAX_VALUE_BYTES),
            redact=kwargs.get("redact"),
        )
        tracer = get_tracer(__name__, __version__, kwargs.get("tracer_provider"), schema_url=_SCHEMA_URL)
        meter = get_meter(__name__, __version__, kwargs.get("meter_provider"), schema_url=_SCHEMA_URL)
        app_version = kwargs.get("app_version") or os.environ.get(ENV_APP_VERSION)
        constant = {sc.GENAI_MLFLOW_APP_VERSION: str(app_version)} if app_version else {}
        tracing = Tracing(tracer, Instruments.create(meter), policy, _not_given_types(), FINISHER, constant)
        self._warn_if_traced_twice()
        self._patched, self._views = [], []
        for endpoint in _endpoints():
            owner = _resolve(endpoint)
            if owner is None:
                continue
            wrap_function_wrapper(owner, endpoint.method, make_wrapper(endpoint, tracing))
            self._patched.append((owner, endpoint.method))
            for name in _VIEWS:
                original = owner.__dict__.get(name)
                if original is not None and not isinstance(original, TracedView):
                    setattr(owner, name, TracedView(name, original))
                    self._views.append((owner, name, original))

    def _uninstrument(self, **kwargs: Any) -> None:
        for owner, method in self._patched:
            unwrap(owner, method)
        for owner, name, original in self._views:
            setattr(owner, name, original)
        self._patched, self._views = [], []

    def _warn_if_traced_twice(self) -> None:
        if OpenAIInstrumentor._warned_other:
            return
        others = []
        for module_name, cls_name in _OTHER_INSTRUMENTORS:
            module = sys.modules.get(module_name)
            cls = getattr(module, cls_name, None) if module is not None else None
            # Read the singleton without constructing it: a constructor call re-runs its __init__.
            instance = getattr(cls, "_instance", None) if cls is not OpenAIInstrumentor else None
            if getattr(instance, "_is_instrumented_by_opentelemetry", False):
                others.append(f"{module_name}.{cls_name}")
        for endpoint in _endpoints():
            owner = _resolve(endpoint)
            # The client's own decorators use functools.wraps; instrumentations use wrapt proxies.
            if owner is not None and isinstance(owner.__dict__[endpoint.method], FunctionWrapper):
                others.append(f"a wrapper around {endpoint.cls}.{endpoint.method}")
                break
        if others:
            OpenAIInstrumentor._warned_other = True
            logger.warning(
                "Another OpenAI instrumentation is active (%s): calls will be traced twice. "
                "Uninstrument it, or do not call genai-mlflow's OpenAIInstrumentor.",
                ", ".join(others),
            )


def _not_given_types() -> tuple[type, ...]:
    import openai

    found = []
    for name in ("NotGiven", "Omit"):
        value = getattr(openai, name, None)
        if isinstance(value, type):
            found.append(value)
    return tuple(found)
