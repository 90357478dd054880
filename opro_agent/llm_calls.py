"""One LLM call, the way every role makes it: retried, traced, its usage counted.

Works for any Runnable: a chat model, a model wrapped in `.with_retry()` or fallbacks, or a
whole chain. Token usage is read by a callback handler, so it is counted inside chains too.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from langchain_core.callbacks import UsageMetadataCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import merge_configs

__all__ = ["CallResult", "Caller", "RetryPolicy", "output_text"]


@dataclass(frozen=True)
class RetryPolicy:
    """Transient failures are retried with exponential backoff and jitter."""

    attempts: int = 3
    initial_wait: float = 1.0
    max_wait: float = 10.0


@dataclass(frozen=True)
class CallResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency: float


def output_text(output: Any) -> str:
    """The text of whatever a model or chain returned."""
    if isinstance(output, BaseMessage):
        return output.text
    if isinstance(output, str):
        return output
    return str(output)


class Caller:
    """Calls one Runnable in one role (tag), with retries; built once, called many times."""

    def __init__(self, runnable: Runnable[Any, Any], *, tag: str, retry: RetryPolicy) -> None:
        self.tag = tag
        self._runnable = runnable.with_retry(
            stop_after_attempt=retry.attempts,
            wait_exponential_jitter=True,
            exponential_jitter_params={
                "initial": retry.initial_wait,
                "max": retry.max_wait,
                "jitter": retry.initial_wait,
            },
        )

    async def __call__(
        self,
        payload: Any,
        *,
        config: RunnableConfig | None,
        metadata: Mapping[str, Any],
        **kwargs: Any,
    ) -> CallResult:
        """Invoke once (with retries); `kwargs` go to the model (e.g. `seed`).

        Raises whatever the last attempt raised.
        """
        usage = UsageMetadataCallbackHandler()
        call_config = merge_configs(
            config, {"tags": [self.tag], "metadata": dict(metadata), "callbacks": [usage]}
        )
        started = time.perf_counter()
        output = await self._runnable.ainvoke(payload, call_config, **kwargs)
        latency = time.perf_counter() - started
        tokens = usage.usage_metadata.values()
        return CallResult(
            output_text(output),
            sum(u.get("input_tokens", 0) for u in tokens),
            sum(u.get("output_tokens", 0) for u in tokens),
            latency,
        )
