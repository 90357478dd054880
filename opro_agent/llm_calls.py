"""One LLM call, the way every role makes it: cached, budgeted, rate-limited, retried,
traced, its usage counted.

Works for any Runnable: a chat model, a model wrapped in `.with_retry()` or fallbacks, or a
whole chain. Token usage is read by a callback handler, so it is counted inside chains too.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiolimiter import AsyncLimiter
from langchain_core.callbacks import UsageMetadataCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import merge_configs
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential_jitter,
)

from opro_agent.budget import Meter
from opro_agent.cache import ResponseCache
from opro_agent.pricing import Price
from opro_agent.tokens import count_message_tokens

__all__ = [
    "CallPolicy",
    "CallResult",
    "Caller",
    "RateLimits",
    "RetryPolicy",
    "output_logprobs",
    "output_text",
]


@dataclass(frozen=True)
class RetryPolicy:
    """Failures are retried with exponential backoff and jitter; rate-limit errors (429)
    get their own, more patient tries, and count as failures only when those run out."""

    attempts: int = 3
    initial_wait: float = 1.0
    max_wait: float = 10.0
    rate_limit_attempts: int = 8
    rate_limit_max_wait: float = 60.0


class RateLimits:
    """Requests and tokens per minute, shared by every call in flight (both roles)."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self._requests = AsyncLimiter(rpm, 60) if rpm else None
        self._tokens = AsyncLimiter(tpm, 60) if tpm else None

    async def acquire(self, tokens: int) -> None:
        if self._requests is not None:
            await self._requests.acquire()
        if self._tokens is not None and self.tpm:
            # A request larger than the whole minute's allowance waits for a full minute.
            await self._tokens.acquire(min(tokens, self.tpm))


class _UsageCounter(UsageMetadataCallbackHandler):
    # It only adds numbers: run it on the event loop, not (LangChain's default for sync
    # handlers under async calls) in a worker thread for every event.
    run_inline = True

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        # Defined so LangChain does not fall back to on_llm_start, stringifying the prompt.
        return None


@dataclass(frozen=True)
class CallResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency: float
    cached: bool = False
    # Per-token log probabilities as OpenAI-compatible chat models return them
    # (`response_metadata["logprobs"]["content"]`), for models asked for them.
    logprobs: list[Any] | None = None


def output_logprobs(output: Any) -> list[Any] | None:
    """The per-token log probabilities a chat model returned with its answer, if any."""
    if not isinstance(output, BaseMessage):
        return None
    logprobs = output.response_metadata.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    return content if isinstance(content, list) and content else None


def output_text(output: Any) -> str:
    """The text of whatever a model or chain returned."""
    if isinstance(output, BaseMessage):
        return output.text
    if isinstance(output, str):
        return output
    return str(output)


@dataclass
class CallPolicy:
    """What surrounds each call of one role; every part is optional."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    rate_limit_errors: tuple[type[BaseException], ...] = ()
    cache: ResponseCache | None = None
    identity: str | None = None  # what identifies the model's answers; None: not cacheable
    meter: Meter | None = None
    limits: RateLimits | None = None
    price: Price | None = None


class Caller:
    """Calls one Runnable in one role ("optimizer" or "scorer"); built once, called often.

    Every call is tagged `opro:<role>` for tracers.
    """

    def __init__(self, runnable: Runnable[Any, Any], *, role: str, policy: CallPolicy) -> None:
        self.role = role
        self.tag = f"opro:{role}"
        self.policy = policy
        self._runnable = runnable
        retry = policy.retry
        # tenacity directly rather than Runnable.with_retry: rate-limit errors need their own
        # attempts and waits, and a wrapper Runnable per call costs a traced child run.
        general = wait_exponential_jitter(
            multiplier=retry.initial_wait, max=retry.max_wait, jitter=retry.initial_wait
        )
        patient = wait_exponential_jitter(
            multiplier=retry.initial_wait, max=retry.rate_limit_max_wait, jitter=retry.initial_wait
        )

        def rate_limited(state: RetryCallState) -> bool:
            error = state.outcome.exception() if state.outcome is not None else None
            return isinstance(error, policy.rate_limit_errors)

        def stop(state: RetryCallState) -> bool:
            limit = retry.rate_limit_attempts if rate_limited(state) else retry.attempts
            return state.attempt_number >= limit

        def wait(state: RetryCallState) -> float:
            return patient(state) if rate_limited(state) else general(state)

        self._retrying = AsyncRetrying(
            stop=stop, wait=wait, retry=retry_if_exception_type(Exception), reraise=True
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

        Raises BudgetExceededError before a call the budget cannot pay for, and otherwise
        whatever the last attempt raised.
        """
        policy = self.policy
        key = None
        if policy.cache is not None and policy.identity is not None:
            key = ResponseCache.key(policy.identity, payload, kwargs)
            hit = policy.cache.get(key)
            if hit is not None:
                if policy.meter is not None:
                    policy.meter.end(self.role, hit[1], hit[2], 0.0, paid=False)
                return CallResult(hit[0], hit[1], hit[2], 0.0, cached=True, logprobs=hit[3])
        if policy.meter is not None:
            policy.meter.begin()
        try:
            if policy.limits is not None:
                await policy.limits.acquire(count_message_tokens(payload))
            result = await self._invoke(payload, config, metadata, kwargs)
        except BaseException:
            if policy.meter is not None:
                policy.meter.abort()
            raise
        if key is not None and policy.cache is not None:
            policy.cache.put(
                key,
                (result.text, result.prompt_tokens, result.completion_tokens, result.logprobs),
            )
        if policy.meter is not None:
            cost = (
                policy.price.cost(result.prompt_tokens, result.completion_tokens)
                if policy.price
                else 0.0
            )
            policy.meter.end(
                self.tag, result.prompt_tokens, result.completion_tokens, cost, paid=True
            )
        return result

    async def _invoke(
        self,
        payload: Any,
        config: RunnableConfig | None,
        metadata: Mapping[str, Any],
        kwargs: Mapping[str, Any],
    ) -> CallResult:
        usage = _UsageCounter()
        call_config = merge_configs(
            config, {"tags": [self.tag], "metadata": dict(metadata), "callbacks": [usage]}
        )
        started = time.perf_counter()
        output: Any = await self._retrying(self._runnable.ainvoke, payload, call_config, **kwargs)
        latency = time.perf_counter() - started
        tokens = usage.usage_metadata.values()
        return CallResult(
            output_text(output),
            sum(u.get("input_tokens", 0) for u in tokens),
            sum(u.get("output_tokens", 0) for u in tokens),
            latency,
            logprobs=output_logprobs(output),
        )
