"""Links from a landed trace to what it was made with: the registered prompt versions it used
and the LoggedModel of the app's version, with the writes MLflow's own tracing would make (see
docs/mlflow-prompt-notes.md). Registry lookups are cached, so that a trace that uses no new prompt
version costs one request per link and nothing else."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from genai_mlflow import semconv as sc

from .gateway import Gateway
from .records import TraceTiming

# A version found missing is asked about again after this long: someone may register it.
MISSING_RECHECK_S = 300.0
MAX_CACHED = 10_000


class Links:
    def __init__(self, gateway: Gateway, clock: Callable[[], float] = time.monotonic) -> None:
        self._gateway = gateway
        self._clock = clock
        self._lock = threading.Lock()
        self._known: dict[tuple[str, str], tuple[bool, float]] = {}  # (name, version) -> (exists, when)
        self._scoped: set[tuple[str, str]] = set()  # (prompt name, experiment id) already tagged

    def registered(self, name: str, version: str) -> bool:
        """Whether the prompt version is in the registry; may raise ``GatewayError``."""
        key = (name, version)
        with self._lock:
            known = self._known.get(key)
        if known is not None and (known[0] or self._clock() - known[1] < MISSING_RECHECK_S):
            return known[0]
        exists = self._gateway.prompt_version_exists(name, version)
        with self._lock:
            if len(self._known) >= MAX_CACHED:
                self._known.clear()
            self._known[key] = (exists, self._clock())
        return exists

    def link_prompts(self, experiment_id: str, trace_id: str, prompts: Sequence[tuple[str, str]]) -> None:
        """Link the trace to the prompt versions, and show the prompts in its experiment's
        Prompts tab, whose Traces view lists only the traces of experiments the prompt is in."""
        if not prompts:
            return
        self._gateway.link_prompts(trace_id, prompts)
        for name in dict.fromkeys(name for name, _ in prompts):
            with self._lock:
                if (name, experiment_id) in self._scoped:
                    continue
            self._gateway.add_prompt_experiment(name, experiment_id)
            with self._lock:
                if len(self._scoped) >= MAX_CACHED:
                    self._scoped.clear()
                self._scoped.add((name, experiment_id))

    def link_model(
        self,
        experiment_id: str,
        trace_id: str,
        app_version: str | None,
        timing: TraceTiming,
    ) -> None:
        """Link a trace that has wholly landed to its app version's LoggedModel in its experiment.
        ``timing`` is the trace's, which the write restates."""
        if not app_version or app_version == sc.PARAM_MIXED:
            return
        model_id = self._gateway.logged_model_id(experiment_id, app_version)  # cached by the gateway
        self._gateway.link_trace_to_model(experiment_id, trace_id, timing, model_id)
