"""Deterministic A/B variant assignment: the pure function behind ``genai_mlflow.variant()``.

The same ``(test_name, key)`` always gets the same variant, in any process, on any machine, under any
Python version and in every release of this package; the scheme below is fixed and is pinned by a
test of known outputs. Assigning in another language or a SQL query gives the same answers if it
follows these steps:

1. ``t`` = the UTF-8 bytes of ``test_name``, ``k`` = the UTF-8 bytes of ``key``.
2. ``message = len(t) as 8-byte big-endian unsigned || t || len(k) as 8-byte big-endian unsigned || k``.
   The lengths keep ``("ab", "c")`` and ``("a", "bc")`` apart.
3. ``u`` = the first 8 bytes of ``SHA-256(message)`` read as a big-endian unsigned integer, so
   ``0 <= u < 2**64`` and ``u / 2**64`` is uniform in [0, 1).
4. With weights ``w_0 .. w_(n-1)`` (all 1 when none are given), total ``W`` and running sums
   ``S_i = w_0 + ... + w_i``, the variant is the first ``i`` with ``u * W < S_i * 2**64``, i.e. the one
   whose interval ``[S_(i-1) / W, S_i / W)`` contains ``u / 2**64``. The comparison is exact: the
   weights are taken as the exact values of their IEEE-754 doubles and nothing is rounded, so a
   variant of weight 0 (an empty interval) is never picked. Computing ``u / 2**64`` and the fractions
   in doubles instead gives the same variant except within about ``2**-52`` of an interval boundary.

The test name is hashed with the key, so different tests assign the same key independently. The
variants' order matters (the intervals are laid out in that order), and changing the variants or the
weights moves some keys to other variants.

Test names and variants are recorded as MLflow params and tags and travel in W3C baggage, so they
must be non-empty, at most ``MAX_LENGTH`` characters, without ``,`` ``;`` ``=``, control characters or
line separators, and without whitespace at either end (baggage parsing strips it). A key may be any
non-empty string.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import numbers
import unicodedata
from collections.abc import Sequence
from fractions import Fraction

__all__ = ["MAX_LENGTH", "assign", "bucket", "validate"]

# A baggage entry is capped at 4096 bytes once percent-encoded; even 250 characters that each encode to
# 12 bytes fit, and an MLflow param value (6000 characters) takes them too.
MAX_LENGTH = 250

_FORBIDDEN = frozenset(",;=")
# Cc: C0 and C1 controls and DEL. Zl/Zp: U+2028 and U+2029, which break lines like a newline.
# Cs: lone surrogates, which have no UTF-8 encoding.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})
_SPACE = Fraction(2**64)


def _check_label(what: str, value: object) -> str:
    """A test name or a variant: a string that survives MLflow params/tags and W3C baggage unchanged."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}: {value!r}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if len(value) > MAX_LENGTH:
        raise ValueError(
            f"{what} {value[:40]!r}... is {len(value)} characters long; the limit is {MAX_LENGTH}"
        )
    for index, char in enumerate(value):
        category = unicodedata.category(char)
        if char in _FORBIDDEN or category in _FORBIDDEN_CATEGORIES:
            if char in _FORBIDDEN:
                kind = "a baggage delimiter"
            elif category == "Cs":
                kind = "a lone surrogate, which UTF-8 cannot encode"
            elif category in ("Zl", "Zp"):
                kind = "a line separator"
            else:
                kind = "a control character"
            raise ValueError(
                f"{what} {value!r} contains {char!r} (U+{ord(char):04X}, {kind}) at index {index}; "
                "test names and variants cannot contain ',', ';', '=', control characters, line "
                "separators or lone surrogates, since they travel in W3C baggage"
            )
    if value != value.strip():
        end = "leading" if value[0].isspace() else "trailing"
        raise ValueError(
            f"{what} {value!r} has {end} whitespace, which baggage parsing would strip; remove it"
        )
    return value


def _check_weight(variant: str, weight: object) -> float:
    # bool is an int, but True/False as a weight is surely a mistake.
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise TypeError(f"weight for variant {variant!r} must be a real number, not {type(weight).__name__}")
    value = float(weight)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"weight for variant {variant!r} is {value!r}; weights must be finite and >= 0")
    return value


def _validate(
    test_name: object, variants: object, weights: object
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The checked test name is dropped; returns the variants and their weights as floats."""
    _check_label("test name", test_name)
    # A bare string is a Sequence[str] of its characters: variant("t", "control") is a mistake.
    if isinstance(variants, str | bytes) or not isinstance(variants, Sequence):
        raise TypeError(f"variants must be a sequence of str, not {type(variants).__name__}: {variants!r}")
    if not variants:
        raise ValueError(f"test {test_name!r} has no variants; give at least one")
    names = tuple(_check_label("variant", v) for v in variants)
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            raise ValueError(f"duplicate variant {name!r} at positions {seen[name]} and {index}")
        seen[name] = index
    if weights is None:
        return names, (1.0,) * len(names)
    if isinstance(weights, str | bytes) or not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a sequence of numbers, not {type(weights).__name__}: {weights!r}")
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weights for {len(names)} variants; give one weight per variant")
    values = tuple(_check_weight(name, w) for name, w in zip(names, weights, strict=True))
    if not any(values):
        raise ValueError("weights are all zero; at least one variant needs a positive weight")
    return names, values


def _exact_cumulative(weights: tuple[float, ...]) -> list[Fraction]:
    """S_i / W exactly; floats are exact rationals, so no sum overflows or rounds."""
    running = Fraction(0)
    sums = []
    for w in weights:
        running += Fraction(w)
        sums.append(running)
    return [s / running for s in sums]


@functools.lru_cache(maxsize=256)  # keyed by validated float weights; bounded
def _thresholds(weights: tuple[float, ...]) -> tuple[int, ...]:
    """``ceil(S_i * 2**64 / W)``: for an integer u, ``u < x`` exactly when ``u < ceil(x)``."""
    return tuple(math.ceil(c * _SPACE) for c in _exact_cumulative(weights))


def bucket(test_name: str, key: str) -> int:
    """Steps 1-3 of the scheme: the 64-bit number ``(test_name, key)`` hashes to."""
    t = test_name.encode("utf-8")
    k = key.encode("utf-8")
    message = len(t).to_bytes(8, "big") + t + len(k).to_bytes(8, "big") + k
    return int.from_bytes(hashlib.sha256(message).digest()[:8], "big")


def validate(
    test_name: str, variants: Sequence[str], weights: Sequence[float] | None = None
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Check a test's definition; return its variants and cumulative weight fractions (the last is 1.0).

    Raises ``TypeError`` for a value of the wrong type and ``ValueError`` for a bad value, naming it.
    """
    names, values = _validate(test_name, variants, weights)
    return names, tuple(float(c) for c in _exact_cumulative(values))


def assign(test_name: str, variants: Sequence[str], key: str, weights: Sequence[float] | None = None) -> str:
    """The variant of ``test_name`` that ``key`` (a user id, a session id) gets; see the module docstring."""
    names, values = _validate(test_name, variants, weights)
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, not {type(key).__name__}: {key!r}")
    if not key:
        raise ValueError("key must not be empty")
    try:
        u = bucket(test_name, key)
    except UnicodeEncodeError as exc:
        raise ValueError(f"key {key!r} is not encodable as UTF-8 (a lone surrogate?)") from exc
    # The first i with u < threshold_i; a zero weight repeats the previous threshold, so never wins.
    return names[bisect.bisect_right(_thresholds(values), u)]
