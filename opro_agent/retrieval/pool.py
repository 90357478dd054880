"""The prompt pool: demonstrations from the *train* splits of a set of tasks.

Validation and test examples never enter the pool, so a retriever can not show the scorer
the answer to a question it is then graded on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from opro_agent.errors import ConfigError
from opro_agent.prompts import Demonstration
from opro_agent.task import Example, Task

__all__ = ["PromptPool", "build_pool", "pool_examples"]


@dataclass(frozen=True)
class PromptPool:
    demonstrations: tuple[Demonstration, ...]

    def __len__(self) -> int:
        return len(self.demonstrations)

    def __iter__(self) -> Iterator[Demonstration]:
        return iter(self.demonstrations)

    def fingerprint(self) -> str:
        payload = json.dumps(
            [[d.id, d.question, d.answer] for d in self.demonstrations], ensure_ascii=False
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def save(self, path: Path) -> None:
        lines = (json.dumps(dataclasses.asdict(d), ensure_ascii=False) for d in self)
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> PromptPool:
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            return cls(tuple(Demonstration(**row) for row in rows))
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read the prompt pool: {exc}", source=str(path)) from exc


def pool_examples(task: Task) -> tuple[Example, ...]:
    """A task's train examples, their ids made unique across tasks (`task:id`), as the pool
    and the labelling runs name them."""
    return tuple(dataclasses.replace(e, id=f"{task.name}:{e.id}") for e in task.splits().train)


def build_pool(tasks: Sequence[Task]) -> PromptPool:
    """One demonstration per train example of each task, rendered as the task renders it."""
    names = [task.name for task in tasks]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"two tasks are named {name!r}: pool entries would be ambiguous")
    return PromptPool(
        tuple(
            Demonstration(id=example.id, question=task.question(example), answer=example.target)
            for task in tasks
            for example in pool_examples(task)
        )
    )
