"""The scorer prompt: where the instruction goes around a question (OPRO's positions), and
the demonstrations (question, answer turns) that may come before it.

The same `ChatPromptTemplate` is used to score during optimization and is handed to the user
afterwards, so what the pipeline gets is exactly what was measured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from langchain_core.example_selectors import BaseExampleSelector
from langchain_core.prompts import ChatPromptTemplate, FewShotChatMessagePromptTemplate

__all__ = [
    "DEMONSTRATION_PROMPT",
    "INSTRUCTION_POSITIONS",
    "Demonstration",
    "Demonstrations",
    "InstructionPosition",
    "Message",
    "demonstrations_prompt",
    "render_question",
    "scorer_prompt",
]

InstructionPosition = Literal["Q_begin", "Q_end", "A_begin", "before_Q", "system"]
INSTRUCTION_POSITIONS: tuple[str, ...] = get_args(InstructionPosition)
Message = tuple[str, str]  # (role, content), as LangChain chat models accept them

# A demonstration is asked the way a question is asked with no instruction, and answered.
DEMONSTRATION_PROMPT = ChatPromptTemplate.from_messages(
    [("human", "Q: {question}\n\nA:"), ("ai", "{answer}")]
)


@dataclass(frozen=True)
class Demonstration:
    """A solved question shown to the scorer before the one it answers.

    `question` is the rendered input (as `render_question` renders it); `id` names it
    uniquely (task and example id), for cache and store keys.
    """

    id: str
    question: str
    answer: str

    def as_example(self) -> dict[str, str]:
        return {"question": self.question, "answer": self.answer}

    @property
    def text(self) -> str:
        """What a prompt encoder reads: the question and its answer."""
        return f"{self.question}\n{self.answer}"


# Fixed demonstrations, or a LangChain example selector that picks them for each input.
Demonstrations = Sequence[Demonstration] | BaseExampleSelector


def demonstrations_prompt(
    demonstrations: Demonstrations, input_fields: Sequence[str]
) -> FewShotChatMessagePromptTemplate:
    """The (question, answer) turns for `demonstrations`, in the order given."""
    if isinstance(demonstrations, BaseExampleSelector):
        return FewShotChatMessagePromptTemplate(
            example_prompt=DEMONSTRATION_PROMPT,
            example_selector=demonstrations,
            input_variables=list(input_fields),
        )
    return FewShotChatMessagePromptTemplate(
        example_prompt=DEMONSTRATION_PROMPT,
        examples=[d.as_example() for d in demonstrations],
    )


def _escape(text: str) -> str:
    # Instructions are baked into an f-string template: literal braces must not become variables.
    return text.replace("{", "{{").replace("}", "}}")


def _question_slot(input_fields: Sequence[str]) -> str:
    return "\n".join("{" + field + "}" for field in input_fields)


def scorer_prompt(
    instruction: str,
    position: InstructionPosition,
    input_fields: Sequence[str],
    demonstrations: Demonstrations | None = None,
) -> ChatPromptTemplate:
    """The chat prompt that asks the scorer one question under `instruction`.

    Its variables are the task's input fields; an empty instruction leaves no trace.
    Demonstrations, if any, come as turns before the question (`p_K ... p_1 x`, in the order
    given or selected), after a system instruction.
    """
    ins = _escape(instruction.strip())
    question = _question_slot(input_fields)
    shots = [] if demonstrations is None else [demonstrations_prompt(demonstrations, input_fields)]
    if position == "system":
        human = f"Q: {question}\n\nA:"
        system = [("system", ins)] if ins else []
        return ChatPromptTemplate.from_messages([*system, *shots, ("human", human)])
    layouts = {
        "Q_begin": f"Q: {ins}\n{question}\n\nA:" if ins else f"Q: {question}\n\nA:",
        "Q_end": f"Q: {question}\n{ins}\n\nA:" if ins else f"Q: {question}\n\nA:",
        "A_begin": f"Q: {question}\n\nA: {ins}" if ins else f"Q: {question}\n\nA:",
        "before_Q": f"{ins}\nQ: {question}\n\nA:" if ins else f"Q: {question}\n\nA:",
    }
    return ChatPromptTemplate.from_messages([*shots, ("human", layouts[position])])


def render_question(inputs: Mapping[str, str], input_fields: Sequence[str]) -> str:
    """A question's text as it appears inside the scorer prompt."""
    return "\n".join(inputs[field] for field in input_fields)
