"""Training labels from the frozen scorer: which demonstrations help it on which inputs.

For each training input (a train example of one of the tasks), `candidates` demonstrations
are drawn from the pool (never the input itself) and the scorer answers the input after each
one alone (`p x`). A candidate's value is the log probability the scorer gives the gold answer
where every answer to that input came with one (see `opro_agent.logprobs`), otherwise whether
the answer was right. Calls go through the same `Scorer` as an optimization's: cache, budget,
rate limits, retries, and a run store in which every answer is committed as it lands, so an
interrupted labelling resumes where it stopped.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from opro_agent.prompts import Demonstration
from opro_agent.retrieval.pool import PromptPool, pool_examples
from opro_agent.scorer import Scorer, gather_all
from opro_agent.task import Example, Task

__all__ = ["CandidateScore", "LabelSettings", "LabelledInput", "label_inputs"]

LABEL_SPLIT = "retrieval"


@dataclass(frozen=True)
class LabelSettings:
    inputs_per_task: int = 20  # training inputs labelled per task (from its train split)
    candidates: int = 8  # demonstrations scored per input
    seed: int = 0  # which inputs and candidates are drawn

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CandidateScore:
    demonstration: Demonstration
    score: float  # the scorer's answer, graded by the task's metric
    logprob: float | None  # of the gold answer, where the scorer returned logprobs


@dataclass(frozen=True)
class LabelledInput:
    example_id: str
    question: str
    candidates: tuple[CandidateScore, ...]  # best first
    by: Literal["logprob", "accuracy"]

    def value(self, candidate: CandidateScore) -> float:
        if self.by == "logprob":
            assert candidate.logprob is not None
            return candidate.logprob
        return candidate.score

    @property
    def informative(self) -> bool:
        """Whether the scorer told its candidates apart (the best beat the worst)."""
        return self.value(self.candidates[0]) > self.value(self.candidates[-1])


def _draw(example: Example, pool: PromptPool, settings: LabelSettings) -> tuple[Demonstration, ...]:
    others = [d for d in pool if d.id != example.id]
    rng = random.Random(f"{settings.seed}\n{example.id}")
    return tuple(rng.sample(others, min(settings.candidates, len(others))))


def _inputs(task: Task, settings: LabelSettings) -> list[Example]:
    examples = list(pool_examples(task))
    random.Random(f"{settings.seed}\n{task.name}").shuffle(examples)
    return examples[: settings.inputs_per_task]


async def _label(
    scorer: Scorer, example: Example, candidates: Sequence[Demonstration]
) -> LabelledInput:
    scores = await gather_all(
        scorer.score("", [example], LABEL_SPLIT, step=0, shots=[d]) for d in candidates
    )
    results = [s.results[example.id] for s in scores]
    scored = [
        CandidateScore(d, r.score, r.logprob) for d, r in zip(candidates, results, strict=True)
    ]
    by: Literal["logprob", "accuracy"] = (
        "logprob" if all(c.logprob is not None for c in scored) else "accuracy"
    )
    labelled = LabelledInput(example.id, scorer.task.question(example), (), by)
    # Stable sort: ties keep the draw's order, so labels are the same on every resume.
    ranked = sorted(scored, key=labelled.value, reverse=True)
    return LabelledInput(example.id, labelled.question, tuple(ranked), by)


async def label_inputs(
    scorers: Mapping[str, Scorer], pool: PromptPool, settings: LabelSettings
) -> list[LabelledInput]:
    """Label `inputs_per_task` train inputs of each task (`scorers` by task name, each
    scoring its task's inputs into the same stored run)."""
    return await gather_all(
        _label(scorer, example, _draw(example, pool, settings))
        for scorer in scorers.values()
        for example in _inputs(scorer.task, settings)
    )
