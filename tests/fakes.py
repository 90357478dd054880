"""A scripted fake chat model for hermetic tests: replies come from a Python function.

The function sees the messages and the call's metadata (which opro-agent fills with the run
id, step and candidate index), so a test can script each role deterministically.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import Field

Responder = Callable[[Sequence[BaseMessage], Mapping[str, Any]], str]


class ScriptedChatModel(BaseChatModel):
    """Replies with `respond(messages, metadata)`; records every call it answers."""

    respond: Responder
    name_for_usage: str = "scripted"
    calls: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted-fake"

    def _reply(self, messages: list[BaseMessage], run_manager: Any) -> ChatResult:
        metadata = dict(run_manager.metadata) if run_manager is not None else {}
        tags = list(run_manager.tags) if run_manager is not None else []
        prompt = "\n".join(m.text for m in messages)
        text = self.respond(messages, metadata)
        self.calls.append({"prompt": prompt, "metadata": metadata, "tags": tags, "reply": text})
        usage = {
            "input_tokens": len(prompt.split()),
            "output_tokens": len(text.split()),
            "total_tokens": len(prompt.split()) + len(text.split()),
        }
        message = AIMessage(
            content=text,
            usage_metadata=usage,  # type: ignore[arg-type]
            response_metadata={"model_name": self.name_for_usage},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._reply(messages, run_manager)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._reply(messages, run_manager)
