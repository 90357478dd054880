"""The scorer prompt: where the instruction goes around a question (OPRO's positions).

The same `ChatPromptTemplate` is used to score during optimization and is handed to the user
afterwards, so what the pipeline gets is exactly what was measured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, get_args

from langchain_core.prompts import ChatPromptTemplate

__all__ = [
    "INSTRUCTION_POSITIONS",
    "InstructionPosition",
    "Message",
    "render_question",
    "scorer_prompt",
]

InstructionPosition = Literal["Q_begin", "Q_end", "A_begin", "before_Q", "system"]
INSTRUCTION_POSITIONS: tuple[str, ...] = get_args(InstructionPosition)
Message = tuple[str, str]  # (role, content), as LangChain chat models accept them


def _escape(text: str) -> str:
    # Instructions are baked into an f-string template: literal braces must not become variables.
    return text.replace("{", "{{").replace("}", "}}")


def _question_slot(input_fields: Sequence[str]) -> str:
    return "\n".join("{" + field + "}" for field in input_fields)


def scorer_prompt(
    instruction: str, position: InstructionPosition, input_fields: Sequence[str]
) -> ChatPromptTemplate:
    """The chat prompt that asks the scorer one question under `instruction`.

    Its variables are the task's input fields; an empty instruction leaves no trace.
    """
    ins = _escape(instruction.strip())
    question = _question_slot(input_fields)
    if position == "system":
        human = f"Q: {question}\n\nA:"
        if not ins:
            return ChatPromptTemplate.from_messages([("human", human)])
        return ChatPromptTemplate.from_messages([("system", ins), ("human", human)])
    layouts = {
        "Q_begin": f"Q: {ins}\n{question}\n\nA:" if ins else f"Q: {question}\n\nA:",
        "Q_end": f"Q: {question}\n{ins}\n\nA:" if ins else f"Q: {question}\n\nA:",
        "A_begin": f"Q: {question}\n\nA: {ins}" if ins else f"Q: {question}\n\nA:",
        "before_Q": f"{ins}\nQ: {question}\n\nA:" if ins else f"Q: {question}\n\nA:",
    }
    return ChatPromptTemplate.from_messages([("human", layouts[position])])


def render_question(inputs: Mapping[str, str], input_fields: Sequence[str]) -> str:
    """A question's text as it appears inside the scorer prompt."""
    return "\n".join(inputs[field] for field in input_fields)
