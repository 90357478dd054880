"""Scorer throughput on the Ray replica pool: does adding model servers add calls per second?

Two measurements, each a table of scorer calls per second (`evaluate_instruction`: the
scorer path of a run, with its `Caller`, on a `PooledChatModel`; no response cache):

1. The embedded model (SmolLM2-135M on llama.cpp, answers of at most 8 tokens): one
   llama.cpp server without Ray (the CLI's default), and pools of 1 and 2 replicas of one
   CPU each; the ratio 2 replicas / 1 replica is the speed-up this machine gives.
2. Stand-in replicas, more than there are cores: latency stubs that answer one request at
   a time after `--stub-latency-ms` (as a llama.cpp server does, one request at a time), 1
   replica against 8. A stub replica costs almost no CPU, so the ideal is replicas /
   latency calls per second; efficiency = measured / ideal says how much of it the driver
   (one process: routing, LangChain, HTTP, the Caller) delivers, and "driver cores" how
   busy the driver was (CPU seconds per second, all its threads): below 1, it was waiting
   for the replicas, not the other way round.

Every configuration's pool runs at once on one local Ray cluster (with logical CPUs enough
for all, idle servers cost nothing), and repetitions alternate between configurations, so
load from other processes hits all of them alike; figures are medians, and ratios are the
medians of ratios within a repetition.

    python benchmarks/ray_pool.py [--reps 3] [--calls 24] [--stub-calls 400]
        [--stub-latency-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import ray
import structlog
from langchain_core.language_models import BaseChatModel

from opro_agent.local_server import LocalServer, find_embedded_model
from opro_agent.optimizer import evaluate_instruction
from opro_agent.providers import ModelOptions, connection_errors, openai_chat_model
from opro_agent.ray_pool import PoolSettings, ReplicaPool, ServerSpec
from opro_agent.task import SplitSpec, Task

REPO = Path(__file__).resolve().parents[1]
STUB = Path(__file__).resolve().parent / "stub_server.py"
INSTRUCTION = "Answer with yes or no."


@dataclass
class Config:
    label: str
    model: BaseChatModel
    concurrency: int
    ideal: float | None = None  # calls per second, for stand-ins of known capacity


def _facts(calls: int) -> Task:
    """`calls` questions of the shipped yes/no task in the test split, one more in train (a
    task needs one); repeated if need be, numbered so no two prompts are alike."""
    lines = (REPO / "tasks" / "yes_no_facts.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    rows = (rows * (calls // len(rows) + 2))[: calls + 1]
    return Task.from_records(
        "facts",
        [{"input": f"{r['input']} ({i})", "target": r["target"]} for i, r in enumerate(rows)],
        metric="boolean",
        instruction_position="system",
        split=SplitSpec(train=1, validation=0, test=calls, seed=0),
        answer_max_tokens=8,
    )


@dataclass(frozen=True)
class Rate:
    calls_per_second: float
    driver_cores: float  # CPU seconds of this process (all threads) per second of wall time


async def _throughput(task: Task, config: Config) -> Rate:
    started, cpu = time.perf_counter(), time.process_time()
    scored = await evaluate_instruction(
        task, INSTRUCTION, scorer=config.model, concurrency=config.concurrency
    )
    wall = time.perf_counter() - started
    failed = sum(1 for r in scored.results.values() if r.error)
    if failed:
        sys.exit(f"{config.label}: {failed} calls failed")
    return Rate(len(scored.results) / wall, (time.process_time() - cpu) / wall)


def _measure(task: Task, configs: Sequence[Config], reps: int) -> dict[str, list[Rate]]:
    rates: dict[str, list[Rate]] = {c.label: [] for c in configs}

    async def run() -> None:
        for config in configs:  # warm-up: connections, the servers' prompt caches
            await _throughput(task, config)
        for _ in range(reps):
            for config in configs:
                rates[config.label].append(await _throughput(task, config))

    # One event loop for everything: langchain-openai's async clients outlive a loop badly.
    asyncio.run(run())
    return rates


def _print(title: str, configs: Sequence[Config], rates: dict[str, list[Rate]]) -> None:
    print(title)
    header = f"{'calls/s (median)':>17} {'min':>7} {'max':>7} {'eff.':>6} {'driver cores':>13}"
    print(f"  {'configuration':<34} {header}")
    for c in configs:
        values = [r.calls_per_second for r in rates[c.label]]
        median = statistics.median(values)
        eff = f"{median / c.ideal:6.2f}" if c.ideal else "     -"
        cores = statistics.median(r.driver_cores for r in rates[c.label])
        print(
            f"  {c.label:<34} {median:>17.2f} {min(values):>7.2f} {max(values):>7.2f} {eff} "
            f"{cores:>13.2f}"
        )


def _ratio(rates: dict[str, list[Rate]], top: str, bottom: str) -> float:
    pairs = zip(rates[top], rates[bottom], strict=True)
    return statistics.median(t.calls_per_second / b.calls_per_second for t, b in pairs)


def _pool(
    replicas: int, cpus: float, spec: ServerSpec, make: Callable[[str], BaseChatModel]
) -> tuple[ReplicaPool, BaseChatModel]:
    pool = ReplicaPool(
        PoolSettings(replicas=replicas, replica_cpus=cpus), spec, connection_errors()
    )
    pool.start()
    return pool, pool.chat_model(make)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--calls", type=int, default=24, help="embedded-model calls per rep")
    parser.add_argument("--stub-calls", type=int, default=400, help="stub calls per rep")
    parser.add_argument("--stub-latency-ms", type=float, default=50.0)
    parser.add_argument("--stub-replicas", type=int, default=8)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    cores = os.cpu_count() or 1
    print(
        f"Ray replica pool throughput: {cores} cores, Python {sys.version.split()[0]}, "
        f"ray {version('ray')}, llama-cpp-python {version('llama-cpp-python')}"
    )
    log_dir = Path(tempfile.mkdtemp(prefix="ray-pool-bench-"))
    # Logical CPUs for every pool at once; only the configuration measured is busy.
    ray.init(num_cpus=32, include_dashboard=False, log_to_driver=False)
    pools: list[ReplicaPool] = []
    try:
        gguf = find_embedded_model()
        embedded = ServerSpec(gguf, log_dir)
        options = ModelOptions(0.0, 8)

        def llama(url: str) -> BaseChatModel:
            return openai_chat_model(embedded.model_name, options, base_url=url)

        with LocalServer(gguf, log_dir / "alone.log", n_ctx=4096) as alone:
            configs = [Config("one server, no Ray", llama(alone.base_url), 4)]
            for replicas in (1, 2):
                pool, model = _pool(replicas, 1.0, embedded, llama)
                pools.append(pool)
                configs.append(Config(f"Ray pool, {replicas} replica(s) x 1 CPU", model, 4))
            task = _facts(args.calls)
            rates = _measure(task, configs, args.reps)
        _print(f"\n1. Embedded model, {args.calls} calls per rep, concurrency 4:", configs, rates)
        ratio = _ratio(rates, configs[2].label, configs[1].label)
        print(f"  2 replicas / 1 replica: {ratio:.2f}x")
        print(f"  1 replica / no Ray:     {_ratio(rates, configs[1].label, configs[0].label):.2f}x")

        stub = ServerSpec(
            Path("stub"),
            log_dir,
            command=(
                sys.executable, str(STUB), "--host", "{host}", "--port", "{port}",
                "--latency-ms", str(args.stub_latency_ms), "--serial",
            ),
        )  # fmt: skip
        stub_options = ModelOptions(0.0, 8)

        def stand_in(url: str) -> BaseChatModel:
            return openai_chat_model("stub", stub_options, base_url=url)

        per_replica = 1000 / args.stub_latency_ms
        stub_configs = []
        for replicas in (1, args.stub_replicas):
            pool, model = _pool(replicas, 0.25, stub, stand_in)
            pools.append(pool)
            stub_configs.append(
                Config(
                    f"{replicas} stub replica(s)",
                    model,
                    2 * replicas,
                    ideal=replicas * per_replica,
                )
            )
        stub_rates = _measure(_facts(args.stub_calls), stub_configs, args.reps)
        _print(
            f"\n2. Serial stubs, {args.stub_latency_ms:g} ms each (ideal {per_replica:g} calls/s "
            f"per replica), {args.stub_calls} calls per rep, concurrency 2 per replica:",
            stub_configs,
            stub_rates,
        )
        top, bottom = stub_configs[1].label, stub_configs[0].label
        print(
            f"  {args.stub_replicas} replicas / 1 replica: {_ratio(stub_rates, top, bottom):.2f}x "
            f"(ideal {args.stub_replicas}x), with {args.stub_replicas} replicas on {cores} cores"
        )
    finally:
        for pool in pools:
            pool.close()
        ray.shutdown()


if __name__ == "__main__":
    main()
