"""Prompt retrieval across tasks (UPRISE): train a retriever on some BIG-Bench Hard tasks,
evaluate on others it never saw, on their test splits, with the embedded model as the frozen
scorer. Four ways to fill the prompt before each test question, side by side:

    zero-shot                   no demonstrations
    random                      K demonstrations drawn from the pool (seeded per input)
    untrained nearest           the base encoder's K nearest neighbours (all-MiniLM-L6-v2)
    trained retriever           the bi-encoder trained on the scorer's labels

    python benchmarks/retrieval.py [--train-tasks a,b,...] [--eval-tasks c,d,...]
        [--seeds 0,1,2] [--k 3] [--inputs-per-task 15] [--candidates 6] [--epochs 2]
        [--train 30] [--test 40] [--data-dir DIR] [--json FILE]

The pool is the train splits of the training tasks; evaluation tasks contribute nothing to
it. The seed changes the labelled inputs and candidates, the training, and the random draw;
zero-shot and the untrained retriever do not depend on it and run once. Each row gives mean
accuracy over seeds with a 95% t-interval across seeds (where there are several), scorer
calls and wall time. Labelling asks the scorer for logprobs (llama.cpp computes them slowly:
~70 ms per generated token), so it dominates the time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from langchain_openai import ChatOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_strategies import DEFAULT_DATA, Split, write_task

from opro_agent.local_server import LocalServer, find_embedded_model
from opro_agent.optimizer import evaluate_instruction, run_sync
from opro_agent.prompts import Demonstrations
from opro_agent.retrieval import (
    LabelSettings,
    RandomDemonstrations,
    RetrievedDemonstrations,
    Retriever,
    TrainSettings,
    build_pool,
    train_retriever,
)
from opro_agent.stats import seed_spread
from opro_agent.store import RunStore
from opro_agent.task import Task

TRAIN_TASKS = ("boolean_expressions", "sports_understanding", "date_understanding", "snarks")
EVAL_TASKS = ("hyperbaton", "logical_deduction_three_objects", "navigate")
CONDITIONS = ("zero-shot", "random", "untrained nearest", "trained retriever")


@dataclass
class Cell:
    scores: list[float] = field(default_factory=list)
    calls: int = 0
    seconds: float = 0.0


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _tasks(names: list[str], folder: Path, args: argparse.Namespace) -> list[Task]:
    options = SimpleNamespace(instruction_position="Q_begin", answer_max_tokens=8)
    split = Split(args.train, 0, args.test)
    return [
        Task.from_yaml(write_task(folder, args.data_dir, name, split, options)) for name in names
    ]


def _evaluate(
    task: Task, scorer: ChatOpenAI, demonstrations: Demonstrations | None
) -> tuple[float, int, float]:
    start = time.perf_counter()
    scored = run_sync(
        evaluate_instruction(task, "", scorer=scorer, demonstrations=demonstrations, concurrency=4)
    )
    return scored.score, len(scored.results), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-tasks", type=_csv, default=list(TRAIN_TASKS))
    parser.add_argument("--eval-tasks", type=_csv, default=list(EVAL_TASKS))
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in _csv(t)], default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--inputs-per-task", type=int, default=15)
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train", type=int, default=30, help="train split per task")
    parser.add_argument("--test", type=int, default=40, help="test split per task")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    overlap = set(args.train_tasks) & set(args.eval_tasks)
    if overlap:
        raise SystemExit(f"a task is both trained on and evaluated: {sorted(overlap)}")

    cells = {(t, c): Cell() for t in args.eval_tasks for c in CONDITIONS}
    labelling: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalServer(find_embedded_model(), Path(tmp) / "server.log", n_ctx=4096) as server,
    ):
        folder = Path(tmp)
        train_tasks = _tasks(args.train_tasks, folder, args)
        eval_tasks = _tasks(args.eval_tasks, folder, args)
        pool = build_pool(train_tasks)

        def model(**extra: Any) -> ChatOpenAI:
            return ChatOpenAI(
                model=server.model_name,
                base_url=server.base_url,
                api_key="unused",  # type: ignore[arg-type]
                temperature=0,
                max_tokens=8,
                **extra,
            )

        scorer = model()
        labeller = model(logprobs=True, top_logprobs=5)

        def record(condition: str, make: Any, note: str = "") -> None:
            """Evaluate every eval task with the demonstrations `make(task)` gives."""
            for task in eval_tasks:
                score, calls, seconds = _evaluate(task, scorer, make(task))
                cell = cells[task.name, condition]
                cell.scores.append(score)
                cell.calls += calls
                cell.seconds += seconds
                print(f"  {condition:18} {task.name:32} {score:.3f}{note}", flush=True)

        record("zero-shot", lambda task: None)
        untrained = Retriever.untrained(pool)
        record(
            "untrained nearest",
            lambda task: RetrievedDemonstrations(untrained, task.input_fields, args.k),
        )
        for seed in args.seeds:
            record(
                "random",
                lambda task, seed=seed: RandomDemonstrations(
                    pool, task.input_fields, args.k, seed=seed
                ),
                f" (seed {seed})",
            )
            start = time.perf_counter()
            store = RunStore(":memory:")
            retriever = train_retriever(
                train_tasks,
                labeller,
                labels=LabelSettings(args.inputs_per_task, args.candidates, seed),
                training=TrainSettings(epochs=args.epochs, seed=seed),
                store=store,
                concurrency=4,
            )
            (run_info,) = store.list_runs()
            labelling.append(
                {
                    "seed": seed,
                    "seconds": round(time.perf_counter() - start, 1),
                    "calls": store.usage(run_info.id)["scorer_calls"],
                    **retriever.info["labels"],
                }
            )
            print(f"  labelled and trained (seed {seed}): {labelling[-1]}", flush=True)
            record(
                "trained retriever",
                lambda task, r=retriever: RetrievedDemonstrations(r, task.input_fields, args.k),
                f" (seed {seed})",
            )

    print()
    print(
        f"Pool: train splits ({args.train} each) of {', '.join(args.train_tasks)} "
        f"({args.train * len(args.train_tasks)} demonstrations). Evaluated on the test splits "
        f"({args.test} each) of {', '.join(args.eval_tasks)}; k = {args.k}; no instruction; "
        f"SmolLM2-135M (llama.cpp) as the frozen scorer; seeds {args.seeds}."
    )
    print(f"| task | {' | '.join(CONDITIONS)} |")
    print("|---|" + "---|" * len(CONDITIONS))
    figures: dict[str, Any] = {"labelling": labelling, "cells": {}}
    for task_name in args.eval_tasks:
        row = []
        for condition in CONDITIONS:
            cell = cells[task_name, condition]
            spread = seed_spread(cell.scores)
            interval = f" [{spread.low:.3f}, {spread.high:.3f}]" if len(cell.scores) > 1 else ""
            row.append(f"{spread.mean:.3f}{interval} ({cell.calls} calls, {cell.seconds:.0f} s)")
            figures["cells"][f"{task_name}/{condition}"] = {
                "scores": cell.scores,
                "calls": cell.calls,
                "seconds": round(cell.seconds, 1),
            }
        print(f"| {task_name} | {' | '.join(row)} |")
    for entry in labelling:
        print(
            f"labelling, seed {entry['seed']}: {entry['labelled']} inputs, "
            f"{entry['informative']} informative ({entry['by_logprob']} by logprob), "
            f"{entry['calls']} calls; label + train {entry['seconds']} s"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
