"""APE's optional log-probability scoring: candidates are raced and ranked by the scorer's
log probability of the gold answers where the scorer returns log probabilities; accuracy
stays the reported metric, and without log probabilities APE falls back to accuracy."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from opro_agent import Ape, OproOptimizer, ResponseCache, RunStore, SearchSettings, Task, cli
from opro_agent.llm_calls import Caller, CallPolicy
from opro_agent.logprobs import MIN_LOGPROB
from opro_agent.providers import ModelOptions, Models, ModelSpec
from opro_agent.scorer import InstructionScore
from opro_agent.store import Evaluation
from opro_agent.strategies.ape import _warn_no_logprobs
from tests.conftest import scorer_reply
from tests.fakes import ScriptedChatModel

CONFIDENCE = {"Reply yes or no.": -2.0, "Answer yes or no.": -0.1}


class LogprobChatModel(ScriptedChatModel):
    """Answers like the scripted scorer, with token log probabilities: the model is surer of
    its answer under some instructions than under others."""

    def _reply(self, messages: list[BaseMessage], run_manager: Any) -> ChatResult:
        result = super()._reply(messages, run_manager)
        message = result.generations[0].message
        prompt = "\n".join(m.text for m in messages)
        logprob = next((v for k, v in CONFIDENCE.items() if k in prompt), -5.0)
        token = {"token": message.text, "logprob": logprob, "bytes": None}
        content = [{**token, "top_logprobs": [token]}]
        metadata = {**message.response_metadata, "logprobs": {"content": content}}
        return ChatResult(
            generations=[
                ChatGeneration(message=AIMessage(content=message.text, response_metadata=metadata))
            ]
        )


def reverse_reply(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
    if metadata["opro_kind"] == "resample":
        return f"<INS>Respond yes or no, variation {metadata['opro_step']}.</INS>"
    return ["<INS>Reply yes or no.</INS>", "<INS>Answer yes or no.</INS>"][
        metadata["opro_candidate"]
    ]


def _run(task: Task, score: str, scorer: ScriptedChatModel) -> Any:
    return OproOptimizer(
        ScriptedChatModel(respond=reverse_reply),
        scorer,
        strategy=Ape(mode="reverse", proposals=2, resample_top=1, variations=1, score=score),  # type: ignore[arg-type]
        settings=SearchSettings(steps=2, validate_top=1),
        store=RunStore(":memory:"),
    ).invoke(task)


def test_logprob_scoring_ranks_by_the_gold_answers_log_probability(yes_no_task: Task) -> None:
    by_accuracy = _run(yes_no_task, "accuracy", LogprobChatModel(respond=scorer_reply))
    by_logprob = _run(yes_no_task, "logprob", LogprobChatModel(respond=scorer_reply))

    # Both are always right; accuracy keeps the first, log probability the surer one.
    def parents(result: Any) -> list[str | None]:
        return [h.parent for h in result.history if h.kind == "resample"]

    assert parents(by_accuracy) == ["Reply yes or no."]
    assert parents(by_logprob) == ["Answer yes or no."]
    assert by_logprob.best_instruction == "Answer yes or no."
    # The reported scores are accuracy all the same.
    assert by_logprob.scores == {"train": 1.0, "validation": 1.0, "test": 1.0}


def test_without_logprobs_ape_falls_back_to_accuracy(yes_no_task: Task) -> None:
    _warn_no_logprobs.cache_clear()  # it warns once per process
    with structlog.testing.capture_logs() as logs:
        result = _run(yes_no_task, "logprob", ScriptedChatModel(respond=scorer_reply))
    assert [h.parent for h in result.history if h.kind == "resample"] == ["Reply yes or no."]
    assert [e["event"] for e in logs].count("ape.no_logprobs") == 1


def test_cached_answers_keep_their_logprobs(tmp_path: Path) -> None:
    model = LogprobChatModel(respond=lambda m, meta: "yes")
    cache = ResponseCache(tmp_path / "cache.db")
    caller = Caller(model, role="scorer", policy=CallPolicy(cache=cache, identity="m"))

    async def twice() -> tuple[Any, Any]:
        messages = [("human", "Answer yes or no. Is 2 even?")]
        first = await caller(messages, config=None, metadata={})
        return first, await caller(messages, config=None, metadata={})

    first, second = asyncio.run(twice())
    assert second.cached and not first.cached
    assert second.logprobs == first.logprobs and first.logprobs[0]["logprob"] == -0.1
    assert len(model.calls) == 1


def test_the_cli_asks_the_scorer_for_logprobs_only_when_needed(
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    options_seen: dict[str, list[ModelOptions]] = {"--optimizer": [], "--scorer": []}
    fake = Models.chat_model

    def chat_model(self: Models, spec: ModelSpec, options: ModelOptions, *, flag: str) -> Any:
        options_seen[flag].append(options)
        model = fake(self, spec, options, flag=flag)
        if flag == "--optimizer":
            model.respond = reverse_reply
        return model

    monkeypatch.setattr(Models, "chat_model", chat_model)
    base = ["optimize", str(task_file), "--strategy", "ape", "-S", "mode=reverse", "-S"]
    base += ["proposals=2", "--steps", "1", "--run-dir", str(tmp_path)]
    assert cli.main([*base, "-S", "score=logprob"]) == 0
    assert cli.main(base) == 0
    capsys.readouterr()
    assert [o.top_logprobs for o in options_seen["--scorer"]] == [5, None]
    assert all(o.top_logprobs is None for o in options_seen["--optimizer"])


def _scored(values: list[tuple[float, float | None]]) -> InstructionScore:
    results = {
        str(i): Evaluation(str(i), "train", "x", score, logprob=logprob)
        for i, (score, logprob) in enumerate(values)
    }
    return InstructionScore("x", "train", results)


def test_logprob_fitness_keeps_one_scale() -> None:
    ape = Ape(score="logprob")
    sure = _scored([(1.0, -0.1)] * 4)
    one_empty_answer = _scored([(1.0, -0.1)] * 3 + [(0.0, None)])
    assert ape.fitness(sure) == pytest.approx(-0.1, abs=1e-5)
    # An answer without a log probability counts as the floor, not as accuracy.
    assert ape.fitness(one_empty_answer) < ape.fitness(sure) < 0
    # A scorer that never gives log probabilities: every candidate at the floor, ties
    # broken by accuracy.
    right, wrong = _scored([(1.0, None)] * 4), _scored([(0.0, None)] * 4)
    assert ape.fitness(right) > MIN_LOGPROB and ape.fitness(wrong) == MIN_LOGPROB
    assert ape.fitness(right) < ape.fitness(one_empty_answer)
