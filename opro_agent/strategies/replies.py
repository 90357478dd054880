"""Reading an instruction out of an optimizer's reply, tolerantly: small models often drop
the tags they were asked for, add a lead-in, or copy a question they were shown."""

from __future__ import annotations

import re
from collections.abc import Sequence

from opro_agent.candidates import normalise_instruction, parse_instruction
from opro_agent.strategies.base import Proposal, Rejected

__all__ = ["parse_reply"]

# What models put before an instruction they were asked to write or induce.
_LEAD_RE = re.compile(
    r"^here(?:'s|\s+is)\s+(?:the|an|a|my)\s+(?:\w+\s+)?(?:instruction|prompt)\s*[:.]?\s*"
    r"|^(?:the\s+)?(?:(?:new|improved|revised)\s+)?(?:instruction|prompt)\s+(?:was|is)\s*(?:to)?\s*:?\s*"
    r"|^(?:(?:new|improved|revised)\s+)?(?:instruction|prompt)\s*:\s*|^output\s*:\s*|^to\s+",
    re.IGNORECASE,
)


def parse_reply(
    output: str,
    tag: str,
    *,
    kind: str,
    parent: str | None = None,
    questions: Sequence[str] = (),
) -> Proposal | Rejected:
    """The instruction in `output`: between <tag> and </tag> if there, else its first
    paragraph without a lead-in. Rejected when empty or when it copies one of `questions`."""
    text = parse_instruction(output, tag)
    if text is None:
        paragraph = next((p for p in re.split(r"\n\s*\n", output.strip()) if p.strip()), "")
        text = normalise_instruction(_LEAD_RE.sub("", normalise_instruction(paragraph)))
    if not text:
        return Rejected("unparseable", output)
    if any(q.strip() and q.strip() in text for q in questions):
        return Rejected("echoes_exemplar", output)
    return Proposal(text[0].upper() + text[1:], kind, parent)
