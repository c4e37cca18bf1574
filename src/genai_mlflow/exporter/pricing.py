"""What an LLM call cost, from a table of USD prices per million tokens.

The shipped table (``prices.json``) holds OpenAI list prices; an override (a JSON file or a mapping of
the same shape) is merged on top, field by field, so ``{"gpt-4o": {"output": 12}}`` changes one price
and ``{"my-deployment": {"input": 1, "output": 2}}`` adds a model. ``null`` removes a model. Keys that
start with ``_`` are notes, not models.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

_PER_TOKENS = 1_000_000
_FIELDS = ("input", "cached_input", "output")
_REQUIRED = ("input", "output")


@dataclass(frozen=True)
class Cost:
    """USD."""

    input_cost: float
    output_cost: float
    total_cost: float

    def as_dict(self) -> dict[str, float]:
        return {"input_cost": self.input_cost, "output_cost": self.output_cost, "total_cost": self.total_cost}


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens."""

    input: float
    cached_input: float
    output: float


class PriceTable:
    def __init__(self, prices: Mapping[str, ModelPrice]) -> None:
        self._prices = {name.strip().lower(): price for name, price in prices.items()}

    @classmethod
    def load(cls, override: str | os.PathLike[str] | Mapping[str, Any] | None = None) -> PriceTable:
        """The shipped prices, with ``override`` (a JSON file's path, or a mapping) merged on top.

        A malformed override raises ValueError naming its source and the bad entry.
        """
        shipped = resources.files(__package__).joinpath("prices.json").read_text(encoding="utf-8")
        entries = _entries(json.loads(shipped), "the shipped prices.json")
        sources = dict.fromkeys(entries, "the shipped prices.json")
        if override is not None:
            source, raw = _read_override(override)
            for name, fields in _entries(raw, source).items():
                if fields is None:
                    entries.pop(name, None)
                else:
                    entries[name] = {**(entries.get(name) or {}), **fields}
                    sources[name] = source
        return cls(
            {
                name: _model_price(fields, f"{sources[name]}: entry {name!r}")
                for name, fields in entries.items()
                if fields is not None
            }
        )

    @property
    def models(self) -> frozenset[str]:
        return frozenset(self._prices)

    def price(self, model: str | None) -> ModelPrice | None:
        """The exact model, else its longest known prefix ending before a ``-``.

        So dated snapshots (``gpt-4o-mini-2024-07-18``) take their base model's price, while
        ``gpt-4`` never prices ``gpt-4o`` or ``gpt-4.1``. Deployment names (Azure) match nothing.
        """
        if not model:
            return None
        name = model.strip().lower()
        found = self._prices.get(name)
        cut = len(name)
        while found is None:
            cut = name.rfind("-", 0, cut)
            if cut <= 0:
                return None
            found = self._prices.get(name[:cut])
        return found

    def cost(
        self, model: str | None, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> Cost | None:
        """None if the model is unknown. Cached tokens are counted inside ``input_tokens``, as OpenAI
        reports them, and billed at the cached price."""
        price = self.price(model)
        if price is None:
            return None
        cached = min(max(cached_input_tokens, 0), max(input_tokens, 0))
        uncached = max(input_tokens, 0) - cached
        input_cost = (uncached * price.input + cached * price.cached_input) / _PER_TOKENS
        output_cost = max(output_tokens, 0) * price.output / _PER_TOKENS
        return Cost(input_cost, output_cost, input_cost + output_cost)


def _read_override(override: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[str, Any]:
    if isinstance(override, Mapping):
        return "price override mapping", override
    path = os.fspath(override)
    source = f"price override file {path!r}"
    try:
        with open(path, encoding="utf-8") as f:
            return source, json.load(f)
    except OSError as exc:
        raise ValueError(f"{source}: cannot be read: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source}: not UTF-8 text: {exc}") from exc


def _entries(raw: Any, source: str) -> dict[str, dict[str, Any] | None]:
    """Model name to price fields (or None to remove it), each field checked."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: expected a JSON object of model names, got {type(raw).__name__}")
    entries: dict[str, dict[str, Any] | None] = {}
    for name, fields in raw.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{source}: model names must be non-empty strings, got {name!r}")
        if name.startswith("_"):
            continue
        where = f"{source}: entry {name!r}"
        if fields is None:
            entries[name.strip().lower()] = None
            continue
        if not isinstance(fields, Mapping):
            raise ValueError(f"{where}: expected an object with {', '.join(_FIELDS)}, got {fields!r}")
        unknown = sorted(set(fields) - set(_FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; the fields are {', '.join(_FIELDS)}")
        for key, value in fields.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{where}: {key!r} must be a number of USD per 1M tokens, got {value!r}")
            if value < 0:
                raise ValueError(f"{where}: {key!r} must not be negative, got {value!r}")
        entries[name.strip().lower()] = dict(fields)
    return entries


def _model_price(fields: Mapping[str, float], where: str) -> ModelPrice:
    missing = [key for key in _REQUIRED if key not in fields]
    if missing:
        raise ValueError(f"{where}: missing {' and '.join(map(repr, missing))} (USD per 1M tokens)")
    # Without a cached price, cached tokens cost what other input tokens cost.
    cached = fields.get("cached_input", fields["input"])
    return ModelPrice(
        input=float(fields["input"]), cached_input=float(cached), output=float(fields["output"])
    )
