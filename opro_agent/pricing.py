"""USD prices per model, for cost budgets.

A price table maps model specs ("openai:gpt-4o-mini", "local") or bare model names to
prices per million tokens. Lookups tolerate dated model versions: "gpt-4o-mini-2024-07-18"
is priced as "gpt-4o-mini".
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from opro_agent.errors import ConfigError
from opro_agent.files import read_yaml

__all__ = ["DEFAULT_PRICES", "Price", "PriceTable"]

_PER = 1_000_000
_LATEST = "-latest"


@dataclass(frozen=True)
class Price:
    """USD per million prompt (input) and completion (output) tokens."""

    input_per_million: float
    output_per_million: float

    def __post_init__(self) -> None:
        for name in ("input_per_million", "output_per_million"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for one call (or a total) with these token counts."""
        return (
            prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million
        ) / _PER


# Public list prices (USD per 1M tokens, standard tier, no caching or batch discounts) as of
# writing; they change, so users override them with `PriceTable.from_yaml`.
DEFAULT_PRICES: Mapping[str, Price] = MappingProxyType(
    {
        "local": Price(0.0, 0.0),
        "openai:gpt-4o": Price(2.50, 10.00),
        "openai:gpt-4o-mini": Price(0.15, 0.60),
        "openai:gpt-4.1": Price(2.00, 8.00),
        "openai:gpt-4.1-mini": Price(0.40, 1.60),
        "openai:gpt-4.1-nano": Price(0.10, 0.40),
        "openai:o3-mini": Price(1.10, 4.40),
        "openai:gpt-3.5-turbo": Price(0.50, 1.50),
        "anthropic:claude-3-5-haiku-latest": Price(0.80, 4.00),
        "anthropic:claude-3-5-sonnet-latest": Price(3.00, 15.00),
        "anthropic:claude-3-7-sonnet-latest": Price(3.00, 15.00),
    }
)


def _normalize(spec: str) -> str:
    return spec.strip().lower()


def _model_name(spec: str) -> str:
    """The model part of "provider:model"; a spec without a provider is a model name."""
    provider, sep, model = spec.partition(":")
    return model if sep else provider


def _provider(spec: str) -> str:
    provider, sep, _ = spec.partition(":")
    return provider if sep else ""


def _starts_at_boundary(name: str, prefix: str) -> bool:
    # "gpt-4o-2024-08-06" is a gpt-4o, but "gpt-4o" is not a "gpt-4".
    return name.startswith(prefix) and (len(name) == len(prefix) or not name[len(prefix)].isalnum())


class PriceTable:
    """Prices by spec; the built-in defaults, extended and overridden by `prices`."""

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        merged = {**DEFAULT_PRICES, **(prices or {})}
        self._prices: dict[str, Price] = {}
        for spec, price in merged.items():
            key = _normalize(spec)
            if not key:
                raise ValueError("a price table key must be a non-empty spec")
            self._prices[key] = price

    @classmethod
    def default(cls) -> PriceTable:
        """The built-in list prices."""
        return cls()

    @classmethod
    def from_yaml(cls, path: str | Path) -> PriceTable:
        """The defaults plus a YAML mapping `spec: {input: USD, output: USD}` per 1M tokens."""
        path = Path(path)
        src = str(path)
        raw = read_yaml(path)
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ConfigError(
                "a price file must be a mapping of model spec -> {input: USD, output: USD}",
                source=src,
            )
        prices: dict[str, Price] = {}
        for spec, entry in raw.items():
            if not isinstance(spec, str) or not spec.strip():
                raise ConfigError(
                    "a model spec must be a non-empty string", source=src, field=str(spec)
                )
            prices[spec] = _parse_entry(entry, src, spec)
        return cls(prices)

    @property
    def prices(self) -> Mapping[str, Price]:
        """Every entry, keyed by normalized spec."""
        return MappingProxyType(self._prices)

    def __contains__(self, spec: object) -> bool:
        return isinstance(spec, str) and self.price(spec) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._prices)

    def __len__(self) -> int:
        return len(self._prices)

    def price(self, spec: str) -> Price | None:
        """The price for a spec: exact key, then model name, then longest model-name prefix."""
        spec = _normalize(spec)
        if not spec:
            return None
        exact = self._prices.get(spec)
        if exact is not None:
            return exact
        provider, name = _provider(spec), _model_name(spec)
        if not name:
            return None

        # Among equally good keys, one from the same provider wins; then table order.
        def rank(key: str) -> int:
            return 0 if _provider(key) == provider else 1

        same_name = [key for key in self._prices if _model_name(key) == name]
        if same_name:
            return self._prices[min(same_name, key=rank)]

        best: tuple[int, int, str] | None = None
        for key in self._prices:
            key_name = _model_name(key)
            # "claude-3-5-haiku-latest" also prices "claude-3-5-haiku-20241022".
            prefixes = {key_name, key_name.removesuffix(_LATEST)}
            for prefix in prefixes:
                if prefix and _starts_at_boundary(name, prefix):
                    candidate = (-len(prefix), rank(key), key)
                    if best is None or candidate[:2] < best[:2]:
                        best = candidate
        return None if best is None else self._prices[best[2]]

    def cost(self, spec: str, prompt_tokens: int, completion_tokens: int) -> float | None:
        """USD for these token counts with `spec`'s price; None if the price is unknown."""
        price = self.price(spec)
        return None if price is None else price.cost(prompt_tokens, completion_tokens)


def _parse_entry(entry: object, src: str, spec: str) -> Price:
    if not isinstance(entry, dict):
        raise ConfigError(
            "must be a mapping {input: USD per 1M tokens, output: USD per 1M tokens}",
            source=src,
            field=spec,
        )
    for name in entry:
        if name not in ("input", "output"):
            raise ConfigError(
                "unknown field (expected one of: input, output)", source=src, field=f"{spec}.{name}"
            )
    values: dict[str, float] = {}
    for name in ("input", "output"):
        where = f"{spec}.{name}"
        if name not in entry:
            raise ConfigError("missing required field (USD per 1M tokens)", source=src, field=where)
        value = entry[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{value!r} is not a number", source=src, field=where)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{value!r} must be a finite number >= 0", source=src, field=where)
        values[name] = float(value)
    return Price(values["input"], values["output"])
