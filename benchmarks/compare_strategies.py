"""Search strategies side by side: `opro-agent compare --strategies opro,ape` on BIG-Bench
Hard tasks from ../shared/data, on the embedded model in both roles, the same splits, seeds
and call budget for every strategy; one combined table.

    python benchmarks/compare_strategies.py [--tasks sports_understanding,navigate,...]
        [--seeds 0,1,2] [--max-calls 420] [--steps 10] [--run-dir DIR] [--data-dir DIR]

Task YAMLs are written to a temporary folder (their data path points at the shared JSON, so
nothing is copied). Each task is one `opro-agent compare ... --json` subprocess; the script
reads its JSON line, then each run's summary (`opro-agent runs show RUN --json`) for the
per-seed scores, the starting instruction's test score and the stop reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_TASKS = ("sports_understanding", "navigate", "boolean_expressions")
STRATEGIES = ("opro", "ape")
# The answer type of each BIG-Bench Hard task here (see ../shared/data/NOTICE.md).
METRICS = {
    "boolean_expressions": "boolean",  # True / False
    "navigate": "boolean",  # Yes / No
    "sports_understanding": "boolean",  # yes / no
    "object_counting": "numeric",
    "date_understanding": "multiple_choice",
    "hyperbaton": "multiple_choice",
    "logical_deduction_three_objects": "multiple_choice",
    "snarks": "multiple_choice",
    "tracking_shuffled_objects_three_objects": "multiple_choice",
    "word_sorting": "exact_match",
}
DESCRIPTIONS = {
    "boolean_expressions": "Evaluate a Boolean expression; answer True or False.",
    "navigate": "Decide whether following the instructions returns to the starting point.",
    "sports_understanding": "Decide whether a sentence about sport is plausible.",
}


def _opro_agent() -> str:
    """The `opro-agent` beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "opro-agent"
    return str(beside) if beside.exists() else "opro-agent"


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@dataclass(frozen=True)
class Split:
    train: int
    validation: int
    test: int


def write_task(
    folder: Path, data_dir: Path, name: str, split: Split, args: argparse.Namespace
) -> Path:
    """A task YAML for one BBH task; JSON is valid YAML, so the file is written as JSON."""
    data = data_dir / "bbh" / f"{name}.json"
    if not data.is_file():
        raise SystemExit(f"no data for {name}: {data} (use --data-dir)")
    spec = {
        "name": name,
        "description": DESCRIPTIONS.get(name, f"BIG-Bench Hard: {name}."),
        "data": {"path": str(data), "records": "examples", "input": "input", "target": "target"},
        "metric": METRICS[name],
        "instruction_position": args.instruction_position,
        "split": {
            "train": split.train,
            "validation": split.validation,
            "test": split.test,
            "seed": 0,
        },
        "answer_max_tokens": args.answer_max_tokens,
    }
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path


def last_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    raise ValueError("no JSON line in the output")


def run_summary(run_id: str, run_dir: Path) -> dict[str, Any]:
    """A run's stored summary (scores, baselines, calls, stop reason) and its history."""
    out = subprocess.run(
        [_opro_agent(), "runs", "show", run_id, "--run-dir", str(run_dir), "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return last_json(out)


def _ci(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    if cell["n"] == 1 or cell["low"] == cell["high"]:
        return f"{cell['mean']:.3f}"
    return f"{cell['mean']:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]"


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=_csv, default=list(DEFAULT_TASKS))
    parser.add_argument("--strategies", type=_csv, default=list(STRATEGIES))
    parser.add_argument("--seeds", default="0,1,2", help="search seeds, e.g. 0,1,2")
    parser.add_argument("--max-calls", type=int, default=420, help="budget per run")
    parser.add_argument(
        "--steps", type=int, default=10, help="step cap (set high: the budget should bind)"
    )
    parser.add_argument("--run-dir", type=Path, help="run store (default: a temporary folder)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="holds bbh/*.json")
    parser.add_argument("--train", type=int, default=15)
    parser.add_argument("--validation", type=int, default=15)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--answer-max-tokens", type=int, default=8)
    parser.add_argument(
        "--instruction-position", default="system", choices=["system", "Q_begin", "Q_end"]
    )
    parser.add_argument(
        "--cache",
        action="store_true",
        help="use the response cache (off by default: a cached answer is not charged to the "
        "budget, so the strategy run second would get more search for the same budget)",
    )
    parser.add_argument(
        "-S",
        "--strategy-setting",
        action="append",
        default=[],
        metavar="STRATEGY.KEY=VALUE",
        help="passed to compare, e.g. -S protegi.beam=2",
    )
    parser.add_argument(
        "--no-guard",
        action="store_true",
        help="pass --no-guard: the best finalist wins even if an initial instruction does better",
    )
    args = parser.parse_args()
    unknown = [t for t in args.tasks if t not in METRICS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    split = Split(args.train, args.validation, args.test)

    tmp = Path(tempfile.mkdtemp(prefix="opro-compare-"))
    run_dir: Path = args.run_dir or tmp / "runs"
    print(f"task files in {tmp}, runs in {run_dir}", file=sys.stderr)
    results: dict[str, dict[str, Any]] = {}
    details: dict[str, dict[str, list[dict[str, Any]]]] = {}
    commands: list[str] = []
    started_all = time.perf_counter()
    for name in args.tasks:
        task_file = write_task(tmp, args.data_dir, name, split, args)
        cmd = [
            _opro_agent(),
            "-q",  # a global flag: before the command
            "compare",
            str(task_file),
            "--strategies",
            ",".join(args.strategies),
            "--seeds",
            args.seeds,
            "--max-calls",
            str(args.max_calls),
            "--steps",
            str(args.steps),
            "--run-dir",
            str(run_dir),
            "--json",
        ]
        if not args.cache:
            cmd.append("--no-cache")
        if args.no_guard:
            cmd.append("--no-guard")
        for setting in args.strategy_setting:
            cmd += ["-S", setting]
        commands.append(shlex.join(cmd))
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {commands[-1]}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"{name}: opro-agent compare exited with {proc.returncode}")
        if proc.stderr.strip():  # -q: warnings only
            sys.stderr.write(proc.stderr)
        results[name] = last_json(proc.stdout)
        details[name] = {
            s["strategy"]: [run_summary(r, run_dir) for r in s["runs"]]
            for s in results[name]["strategies"]
        }
        print(
            f"[{time.strftime('%H:%M:%S')}] {name}: done in {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    total = time.perf_counter() - started_all
    raw = {"tasks": results, "runs": details, "commands": commands, "seconds": total}
    (run_dir / "compare_strategies.json").write_text(json.dumps(raw, ensure_ascii=False))

    print(
        f"\nopro-agent compare, strategies {', '.join(args.strategies)}, seeds {args.seeds}; "
        f"--max-calls {args.max_calls} per run, --steps {args.steps}; embedded SmolLM2-135M "
        f"(local) as optimizer and scorer; split train {split.train} / validation "
        f"{split.validation} / test {split.test} (split seed 0); instruction position "
        f"{args.instruction_position}; answer_max_tokens {args.answer_max_tokens}; "
        f"cache {'on' if args.cache else 'off'}; {os.cpu_count()} cores; total {total:.0f} s\n"
    )
    print(
        f"{'task':<22} {'strategy':<8} {'test mean [95% CI over seeds]':<30} "
        f"{'validation':<26} {'baseline':>8} {'calls':>6} {'tokens':>7} {'wall s':>7}"
    )
    for name, result in results.items():
        for s in result["strategies"]:
            runs = details[name][s["strategy"]]
            baseline = max(
                (v for r in runs for v in (r["summary"] or {}).get("baselines", {}).values()),
                default=None,
            )
            print(
                f"{name:<22} {s['strategy']:<8} {_ci(s['test']):<30} {_ci(s['validation']):<26} "
                f"{_score(baseline):>8} {s['calls']:>6.0f} {s['tokens']:>7.0f} "
                f"{s['wall_seconds']:>7.1f}"
            )
    print(
        "(calls, tokens and wall seconds: mean per run; baseline: the starting instruction on test)"
    )
    package = subprocess.run(
        # -P: not the current folder first, so this is the package `opro-agent` imports
        [sys.executable, "-P", "-c", "import opro_agent; print(opro_agent.__file__)"],
        capture_output=True,
        text=True,
    ).stdout.strip()

    print(
        f"\n{'task':<22} {'strategy':<8} {'seed':>4} {'train':>6} {'valid':>6} {'test':>6} "
        f"{'calls':>6} {'last':>4} {'stop':<8} {'kept':<4} best instruction"
    )
    seeds = _csv(args.seeds)
    for name in results:
        for strategy, runs in details[name].items():
            for seed, run in zip(seeds, runs, strict=True):
                summary = run["summary"] or {}
                scores = summary.get("scores", {})
                steps = max((h["step"] for h in run["history"]), default=0)
                calls = sum(summary.get("calls", {}).values())
                best = summary.get("best_instruction", "")
                kept = "yes" if (summary.get("selection") or {}).get("kept_initial") else "no"
                print(
                    f"{name:<22} {strategy:<8} {seed:>4} {_score(scores.get('train')):>6} "
                    f"{_score(scores.get('validation')):>6} {_score(scores.get('test')):>6} "
                    f"{calls:>6} {steps:>4} {summary.get('stop_reason', '-'):<8} {kept:<4} "
                    f"{best[:90]!r}"
                )

    print(
        "(last: the last step that added a new candidate; kept: the initial instruction won "
        "because no new one beat it on validation)"
    )
    print(f"\nopro_agent imported from {package}")
    print("command line:", shlex.join([sys.executable, *sys.argv]))
    for command in commands:
        print("  ", command)


if __name__ == "__main__":
    main()
