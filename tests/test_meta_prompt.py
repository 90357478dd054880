"""Golden tests of the rendered meta-prompts: order, top-N, buckets, exemplars, tags."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from opro_agent.errors import ConfigError
from opro_agent.meta_prompt import (
    MetaPromptTemplate,
    ScoredInstruction,
    builtin_template_dir,
    exemplar_prompt,
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


@pytest.mark.parametrize(("variant", "position"), [("chat", "Q_begin"), ("text", "A_begin")])
def test_rendered_meta_prompt_matches_golden(variant: str, position: str) -> None:
    template = MetaPromptTemplate.load(variant)
    exemplars = [
        (exemplar_prompt(e, position, ["input"], placeholder=f"<{template.tag}>"), e.target)  # type: ignore[arg-type]
        for e in EXAMPLES
    ]
    _check_golden(f"meta_prompt_{variant}_{position}.txt", template.render(HISTORY, exemplars))


def test_history_is_ascending_best_last_and_bucketed() -> None:
    text = MetaPromptTemplate.load("chat").render(HISTORY, [])
    order = [text.index(h.text + "\nscore:") for h in HISTORY if h.text]
    # ascending by score: 0.254, 0.5, 0.9
    assert order[0] < order[2] < order[1]
    assert "score:\n25\n" in text and "score:\n90\n" in text and "score:\n10\n" in text


def test_only_the_best_instructions_are_kept() -> None:
    history = [ScoredInstruction(f"instruction number {i}", i / 100) for i in range(30)]
    text = MetaPromptTemplate.load("chat").render(history, [], max_history=20)
    kept = [i for i in range(30) if f"instruction number {i}\n" in text]
    assert kept == list(range(10, 30))


def test_ties_keep_discovery_order() -> None:
    history = [ScoredInstruction("first", 0.5), ScoredInstruction("second", 0.5)]
    text = MetaPromptTemplate.load("chat").render(history, [])
    assert text.index("first") < text.index("second")


@pytest.mark.parametrize(("score", "bucket"), [(0.0, 0), (0.254, 25), (0.255, 26), (1.0, 100)])
def test_score_bucket(score: float, bucket: int) -> None:
    assert score_bucket(score) == bucket


def test_exemplar_shows_where_the_instruction_goes_for_system_position() -> None:
    text = exemplar_prompt(EXAMPLES[0], "system", ["input"])
    assert text.startswith("System: <INS>") and "Q: Is 4 even?" in text


def test_user_text_with_braces_is_not_a_placeholder() -> None:
    template = MetaPromptTemplate.load("chat")
    text = template.render([ScoredInstruction("Use {format} please", 0.5)], [("Q: {x}", "{y}")])
    assert "Use {format} please" in text and "Q: {x}" in text


def test_custom_template_folder(tmp_path: Path) -> None:
    for name in ("meta_prompt.txt", "history_item.txt", "exemplar.txt"):
        (tmp_path / name).write_text((builtin_template_dir() / "chat" / name).read_text())
    (tmp_path / "tag.txt").write_text("PROMPT\n")
    assert MetaPromptTemplate.load(str(tmp_path)).tag == "PROMPT"


def test_custom_template_with_unknown_placeholder_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "meta_prompt.txt").write_text("{history}{nonsense}")
    (tmp_path / "history_item.txt").write_text("{instruction} {score}")
    (tmp_path / "exemplar.txt").write_text("{prompt} {answer}")
    (tmp_path / "tag.txt").write_text("INS")
    with pytest.raises(ConfigError, match="nonsense"):
        MetaPromptTemplate.load(str(tmp_path))


def test_unknown_template_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--meta-prompt"):
        MetaPromptTemplate.load("no-such-template")
