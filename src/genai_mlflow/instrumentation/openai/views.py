"""A data descriptor for the client's ``with_raw_response`` / ``with_streaming_response``.

Those are cached properties whose value holds the resource's bound ``create`` as it was when first
read. A client read before ``instrument()`` would keep calling the unpatched method forever. While
instrumented, this descriptor (a data descriptor, so it wins over the instance's cache) builds the
view afresh from the patched methods, and keeps it under a key of its own: after
``uninstrument()`` the original property and its cache are back, untraced.
"""

from __future__ import annotations

import itertools
from typing import Any

# Each instrumentation gets its own cache key, so a view built under an earlier one is not reused.
_generation = itertools.count()


class TracedView:
    def __init__(self, name: str, original: Any) -> None:
        self._original = original
        self._key = f"_genai_mlflow_{name}_{next(_generation)}"
        self.__doc__ = getattr(original, "__doc__", None)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        cache = instance.__dict__
        view = cache.get(self._key)
        if view is None:
            view = cache[self._key] = self._original.func(instance)
        return view

    def __set__(self, instance: Any, value: Any) -> None:
        instance.__dict__[self._key] = value
