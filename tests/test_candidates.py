"""Parsing, normalising and deduplicating the optimizer's candidate instructions."""

from __future__ import annotations

import pytest

from opro_agent.candidates import (
    dedupe_key,
    instruction_key,
    normalise_instruction,
    parse_instruction,
    unique,
)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("<INS>Be concise.</INS>", "Be concise."),
        ("  \n<INS>  Be concise.  </INS>\n", "Be concise."),
        (
            "Sure! Here is a better one:\n<INS>Answer with yes or no.</INS>\nI hope it helps.",
            "Answer with yes or no.",
        ),
        ("**<INS>Answer with yes or no.</INS>**", "Answer with yes or no."),
        ("<INS>**Answer with yes or no.**</INS>", "Answer with yes or no."),
        ("```\n<INS>Think step by step.</INS>\n```", "Think step by step."),
        ("```text\n<INS>Think step by step.</INS>\n```", "Think step by step."),
        ("<INS>```text\nThink step by step.\n```</INS>", "Think step by step."),
        ('<INS>"Think step by step."</INS>', "Think step by step."),
        ("<INS>\u201cThink step by step.\u201d</INS>", "Think step by step."),
        (
            "<INS>Answer 'yes' or 'no', then say \"done\".</INS>",
            "Answer 'yes' or 'no', then say \"done\".",
        ),
        ("<ins>Be concise.</ins>", "Be concise."),
        ("<Ins>Be concise.</INS>", "Be concise."),
        ("<INS>Instruction: Be concise.</INS>", "Be concise."),
        ("<INS>Be\n   concise   and    clear.</INS>", "Be\nconcise and clear."),
        ("<INS>First line.\n\n\nSecond line.</INS>", "First line.\nSecond line."),
        # missing closing tag: the text up to a blank line (or the end)
        ("<INS>Be brief", "Be brief"),
        ("<INS>Be brief and\nclear.\n\nThis instruction should help.", "Be brief and\nclear."),
        ("Here: <INS>Be brief.\n  \nMore prose.", "Be brief."),
        # a lone closing tag: the text before it, back to a blank line
        ("Be brief.</INS>", "Be brief."),
        ("Here is my proposal.\n\nBe brief.</INS>", "Be brief."),
        # several pairs: the first
        ("<INS>First.</INS> or maybe <INS>Second.</INS>", "First."),
        ("<INS>First.</INS>\n\n<INS>Second.</INS>", "First."),
        # non-ASCII text is kept intact
        ("<INS>Réponds en français, s'il te plaît.</INS>", "Réponds en français, s'il te plaît."),
        ("<INS>一步一步地思考。</INS>", "一步一步地思考。"),
        ("<INS>Answer with 👍 or 👎 only.</INS>", "Answer with 👍 or 👎 only."),
        (
            "<INS>Antworte kurz: ja oder nein. Größe zählt.</INS>",
            "Antworte kurz: ja oder nein. Größe zählt.",
        ),
        ("<INS>Re\u0301ponds.</INS>", "Réponds."),  # decomposed accent is composed (NFC)
    ],
)
def test_parse_instruction(output: str, expected: str) -> None:
    assert parse_instruction(output, "INS") == expected


@pytest.mark.parametrize(
    "output",
    [
        "<INS></INS>",
        "<INS>   \n  </INS>",
        '<INS>""</INS>',
        "<INS>**</INS>",
        "I am not sure what to write.",
        "",
        "INS: Be brief.",
        "<INSTRUCTION>Be brief.</INSTRUCTION>",
        "<TEXT>Be brief.</TEXT>",  # another template's tag
        "<INS>\n\nBe brief.",  # opening tag, then a blank line straight away
    ],
)
def test_parse_instruction_returns_none_when_nothing_usable(output: str) -> None:
    assert parse_instruction(output, "INS") is None


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("<TEXT>Solve it carefully.</TEXT>", "Solve it carefully."),
        ("<text>Solve it carefully.</text>", "Solve it carefully."),
        ("Output: <TEXT>Solve it carefully.", "Solve it carefully."),
        ("<INS>Not this one.</INS>", None),
    ],
)
def test_parse_instruction_text_tag(output: str, expected: str | None) -> None:
    assert parse_instruction(output, "TEXT") == expected


@pytest.mark.parametrize(
    "output", ["<INS>Say yes if a < b, else no.", "Say yes if a > b, else no.</INS>"]
)
def test_parse_instruction_keeps_comparison_signs(output: str) -> None:
    assert parse_instruction(output, "INS") in {
        "Say yes if a < b, else no.",
        "Say yes if a > b, else no.",
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Instruction: Be brief.", "Be brief."),
        ("instruction - Be brief.", "Be brief."),
        ("New instruction: Be brief.", "Be brief."),
        ("Prompt: Be brief.", "Be brief."),
        ("TEXT: Be brief.", "Be brief."),
        ('"Be brief."', "Be brief."),
        ("'Be brief.'", "Be brief."),
        ("`Be brief.`", "Be brief."),
        ("\u201cBe brief.\u201d", "Be brief."),
        ("\u00abBe brief.\u00bb", "Be brief."),
        ("\"'Be brief.'\"", "Be brief."),
        ('Instruction: "Be brief."', "Be brief."),
        ("  Be   brief.  ", "Be brief."),
        ("__Be brief.__", "Be brief."),
        ("Say \"yes\" or 'no'.", "Say \"yes\" or 'no'."),
        ("Use the instruction: be brief.", "Use the instruction: be brief."),  # label only at start
        ("", ""),
    ],
)
def test_normalise_instruction(text: str, expected: str) -> None:
    assert normalise_instruction(text) == expected


def test_normalise_instruction_keeps_quotes_that_do_not_wrap() -> None:
    text = '"Yes" if it is true, otherwise "No"'
    assert normalise_instruction(text) == text


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Think about it.", "think about it"),
        ("Think about it.", "THINK ABOUT IT!"),
        ("Think about it", "Think   about\n it ;"),
        ("Think about it.", "\uff34\uff48\uff49\uff4e\uff4b about it"),  # full-width letters
        ("Answer with 42.", "Answer with \uff14\uff12."),  # full-width digits
        ("Straße prüfen.", "STRASSE PRÜFEN"),  # casefold
        ("Think about it", "Think\u3000about it"),  # ideographic space
    ],
)
def test_dedupe_key_folds_variants_together(a: str, b: str) -> None:
    assert dedupe_key(a) == dedupe_key(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Think about it.", "Think about it carefully."),
        ("Answer yes.", "Answer no."),
        ("Be brief.", "Be not brief."),
        ("Answer with 42.", "Answer with 24."),
        ("Répondez.", "Repondez."),  # accents are meaningful
        ("Think about it?", "Think about it"),  # a question mark is not folded
    ],
)
def test_dedupe_key_keeps_different_instructions_apart(a: str, b: str) -> None:
    assert dedupe_key(a) != dedupe_key(b)


def test_unique_uses_dedupe_keys_and_updates_seen() -> None:
    seen = {dedupe_key("Be brief.")}
    texts = ["be brief", "Think.", "THINK", "Answer now."]
    assert unique(texts, seen) == ["Think.", "Answer now."]
    assert seen == {"be brief", "think", "answer now"}


def test_instruction_key_is_stable_and_exact() -> None:
    key = instruction_key("Let's solve the problem.")
    # Pinned: the run store keys results by this, so it must not change across versions.
    assert key == "e3e5ce3243ebea6c5000"
    assert instruction_key("Let's solve the problem.") == key
    assert len(key) == 20 and all(c in "0123456789abcdef" for c in key)
    variants = [
        "let's solve the problem.",
        "Let's solve the problem",
        "Let's solve the problem. ",
        "",
    ]
    keys = {key, *(instruction_key(v) for v in variants)}
    assert len(keys) == 5
    assert instruction_key("一步一步地思考") != instruction_key("一步一步地思考。")
