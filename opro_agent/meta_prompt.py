"""The meta-prompt builder: past instructions (ascending, top N, bucketed) plus exemplars.

Templates are data: a folder of text files under `meta_prompts/` (see its README).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from langchain_core.messages import get_buffer_string

from opro_agent.errors import ConfigError
from opro_agent.prompts import InstructionPosition, scorer_prompt
from opro_agent.task import Example

__all__ = [
    "MetaPromptTemplate",
    "ScoredInstruction",
    "builtin_template_dir",
    "exemplar_prompt",
    "score_bucket",
]

_PACKAGE_DIR = Path(__file__).resolve().parent
_FILES = ("meta_prompt.txt", "history_item.txt", "exemplar.txt", "tag.txt")


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


def score_bucket(score: float, buckets: int = 100) -> int:
    """OPRO shows scores as integers 0..buckets."""
    return round(score * buckets)


@dataclass(frozen=True)
class MetaPromptTemplate:
    name: str
    main: str
    history_item: str
    exemplar: str
    tag: str

    @classmethod
    def load(cls, name_or_path: str) -> MetaPromptTemplate:
        """A built-in variant by name (`chat`, `text`) or a folder holding the four files."""
        folder = Path(name_or_path)
        if not folder.is_dir():
            folder = builtin_template_dir() / name_or_path
        if not folder.is_dir():
            known = sorted(p.name for p in builtin_template_dir().iterdir() if p.is_dir())
            raise ConfigError(
                f"no meta-prompt {name_or_path!r} (built-in: {', '.join(known)}, or a folder)",
                field="--meta-prompt",
            )
        texts = {}
        for filename in _FILES:
            try:
                texts[filename] = (folder / filename).read_text(encoding="utf-8")
            except OSError:
                raise ConfigError(
                    "missing or unreadable", source=str(folder / filename), field="--meta-prompt"
                ) from None
        tag = texts["tag.txt"].strip()
        if not tag.isalnum():
            raise ConfigError("must hold one alphanumeric tag name", source=str(folder / "tag.txt"))
        template = cls(
            folder.name,
            texts["meta_prompt.txt"],
            texts["history_item.txt"],
            texts["exemplar.txt"],
            tag,
        )
        template.render([ScoredInstruction("x", 0.5)], [("q", "a")])  # fail now, not mid-run
        return template

    def render(
        self,
        history: Sequence[ScoredInstruction],
        exemplars: Sequence[tuple[str, str]],
        *,
        max_history: int = 20,
        buckets: int = 100,
    ) -> str:
        """The meta-prompt: the best `max_history` instructions in ascending score, best last.

        `exemplars` are (scorer prompt with <INS>, ground truth) pairs.
        """
        # sorted() is stable, so ties keep the order the instructions were found in.
        kept = sorted(history, key=lambda item: item.score)[-max_history:] if max_history else []
        try:
            history_text = "".join(
                self.history_item.format(
                    instruction=item.text, score=score_bucket(item.score, buckets)
                )
                for item in kept
            )
            exemplar_text = "".join(
                self.exemplar.format(prompt=prompt, answer=answer) for prompt, answer in exemplars
            )
            return self.main.format(history=history_text, exemplars=exemplar_text)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"bad placeholder in template: {exc}", field=f"--meta-prompt {self.name}"
            ) from None


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
