"""The price table: the shipped prices, model matching, cost arithmetic and overrides."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from genai_mlflow.exporter.pricing import Cost, PriceTable

PRICES = PriceTable.load()

LISTED = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "o1",
    "o3",
    "o3-mini",
    "o4-mini",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "gpt-3.5-turbo",
    "gpt-3.5-turbo-instruct",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
)


def test_the_shipped_table_prices_every_listed_model_and_says_where_prices_come_from() -> None:
    assert set(LISTED) <= PRICES.models
    shipped = json.loads(resources.files("genai_mlflow.exporter").joinpath("prices.json").read_text())
    assert "20" in shipped["_source"]  # dated
    assert "_source" not in PRICES.models


@pytest.mark.parametrize(
    ("model", "priced_as"),
    [
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("o3-2025-04-16", "o3"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("gpt-3.5-turbo-instruct-0914", "gpt-3.5-turbo-instruct"),
        ("GPT-4o-Mini", "gpt-4o-mini"),
        ("o1-pro-2025-03-19", "o1-pro"),  # not priced as o1, a tenth of its price
    ],
)
def test_models_match_exactly_or_by_their_longest_known_prefix(model: str, priced_as: str) -> None:
    assert PRICES.price(model) == PRICES.price(priced_as)
    assert PRICES.price(model) is not None


def test_gpt_4o_mini_is_not_priced_as_gpt_4o() -> None:
    mini, full = PRICES.price("gpt-4o-mini-2024-07-18"), PRICES.price("gpt-4o")
    assert mini is not None and full is not None
    assert (mini.input, mini.output) == (0.15, 0.60)
    assert (full.input, full.output) == (2.50, 10.00)


@pytest.mark.parametrize(
    "model",
    [
        None,
        "",
        "my-gpt4o-deployment",
        "prod-chat",
        "gpt-4",
        "gpt-4o1",
        "ft:gpt-4o-mini-2024-07-18:acme::abc123",
        "o",
    ],
)
def test_deployment_names_and_unknown_models_are_not_priced(model: str | None) -> None:
    assert PRICES.price(model) is None
    assert PRICES.cost(model, 100, 10) is None


def test_cost_is_usd_from_per_million_prices() -> None:
    cost = PRICES.cost("gpt-4o-mini-2024-07-18", 12, 3)
    assert cost == Cost(pytest.approx(1.8e-06), pytest.approx(1.8e-06), pytest.approx(3.6e-06))  # type: ignore[arg-type]
    assert cost is not None and cost.total_cost == cost.input_cost + cost.output_cost
    assert cost.as_dict() == {
        "input_cost": cost.input_cost,
        "output_cost": cost.output_cost,
        "total_cost": cost.total_cost,
    }


def test_cached_tokens_are_part_of_the_input_and_billed_at_the_cached_price() -> None:
    cost = PRICES.cost("gpt-4o", 1000, 0, cached_input_tokens=400)
    assert cost is not None
    assert cost.input_cost == pytest.approx((600 * 2.50 + 400 * 1.25) / 1e6)
    # More cached than input tokens (a bad count) cannot make the cost negative or larger.
    capped = PRICES.cost("gpt-4o", 100, 0, cached_input_tokens=500)
    assert capped is not None and capped.input_cost == pytest.approx(100 * 1.25 / 1e6)


def test_embeddings_cost_only_input() -> None:
    cost = PRICES.cost("text-embedding-3-small", 1_000_000, 0)
    assert cost == Cost(pytest.approx(0.02), 0.0, pytest.approx(0.02))  # type: ignore[arg-type]


def test_an_override_mapping_changes_adds_and_removes_models() -> None:
    table = PriceTable.load(
        {
            "_note": "ours",
            "gpt-4o": {"output": 12.0},
            "prod-chat": {"input": 1, "output": 2},
            "o1": None,
        }
    )
    gpt_4o, prod = table.price("gpt-4o"), table.price("prod-chat")
    assert gpt_4o is not None and (gpt_4o.input, gpt_4o.cached_input, gpt_4o.output) == (2.50, 1.25, 12.0)
    assert prod is not None and (prod.input, prod.cached_input, prod.output) == (1.0, 1.0, 2.0)
    assert table.price("o1") is None
    assert table.price("o1-mini") is not None
    assert PRICES.price("prod-chat") is None  # the shipped table is untouched


def test_an_override_file_is_merged_on_top(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"my-deployment": {"input": 3, "cached_input": 1.5, "output": 9}}))
    table = PriceTable.load(path)
    assert table.cost("my-deployment", 1_000_000, 1_000_000) == Cost(3.0, 9.0, 12.0)
    assert PriceTable.load(str(path)).price("my-deployment") == table.price("my-deployment")
    assert table.price("gpt-4o") == PRICES.price("gpt-4o")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"x": 3}, "price override mapping: entry 'x': expected an object with input, cached_input, output"),
        (
            {"x": {"input": -1, "output": 1}},
            "price override mapping: entry 'x': 'input' must not be negative",
        ),
        (
            {"x": {"input": "1", "output": 1}},
            "entry 'x': 'input' must be a number of USD per 1M tokens, got '1'",
        ),
        ({"x": {"input": True, "output": 1}}, "entry 'x': 'input' must be a number"),
        ({"x": {"input": float("nan"), "output": 1}}, "entry 'x': 'input' must be a number"),
        ({"x": {"inptu": 1, "output": 1}}, "entry 'x': unknown field(s) ['inptu']"),
        ({"x": {"input": 1}}, "price override mapping: entry 'x': missing 'output'"),
        ({"": {"input": 1, "output": 1}}, "model names must be non-empty strings"),
    ],
)
def test_a_malformed_override_names_the_bad_entry(override: object, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        PriceTable.load(override)  # type: ignore[arg-type]
    assert message in str(raised.value)


def test_a_malformed_override_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"gpt-4o": {"input": 1,}}')
    with pytest.raises(ValueError, match=r"price override file '.*bad\.json': not valid JSON: .*line 1"):
        PriceTable.load(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match=r"bad\.json': expected a JSON object of model names, got list"):
        PriceTable.load(path)
    path.write_text('{"gpt-4o": {"output": "cheap"}}')
    with pytest.raises(ValueError, match=r"bad\.json': entry 'gpt-4o': 'output' must be a number"):
        PriceTable.load(path)
    with pytest.raises(ValueError, match=r"missing\.json': cannot be read"):
        PriceTable.load(tmp_path / "missing.json")
