"""Prompt retrieval (UPRISE), hermetic: the pool, labels from a scripted scorer, prompt
assembly, the example selector against the evaluated prompt, and the CLI's input checks."""

from __future__ import annotations

import asyncio
import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from opro_agent import OproOptimizer, SearchSettings, SplitSpec, Task
from opro_agent.budget import Budget
from opro_agent.cli import main
from opro_agent.errors import ConfigError, RunStoreError
from opro_agent.optimizer import evaluate_instruction
from opro_agent.prompts import Demonstration, scorer_prompt
from opro_agent.providers import ModelOptions, Models, ModelSpec
from opro_agent.retrieval import (
    LabelSettings,
    PromptPool,
    RandomDemonstrations,
    RetrievedDemonstrations,
    Retriever,
    build_pool,
    label_run,
)
from opro_agent.retrieval.training import _label
from opro_agent.settings import RunResources
from opro_agent.store import RunStore
from tests.conftest import FAST_OPRO, even_numbers_task, needs_retrieval
from tests.fakes import ScriptedChatModel

COLOURS = [(f"What colour is a {thing}?", colour) for thing, colour in [
    ("banana", "yellow"), ("leaf", "green"), ("sky", "blue"), ("cherry", "red"),
    ("lemon", "yellow"), ("frog", "green"), ("sea", "blue"), ("tomato", "red"),
    ("sun", "yellow"), ("lime", "green"), ("jeans", "blue"), ("strawberry", "red"),
]]  # fmt: skip


def colours_task() -> Task:
    return Task.from_records(
        "colours",
        [{"input": q, "target": a} for q, a in COLOURS],
        metric="exact_match",
        split=SplitSpec(train=6, validation=3, test=3, seed=2),
    )


class LetterEncoder:
    """A stand-in sentence encoder: letter counts, so similar words are near each other.
    Each text it encodes is recorded, to show what each tower reads."""

    def __init__(self) -> None:
        self.queries: list[str] = []
        self.documents: list[str] = []

    @staticmethod
    def _vectors(texts: Sequence[str]) -> np.ndarray:
        return np.array(
            [[t.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz"] for t in texts],
            dtype=np.float32,
        )

    def encode_query(self, texts: Sequence[str], **_: Any) -> np.ndarray:
        self.queries.extend(texts)
        return self._vectors(texts)

    def encode_document(self, texts: Sequence[str], **_: Any) -> np.ndarray:
        self.documents.extend(texts)
        return self._vectors(texts)


def fake_retriever(pool: PromptPool) -> Retriever:
    return Retriever(LetterEncoder(), pool, trained=False)  # type: ignore[arg-type]


# -- the pool -----------------------------------------------------------------------------


def test_the_pool_holds_train_examples_only_rendered_as_the_task_renders_them() -> None:
    tasks = [even_numbers_task(), colours_task()]
    pool = build_pool(tasks)
    for task in tasks:
        splits = task.splits()
        ids = {d.id for d in pool if d.id.startswith(task.name + ":")}
        assert ids == {f"{task.name}:{e.id}" for e in splits.train}
        held_out = {f"{task.name}:{e.id}" for e in splits.validation + splits.test}
        assert not ids & held_out
        for example in splits.train:
            demo = next(d for d in pool if d.id == f"{task.name}:{example.id}")
            assert (demo.question, demo.answer) == (task.question(example), example.target)
    assert len(pool) == 20 + 6


def test_two_tasks_with_one_name_are_refused() -> None:
    with pytest.raises(ConfigError, match="two tasks are named 'colours'"):
        build_pool([colours_task(), colours_task()])


def test_a_pool_survives_save_and_load(tmp_path: Path) -> None:
    pool = build_pool([colours_task()])
    pool.save(tmp_path / "pool.jsonl")
    assert PromptPool.load(tmp_path / "pool.jsonl") == pool
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl: cannot read the prompt pool"):
        PromptPool.load(tmp_path / "bad.jsonl")


# -- prompt assembly ----------------------------------------------------------------------


def _demo(n: int) -> Demonstration:
    return Demonstration(f"t:{n}", f"question {n}", f"answer {n}")


def test_demonstrations_come_before_the_question_and_after_a_system_instruction() -> None:
    shots = [_demo(2), _demo(1)]  # p_2 p_1: the most similar (p_1) last
    messages = scorer_prompt("Be brief.", "system", ["input"], shots).format_messages(input="x?")
    assert [type(m) for m in messages] == [
        SystemMessage, HumanMessage, AIMessage, HumanMessage, AIMessage, HumanMessage
    ]  # fmt: skip
    assert [m.content for m in messages] == [
        "Be brief.",
        "Q: question 2\n\nA:",
        "answer 2",
        "Q: question 1\n\nA:",
        "answer 1",
        "Q: x?\n\nA:",
    ]
    q_begin = scorer_prompt("Be brief.", "Q_begin", ["input"], shots).format_messages(input="x?")
    assert [m.content for m in q_begin][-1] == "Q: Be brief.\nx?\n\nA:"
    assert [m.content for m in q_begin][:4] == [m.content for m in messages][1:5]


def test_demonstration_text_is_not_read_as_template_variables() -> None:
    shots = [Demonstration("t:1", "what is {x}?", "{y}")]
    messages = scorer_prompt("", "Q_begin", ["input"], shots).format_messages(input="q")
    assert [m.content for m in messages] == ["Q: what is {x}?\n\nA:", "{y}", "Q: q\n\nA:"]


def test_the_retriever_selector_orders_p_k_to_p_1_most_similar_last() -> None:
    pool = PromptPool(
        (
            Demonstration("a", "zzzz", "1"),
            Demonstration("b", "banana", "2"),
            Demonstration("c", "bananas", "3"),
            Demonstration("d", "qqqq", "4"),
        )
    )
    retriever = fake_retriever(pool)
    assert [d.id for d in retriever.top_k("banana", 2)] == ["b", "c"]
    selector = RetrievedDemonstrations(retriever, ["input"], k=2)
    assert selector.select_examples({"input": "banana"}) == [
        {"question": "bananas", "answer": "3"},
        {"question": "banana", "answer": "2"},
    ]
    # The prompt tower reads a demonstration with its answer; the input tower the question.
    encoder = retriever.encoder
    assert encoder.documents[:4] == [d.text for d in pool]  # type: ignore[attr-defined]
    assert encoder.queries == ["banana"]  # type: ignore[attr-defined]
    selector.select_examples({"input": "banana"})
    assert encoder.queries == ["banana"]  # type: ignore[attr-defined]  # encoded once


def test_k_outside_the_pool_is_refused() -> None:
    retriever = fake_retriever(build_pool([colours_task()]))
    with pytest.raises(ConfigError, match="k must be between 1 and the pool size \\(6\\)"):
        RetrievedDemonstrations(retriever, ["input"], k=7)


def test_random_demonstrations_are_the_same_for_the_same_input() -> None:
    pool = build_pool([even_numbers_task()])
    selector = RandomDemonstrations(pool, ["input"], k=3, seed=1)
    first = selector.select_examples({"input": "Is 3 an even number?"})
    assert selector.select_examples({"input": "Is 3 an even number?"}) == first
    assert len({e["question"] for e in first}) == 3
    other = [selector.select_examples({"input": f"q{n}"}) for n in range(5)]
    assert any(o != first for o in other)


def test_added_examples_are_retrievable() -> None:
    retriever = fake_retriever(PromptPool((Demonstration("a", "zzzz", "1"),)))
    selector = RetrievedDemonstrations(retriever, ["input"], k=1)
    selector.add_example({"question": "kiwi", "answer": "green"})
    assert selector.select_examples({"input": "kiwi"}) == [{"question": "kiwi", "answer": "green"}]
    with pytest.raises(ConfigError, match="needs a 'answer' key"):
        selector.add_example({"question": "x"})


# -- the evaluated prompt is the prompt a chain gets ---------------------------------------


def _colour_reply(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
    # Answers right only when a demonstration with the same colour word is shown.
    question = messages[-1].text
    thing = question.split("a ")[1].split("?")[0]
    colour = dict(COLOURS)[f"What colour is a {thing}?"]
    shown = " ".join(m.text for m in messages[:-1])
    return colour if colour in shown else "I do not know."


def test_the_example_selector_reproduces_the_evaluated_prompt() -> None:
    task = colours_task()
    selector = RetrievedDemonstrations(fake_retriever(build_pool([task])), task.input_fields, 2)
    model = ScriptedChatModel(respond=_colour_reply)
    scored = asyncio.run(
        evaluate_instruction(task, "Name the colour.", scorer=model, demonstrations=selector)
    )
    evaluated = {c["prompt"]: c["reply"] for c in model.calls}
    assert len(evaluated) == len(task.splits().test) == len(scored.results)
    chain = scorer_prompt(
        "Name the colour.", task.instruction_position, task.input_fields, selector
    )
    again = ScriptedChatModel(respond=_colour_reply)
    for example in task.splits().test:
        reply = (chain | again).invoke(dict(example.inputs))
        assert reply.content == scored.results[example.id].prediction
    assert {c["prompt"] for c in again.calls} == set(evaluated)


def test_a_run_with_retrieved_demonstrations_scores_with_them_and_hands_them_back(
    optimizer_model: ScriptedChatModel,
) -> None:
    task = colours_task()
    selector = RetrievedDemonstrations(fake_retriever(build_pool([task])), task.input_fields, 3)
    scorer = ScriptedChatModel(respond=_colour_reply)
    store = RunStore(":memory:")
    optimizer = OproOptimizer(
        optimizer_model,
        scorer,
        strategy=FAST_OPRO,
        settings=SearchSettings(steps=1, concurrency=2),
        store=store,
        demonstrations=selector,
    )
    result = optimizer.invoke(task)
    assert all("Q: " in c["prompt"].split("\n")[0] for c in scorer.calls)
    assert all(
        c["prompt"].count("\nQ: ") + c["prompt"].startswith("Q: ") >= 4 for c in scorer.calls
    )
    messages = result.to_prompt_template(selector).format_messages(**task.splits().test[0].inputs)
    assert len(messages) == 3 * 2 + 1
    # The stored run names its demonstrations, and refuses to resume with others.
    (run,) = store.list_runs()
    assert run.config["demonstrations"] == repr(selector)
    other = OproOptimizer(optimizer_model, scorer, strategy=FAST_OPRO, store=store,
                          settings=SearchSettings(steps=1, concurrency=2))  # fmt: skip
    with pytest.raises(RunStoreError, match="different demonstrations"):
        other.invoke(task, run_id=run.id)


def test_demonstrations_need_a_chat_model_scorer() -> None:
    task = colours_task()
    selector = RandomDemonstrations(build_pool([task]), task.input_fields, 1)
    chain = ScriptedChatModel(respond=_colour_reply)
    with pytest.raises(ConfigError, match="demonstrations need a chat model"):
        asyncio.run(evaluate_instruction(task, "", target=chain, demonstrations=selector))


# -- labels ---------------------------------------------------------------------------------


def _helpful_reply(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
    # Answers right after a demonstration answered 'yes', wrong after any other.
    question = messages[-1].text
    shown = messages[-2].text if len(messages) > 1 else ""
    truth = "yes" if "even" in question and int(question.split()[2]) % 2 == 0 else "no"
    return truth if shown == "yes" else ("no" if truth == "yes" else "yes")


def _labels(model: ScriptedChatModel, store: RunStore, run_id: str, settings: LabelSettings) -> Any:
    tasks = [even_numbers_task()]
    return asyncio.run(
        _label(
            tasks,
            build_pool(tasks),
            model,
            store,
            run_id,
            settings,
            RunResources(),
            Budget(),
            4,
            None,
        )
    )


def test_labels_rank_the_demonstrations_that_helped_the_scorer_first() -> None:
    model = ScriptedChatModel(respond=_helpful_reply)
    store = RunStore(":memory:")
    settings = LabelSettings(inputs_per_task=5, candidates=4, seed=3)
    run_id = label_run(store, [even_numbers_task()], settings)
    labelled = _labels(model, store, run_id, settings)
    assert len(labelled) == 5 and len(model.calls) == 5 * 4
    train_ids = {f"even_numbers:{e.id}" for e in even_numbers_task().splits().train}
    for row in labelled:
        assert row.by == "accuracy"  # the fake returns no logprobs
        assert row.example_id in train_ids
        assert len(row.candidates) == 4
        assert all(c.demonstration.id != row.example_id for c in row.candidates)
        assert all(c.demonstration.id in train_ids for c in row.candidates)
        values = [c.score for c in row.candidates]
        assert values == sorted(values, reverse=True)
        for c in row.candidates:
            assert c.score == (1.0 if c.demonstration.answer == "yes" else 0.0)
        assert row.informative == (values[0] > values[-1])
    # Every answer is stored as it lands: labelling again costs nothing.
    again = _labels(model, store, run_id, settings)
    assert len(model.calls) == 20 and again == labelled


def test_labels_use_log_probabilities_where_the_scorer_returns_them() -> None:
    class WithLogprobs(ScriptedChatModel):
        def _reply(self, messages: list[BaseMessage], run_manager: Any) -> Any:
            result = super()._reply(messages, run_manager)
            text = result.generations[0].message.content
            confident = -0.1 if messages[-2].text == "yes" else -2.0
            result.generations[0].message.response_metadata["logprobs"] = {
                "content": [{"token": text, "logprob": confident, "top_logprobs": [
                    {"token": text, "logprob": confident},
                    {"token": "no" if text == "yes" else "yes", "logprob": -3.0},
                ]}]
            }  # fmt: skip
            return result

    model = WithLogprobs(respond=_helpful_reply)
    store = RunStore(":memory:")
    settings = LabelSettings(inputs_per_task=3, candidates=3)
    labelled = _labels(model, store, label_run(store, [even_numbers_task()], settings), settings)
    assert {row.by for row in labelled} == {"logprob"}
    for row in labelled:
        logprobs = [c.logprob for c in row.candidates]
        assert logprobs == sorted(logprobs, reverse=True)  # type: ignore[type-var]


def test_a_labelling_run_resumes_only_the_same_labelling() -> None:
    store = RunStore(":memory:")
    tasks = [even_numbers_task()]
    run_id = label_run(store, tasks, LabelSettings(candidates=4))
    assert label_run(store, tasks, LabelSettings(candidates=4), run_id) == run_id
    with pytest.raises(RunStoreError, match="other tasks, data or label settings"):
        label_run(store, tasks, LabelSettings(candidates=5), run_id)


def test_label_inputs_draw_the_same_inputs_and_candidates_for_a_seed() -> None:
    task = even_numbers_task()

    def draw(seed: int) -> list[tuple[str, tuple[str, ...]]]:
        model = ScriptedChatModel(respond=_helpful_reply)
        store = RunStore(":memory:")
        run_id = label_run(store, [task], LabelSettings(3, 2, seed))
        labelled = _labels(model, store, run_id, LabelSettings(3, 2, seed))
        return [(r.example_id, tuple(sorted(c.demonstration.id for c in r.candidates)))
                for r in labelled]  # fmt: skip

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)


# -- a real encoder (the retrieval extra), saved and loaded -----------------------------------


@needs_retrieval
def test_the_untrained_retriever_saves_and_loads_with_the_same_rankings(tmp_path: Path) -> None:
    pool = build_pool([colours_task(), even_numbers_task()])
    retriever = Retriever.untrained(pool)
    retriever.save(tmp_path / "r")
    assert not (tmp_path / "r" / "encoder").exists()  # the packaged base encoder is not copied
    loaded = Retriever.load(tmp_path / "r")
    question = "What colour is a grape?"
    assert [d.id for d in loaded.top_k(question, 4)] == [d.id for d in retriever.top_k(question, 4)]
    assert all(d.id.startswith("colours:") for d in loaded.top_k(question, 4))
    assert repr(loaded) == repr(retriever)


def test_a_folder_that_is_not_a_retriever_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a saved retriever"):
        Retriever.load(tmp_path)


# -- the CLI --------------------------------------------------------------------------------


def test_cli_refuses_bad_retriever_input_in_one_line(
    task_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    cases = [
        (["retriever", "train", "--tasks", str(task_file), "--out", str(tmp_path / "stuff")],
         "--out: "),
        (["evaluate", str(task_file), "--instruction", "", "--retriever", str(tmp_path)],
         "--retriever: "),
        (["retriever", "train", "--tasks", str(tmp_path / "missing.yaml"), "--out",
          str(tmp_path / "r")], "missing.yaml"),
    ]  # fmt: skip
    for argv, named in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(task_file), "--instruction", "", "--k", "0"])
    assert exit_info.value.code == 2
    assert "--k" in capsys.readouterr().err


@needs_retrieval
def test_cli_untrained_retriever_then_evaluate_with_it(
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "retriever"
    argv = ["retriever", "train", "--tasks", str(task_file), "--out", str(out), "--epochs", "0"]
    assert main(argv) == 0
    assert "20 demonstrations, untrained" in capsys.readouterr().out
    assert json.loads((out / "retriever.json").read_text())["trained"] is False
    assert main(argv) == 0  # a saved retriever may be replaced
    capsys.readouterr()
    evaluate = ["evaluate", str(task_file), "--instruction", "Reply yes or no.", "--json"]
    assert main([*evaluate, "--retriever", str(out), "--k", "2", "--run-dir", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["retriever"].startswith("RetrievedDemonstrations(Retriever(untrained, 20")
    (scorer,) = fake_models["--scorer"]
    assert len(scorer.calls) == 30
    assert all(c["prompt"].count("Q: ") == 3 for c in scorer.calls)  # 2 shots and the question


@needs_retrieval
def test_the_readme_optimize_with_a_retriever_command_runs(
    task_file: Path,
    tmp_path: Path,
    fake_models: dict[str, list[ScriptedChatModel]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The README's `optimize --retriever` command as printed, on scripted models and the
    conftest task (the embedded model trains and evaluates in test_retrieval_e2e.py)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(
        line for line in readme.splitlines() if line.startswith("opro-agent optimize tasks/pick")
    )
    argv = shlex.split(line)[1:]
    out = tmp_path / "my-retriever"
    assert main(["retriever", "train", "--tasks", str(task_file), "--out", str(out),
                 "--epochs", "0"]) == 0  # fmt: skip
    argv = [str(task_file) if a.endswith(".yaml") else str(out) if a == "my-retriever" else a
            for a in argv]  # fmt: skip
    assert main([*argv, "--run-dir", str(tmp_path / "runs"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["scores"]["test"] is not None
    run = RunStore.open(tmp_path / "runs").get_run(result["run_id"])
    assert run.config["demonstrations"].startswith("RetrievedDemonstrations(Retriever(untrained")
    assert run.config["cli"]["retriever"] == str(out.resolve())
    (scorer,) = fake_models["--scorer"]
    assert all(c["prompt"].count("Q: ") == 4 for c in scorer.calls)  # k=3 and the question


@needs_retrieval
def test_cli_labelling_stopped_by_the_budget_resumes_where_it_stopped(
    task_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[ScriptedChatModel] = []

    def chat_model(self: Models, spec: ModelSpec, options: ModelOptions, *, flag: str) -> Any:
        built.append(ScriptedChatModel(respond=_helpful_reply))
        return built[-1]

    monkeypatch.setattr(Models, "chat_model", chat_model)
    out, runs = tmp_path / "r", tmp_path / "runs"
    argv = ["retriever", "train", "--tasks", str(task_file), "--out", str(out),
            "--inputs-per-task", "4", "--candidates", "3", "--epochs", "1",
            "--label-by", "accuracy", "--run-dir", str(runs),
            # One at a time: calls in flight when the budget stops a batch are not stored.
            "--concurrency", "1"]  # fmt: skip
    assert main([*argv, "--max-calls", "5"]) == 1
    err = capsys.readouterr().err
    (run,) = RunStore.open(runs).list_runs()
    assert f"--resume {run.id}" in err and "Traceback" not in err
    assert not out.exists()
    assert main([*argv, "--resume", run.id]) == 0
    calls = sum(len(m.calls) for m in built)
    assert calls == 4 * 3  # none paid twice
    assert RunStore.open(runs).get_run(run.id).status == "done"
    assert json.loads((out / "retriever.json").read_text())["labels"]["run_id"] == run.id
    capsys.readouterr()
    assert main(["optimize", "--resume", run.id, "--run-dir", str(runs)]) == 2
    assert "labels a retriever: continue it with opro-agent retriever train" in (
        capsys.readouterr().err
    )
