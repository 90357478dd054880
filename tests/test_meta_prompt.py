"""Golden tests of the rendered meta-prompts: order, top-N, buckets, exemplars, tags."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from opro_agent.errors import ConfigError
from opro_agent.meta_prompt import (
    Exemplar,
    MetaPromptTemplate,
    ScoredInstruction,
    builtin_template_dir,
    exemplar_prompt,
    render_text,
    score_bucket,
)
from opro_agent.task import Example

GOLDEN = Path(__file__).parent / "golden"
HISTORY = [
    ScoredInstruction("Let's solve the problem.", 0.254),
    ScoredInstruction("Answer with yes or no.", 0.9),
    ScoredInstruction("", 0.1),
    ScoredInstruction("Think step by step.", 0.5),
]
EXAMPLES = [
    Example("0", {"input": "Is 4 even?"}, "yes"),
    Example("1", {"input": "Is 7 even?"}, "no"),
    Example("2", {"input": "Is 0 even?"}, "yes"),
]


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("OPRO_UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")


def _exemplars(template: MetaPromptTemplate, position: str) -> list[Exemplar]:
    return [
        Exemplar(
            question=e.inputs["input"],
            prompt=exemplar_prompt(e, position, ["input"], placeholder=f"<{template.tag}>"),  # type: ignore[arg-type]
            answer=e.target,
        )
        for e in EXAMPLES
    ]


@pytest.mark.parametrize(
    ("variant", "position"), [("chat", "Q_begin"), ("chat_single", "Q_begin"), ("text", "A_begin")]
)
def test_rendered_meta_prompt_matches_golden(variant: str, position: str) -> None:
    template = MetaPromptTemplate.load(variant)
    messages = template.render(HISTORY, _exemplars(template, position))
    _check_golden(f"meta_prompt_{variant}_{position}.txt", render_text(messages))


def test_conversation_shows_history_as_turns_ascending() -> None:
    messages = MetaPromptTemplate.load("chat").render(HISTORY, [])
    roles = [role for role, _ in messages]
    assert roles == ["human"] + ["ai", "human"] * len(HISTORY)
    replies = [content for role, content in messages if role == "ai"]
    assert replies == [
        "<INS></INS>",
        "<INS>Let's solve the problem.</INS>",
        "<INS>Think step by step.</INS>",
        "<INS>Answer with yes or no.</INS>",
    ]
    assert messages[-1][1].startswith("Score: 90/100.")


@pytest.mark.parametrize("variant", ["chat", "chat_single", "text"])
def test_history_is_ascending_best_last_and_bucketed(variant: str) -> None:
    text = render_text(MetaPromptTemplate.load(variant).render(HISTORY, []))
    order = [text.index(h.text) for h in HISTORY if h.text]
    # ascending by score: 0.254 ("Let's..."), 0.5 ("Think..."), 0.9 ("Answer...")
    assert order[0] < order[2] < order[1]
    for bucket in ("10", "25", "50", "90"):
        assert bucket in text


@pytest.mark.parametrize("variant", ["chat", "chat_single"])
def test_only_the_best_instructions_are_kept(variant: str) -> None:
    history = [ScoredInstruction(f"instruction number {i}.", i / 100) for i in range(30)]
    text = render_text(MetaPromptTemplate.load(variant).render(history, [], max_history=20))
    kept = [i for i in range(30) if f"instruction number {i}." in text]
    assert kept == list(range(10, 30))


def test_ties_keep_discovery_order() -> None:
    history = [ScoredInstruction("first", 0.5), ScoredInstruction("second", 0.5)]
    text = render_text(MetaPromptTemplate.load("chat").render(history, []))
    assert text.index("first") < text.index("second")


@pytest.mark.parametrize(("score", "bucket"), [(0.0, 0), (0.254, 25), (0.255, 26), (1.0, 100)])
def test_score_bucket(score: float, bucket: int) -> None:
    assert score_bucket(score) == bucket


def test_exemplar_shows_where_the_instruction_goes_for_system_position() -> None:
    text = exemplar_prompt(EXAMPLES[0], "system", ["input"])
    assert text.startswith("System: <INS>") and "Q: Is 4 even?" in text


@pytest.mark.parametrize("variant", ["chat", "chat_single"])
def test_user_text_with_braces_is_not_a_placeholder(variant: str) -> None:
    template = MetaPromptTemplate.load(variant)
    text = render_text(
        template.render(
            [ScoredInstruction("Use {format} please", 0.5)], [Exemplar("Q {x}", "Q: {x}", "{y}")]
        )
    )
    assert "Use {format} please" in text and "{x}" in text and "{y}" in text


def test_custom_template_folder(tmp_path: Path) -> None:
    for name in ("opening.txt", "history_item.txt", "exemplar.txt"):
        (tmp_path / name).write_text(
            (builtin_template_dir() / "opro" / "chat_single" / name).read_text()
        )
    (tmp_path / "tag.txt").write_text("PROMPT\n")
    assert MetaPromptTemplate.load(str(tmp_path)).tag == "PROMPT"


def test_template_needs_one_way_to_show_history(tmp_path: Path) -> None:
    for name in ("opening.txt", "exemplar.txt", "tag.txt"):
        (tmp_path / name).write_text((builtin_template_dir() / "opro" / "chat" / name).read_text())
    with pytest.raises(ConfigError, match=r"history_item\.txt, or reply\.txt and feedback\.txt"):
        MetaPromptTemplate.load(str(tmp_path))


def test_custom_template_with_unknown_placeholder_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "opening.txt").write_text("{history}{nonsense}")
    (tmp_path / "history_item.txt").write_text("{instruction} {score}")
    (tmp_path / "exemplar.txt").write_text("{prompt} {answer}")
    (tmp_path / "tag.txt").write_text("INS")
    with pytest.raises(ConfigError, match="nonsense"):
        MetaPromptTemplate.load(str(tmp_path))


def test_unknown_template_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--meta-prompt"):
        MetaPromptTemplate.load("no-such-template")
