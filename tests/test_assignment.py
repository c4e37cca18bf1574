"""``genai_mlflow.assignment``: stable across processes, pinned, split by weight, independent per test."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import pytest

from genai_mlflow.assignment import MAX_LENGTH, assign, bucket, validate

N = 20_000
KEYS = [f"user-{i}" for i in range(N)]
SRC = str(Path(__file__).resolve().parent.parent / "src")

# Computed once from the documented scheme. A change here means every running A/B test reshuffles its
# users: do not update these numbers, fix the code.
GOLDEN: list[tuple[str, tuple[str, ...], tuple[float, ...] | None, str, int, str]] = [
    ("checkout-flow", ("control", "treatment"), None, "user-1", 931894451612251615, "control"),
    ("checkout-flow", ("control", "treatment"), None, "user-2", 9981525275302158931, "treatment"),
    ("checkout-flow", ("control", "treatment"), None, "user-3", 3613559680606334908, "control"),
    ("checkout-flow", ("control", "treatment"), None, "user-6", 15994884459983549761, "treatment"),
    ("prompt-v2", ("a", "b", "c"), (1, 2, 7), "s-1", 18060201020206213990, "c"),
    ("prompt-v2", ("a", "b", "c"), (1, 2, 7), "s-3", 3025674431480852621, "b"),
    ("prompt-v2", ("a", "b", "c"), (1, 2, 7), "s-6", 960338930857778535, "a"),
    ("rollout", ("old", "new"), (0.9, 0.1), "42", 13378481798429562289, "old"),
    ("rollout", ("old", "new"), (0.9, 0.1), "51", 16911787129522226010, "new"),
    ("größe ✓", ("rot", "grün"), None, "ключ", 3750183617609881527, "rot"),
    ("größe ✓", ("rot", "grün"), None, "🙂", 16158105739168570544, "grün"),
    # Under equal weights k5 would get "off"; with weight 0 it moves to the next variant.
    ("zero", ("a", "off", "b"), (1, 0, 1), "k5", 11921164527915416162, "b"),
    ("zero", ("a", "off", "b"), None, "k5", 11921164527915416162, "off"),
]


def documented_assign(
    test_name: str, variants: Sequence[str], key: str, weights: Sequence[float] | None
) -> str:
    """The module docstring's steps, written out independently of the implementation."""
    t, k = test_name.encode(), key.encode()
    digest = hashlib.sha256(len(t).to_bytes(8, "big") + t + len(k).to_bytes(8, "big") + k).digest()
    u = int.from_bytes(digest[:8], "big")
    ws = [Fraction(w) for w in (weights or [1] * len(variants))]
    total, running = sum(ws), Fraction(0)
    for variant, w in zip(variants, ws, strict=True):
        running += w
        if u * total < running * 2**64:
            return variant
    raise AssertionError("u fell outside [0, 1)")


@pytest.mark.parametrize(("test_name", "variants", "weights", "key", "u", "expected"), GOLDEN)
def test_golden_outputs_are_pinned(test_name, variants, weights, key, u, expected):
    assert assign(test_name, variants, key, weights) == expected
    assert documented_assign(test_name, variants, key, weights) == expected
    assert bucket(test_name, key) == u


def test_length_prefix_separates_test_name_from_key():
    assert bucket("ab", "c") == 6925784671553650220
    assert bucket("a", "bc") == 4589064456534337473


def test_implementation_matches_the_documented_scheme():
    configs = [(("x", "y"), None), (("a", "b", "c"), (1, 2, 7)), (("p", "q", "r"), (0.3, 0.0, 1e-9))]
    for variants, weights in configs:
        for key in KEYS[:2000]:
            assert assign("doc", variants, key, weights) == documented_assign("doc", variants, key, weights)


def test_same_key_same_variant_in_this_and_fresh_processes():
    variants, weights = ("a", "b", "c"), (1.0, 2.0, 7.0)
    keys = KEYS[:300]
    here = [assign("stable", variants, k, weights) for k in keys]
    assert here == [assign("stable", list(variants), k, list(weights)) for k in keys]
    script = (
        "import json, sys\n"
        "from genai_mlflow.assignment import assign\n"
        "keys, variants, weights = json.load(sys.stdin)\n"
        "print(json.dumps([assign('stable', variants, k, weights) for k in keys]))\n"
    )
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": SRC}
        done = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps([keys, variants, weights]),
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=60,
        )
        assert json.loads(done.stdout) == here


def _shares(test_name: str, variants: tuple[str, ...], weights: tuple[float, ...] | None) -> Counter[str]:
    return Counter(assign(test_name, variants, k, weights) for k in KEYS)


# Chi-square critical values at p = 0.001 by degrees of freedom (the assignment is deterministic, so a
# pass is a pass forever; the level only says how unlucky the pinned keys would have to be).
CHI2_CRIT_001 = {1: 10.828, 2: 13.816, 3: 16.266}


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.9, 0.1), (1.0, 2.0, 7.0)])
def test_split_follows_weights(weights):
    variants = tuple(f"v{i}" for i in range(len(weights)))
    counts = _shares("split", variants, weights)
    total = sum(weights)
    chi2 = 0.0
    for variant, w in zip(variants, weights, strict=True):
        p = w / total
        share = counts[variant] / N
        se = math.sqrt(p * (1 - p) / N)
        assert abs(share - p) < 4.5 * se, (variant, share, p)
        chi2 += (counts[variant] - N * p) ** 2 / (N * p)
    assert chi2 < CHI2_CRIT_001[len(weights) - 1], chi2


def test_two_tests_assign_independently():
    a = [assign("test-a", ("a0", "a1"), k) for k in KEYS]
    b = [assign("test-b", ("b0", "b1"), k) for k in KEYS]
    cells = Counter(zip(a, b, strict=True))
    assert len(cells) == 4
    se = math.sqrt(0.25 * 0.75 / N)
    chi2 = 0.0
    for cell in [("a0", "b0"), ("a0", "b1"), ("a1", "b0"), ("a1", "b1")]:
        assert abs(cells[cell] / N - 0.25) < 4.5 * se, (cell, cells[cell])
        chi2 += (cells[cell] - N / 4) ** 2 / (N / 4)
    # Goodness of fit of the four cells to 1/4 each: 3 degrees of freedom.
    assert chi2 < CHI2_CRIT_001[3], chi2


def test_zero_weight_is_never_chosen():
    counts = _shares("zero", ("a", "off", "b"), (1.0, 0.0, 1.0))
    assert counts["off"] == 0
    assert counts["a"] + counts["b"] == N
    first = _shares("zero-first", ("off", "on"), (0.0, 3.0))
    assert first == Counter({"on": N})
    last = _shares("zero-last", ("on", "off"), (2.0, 0.0))
    assert last == Counter({"on": N})


def test_single_variant_and_tiny_or_huge_weights():
    assert {assign("one", ["only"], k) for k in KEYS[:100]} == {"only"}
    # Exact arithmetic: a sum of weights that overflows a double still splits evenly.
    counts = Counter(assign("huge", ("x", "y"), k, (1e308, 1e308)) for k in KEYS[:2000])
    assert 900 < counts["x"] < 1100


def test_validate_returns_variants_and_cumulative_fractions():
    assert validate("t", ["a", "b", "c"], [1, 2, 7]) == (("a", "b", "c"), (0.1, 0.3, 1.0))
    assert validate("t", ("a", "b"), None) == (("a", "b"), (0.5, 1.0))
    assert validate("t", ["a", "off"], [3, 0]) == (("a", "off"), (1.0, 1.0))


@pytest.mark.parametrize(
    ("test_name", "variants", "weights", "exc", "message"),
    [
        ("", ["a"], None, ValueError, "test name must not be empty"),
        (3, ["a"], None, TypeError, "test name must be a str, not int: 3"),
        ("t", [], None, ValueError, "test 't' has no variants; give at least one"),
        ("t", "ab", None, TypeError, "variants must be a sequence of str, not str: 'ab'"),
        ("t", ["a", 2], None, TypeError, "variant must be a str, not int: 2"),
        ("t", ["a", ""], None, ValueError, "variant must not be empty"),
        ("t", ["a", "b", "a"], None, ValueError, "duplicate variant 'a' at positions 0 and 2"),
        ("t", ["a", "b"], [1], ValueError, "1 weights for 2 variants; give one weight per variant"),
        (
            "t",
            ["a", "b"],
            [1, -1],
            ValueError,
            "weight for variant 'b' is -1.0; weights must be finite and >= 0",
        ),
        ("t", ["a", "b"], [math.nan, 1], ValueError, "weight for variant 'a' is nan; weights must be"),
        ("t", ["a", "b"], [1, math.inf], ValueError, "weight for variant 'b' is inf; weights must be"),
        (
            "t",
            ["a", "b"],
            [0, 0.0],
            ValueError,
            "weights are all zero; at least one variant needs a positive",
        ),
        ("t", ["a", "b"], [1, "2"], TypeError, "weight for variant 'b' must be a real number, not str"),
        ("t", ["a", "b"], [True, 1], TypeError, "weight for variant 'a' must be a real number, not bool"),
        ("t", ["a", "b"], 5, TypeError, "weights must be a sequence of numbers, not int: 5"),
        (
            "a,b",
            ["a"],
            None,
            ValueError,
            "test name 'a,b' contains ',' (U+002C, a baggage delimiter) at index 1",
        ),
        (
            "t",
            ["x;y"],
            None,
            ValueError,
            "variant 'x;y' contains ';' (U+003B, a baggage delimiter) at index 1",
        ),
        (
            "t",
            ["k=v"],
            None,
            ValueError,
            "variant 'k=v' contains '=' (U+003D, a baggage delimiter) at index 1",
        ),
        (
            "t",
            ["a\nb"],
            None,
            ValueError,
            "variant 'a\\nb' contains '\\n' (U+000A, a control character) at index 1",
        ),
        ("t", ["a\x7f"], None, ValueError, "contains '\\x7f' (U+007F, a control character) at index 1"),
        ("t", ["a\u2029"], None, ValueError, "(U+2029, a line separator) at index 1"),
        ("t", ["a\u2028"], None, ValueError, "(U+2028, a line separator) at index 1"),
        (
            "t",
            ["a\ud800"],
            None,
            ValueError,
            "(U+D800, a lone surrogate, which UTF-8 cannot encode) at index 1",
        ),
        (
            " t",
            ["a"],
            None,
            ValueError,
            "test name ' t' has leading whitespace, which baggage parsing would strip",
        ),
        (
            "t",
            ["a "],
            None,
            ValueError,
            "variant 'a ' has trailing whitespace, which baggage parsing would strip",
        ),
        (
            "t" * (MAX_LENGTH + 1),
            ["a"],
            None,
            ValueError,
            f"is {MAX_LENGTH + 1} characters long; the limit is",
        ),
    ],
)
def test_validation_errors(test_name, variants, weights, exc, message):
    with pytest.raises(exc) as info:
        validate(test_name, variants, weights)
    assert message in str(info.value)
    with pytest.raises(exc) as info:
        assign(test_name, variants, "key", weights)
    assert message in str(info.value)


def test_key_errors_and_keys_that_are_fine():
    with pytest.raises(TypeError, match="key must be a str, not int: 7"):
        assign("t", ["a"], 7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key must not be empty"):
        assign("t", ["a"], "")
    with pytest.raises(ValueError, match="is not encodable as UTF-8"):
        assign("t", ["a"], "\udc80")
    # A key never travels in baggage as a variant does: delimiters, spaces and newlines are all fine.
    for key in [" a,b;c=d \n", "x" * 10_000, "\x00"]:
        assert assign("t", ["a", "b"], key) in {"a", "b"}
