"""Strategies by name: the built-in ones, and any a package adds through the entry point
group `opro_agent.strategies` (name = "module:StrategyClass"), as simonw/llm does for models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from importlib.metadata import entry_points
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import structlog

from opro_agent.errors import ConfigError
from opro_agent.strategies.ape import Ape
from opro_agent.strategies.base import Strategy
from opro_agent.strategies.opro import Opro
from opro_agent.strategies.pe2 import Pe2
from opro_agent.strategies.protegi import ProTeGi

__all__ = [
    "ENTRY_POINT_GROUP",
    "StrategySpec",
    "make_strategy",
    "split_run_config",
    "strategy_types",
]

ENTRY_POINT_GROUP = "opro_agent.strategies"
# A name, a mapping with `name` and settings (as in YAML), or a ready strategy.
StrategySpec = str | Mapping[str, Any] | Strategy

log = structlog.get_logger()


def strategy_types() -> dict[str, type[Strategy]]:
    """Every strategy that can be chosen by name; a broken plugin is skipped with a warning."""
    found: dict[str, type[Strategy]] = {cls.name: cls for cls in (Opro, Ape, ProTeGi, Pe2)}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as exc:  # a third-party package failing must not break the rest
            log.warning("strategy.plugin_failed", name=entry.name, error=str(exc))
            continue
        if not (isinstance(loaded, type) and issubclass(loaded, Strategy)):
            log.warning("strategy.plugin_ignored", name=entry.name, reason="not a Strategy")
            continue
        if entry.name != loaded.name:  # runs store the class's name: it must find it again
            log.warning("strategy.plugin_renamed", entry_point=entry.name, name=loaded.name)
        found.setdefault(loaded.name, loaded)
    return found


def make_strategy(
    spec: StrategySpec,
    overrides: Mapping[str, Any] | None = None,
    *,
    source: str | None = None,
    field: str = "strategy",
) -> Strategy:
    """Build a strategy from a spec plus setting overrides; bad input is a ConfigError
    naming `source` and `field`."""
    if isinstance(spec, Strategy):
        if not overrides:
            return spec
        settings = spec.to_dict()
    elif isinstance(spec, str):
        settings = {"name": spec}
    elif isinstance(spec, Mapping):
        settings = dict(spec)
    else:
        raise ConfigError(
            "must be a strategy name or a mapping with a name", source=source, field=field
        )
    settings.update(overrides or {})
    name = settings.pop("name", None)
    types = strategy_types()
    if not isinstance(name, str) or name not in types:
        raise ConfigError(
            f"no strategy {name!r} (known: {', '.join(sorted(types))})", source=source, field=field
        )
    cls = types[name]
    known = sorted(f.name for f in dataclasses.fields(cls) if not f.name.startswith("_"))  # type: ignore[arg-type]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigError(
            f"strategy {name} has no setting {unknown[0]!r} (its settings: {', '.join(known)})",
            source=source,
            field=field,
        )
    hints = get_type_hints(cls)
    for key, value in settings.items():
        if not _fits(value, hints[key]):
            raise ConfigError(
                f"strategy {name}: {key} must be {_describe(hints[key])}, got {value!r}",
                source=source,
                field=field,
            )
    try:
        return cls.from_settings(settings)
    except ConfigError as exc:
        raise ConfigError(
            exc.message, source=source, field=f"{field}.{exc.field}" if exc.field else field
        ) from None
    except (TypeError, ValueError) as exc:  # a value of the wrong type in a setting
        raise ConfigError(
            f"bad setting for strategy {name}: {exc}", source=source, field=field
        ) from None


def _fits(value: Any, hint: Any) -> bool:
    """Whether a setting's value has the type its field declares (ints are not floats'
    only way in: a whole number is a fine float, but 2.5 is no int, and True no number)."""
    if get_origin(hint) in (Union, UnionType):
        return any(_fits(value, arm) for arm in get_args(hint))
    if get_origin(hint) is Literal:
        return value in get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(_describe(arm) for arm in get_args(hint))
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(v) for v in get_args(hint))
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}
    return names.get(hint, "none" if hint is type(None) else getattr(hint, "__name__", str(hint)))


def split_run_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A stored run's strategy (as `Strategy.to_dict`) and search settings. Runs stored
    before strategies existed hold OPRO's and the search's settings in one mapping."""
    if "strategy" in config:
        return dict(config["strategy"]), dict(config["settings"])
    settings = dict(config["settings"])
    opro_fields = {f.name for f in dataclasses.fields(Opro)}
    strategy = {k: settings.pop(k) for k in list(settings) if k in opro_fields}
    return make_strategy({"name": Opro.name, **strategy}).to_dict(), settings
