"""The meta-prompt builder: past instructions (ascending, top N, bucketed) plus exemplars.

Templates are data: a folder of text files under `meta_prompts/` (see its README). A template
lists the history inline (`history_item.txt`, as in the OPRO paper) or as the turns of a
conversation (`reply.txt` + `feedback.txt`); either way it renders to chat messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from langchain_core.messages import get_buffer_string

from opro_agent.errors import ConfigError
from opro_agent.prompts import InstructionPosition, Message, scorer_prompt
from opro_agent.task import Example

__all__ = [
    "Exemplar",
    "Message",
    "MetaPromptTemplate",
    "ScoredInstruction",
    "builtin_template_dir",
    "exemplar_prompt",
    "read_template",
    "render_text",
    "score_bucket",
]

_PACKAGE_DIR = Path(__file__).resolve().parent


def builtin_template_dir() -> Path:
    """`meta_prompts/` inside the installed wheel, or beside the package in a source checkout."""
    for candidate in (_PACKAGE_DIR / "meta_prompts", _PACKAGE_DIR.parent / "meta_prompts"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("the built-in meta-prompt templates are missing from this installation")


@dataclass(frozen=True)
class ScoredInstruction:
    text: str
    score: float  # accuracy in [0, 1]


@dataclass(frozen=True)
class Exemplar:
    question: str
    prompt: str  # the scorer prompt with the instruction tag where the instruction goes
    answer: str


def score_bucket(score: float, buckets: int = 100) -> int:
    """OPRO shows scores as integers 0..buckets."""
    return round(score * buckets)


def read_template(
    folder: Path, name: str, *, required: bool, field: str = "--meta-prompt"
) -> str | None:
    """A template file's text; None (or a ConfigError when `required`) if it is missing."""
    path = folder / name
    if not path.is_file():
        if required:
            raise ConfigError("missing", source=str(path), field=field)
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"unreadable: {exc}", source=str(path), field=field) from None


@dataclass(frozen=True)
class MetaPromptTemplate:
    name: str
    opening: str
    exemplar: str
    tag: str
    history_item: str | None = None
    reply: str | None = None
    feedback: str | None = None

    @classmethod
    def load(cls, name_or_path: str) -> MetaPromptTemplate:
        """A built-in variant by name (`chat`, `chat_single`, `text`) or a folder."""
        builtin = builtin_template_dir() / "opro"
        folder = Path(name_or_path)
        if not folder.is_dir():
            folder = builtin / name_or_path
        if not folder.is_dir():
            known = sorted(p.name for p in builtin.iterdir() if p.is_dir())
            raise ConfigError(
                f"no meta-prompt {name_or_path!r} (built-in: {', '.join(known)}, or a folder)",
                field="--meta-prompt",
            )
        opening, exemplar, tag = (
            read_template(folder, name, required=True) or ""
            for name in ("opening.txt", "exemplar.txt", "tag.txt")
        )
        history_item = read_template(folder, "history_item.txt", required=False)
        reply = read_template(folder, "reply.txt", required=False)
        feedback = read_template(folder, "feedback.txt", required=False)
        if (history_item is None) == (reply is None or feedback is None):
            raise ConfigError(
                "needs history_item.txt, or reply.txt and feedback.txt (not both)",
                source=str(folder),
                field="--meta-prompt",
            )
        if not tag.strip().isalnum():
            raise ConfigError("must hold one alphanumeric tag name", source=str(folder / "tag.txt"))
        template = cls(folder.name, opening, exemplar, tag.strip(), history_item, reply, feedback)
        template.render([ScoredInstruction("x", 0.5)], [Exemplar("q", "p", "a")])  # fail now
        return template

    def render(
        self,
        history: Sequence[ScoredInstruction],
        exemplars: Sequence[Exemplar],
        *,
        max_history: int = 20,
        buckets: int = 100,
    ) -> list[Message]:
        """The meta-prompt as chat messages, best `max_history` instructions ascending."""
        # sorted() is stable, so ties keep the order the instructions were found in.
        kept = sorted(history, key=lambda item: item.score)[-max_history:] if max_history else []
        try:
            exemplar_text = "".join(
                self.exemplar.format(prompt=e.prompt, question=e.question, answer=e.answer)
                for e in exemplars
            )
            items = [
                {"instruction": item.text, "score": score_bucket(item.score, buckets)}
                for item in kept
            ]
            if self.history_item is not None:
                history_text = "".join(self.history_item.format(**item) for item in items)
                opening = self.opening.format(history=history_text, exemplars=exemplar_text)
                return [("human", opening)]
            assert self.reply is not None and self.feedback is not None
            opening = self.opening.format(history="", exemplars=exemplar_text).strip()
            messages = [("human", opening)]
            for item in items:
                messages.append(("ai", self.reply.format(**item).strip()))
                messages.append(("human", self.feedback.format(**item).strip()))
            return messages
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"bad placeholder in template: {exc}", field=f"--meta-prompt {self.name}"
            ) from None


def render_text(messages: Sequence[Message]) -> str:
    """Messages as one readable text (for logs and golden tests)."""
    return "".join(f"[{role}]\n{content}\n" for role, content in messages)


def exemplar_prompt(
    example: Example,
    position: InstructionPosition,
    input_fields: Sequence[str],
    *,
    placeholder: str = "<INS>",
) -> str:
    """The scorer prompt for `example` with `placeholder` where the instruction goes."""
    messages = scorer_prompt(placeholder, position, input_fields).format_messages(**example.inputs)
    if len(messages) == 1:
        return str(messages[0].content)
    return get_buffer_string(messages, human_prefix="User")
