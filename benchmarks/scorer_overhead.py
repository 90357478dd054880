"""Scorer-call overhead and concurrency efficiency of opro-agent, against raw LangChain.

Two measurements, side by side in one run, against local OpenAI-compatible stub servers
(`stub_server.py`), each printed as a row of one table:

1. Framework overhead per scorer call: `evaluate_instruction` over N examples versus raw
   `ChatOpenAI.abatch` over exactly the messages our scorer sends, both at concurrency C,
   on a stub answering at once. Target: ours within 10% of raw.
2. Concurrency efficiency: `evaluate_instruction` over 320 examples at concurrency 16 on a
   stub answering after 100 ms; efficiency = ideal / wall with ideal = ceil(320/16) * 0.1 s.
   Target: at least 0.9. Raw `abatch` in the same setting is shown for reference.

The machines are noisy, so repetitions alternate (raw, ours, raw, ours, ...) after a warm-up
of each, and medians are reported. Everything runs in one event loop: langchain-openai caches
its async HTTP client across event loops, and a second `asyncio.run` would reuse connections
bound to the closed loop of the first.

    python benchmarks/scorer_overhead.py [--calls 400] [--reps 5] [--concurrency 8]

Exit code 0 whatever the verdicts (it is a benchmark, not a test); 1 if calls fail.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import contextlib
import gc
import math
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version

from langchain_core.messages import BaseMessage
from langchain_openai import ChatOpenAI
from stub_server import ANSWER, completions_served, running_stub

from opro_agent.optimizer import evaluate_instruction
from opro_agent.prompts import scorer_prompt
from opro_agent.task import SplitSpec, Task

INSTRUCTION = "Answer yes or no."
OVERHEAD_TARGET = 0.10  # ours at most 10% slower per call than raw abatch
EFFICIENCY_TARGET = 0.90  # ideal / wall at least this


@dataclass(frozen=True)
class Setting:
    base_url: str
    calls: int
    concurrency: int


@dataclass(frozen=True)
class Timings:
    raw: list[float]  # wall seconds per repetition
    ours: list[float]

    @property
    def raw_median(self) -> float:
        return statistics.median(self.raw)

    @property
    def ours_median(self) -> float:
        return statistics.median(self.ours)


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
    prompt = scorer_prompt(INSTRUCTION, task.instruction_position, task.input_fields)
    return [prompt.format_messages(**e.inputs) for e in task.splits().test]


def chat_model(base_url: str) -> ChatOpenAI:
    return ChatOpenAI(base_url=base_url, api_key="unused", model="stub", max_retries=0)  # type: ignore[arg-type]


def check_served(setting: Setting, before: int, side: str) -> None:
    """Every timed call must have reached the server (no cache, no short cut)."""
    served = completions_served(setting.base_url) - before
    if served != setting.calls:
        raise RuntimeError(f"{side}: the stub served {served} completions, not {setting.calls}")


async def run_ours(setting: Setting, task: Task) -> float:
    """Wall seconds of one `evaluate_instruction` over the test split."""
    llm = chat_model(setting.base_url)
    before = completions_served(setting.base_url)
    started = time.perf_counter()
    score = await evaluate_instruction(
        task, INSTRUCTION, scorer=llm, split="test", concurrency=setting.concurrency
    )
    wall = time.perf_counter() - started
    check_served(setting, before, "ours")
    errors = [r.error for r in score.results.values() if r.error is not None]
    if len(score.results) != setting.calls or errors:
        raise RuntimeError(
            f"ours: {len(score.results)} results, {len(errors)} failed "
            f"(first: {errors[:1]}); expected {setting.calls} answers"
        )
    return wall


async def run_raw(setting: Setting, messages: Sequence[list[BaseMessage]]) -> float:
    """Wall seconds of one raw `abatch` over the same messages."""
    llm = chat_model(setting.base_url)
    before = completions_served(setting.base_url)
    started = time.perf_counter()
    outputs = await llm.abatch(list(messages), config={"max_concurrency": setting.concurrency})
    wall = time.perf_counter() - started
    check_served(setting, before, "raw")
    if len(outputs) != setting.calls or any(o.content != ANSWER for o in outputs):
        raise RuntimeError(f"raw: unexpected outputs (first: {outputs[:1]!r})")
    return wall


async def interleaved(
    raw: Callable[[], Awaitable[float]], ours: Callable[[], Awaitable[float]], reps: int
) -> Timings:
    """One warm-up of each, then raw, ours, raw, ours, ... `reps` times each."""
    await raw()
    await ours()
    raw_times: list[float] = []
    ours_times: list[float] = []
    for _ in range(reps):
        for run, times in ((raw, raw_times), (ours, ours_times)):
            gc.collect()  # neither side pays for the other's garbage
            times.append(await run())
    return Timings(raw_times, ours_times)


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
    ]
    return "\n".join(lines)


def spread(times: Sequence[float], scale: float = 1.0, unit: str = "") -> str:
    return " ".join(f"{t * scale:.3f}{unit}" for t in times)


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


async def benchmark(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        fast = Setting(stack.enter_context(running_stub(0)), args.calls, args.concurrency)
        slow = Setting(
            stack.enter_context(running_stub(args.latency_ms)),
            args.latency_calls,
            args.latency_concurrency,
        )
        fast_task, slow_task = make_task(fast.calls), make_task(slow.calls)
        fast_messages, slow_messages = scorer_messages(fast_task), scorer_messages(slow_task)

        overhead = await interleaved(
            lambda: run_raw(fast, fast_messages), lambda: run_ours(fast, fast_task), args.reps
        )
        latency = await interleaved(
            lambda: run_raw(slow, slow_messages), lambda: run_ours(slow, slow_task), args.reps
        )
        if args.profile:
            await profile_ours(fast, fast_task, args.profile)

    per_call_raw = overhead.raw_median / fast.calls
    per_call_ours = overhead.ours_median / fast.calls
    extra = per_call_ours / per_call_raw - 1
    ideal = math.ceil(slow.calls / slow.concurrency) * args.latency_ms / 1000
    efficiency_ours = ideal / latency.ours_median
    efficiency_raw = ideal / latency.raw_median

    header = ("measurement", "ours", "raw/ideal", "ratio", "target", "verdict")
    rows = [
        header,
        (
            f"1. per scorer call, 0 ms stub, {fast.calls} calls, C={fast.concurrency}",
            f"{per_call_ours * 1000:.3f} ms",
            f"raw {per_call_raw * 1000:.3f} ms",
            f"{per_call_ours / per_call_raw:.3f} ({extra:+.1%})",
            f"<= 1.10 (+{OVERHEAD_TARGET:.0%})",
            "PASS" if extra <= OVERHEAD_TARGET else "FAIL",
        ),
        (
            f"2. efficiency, {args.latency_ms:g} ms stub, {slow.calls} calls, "
            f"C={slow.concurrency}",
            f"{latency.ours_median:.3f} s",
            f"ideal {ideal:.3f} s",
            f"{efficiency_ours:.3f}",
            f">= {EFFICIENCY_TARGET:.2f}",
            "PASS" if efficiency_ours >= EFFICIENCY_TARGET else "FAIL",
        ),
        (
            "   raw abatch, same setting (reference)",
            f"{latency.raw_median:.3f} s",
            f"ideal {ideal:.3f} s",
            f"{efficiency_raw:.3f}",
            "-",
            "-",
        ),
    ]
    print()
    print(table(rows))
    print(
        f"\nmedians of {args.reps} interleaved repetitions after one warm-up each; per rep:\n"
        f"  1. raw  ms/call: {spread(overhead.raw, 1000 / fast.calls)}\n"
        f"     ours ms/call: {spread(overhead.ours, 1000 / fast.calls)}\n"
        f"  2. raw  wall s:  {spread(latency.raw)}\n"
        f"     ours wall s:  {spread(latency.ours)}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=400, help="scorer calls, measurement 1")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each side")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrency, measurement 1")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="stub latency, 2")
    parser.add_argument("--latency-calls", type=int, default=320, help="scorer calls, 2")
    parser.add_argument("--latency-concurrency", type=int, default=16, help="concurrency, 2")
    parser.add_argument(
        "--profile", metavar="FILE.prof", help="also cProfile one run of ours (measurement 1)"
    )
    args = parser.parse_args(argv)
    for name in ("calls", "reps", "concurrency", "latency_calls", "latency_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(machine_info())
    try:
        asyncio.run(benchmark(args))
    except RuntimeError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
