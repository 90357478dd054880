"""Scorer-call overhead and concurrency efficiency of opro-agent, against raw LangChain.

Three measurements, side by side in one run, against local OpenAI-compatible stub servers
(`stub_server.py`), each printed as a row of one table:

1. Framework overhead per scorer call: `evaluate_instruction` over N examples versus raw
   `ChatOpenAI.abatch` over exactly the messages our scorer sends, both at concurrency C,
   on a stub answering at once. Target: ours within 10% of raw.
2. Concurrency efficiency: `evaluate_instruction` over 320 examples at concurrency 16 on a
   stub answering after 100 ms; efficiency = ideal / wall with ideal = ceil(320/16) * 0.1 s.
   Target: at least 0.9. Raw `abatch` in the same setting is shown for reference: the
   client's own CPU per call bounds what any framework on top of it can reach.
3. A whole run: `OproOptimizer` (OPRO, both roles ChatOpenAI on the 100 ms stub, which
   answers every meta-prompt with a new instruction and every scorer prompt with "yes"),
   with a run store on disk as the CLI has, at concurrency 16, against raw `abatch` of as
   many calls as the run made (the stub counts them), at the same concurrency on the same
   stub. Busy-ness = raw wall / run wall: the share of raw `abatch`'s throughput the run
   keeps the server at. A run cannot reach 1: its phases (score the initial instruction;
   per step, one round of optimizer calls, then the proposals' scoring; validation; test)
   each end on a partly filled wave. The lockstep bound (raw waves / run waves, a wave being
   one latency of up to C calls in flight, with zero client CPU) says how far below 1 its
   structure alone puts it; the rest is client work.

The raw side gets its message lists built before the clock starts; ours formats them itself,
inside the measurement (it is part of the framework's work). Every timed call must reach the
stub (it counts completions), so a response cache cannot flatter either side. The client's
CPU time per call (all threads) is shown next to wall time: it is less sensitive to other
load on the machine.

The machines are noisy, so repetitions alternate (raw, ours, raw, ours, ...) after a warm-up
of each; times are medians, and the overhead ratio is the median of the paired ratios (each
"ours" over the "raw" just before it), which cancels load that drifts during the run.
Everything runs in one event loop: langchain-openai caches its async HTTP client across
event loops, and a second `asyncio.run` would reuse connections bound to the closed loop of
the first.

    python benchmarks/scorer_overhead.py [--calls 400] [--reps 5] [--concurrency 8]
        [--only 3] [--run-train 32] [--run-steps 3] [--run-candidates 8]

Exit code 0 whatever the verdicts (it is a benchmark, not a test); 1 if calls fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import logging
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import structlog
from langchain_core.messages import BaseMessage
from langchain_openai import ChatOpenAI
from stub_server import ANSWER, completions_served, running_stub

import opro_agent
from opro_agent import Opro, OproOptimizer, RunStore, SearchSettings
from opro_agent.optimizer import evaluate_instruction
from opro_agent.prompts import scorer_prompt
from opro_agent.task import Example, SplitSpec, Task

INSTRUCTION = "Answer yes or no."
OVERHEAD_TARGET = 0.10  # ours at most 10% slower per call than raw abatch
EFFICIENCY_TARGET = 0.90  # ideal / wall at least this


@dataclass(frozen=True)
class Setting:
    base_url: str
    calls: int
    concurrency: int


@dataclass(frozen=True)
class RunShape:
    """The whole run of measurement 3."""

    base_url: str
    concurrency: int
    latency_ms: float
    train: int
    validation: int
    test: int
    steps: int
    candidates: int
    validate_top: int = 3

    def waves(self, count: RunCount) -> int:
        """Latencies the run takes with zero client CPU: each phase waits for its last call.

        The initial instruction on train; per step, the optimizer calls (one wave), then each
        proposal's scoring, all proposals together; the instructions the run validated, on
        validation; those it tested, on test.
        """
        c = self.concurrency
        per_step = math.ceil(self.candidates / c) + math.ceil(self.candidates * self.train / c)
        return (
            math.ceil(self.train / c)
            + self.steps * per_step
            + math.ceil(count.validated * self.validation / c)
            + math.ceil(count.tested * self.test / c)
        )


@dataclass(frozen=True)
class Sample:
    """One timed repetition."""

    wall: float  # seconds
    cpu: float  # CPU seconds of this (client) process, all threads

    @classmethod
    def since(cls, start: tuple[float, float]) -> Sample:
        """The time elapsed since `start`, a `clock()` reading."""
        wall, cpu = clock()
        return cls(wall - start[0], cpu - start[1])

    def get(self, what: Literal["wall", "cpu"]) -> float:
        return self.wall if what == "wall" else self.cpu


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


@dataclass(frozen=True)
class Comparison:
    """Interleaved repetitions of the raw baseline and ours."""

    raw: list[Sample]
    ours: list[Sample]

    def median(self, side: Literal["raw", "ours"], what: Literal["wall", "cpu"]) -> float:
        samples: list[Sample] = self.raw if side == "raw" else self.ours
        return statistics.median(sample.get(what) for sample in samples)

    def ratios(self, what: Literal["wall", "cpu"]) -> list[float]:
        """ours / raw of each repetition with the raw run just before it."""
        return [o.get(what) / r.get(what) for r, o in zip(self.raw, self.ours, strict=True)]

    def ratio(self, what: Literal["wall", "cpu"]) -> float:
        """The median of the paired ratios: robust to load that drifts during the run."""
        return statistics.median(self.ratios(what))


def make_run_task(shape: RunShape) -> Task:
    """The yes/no task of measurement 3 with the shape's split sizes."""
    total = shape.train + shape.validation + shape.test
    records = [
        {"question": f"Is {n} an even number?", "answer": "yes" if n % 2 == 0 else "no"}
        for n in range(total)
    ]
    return Task.from_records(
        "stub_yes_no_run",
        records,
        input="question",
        target="answer",
        metric="boolean",
        instruction_position="system",
        split=SplitSpec(train=shape.train, validation=shape.validation, test=shape.test),
    )


def make_task(calls: int) -> Task:
    """A tiny yes/no task whose test split has `calls` examples (one more for train)."""
    records = [
        {"question": f"Is {n} an even number?", "answer": "yes" if n % 2 == 0 else "no"}
        for n in range(calls + 1)
    ]
    return Task.from_records(
        "stub_yes_no",
        records,
        input="question",
        target="answer",
        metric="boolean",
        instruction_position="system",
        split=SplitSpec(train=1, validation=0, test=calls),
    )


def scorer_messages(task: Task) -> list[list[BaseMessage]]:
    """Exactly the message lists our scorer sends for INSTRUCTION on the test split."""
    return scorer_messages_of(task, task.splits().test)


def scorer_messages_of(task: Task, examples: Sequence[Example]) -> list[list[BaseMessage]]:
    prompt = scorer_prompt(INSTRUCTION, task.instruction_position, task.input_fields)
    return [prompt.format_messages(**e.inputs) for e in examples]


def chat_model(base_url: str) -> ChatOpenAI:
    return ChatOpenAI(base_url=base_url, api_key="unused", model="stub", max_retries=0)  # type: ignore[arg-type]


def check_served(setting: Setting, before: int, side: str) -> None:
    """Every timed call must have reached the server (no cache, no short cut)."""
    served = completions_served(setting.base_url) - before
    if served != setting.calls:
        raise RuntimeError(f"{side}: the stub served {served} completions, not {setting.calls}")


async def run_ours(setting: Setting, task: Task) -> Sample:
    """One `evaluate_instruction` over the test split."""
    llm = chat_model(setting.base_url)
    before = completions_served(setting.base_url)
    start = clock()
    score = await evaluate_instruction(
        task, INSTRUCTION, scorer=llm, split="test", concurrency=setting.concurrency
    )
    sample = Sample.since(start)
    check_served(setting, before, "ours")
    errors = [r.error for r in score.results.values() if r.error is not None]
    if len(score.results) != setting.calls or errors:
        raise RuntimeError(
            f"ours: {len(score.results)} results, {len(errors)} failed "
            f"(first: {errors[:1]}); expected {setting.calls} answers"
        )
    return sample


async def run_raw(setting: Setting, messages: Sequence[list[BaseMessage]]) -> Sample:
    """One raw `abatch` over the same messages."""
    llm = chat_model(setting.base_url)
    before = completions_served(setting.base_url)
    start = clock()
    outputs = await llm.abatch(list(messages), config={"max_concurrency": setting.concurrency})
    sample = Sample.since(start)
    check_served(setting, before, "raw")
    if len(outputs) != setting.calls or any(o.content != ANSWER for o in outputs):
        raise RuntimeError(f"raw: unexpected outputs (first: {outputs[:1]!r})")
    return sample


@dataclass(frozen=True)
class RunCount:
    calls: int  # both roles
    validated: int  # instructions scored on the validation split
    tested: int  # instructions scored on the test split


async def run_whole(shape: RunShape, task: Task) -> tuple[Sample, RunCount]:
    """One whole OPRO run with a fresh run store on disk; its sample and what it called."""
    with tempfile.TemporaryDirectory(prefix="opro-bench-") as run_dir:
        store = RunStore.open(run_dir)
        optimizer = OproOptimizer(
            chat_model(shape.base_url),
            chat_model(shape.base_url),
            strategy=Opro(candidates_per_step=shape.candidates),
            settings=SearchSettings(
                steps=shape.steps,
                concurrency=shape.concurrency,
                seed=0,
                validate_top=shape.validate_top,
            ),
            store=store,
        )
        before = completions_served(shape.base_url)
        start = clock()
        result = await optimizer.ainvoke(task)
        sample = Sample.since(start)
        store.close()
    calls = result.calls["optimizer"] + result.calls["scorer"]
    served = completions_served(shape.base_url) - before
    proposals = len(result.history) - len(task.initial_instructions)
    if served != calls or proposals != shape.steps * shape.candidates:
        raise RuntimeError(
            f"whole run: {calls} calls counted, {served} served, {proposals} proposals scored "
            f"(expected {shape.steps * shape.candidates})"
        )
    validated = sum(entry.validation is not None for entry in result.history)
    tested = sum(entry.test is not None for entry in result.history)
    return sample, RunCount(calls, validated, tested)


async def interleaved(
    raw: Callable[[], Awaitable[Sample]],
    ours: Callable[[], Awaitable[Sample]],
    reps: int,
    *,
    warm_up: bool = True,
) -> Comparison:
    """One warm-up of each (unless done already), then raw, ours, raw, ours, ... `reps`
    times each."""
    if warm_up:
        await raw()
        await ours()
    comparison = Comparison([], [])
    for _ in range(reps):
        for run, samples in ((raw, comparison.raw), (ours, comparison.ours)):
            gc.collect()  # neither side pays for the other's garbage
            samples.append(await run())
    return comparison


async def whole_run(shape: RunShape, reps: int) -> tuple[Comparison, RunCount]:
    """Measurement 3: whole runs against raw `abatch` of as many calls, interleaved."""
    task = make_run_task(shape)
    _, count = await run_whole(shape, task)  # the warm-up tells how many calls a run makes
    calls = count.calls
    train = scorer_messages_of(task, task.splits().train)
    setting = Setting(shape.base_url, calls, shape.concurrency)
    messages = [train[n % len(train)] for n in range(calls)]
    await run_raw(setting, messages)

    async def ours() -> Sample:
        sample, made = await run_whole(shape, task)
        if made != count:
            raise RuntimeError(f"whole run: {made}, the warm-up made {count}")
        return sample

    comparison = await interleaved(lambda: run_raw(setting, messages), ours, reps, warm_up=False)
    return comparison, count


async def profile_ours(setting: Setting, task: Task, path: str) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    await run_ours(setting, task)
    profiler.disable()
    profiler.dump_stats(path)
    stats = pstats.Stats(profiler, stream=sys.stdout)
    print(f"\ncProfile of one evaluate_instruction run ({setting.calls} calls), saved to {path}:")
    stats.sort_stats("tottime").print_stats(25)


def machine_info() -> str:
    packages = ("langchain-core", "langchain-openai", "openai", "httpx", "uvicorn")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine: {platform.platform()}, cpu_count={os.cpu_count()}, usable cpus={affinity}",
        f"python: {platform.python_implementation()} {platform.python_version()}",
        "packages: " + ", ".join(f"{p} {version(p)}" for p in packages),
        f"opro_agent: {code_version()}",
    ]
    return "\n".join(lines)


def code_version() -> str:
    """Where opro_agent was imported from, and its git commit if it is a checkout."""
    package = Path(opro_agent.__file__).parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(package), "log", "-1", "--format=%h %cI"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(package), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(package)
    return f"{package}, commit {commit}{' + uncommitted changes' if dirty else ''}"


def spread(samples: Sequence[Sample], what: Literal["wall", "cpu"], scale: float) -> str:
    return " ".join(f"{sample.get(what) * scale:.3f}" for sample in samples)


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


@dataclass
class Results:
    """What was measured; a measurement left out by `--only` is None."""

    fast: Setting
    slow: Setting
    shape: RunShape | None = None
    overhead: Comparison | None = None
    latency: Comparison | None = None
    whole: Comparison | None = None
    whole_count: RunCount | None = None


async def benchmark(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        fast_url = stack.enter_context(running_stub(0)) if 1 in args.only else ""
        slow_url = stack.enter_context(running_stub(args.latency_ms)) if args.only - {1} else ""
        results = Results(
            Setting(fast_url, args.calls, args.concurrency),
            Setting(slow_url, args.latency_calls, args.latency_concurrency),
        )
        fast, slow = results.fast, results.slow
        fast_task, slow_task = make_task(fast.calls), make_task(slow.calls)
        if 1 in args.only:
            fast_messages = scorer_messages(fast_task)
            results.overhead = await interleaved(
                lambda: run_raw(fast, fast_messages), lambda: run_ours(fast, fast_task), args.reps
            )
        if 2 in args.only:
            slow_messages = scorer_messages(slow_task)
            results.latency = await interleaved(
                lambda: run_raw(slow, slow_messages), lambda: run_ours(slow, slow_task), args.reps
            )
        if 3 in args.only:
            results.shape = RunShape(
                slow_url,
                args.latency_concurrency,
                args.latency_ms,
                args.run_train,
                args.run_validation,
                args.run_test,
                args.run_steps,
                args.run_candidates,
            )
            results.whole, results.whole_count = await whole_run(results.shape, args.reps)
        if args.profile and 1 in args.only:
            await profile_ours(fast, fast_task, args.profile)

    report(args, results)


def report(args: argparse.Namespace, results: Results) -> None:
    fast, slow = results.fast, results.slow
    header = ("measurement", "ours", "raw/ideal", "ratio", "target", "verdict")
    rows: list[tuple[str, ...]] = [header]
    details: list[str] = []
    if (overhead := results.overhead) is not None:
        ms_per_call = 1000 / fast.calls
        wall_ratio, cpu_ratio = overhead.ratio("wall"), overhead.ratio("cpu")
        rows += [
            (
                f"1. wall per scorer call, 0 ms stub, {fast.calls} calls, C={fast.concurrency}",
                f"{overhead.median('ours', 'wall') * ms_per_call:.3f} ms",
                f"raw {overhead.median('raw', 'wall') * ms_per_call:.3f} ms",
                f"{wall_ratio:.3f} ({wall_ratio - 1:+.1%})",
                f"<= {1 + OVERHEAD_TARGET:.2f}",
                "PASS" if wall_ratio - 1 <= OVERHEAD_TARGET else "FAIL",
            ),
            (
                "   client CPU per call, same runs (reference)",
                f"{overhead.median('ours', 'cpu') * ms_per_call:.3f} ms",
                f"raw {overhead.median('raw', 'cpu') * ms_per_call:.3f} ms",
                f"{cpu_ratio:.3f} ({cpu_ratio - 1:+.1%})",
                "-",
                "-",
            ),
        ]
        details += [
            f"  1. raw  wall ms/call: {spread(overhead.raw, 'wall', ms_per_call)}",
            f"     ours wall ms/call: {spread(overhead.ours, 'wall', ms_per_call)}",
            f"     ours / raw wall:   {' '.join(f'{r:.3f}' for r in overhead.ratios('wall'))}",
            f"     raw  CPU ms/call:  {spread(overhead.raw, 'cpu', ms_per_call)}",
            f"     ours CPU ms/call:  {spread(overhead.ours, 'cpu', ms_per_call)}",
            f"     ours / raw CPU:    {' '.join(f'{r:.3f}' for r in overhead.ratios('cpu'))}",
        ]
    if (latency := results.latency) is not None:
        ideal = math.ceil(slow.calls / slow.concurrency) * args.latency_ms / 1000
        slow_raw = latency.median("raw", "wall")
        slow_ours = latency.median("ours", "wall")
        efficiency = ideal / slow_ours
        rows += [
            (
                f"2. efficiency, {args.latency_ms:g} ms stub, {slow.calls} calls, "
                f"C={slow.concurrency}",
                f"{slow_ours:.3f} s",
                f"ideal {ideal:.3f} s",
                f"{efficiency:.3f}",
                f">= {EFFICIENCY_TARGET:.2f}",
                "PASS" if efficiency >= EFFICIENCY_TARGET else "FAIL",
            ),
            (
                "   raw abatch, same setting (reference)",
                f"{slow_raw:.3f} s",
                f"ideal {ideal:.3f} s",
                f"{ideal / slow_raw:.3f}",
                "-",
                "-",
            ),
        ]
        details += [
            f"  2. raw  wall s:       {spread(latency.raw, 'wall', 1)}",
            f"     ours wall s:       {spread(latency.ours, 'wall', 1)}",
            f"     ours / raw wall:   {' '.join(f'{r:.3f}' for r in latency.ratios('wall'))}",
        ]
    whole, shape, count = results.whole, results.shape, results.whole_count
    if whole is not None and shape is not None and count is not None:
        calls = count.calls
        busy = [1 / r for r in whole.ratios("wall")]
        raw_waves = math.ceil(calls / shape.concurrency)
        run_waves = shape.waves(count)
        bound = raw_waves / run_waves
        latency_s = shape.latency_ms / 1000
        rows += [
            (
                f"3. whole run, {shape.latency_ms:g} ms stub, {calls} calls, "
                f"C={shape.concurrency}: busy-ness (raw wall / run wall)",
                f"{whole.median('ours', 'wall'):.3f} s",
                f"raw {whole.median('raw', 'wall'):.3f} s",
                f"{statistics.median(busy):.3f}",
                f"<= {bound:.3f} (lockstep bound)",
                "-",
            ),
            (
                "   lockstep waves with zero client CPU: run / raw",
                f"{run_waves} ({run_waves * latency_s:.1f} s)",
                f"raw {raw_waves} ({raw_waves * latency_s:.1f} s)",
                f"{bound:.3f}",
                "-",
                "-",
            ),
            (
                "   client CPU per call, same runs (reference)",
                f"{whole.median('ours', 'cpu') * 1000 / calls:.3f} ms",
                f"raw {whole.median('raw', 'cpu') * 1000 / calls:.3f} ms",
                f"{whole.ratio('cpu'):.3f}",
                "-",
                "-",
            ),
        ]
        details += [
            f"  3. OPRO run: train {shape.train}, validation {shape.validation}, test "
            f"{shape.test}, {shape.steps} steps x {shape.candidates} candidates, run store on "
            "disk",
            f"     raw  wall s:       {spread(whole.raw, 'wall', 1)}",
            f"     run  wall s:       {spread(whole.ours, 'wall', 1)}",
            f"     raw / run wall:    {' '.join(f'{b:.3f}' for b in busy)}",
            f"     raw  CPU ms/call:  {spread(whole.raw, 'cpu', 1000 / calls)}",
            f"     run  CPU ms/call:  {spread(whole.ours, 'cpu', 1000 / calls)}",
        ]
    print()
    print(table(rows))
    print(
        f"\nmedians of {args.reps} interleaved repetitions (raw, ours, raw, ours, ...) after one "
        "warm-up each;\nratios are medians of each repetition's ours / raw (3: raw / ours). "
        "Per repetition:"
    )
    print("\n".join(details))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=400, help="scorer calls, measurement 1")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each side")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrency, measurement 1")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="stub latency, 2 and 3")
    parser.add_argument("--latency-calls", type=int, default=320, help="scorer calls, 2")
    parser.add_argument("--latency-concurrency", type=int, default=16, help="concurrency, 2 and 3")
    parser.add_argument("--run-train", type=int, default=32, help="train examples, 3")
    parser.add_argument("--run-validation", type=int, default=16, help="validation examples, 3")
    parser.add_argument("--run-test", type=int, default=16, help="test examples, 3")
    parser.add_argument("--run-steps", type=int, default=3, help="steps, 3")
    parser.add_argument("--run-candidates", type=int, default=8, help="candidates per step, 3")
    parser.add_argument(
        "--only",
        type=lambda text: {int(n) for n in text.split(",")},
        default={1, 2, 3},
        metavar="1,2,3",
        help="the measurements to make (default: all)",
    )
    parser.add_argument(
        "--profile", metavar="FILE.prof", help="also cProfile one run of ours (measurement 1)"
    )
    args = parser.parse_args(argv)
    positive = (
        "calls",
        "reps",
        "concurrency",
        "latency_calls",
        "latency_concurrency",
        "run_train",
        "run_validation",
        "run_test",
        "run_steps",
        "run_candidates",
    )
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.only or not args.only <= {1, 2, 3}:
        parser.error("--only takes measurement numbers among 1, 2, 3")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The library logs steps and candidates (info) and, here, that no proposal beat the
    # initial instruction (warning): keep the report readable.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    print(machine_info())
    try:
        asyncio.run(benchmark(args))
    except RuntimeError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
