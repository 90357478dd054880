"""Reading the user's YAML files, with every failure as one ConfigError naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from opro_agent.errors import ConfigError

__all__ = ["read_yaml"]


def read_yaml(path: Path) -> Any:
    src = str(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("no such file", source=src) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", source=src) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"invalid YAML{where}: {problem}", source=src) from None
