"""Prompt retrieval on the real embedded model: the README's commands train a retriever with
the frozen SmolLM2 as the labeller and evaluate an unseen task with it; the labelling run
resumes without a call; a chain built from the selector answers as the evaluation did. (The
README's `optimize --retriever` command runs on scripted models in test_retrieval.py.)"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest

from opro_agent import Task
from opro_agent.cli import main
from opro_agent.local_server import LocalServer
from opro_agent.optimizer import evaluate_instruction, run_sync
from opro_agent.prompts import scorer_prompt
from opro_agent.retrieval import RetrievedDemonstrations, Retriever
from opro_agent.store import RunStore
from tests.conftest import needs_llama, needs_retrieval

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration, needs_llama, needs_retrieval]


def _readme_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    block = next(b for b in blocks if b.startswith("opro-agent retriever train"))
    return [shlex.split(line)[1:] for line in block.strip().splitlines()]


def _scorer_flags(server: LocalServer) -> list[str]:
    return ["--scorer", f"openai:{server.model_name}", "--scorer-base-url", server.base_url]


def test_the_readme_retrieval_commands_on_the_embedded_model(
    embedded_server: LocalServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(REPO)  # the commands name tasks/ relative to the repository
    train, evaluate, _ = _readme_commands()
    out, runs = str(tmp_path / "my-retriever"), str(tmp_path / "runs")
    local = [*_scorer_flags(embedded_server), "--run-dir", runs, "--no-cache"]

    def run(argv: list[str], *extra: str) -> str:
        argv = [out if a == "my-retriever" else a for a in argv]
        assert main([*argv, *local, *extra]) == 0
        return capsys.readouterr().out

    printed = run(train)
    assert re.search(r"retriever: \d+ demonstrations, trained on \d+ of 12 labelled", printed)
    manifest = json.loads((Path(out) / "retriever.json").read_text())
    assert manifest["trained"] is True
    assert manifest["labels"]["by_logprob"] == 12  # llama.cpp returns logprobs
    store = RunStore.open(Path(runs))
    (label_run,) = store.list_runs()
    assert label_run.status == "done"
    assert store.usage(label_run.id)["scorer_calls"] == 12 * 4

    # Resuming the finished labelling pays for nothing and trains the same labels.
    run(train, "--resume", label_run.id)
    assert store.usage(label_run.id)["scorer_calls"] == 12 * 4
    again = json.loads((Path(out) / "retriever.json").read_text())
    assert again["encoder_fingerprint"] == manifest["encoder_fingerprint"]

    summary = json.loads(run(evaluate, "--json").strip().splitlines()[-1])
    assert summary["task"] == "pick_the_colour" and summary["failed"] == 0
    assert summary["retriever"].startswith("RetrievedDemonstrations(Retriever(trained")

    # The chain built from the selector asks the model exactly what the evaluation asked.
    task = Task.from_yaml(REPO / "tasks" / "pick_the_colour.yaml")
    selector = RetrievedDemonstrations(Retriever.load(out), task.input_fields, k=3)
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(
        model=embedded_server.model_name,
        base_url=embedded_server.base_url,
        api_key="unused",  # type: ignore[arg-type]
        temperature=0,
        max_tokens=task.answer_max_tokens,
    )
    few = dataclasses.replace(task, split=dataclasses.replace(task.split, test=5))
    scored = run_sync(evaluate_instruction(few, "", scorer=model, demonstrations=selector))
    chain = scorer_prompt("", task.instruction_position, task.input_fields, selector) | model
    examples = few.splits().test
    answers = chain.batch([dict(e.inputs) for e in examples])
    assert [a.content for a in answers] == [scored.results[e.id].prediction for e in examples]
