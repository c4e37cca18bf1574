"""Notes each prompt version the app loads from MLflow's Prompt Registry, so that the LLM calls
after the load carry it (see ``context.note_prompt_loaded``).

MLflow links a load only to a trace of its own tracer, which genai-mlflow's spans are not. Every
way to load a prompt (``mlflow.genai.load_prompt``, ``mlflow.load_prompt``, ``MlflowClient``), its
cache included, goes through ``MlflowClient.load_prompt``: the one method patched. The patch waits
for the app to import MLflow, so that an app that never does pays nothing.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from wrapt import register_post_import_hook, wrap_function_wrapper

from genai_mlflow.context import note_prompt_loaded

logger = logging.getLogger("genai_mlflow")

_MODULE = "mlflow.tracking.client"
_lock = threading.Lock()
_installed: list[bool] = []  # once installed, [True]


def install() -> None:
    """Patch ``MlflowClient.load_prompt`` once MLflow is imported; idempotent."""
    with _lock:
        if _installed:
            return
        _installed.append(True)
    register_post_import_hook(_patch, _MODULE)


def _patch(module: Any) -> None:
    try:
        wrap_function_wrapper(module, "MlflowClient.load_prompt", _noting_loads)
    except Exception:  # another MLflow version may have moved it: no links, nothing broken
        logger.warning("genai-mlflow cannot see prompt loads in this MLflow version", exc_info=True)


def _noting_loads(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    loaded = wrapped(*args, **kwargs)
    try:
        name = getattr(loaded, "name", None)
        version = getattr(loaded, "version", None)
        if isinstance(name, str) and version is not None:
            note_prompt_loaded(name, version)
    except Exception:
        logger.debug("genai-mlflow could not note a prompt load", exc_info=True)
    return loaded
