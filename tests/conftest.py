"""Shared fixtures: a yes/no task and scripted optimizer/scorer models whose behaviour
depends on the instruction, so the loop has something real to find."""

from __future__ import annotations

import importlib.util
import json
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage

from opro_agent import Opro, RetryPolicy, SearchSettings, SplitSpec, Task
from opro_agent.local_server import LocalServer, find_embedded_model
from opro_agent.providers import ModelOptions, Models, ModelSpec
from tests.fakes import ScriptedChatModel

FACTS = [(f"Is {n} an even number?", "yes" if n % 2 == 0 else "no") for n in range(60)]
TRUTH = dict(FACTS)

# The conftest task as a YAML file (with FACTS written beside it by `task_file`).
TASK_YAML = """\
name: even_numbers
description: Say whether a number is even.
data:
  path: facts.jsonl
metric: boolean
instruction_position: Q_begin
split: {train: 20, validation: 10, test: 30, seed: 1}
"""

# What the fake optimizer proposes, by step; index = candidate number in the step.
OPTIMIZER_SCRIPT: dict[int, list[str]] = {
    1: [
        "<INS>Think about it.</INS>",
        "I am not sure what to write.",  # unparseable
        "<INS>think about it</INS>",  # duplicate of the first (case, punctuation)
        "<INS>" + "very long " * 60 + "</INS>",  # over 500 characters
    ],
    2: [
        "**<INS>Answer with yes or no.</INS>**",
        "<INS>Think about it carefully.</INS>",
        "<INS></INS>",  # empty
        "<INS>Be brief",  # missing closing tag
    ],
}


def optimizer_reply(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
    step, idx = metadata["opro_step"], metadata["opro_candidate"]
    script = OPTIMIZER_SCRIPT.get(step)
    if script is None:
        return f"<INS>Reply yes or no, variant {step}.{idx}.</INS>"
    return script[idx % len(script)]


def scorer_reply(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
    """Right when told the format; half right when told to think; otherwise rambles."""
    prompt = "\n".join(m.text for m in messages)
    question = next(q for q in TRUTH if q in prompt)
    truth = TRUTH[question]
    lowered = prompt.lower()
    if "yes or no" in lowered:
        return truth.capitalize() + "."
    if "think" in lowered:
        return truth if zlib.crc32(question.encode()) % 2 else "Hmm, it depends."
    return "That is an interesting question."


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The CLI caches responses under XDG_CACHE_HOME: keep each test's cache to itself.

    (Its own MonkeyPatch, so tests' `monkeypatch` fixtures are undone before it.)"""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


def even_numbers_task() -> Task:
    """The yes/no task of most tests (also for processes that have no fixtures)."""
    return Task.from_records(
        "even_numbers",
        [{"input": q, "target": a} for q, a in FACTS],
        metric="boolean",
        instruction_position="Q_begin",
        split=SplitSpec(train=20, validation=10, test=30, seed=1),
    )


@pytest.fixture
def yes_no_task() -> Task:
    return even_numbers_task()


@pytest.fixture
def optimizer_model() -> ScriptedChatModel:
    return ScriptedChatModel(respond=optimizer_reply, name_for_usage="fake-optimizer")


@pytest.fixture
def scorer_model() -> ScriptedChatModel:
    return ScriptedChatModel(respond=scorer_reply, name_for_usage="fake-scorer")


FAST_OPRO = Opro(candidates_per_step=4)
FAST_RETRY = RetryPolicy(attempts=2, initial_wait=0.001, max_wait=0.002)


def split_settings(**values: Any) -> tuple[SearchSettings, Opro]:
    """Search settings and OPRO's settings from one set of values (OPRO: 4 candidates)."""
    values = {"steps": 3, "concurrency": 4, "retry": FAST_RETRY, "candidates_per_step": 4, **values}
    search = {k: v for k, v in values.items() if k in SearchSettings.__dataclass_fields__}
    strategy = {k: v for k, v in values.items() if k not in search}
    return SearchSettings(**search), Opro(**strategy)


@pytest.fixture
def fast_settings() -> SearchSettings:
    return split_settings()[0]


needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama_cpp is not installed (pip install -e '.[local]')",
)

needs_retrieval = pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None,
    reason="the retrieval extra is not installed (pip install -e '.[retrieval]')",
)


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """The real llama.cpp server with the embedded SmolLM2, started once per test session."""
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    with LocalServer(find_embedded_model(), log_path, n_ctx=4096) as server:
        yield server


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    (tmp_path / "facts.jsonl").write_text(
        "".join(json.dumps({"input": q, "target": a}) + "\n" for q, a in FACTS)
    )
    path = tmp_path / "even.yaml"
    path.write_text(TASK_YAML)
    return path


@pytest.fixture
def fake_models(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[ScriptedChatModel]]:
    built: dict[str, list[ScriptedChatModel]] = {"--optimizer": [], "--scorer": []}
    replies = {"--optimizer": optimizer_reply, "--scorer": scorer_reply}

    def chat_model(self: Models, spec: ModelSpec, options: ModelOptions, *, flag: str) -> Any:
        model = ScriptedChatModel(respond=replies[flag], name_for_usage=str(spec))
        built[flag].append(model)
        return model

    monkeypatch.setattr(Models, "chat_model", chat_model)
    return built
