"""OPRO's results are pinned: the same seed on the scripted fake gives the same winner,
history, scores and call counts as before the search was split into search and strategy.

`tests/golden/opro_pinned.json` was written by the code before that refactor; regenerate it
only for a change that is meant to alter OPRO's results (OPRO_PIN_WRITE=1 pytest this file).
It was regenerated once since, when the initial instruction came to be validated beside the
finalists ("do no harm"): its validation score and those 10 calls are all that changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from opro_agent import Budget, Opro, OproOptimizer, RetryPolicy, SearchSettings, Task
from tests.conftest import optimizer_reply, scorer_reply
from tests.fakes import ScriptedChatModel

GOLDEN = Path(__file__).parent / "golden" / "opro_pinned.json"
RETRY = RetryPolicy(attempts=2, initial_wait=0.001, max_wait=0.002)

CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "early_rejection": {"early_rejection": True, "first_stage": 5},
    "most_wrong": {"exemplar_selection": "most_wrong", "steps": 4},
    "constant_patience": {"exemplar_selection": "constant", "steps": 6, "patience": 1},
    "budget": {"steps": 5, "max_calls": 250},
    "seed_7_target": {"seed": 7, "steps": 5, "target_score": 1.0},
}


def _run(task: Task, case: dict[str, Any]) -> dict[str, Any]:
    values = {"steps": 3, "candidates_per_step": 4, "concurrency": 4, "retry": RETRY, **case}
    values["budget"] = Budget(max_calls=values.pop("max_calls", None))
    search = {k: v for k, v in values.items() if k in SearchSettings.__dataclass_fields__}
    strategy = {k: v for k, v in values.items() if k not in search}
    optimizer = ScriptedChatModel(respond=optimizer_reply, name_for_usage="o")
    scorer = ScriptedChatModel(respond=scorer_reply, name_for_usage="s")
    result = OproOptimizer(
        optimizer, scorer, strategy=Opro(**strategy), settings=SearchSettings(**search)
    ).invoke(task)
    return {
        "best_instruction": result.best_instruction,
        "scores": dict(result.scores),
        "baselines": dict(result.baselines),
        "history": [
            [h.step, h.origin, h.instruction, h.train, h.validation, h.test] for h in result.history
        ],
        "calls": dict(result.calls),
        "tokens": dict(result.tokens),
        "saved_by_early_rejection": result.saved_by_early_rejection,
        "stop_reason": result.stop_reason,
        "optimizer_prompts": [c["prompt"] for c in optimizer.calls],
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_opro_results_are_unchanged(name: str, yes_no_task: Task) -> None:
    got = _run(yes_no_task, CASES[name])
    if os.environ.get("OPRO_PIN_WRITE"):
        pinned = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        pinned[name] = got
        GOLDEN.write_text(json.dumps(pinned, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    expected = json.loads(GOLDEN.read_text())[name]
    # Prompts are compared as a multiset: the optimizer calls of a step run concurrently.
    assert sorted(got.pop("optimizer_prompts")) == sorted(expected.pop("optimizer_prompts"))
    assert got == expected
