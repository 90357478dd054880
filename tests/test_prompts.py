"""The scorer prompt: OPRO's instruction positions, rendered exactly."""

from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage, SystemMessage

from opro_agent.prompts import INSTRUCTION_POSITIONS, render_question, scorer_prompt

INS = "Let's think step by step."
QUESTION = "Is 4 an even number?"

# OPRO's layouts; {ins} and {q} stand for the instruction and the question.
HUMAN_LAYOUTS = {
    "Q_begin": "Q: {ins}\n{q}\n\nA:",
    "Q_end": "Q: {q}\n{ins}\n\nA:",
    "A_begin": "Q: {q}\n\nA: {ins}",
    "before_Q": "{ins}\nQ: {q}\n\nA:",
    "system": "Q: {q}\n\nA:",
}


def _layout(position: str, ins: str, q: str) -> str:
    return HUMAN_LAYOUTS[position].replace("{ins}", ins).replace("{q}", q)


def _render(instruction: str, position: str, **inputs: str) -> list[tuple[type, str]]:
    prompt = scorer_prompt(instruction, position, list(inputs))  # type: ignore[arg-type]
    return [(type(m), m.content) for m in prompt.format_messages(**inputs)]


def test_the_five_positions() -> None:
    assert set(INSTRUCTION_POSITIONS) == set(HUMAN_LAYOUTS)


@pytest.mark.parametrize("position", HUMAN_LAYOUTS)
def test_layout(position: str) -> None:
    messages = _render(INS, position, input=QUESTION)
    human = (HumanMessage, _layout(position, INS, QUESTION))
    if position == "system":
        assert messages == [(SystemMessage, INS), human]
    else:
        assert messages == [human]


@pytest.mark.parametrize("position", HUMAN_LAYOUTS)
@pytest.mark.parametrize("instruction", ["", "   ", "\n"])
def test_empty_instruction_leaves_no_trace(position: str, instruction: str) -> None:
    assert _render(instruction, position, input=QUESTION) == [
        (HumanMessage, f"Q: {QUESTION}\n\nA:")
    ]


@pytest.mark.parametrize("position", HUMAN_LAYOUTS)
def test_instruction_is_stripped(position: str) -> None:
    assert _render(f"  {INS}\n", position, input=QUESTION) == _render(INS, position, input=QUESTION)


@pytest.mark.parametrize("position", HUMAN_LAYOUTS)
def test_braces_are_literal(position: str) -> None:
    instruction = 'Reply as JSON: {x} or {{"answer": 1}}; never {input}.'
    question = "Evaluate {y} where y = {2}; see {input}."
    prompt = scorer_prompt(instruction, position, ["input"])  # type: ignore[arg-type]
    assert prompt.input_variables == ["input"]
    messages = [(type(m), m.content) for m in prompt.format_messages(input=question)]
    human = (HumanMessage, _layout(position, instruction, question))
    expected = [(SystemMessage, instruction), human] if position == "system" else [human]
    assert messages == expected


@pytest.mark.parametrize("position", HUMAN_LAYOUTS)
def test_two_input_fields_are_joined_by_newline(position: str) -> None:
    inputs = {"question": "What colour is the sky?", "options": "(A) red\n(B) blue"}
    prompt = scorer_prompt(INS, position, ["question", "options"])  # type: ignore[arg-type]
    assert sorted(prompt.input_variables) == ["options", "question"]
    question = "What colour is the sky?\n(A) red\n(B) blue"
    assert render_question(inputs, ["question", "options"]) == question
    messages = [(type(m), m.content) for m in prompt.format_messages(**inputs)]
    human = (HumanMessage, _layout(position, INS, question))
    assert messages == ([(SystemMessage, INS), human] if position == "system" else [human])


def test_field_order_follows_input_fields() -> None:
    prompt = scorer_prompt("", "Q_begin", ["b", "a"])
    assert prompt.format_messages(a="first", b="second")[0].content == "Q: second\nfirst\n\nA:"


def test_missing_field_value_is_an_error() -> None:
    prompt = scorer_prompt(INS, "Q_begin", ["question", "options"])
    with pytest.raises(KeyError):
        prompt.format_messages(question="only this")


def test_render_question_single_field() -> None:
    assert render_question({"input": QUESTION, "other": "x"}, ["input"]) == QUESTION
