"""The exception tree.

OproError
├── ConfigError            bad user input: task YAML, data file, metric, flag, model spec
├── RunStoreError          unknown run, or a resume that does not match the stored run
├── LLMCallsFailingError   scorer/optimizer calls keep failing (dead or overloaded server)
├── LocalServerError       the embedded llama.cpp server could not start or died
└── BudgetExceededError    a --max-* budget is spent (the run stops cleanly)
"""

from __future__ import annotations

__all__ = [
    "BudgetExceededError",
    "ConfigError",
    "LLMCallsFailingError",
    "LocalServerError",
    "OproError",
    "RunStoreError",
]


class OproError(Exception):
    """Base of every error opro-agent raises on purpose."""


class ConfigError(OproError):
    """Bad user input. Renders as one line naming where the problem is."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.message = message
        self.source = source
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.source, self.field) if part)
        return f"{where}: {self.message}" if where else self.message


class RunStoreError(OproError):
    """A run that does not exist or cannot be resumed as asked."""


class LLMCallsFailingError(OproError):
    """Too many LLM calls failed even after retries; the run stops and can be resumed."""


class LocalServerError(OproError):
    """The embedded llama.cpp server failed to start or stopped answering."""


class BudgetExceededError(OproError):
    """A call, token or cost budget is spent."""
