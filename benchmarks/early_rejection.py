"""Early rejection (racing) against OPRO's policy of scoring every candidate on the whole
train split: scorer calls and final test accuracy, on the embedded model and a BIG-Bench Hard
task from ../shared/data, side by side in one run.

    python benchmarks/early_rejection.py [--task sports_understanding] [--steps 3] [--seeds 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from langchain_core.language_models import BaseChatModel

from opro_agent import Opro, OproOptimizer, RunStore, SearchSettings, SplitSpec, Task
from opro_agent.local_server import LocalServer, find_embedded_model
from opro_agent.providers import ModelOptions, openai_chat_model

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OPRO_SHARED_DATA", REPO.parent / "shared" / "data"))
BOOLEAN_TASKS = {"sports_understanding", "navigate", "boolean_expressions"}


def chat(server: LocalServer, temperature: float, max_tokens: int) -> BaseChatModel:
    return openai_chat_model(
        server.model_name, ModelOptions(temperature, max_tokens), base_url=server.base_url
    )


def load_task(name: str, train: int, validation: int, test: int) -> Task:
    import json

    records = json.loads((SHARED / "bbh" / f"{name}.json").read_text())["examples"]
    return Task.from_records(
        name,
        records,
        metric="boolean" if name in BOOLEAN_TASKS else "multiple_choice",
        instruction_position="system",
        split=SplitSpec(train=train, validation=validation, test=test, seed=0),
        answer_max_tokens=8,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="sports_understanding")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--train", type=int, default=20)
    parser.add_argument("--validation", type=int, default=20)
    parser.add_argument("--test", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=1, help="search seeds per policy")
    args = parser.parse_args()
    task = load_task(args.task, args.train, args.validation, args.test)
    rows = []
    with LocalServer(find_embedded_model(), Path("/tmp/opro-bench-llama.log"), n_ctx=4096) as s:
        for seed in range(args.seeds):
            # Interleave the policies so machine noise hits both alike.
            for racing in (True, False):
                strategy = Opro(candidates_per_step=args.candidates, early_rejection=racing)
                store = RunStore(":memory:")
                started = time.perf_counter()
                result = OproOptimizer(
                    chat(s, 1.0, 60),
                    chat(s, 0.0, task.answer_max_tokens),
                    strategy=strategy,
                    settings=SearchSettings(steps=args.steps, seed=seed, concurrency=4),
                    store=store,
                    seed_optimizer_calls=True,
                ).invoke(task)
                wall = time.perf_counter() - started
                search_calls = sum(
                    1 for _, ev in store.iter_evaluations(result.run_id) if ev.split == "train"
                )
                rows.append(
                    {
                        "policy": "racing" if racing else "full (OPRO)",
                        "seed": seed,
                        "train_calls": search_calls,
                        "scorer_calls": result.calls["scorer"],
                        "saved": result.saved_by_early_rejection,
                        "test": result.scores["test"],
                        "baseline": max(result.baselines.values()),
                        "wall": wall,
                        "best": result.best_instruction,
                    }
                )
                print(rows[-1], file=sys.stderr, flush=True)

    print(
        f"\nTask {args.task}: train {args.train}, validation {args.validation}, "
        f"test {args.test}; {args.steps} steps x {args.candidates} candidates; "
        f"embedded SmolLM2-135M in both roles; {os.cpu_count()} cores"
    )
    header = f"{'policy':<12} {'seed':>4} {'train calls':>11} {'all scorer':>10} {'test':>6} "
    print(header + f"{'baseline':>8} {'wall s':>7}  best instruction")
    for r in rows:
        print(
            f"{r['policy']:<12} {r['seed']:>4} {r['train_calls']:>11} {r['scorer_calls']:>10} "
            f"{r['test']:>6.3f} {r['baseline']:>8.3f} {r['wall']:>7.1f}  {r['best'][:60]!r}"
        )
    for policy in ("racing", "full (OPRO)"):
        mine = [r for r in rows if r["policy"] == policy]
        print(
            f"{policy:<12} mean train calls {statistics.mean(r['train_calls'] for r in mine):.0f}, "
            f"mean test {statistics.mean(r['test'] for r in mine):.3f}"
        )
    racing = statistics.mean(r["train_calls"] for r in rows if r["policy"] == "racing")
    full = statistics.mean(r["train_calls"] for r in rows if r["policy"] != "racing")
    print(f"search calls, full / racing: {full / racing:.2f}x (target: 3x at equal accuracy)")


if __name__ == "__main__":
    main()
