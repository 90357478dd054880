"""Price lookups by spec and the YAML price file."""

from __future__ import annotations

from pathlib import Path

import pytest

from opro_agent.errors import ConfigError
from opro_agent.pricing import DEFAULT_PRICES, Price, PriceTable


@pytest.fixture
def table() -> PriceTable:
    return PriceTable.default()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prices.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# -- cost arithmetic ----------------------------------------------------------------------------


def test_price_cost() -> None:
    price = Price(input_per_million=2.5, output_per_million=10.0)
    assert price.cost(1_000_000, 0) == pytest.approx(2.5)
    assert price.cost(0, 1_000_000) == pytest.approx(10.0)
    assert price.cost(1000, 500) == pytest.approx(0.0025 + 0.005)
    assert price.cost(0, 0) == 0.0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_price_rejects_bad_values(bad: float) -> None:
    with pytest.raises(ValueError):
        Price(bad, 1.0)
    with pytest.raises(ValueError):
        Price(1.0, bad)


def test_table_cost(table: PriceTable) -> None:
    assert table.cost("openai:gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.15 + 0.60)
    assert table.cost("openai:gpt-4o-mini", 2000, 1000) == pytest.approx(
        (2000 * 0.15 + 1000 * 0.60) / 1_000_000
    )
    assert table.cost("nobody:knows", 10, 10) is None


# -- lookups ----------------------------------------------------------------------------------


def test_default_table_has_the_listed_models(table: PriceTable) -> None:
    expected = {
        "local",
        "openai:gpt-4o",
        "openai:gpt-4o-mini",
        "openai:gpt-4.1",
        "openai:gpt-4.1-mini",
        "openai:gpt-4.1-nano",
        "openai:o3-mini",
        "openai:gpt-3.5-turbo",
        "anthropic:claude-3-5-haiku-latest",
        "anthropic:claude-3-5-sonnet-latest",
        "anthropic:claude-3-7-sonnet-latest",
    }
    assert set(table) == expected == set(DEFAULT_PRICES)
    assert len(table) == len(expected)
    for spec in expected:
        price = table.price(spec)
        assert price is not None
        assert price.input_per_million <= price.output_per_million


def test_local_is_free(table: PriceTable) -> None:
    assert table.price("local") == Price(0.0, 0.0)
    assert table.cost("local", 123_456, 7_890) == 0.0


def test_exact_lookup(table: PriceTable) -> None:
    assert table.price("openai:gpt-4o-mini") == DEFAULT_PRICES["openai:gpt-4o-mini"]
    assert table.price("  OpenAI:GPT-4o-mini ") == DEFAULT_PRICES["openai:gpt-4o-mini"]


def test_lookup_by_model_name(table: PriceTable) -> None:
    assert table.price("gpt-4o-mini") == DEFAULT_PRICES["openai:gpt-4o-mini"]
    # The same model through another provider (e.g. an OpenAI-compatible proxy).
    assert table.price("azure_openai:gpt-4.1-nano") == DEFAULT_PRICES["openai:gpt-4.1-nano"]


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ("openai:gpt-4o-mini-2024-07-18", "openai:gpt-4o-mini"),
        ("openai:gpt-4o-2024-08-06", "openai:gpt-4o"),
        ("openai:gpt-4.1-mini-2025-04-14", "openai:gpt-4.1-mini"),
        ("openai:gpt-4.1-2025-04-14", "openai:gpt-4.1"),
        ("openai:gpt-3.5-turbo-0125", "openai:gpt-3.5-turbo"),
        ("o3-mini-2025-01-31", "openai:o3-mini"),
        ("anthropic:claude-3-5-haiku-20241022", "anthropic:claude-3-5-haiku-latest"),
        ("anthropic:claude-3-7-sonnet-20250219", "anthropic:claude-3-7-sonnet-latest"),
    ],
)
def test_dated_versions_find_their_family(table: PriceTable, spec: str, key: str) -> None:
    assert table.price(spec) == DEFAULT_PRICES[key]


def test_longest_prefix_wins_regardless_of_order() -> None:
    # gpt-4o first in the table must not shadow gpt-4o-mini.
    table = PriceTable({"x:m": Price(1, 1), "x:m-mini": Price(2, 2)})
    assert table.price("x:m-mini-2025") == Price(2, 2)
    assert table.price("x:m-2025") == Price(1, 1)
    assert PriceTable.default().price("openai:gpt-4o-mini-2024-07-18") == Price(0.15, 0.60)


def test_prefix_must_end_at_a_word_boundary() -> None:
    table = PriceTable({"openai:gpt-4": Price(30, 60)})
    assert table.price("openai:gpt-4o") == DEFAULT_PRICES["openai:gpt-4o"]
    assert table.price("openai:gpt-4-0613") == Price(30, 60)
    assert table.price("openai:gpt-45") is None


@pytest.mark.parametrize("spec", ["nobody:knows", "openai:gpt-5x", "ollama:llama3", "", "openai:"])
def test_unknown_is_none(table: PriceTable, spec: str) -> None:
    assert table.price(spec) is None
    assert table.cost(spec, 1, 1) is None
    assert spec not in table


def test_constructor_merges_with_defaults() -> None:
    table = PriceTable({"openai:gpt-4o": Price(1, 2), "my:model": Price(3, 4)})
    assert table.price("openai:gpt-4o") == Price(1, 2)
    assert table.price("my:model") == Price(3, 4)
    assert table.price("openai:gpt-4o-mini") == DEFAULT_PRICES["openai:gpt-4o-mini"]
    assert "my:model" in table.prices


# -- YAML ---------------------------------------------------------------------------------------


def test_yaml_extends_and_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "openai:gpt-4o-mini: {input: 0.1, output: 0.2}\n"
        "mistral:mistral-small:\n  input: 1\n  output: 3\n"
        "my-finetune: {input: 0, output: 0}\n",
    )
    table = PriceTable.from_yaml(path)
    assert table.price("openai:gpt-4o-mini") == Price(0.1, 0.2)
    assert table.price("openai:gpt-4o-mini-2024-07-18") == Price(0.1, 0.2)
    assert table.price("mistral:mistral-small") == Price(1.0, 3.0)
    assert table.price("openai:my-finetune") == Price(0.0, 0.0)
    assert table.price("openai:gpt-4o") == DEFAULT_PRICES["openai:gpt-4o"]
    assert table.price("local") == Price(0.0, 0.0)
    assert PriceTable.from_yaml(str(path)).price("mistral:mistral-small") == Price(1.0, 3.0)


def test_empty_yaml_is_the_defaults(tmp_path: Path) -> None:
    table = PriceTable.from_yaml(write(tmp_path, "# nothing here\n"))
    assert set(table) == set(DEFAULT_PRICES)


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("a: [1, 2\n", None, "invalid YAML"),
        ("- openai:gpt-4o\n", None, "mapping"),
        ("just a string\n", None, "mapping"),
        ("my:model: 3\n", "my:model", "mapping"),
        ("my:model: {output: 1}\n", "my:model.input", "missing"),
        ("my:model: {input: 1}\n", "my:model.output", "missing"),
        ("my:model: {input: -1, output: 1}\n", "my:model.input", ">= 0"),
        ("my:model: {input: 1, output: cheap}\n", "my:model.output", "not a number"),
        ("my:model: {input: true, output: 1}\n", "my:model.input", "not a number"),
        ("my:model: {input: .nan, output: 1}\n", "my:model.input", ">= 0"),
        ("my:model: {input: 1, output: .inf}\n", "my:model.output", ">= 0"),
        ("my:model: {input: 1, output: 2, cached: 0.5}\n", "my:model.cached", "unknown field"),
        ("123: {input: 1, output: 2}\n", "123", "non-empty string"),
        ("'  ': {input: 1, output: 2}\n", "  ", "non-empty string"),
    ],
)
def test_bad_yaml_raises_config_error(
    tmp_path: Path, text: str, field: str | None, words: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        PriceTable.from_yaml(path)
    error = info.value
    assert error.source == str(path)
    assert error.field == field
    assert str(path) in str(error)
    if field is not None:
        assert field in str(error)
    assert words in str(error)


def test_missing_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="no such file") as info:
        PriceTable.from_yaml(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)


def test_unreadable_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as info:
        PriceTable.from_yaml(tmp_path)
    assert info.value.source == str(tmp_path)
