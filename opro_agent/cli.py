"""The `opro-agent` command line. The only place that configures logging."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import structlog
import yaml
from tqdm import tqdm

from opro_agent.budget import Budget
from opro_agent.cache import ResponseCache
from opro_agent.compare import RunSummary, render_table, summarise
from opro_agent.errors import ConfigError, LLMCallsFailingError, OproError, RunStoreError
from opro_agent.estimate import estimate_run
from opro_agent.files import read_yaml
from opro_agent.llm_calls import RateLimits
from opro_agent.optimizer import OproOptimizer, evaluate_instruction
from opro_agent.pricing import Price, PriceTable
from opro_agent.providers import (
    LOCAL,
    ModelOptions,
    Models,
    ModelSpec,
    rate_limit_errors,
    redact_url,
)
from opro_agent.ray_pool import PoolSettings, check_address, import_ray, pool_settings
from opro_agent.reports import RunReport, RunsComparison
from opro_agent.result import OptimizationResult
from opro_agent.retrieval import (
    LABEL_RUN_KIND,
    LabelSettings,
    RetrievedDemonstrations,
    Retriever,
    TrainSettings,
    label_run,
    train_retriever,
)
from opro_agent.settings import RunResources, SearchSettings
from opro_agent.stats import Interval
from opro_agent.store import DB_FILENAME, RunStore
from opro_agent.strategies import Strategy, make_strategy
from opro_agent.strategies.registry import split_run_config
from opro_agent.sweep import SweepRun, run_signature, run_sweep
from opro_agent.task import Task
from opro_agent.tokens import tiktoken_available

__all__ = ["main"]

OPTIMIZER_MAX_TOKENS = 200  # an instruction is at most 500 characters
SCORER_TOP_LOGPROBS = 5  # alternatives per answer token, to find the gold answer among them
log = structlog.get_logger()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line naming the flag, not a usage dump.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(text: str, kind: type[int] | type[float]) -> float:
    try:
        return kind(text)
    except ValueError:
        expected = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _build_parser() -> _Parser:
    parser = _Parser(prog="opro-agent", description="Automatic prompt optimization (OPRO).")
    parser.add_argument("--log-json", action="store_true", help="log events as JSON lines")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    opt = commands.add_parser("optimize", help="search for the best instruction for a task")
    opt.add_argument("task", nargs="?", help="task YAML (optional with --resume)")
    opt.add_argument("--resume", metavar="RUN", help="continue a stopped run")
    _add_model_flags(opt, roles=("optimizer", "scorer"))
    _add_executor_flags(opt)
    _add_search_flags(opt)
    opt.add_argument(
        "--strategy", help="search strategy: opro (default), ape, or one a plugin adds"
    )
    opt.add_argument(
        "-S",
        "--strategy-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the strategy, e.g. -S mode=reverse (repeatable)",
    )
    opt.add_argument("--candidates", type=_positive_int, help="OPRO: instructions per step (8)")
    opt.add_argument(
        "--exemplars",
        choices=("random", "constant", "most_wrong"),
        help="OPRO: how the meta-prompt's 3 exemplars are chosen (default random)",
    )
    opt.add_argument(
        "--meta-prompt", help="OPRO: built-in template (chat, chat_single, text) or a folder"
    )
    opt.add_argument(
        "--early-rejection",
        action="store_true",
        help="OPRO: race candidates on growing subsets of the train split (successive halving)",
    )
    _add_retriever_flags(opt)
    opt.add_argument(
        "--dry-run", action="store_true", help="print projected calls, tokens and cost; stop"
    )
    opt.add_argument("--json", action="store_true", help="end stdout with a JSON summary")
    _add_mlflow_flag(opt)
    opt.set_defaults(handler=_cmd_optimize)

    cmp = commands.add_parser(
        "compare", help="run several strategies on a task with the same splits and budget"
    )
    cmp.add_argument("task", help="task YAML")
    _add_comparison_flags(cmp)
    _add_model_flags(cmp, roles=("optimizer", "scorer"))
    _add_executor_flags(cmp)
    _add_search_flags(cmp)
    cmp.add_argument("--json", action="store_true", help="end stdout with a JSON object")
    _add_mlflow_flag(cmp)
    cmp.set_defaults(handler=_cmd_compare)

    sw = commands.add_parser(
        "sweep", help="every task x strategy x seed as its own run, in parallel; one table"
    )
    sw.add_argument("tasks", nargs="+", metavar="TASK", help="task YAML files")
    _add_comparison_flags(sw)
    _add_model_flags(sw, roles=("optimizer", "scorer"))
    _add_executor_flags(sw, sweep=True)
    sw.add_argument(
        "--max-parallel",
        type=_positive_int,
        metavar="N",
        help="runs at once (default: local, one per CPU; ray, as many as the cluster fits)",
    )
    _add_search_flags(sw)
    sw.add_argument("--json", action="store_true", help="end stdout with a JSON object")
    sw.set_defaults(handler=_cmd_sweep)

    ev = commands.add_parser("evaluate", help="score one instruction on a split of a task")
    ev.add_argument("task", help="task YAML")
    ev.add_argument("--instruction", required=True, help="the instruction to score")
    ev.add_argument(
        "--split", choices=("train", "validation", "test"), default="test", help="default test"
    )
    _add_model_flags(ev, roles=("scorer",))
    _add_retriever_flags(ev)
    _add_executor_flags(ev)
    ev.add_argument("--json", action="store_true", help="print a JSON object")
    ev.set_defaults(handler=_cmd_evaluate)

    retriever = commands.add_parser(
        "retriever", help="prompt retrieval: train a demonstration retriever (UPRISE)"
    )
    retriever_commands = retriever.add_subparsers(
        dest="retriever_command", required=True, metavar="COMMAND"
    )
    train = retriever_commands.add_parser(
        "train", help="label demonstrations with the scorer and train a retriever on them"
    )
    train.add_argument(
        "--tasks", nargs="+", required=True, metavar="TASK", help="task YAMLs (train splits)"
    )
    train.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to save it")
    train.add_argument("--resume", metavar="RUN", help="continue a stopped labelling run")
    train.add_argument(
        "--inputs-per-task", type=_positive_int, default=20, help="inputs labelled per task (20)"
    )
    train.add_argument(
        "--candidates", type=_positive_int, default=8, help="demonstrations scored per input (8)"
    )
    train.add_argument(
        "--epochs", type=_non_negative_int, default=2, help="0: the untrained encoder (2)"
    )
    train.add_argument("--batch-size", type=_positive_int, default=8, help="(8)")
    train.add_argument("--learning-rate", type=_positive_float, default=2e-5, help="(2e-5)")
    train.add_argument("--seed", type=_non_negative_int, default=0, help="(0)")
    train.add_argument(
        "--label-by",
        choices=("logprob", "accuracy"),
        default="logprob",
        help="rank candidates by the gold answer's log probability (where the scorer "
        "returns it) or by right answers only (logprob)",
    )
    train.add_argument("--max-calls", type=_positive_int, help="stop labelling after N calls")
    _add_model_flags(train, roles=("scorer",))
    train.set_defaults(handler=_cmd_retriever_train)

    runs = commands.add_parser("runs", help="list and inspect stored runs")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True, metavar="COMMAND")
    listing = runs_commands.add_parser("list", help="list the runs in a run directory")
    listing.add_argument("--run-dir", type=Path, default=Path("runs"))
    listing.set_defaults(handler=_cmd_runs_list)
    show = runs_commands.add_parser("show", help="a run's settings and history")
    show.add_argument("run", help="run id (a unique prefix will do)")
    show.add_argument("--run-dir", type=Path, default=Path("runs"))
    show.add_argument("--json", action="store_true", help="print a JSON object")
    show.set_defaults(handler=_cmd_runs_show)
    runs_compare = runs_commands.add_parser(
        "compare", help="stored runs side by side: one table and their curves (HTML)"
    )
    runs_compare.add_argument("runs", nargs="+", metavar="RUN", help="two or more run ids")
    runs_compare.add_argument("--run-dir", type=Path, default=Path("runs"))
    runs_compare.add_argument(
        "--out", type=Path, help="HTML file to write (default compare.html; with --json, none)"
    )
    runs_compare.add_argument("--json", action="store_true", help="print a JSON object")
    runs_compare.set_defaults(handler=_cmd_runs_compare)

    report = commands.add_parser("report", help="write a run's report: one offline HTML file")
    report.add_argument("run", metavar="RUN", help="run id (a unique prefix will do)")
    report.add_argument("--run-dir", type=Path, default=Path("runs"))
    report.add_argument(
        "--out", type=Path, default=Path("report.html"), help="HTML file (report.html)"
    )
    report.add_argument(
        "--png", action="store_true", help="also write the main chart as a PNG beside it"
    )
    report.set_defaults(handler=_cmd_report)

    tasks = commands.add_parser("tasks", help="work with task files")
    tasks_commands = tasks.add_subparsers(dest="tasks_command", required=True, metavar="COMMAND")
    validate = tasks_commands.add_parser("validate", help="check task files and their data")
    validate.add_argument("paths", nargs="+", metavar="TASK")
    validate.set_defaults(handler=_cmd_tasks_validate)
    return parser


def _add_comparison_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--strategies",
        required=True,
        type=_names,
        metavar="A,B",
        help="strategies to compare, e.g. opro,ape",
    )
    parser.add_argument(
        "--seeds", type=_seeds, default=(0,), metavar="0,1,2", help="one run per seed (0)"
    )
    parser.add_argument(
        "-S",
        "--strategy-setting",
        action="append",
        default=[],
        metavar="STRATEGY.KEY=VALUE",
        help="a setting of one strategy, e.g. -S protegi.beam=2 (repeatable)",
    )


def _names(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError("give at least one strategy name, e.g. opro,ape")
    return names


def _seeds(text: str) -> tuple[int, ...]:
    seeds = tuple(dict.fromkeys(int(_number(n, int)) for n in text.split(",") if n.strip()))
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed, e.g. 0,1,2")
    return seeds


def _add_search_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, metavar="YAML", help="run settings: strategy, steps, seed, ..."
    )
    parser.add_argument("--steps", type=_non_negative_int, help="optimization steps (default 10)")
    parser.add_argument("--patience", type=_positive_int, help="stop after K steps without gain")
    parser.add_argument("--target-score", type=_fraction, help="stop at this train accuracy")
    parser.add_argument("--seed", type=int, help="seed of the search (default 0)")
    parser.add_argument(
        "--no-guard",
        action="store_true",
        help="pick the best finalist on validation even if an initial instruction does better",
    )
    parser.add_argument(
        "--max-calls", type=_positive_int, help="stop cleanly after this many calls (per run)"
    )
    parser.add_argument("--max-tokens", type=_positive_int, help="... after this many tokens")
    parser.add_argument("--max-cost", type=_positive_float, help="... after this many USD")
    parser.add_argument(
        "--prices", type=Path, metavar="YAML", help="USD per 1M tokens by model, added to defaults"
    )


def _tracking_uri(text: str) -> str:
    if text.endswith((".yaml", ".yml")):  # `--mlflow task.yaml`: the URI is optional
        raise argparse.ArgumentTypeError(
            f"{text!r} looks like a task file: put --mlflow after it, or write --mlflow=URI"
        )
    return text


def _add_mlflow_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        type=_tracking_uri,
        metavar="TRACKING_URI",
        help="log each run to MLflow (the mlflow extra); URI default $MLFLOW_TRACKING_URI, "
        "else ./mlruns",
    )


def _mlflow_uri(args: argparse.Namespace) -> str | None:
    """The checked tracking URI of --mlflow (None without the flag), found before any
    model server starts."""
    if args.mlflow is None:
        return None
    from opro_agent.reports import mlflow as tracking

    return tracking.check_tracking_uri(args.mlflow or None, field="--mlflow")


def _log_to_mlflow(uri: str | None, result: OptimizationResult, store: RunStore) -> None:
    if uri is not None:
        from opro_agent.reports import mlflow as tracking

        tracking.log_run(result, store, tracking_uri=uri)


def _add_retriever_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--retriever",
        type=Path,
        metavar="DIR",
        help="show each question K demonstrations picked by this retriever",
    )
    parser.add_argument(
        "--k", type=_positive_int, default=3, help="demonstrations per question (3)"
    )


def _demonstrations(
    folder: Path | str | None, k: int, task: Task
) -> RetrievedDemonstrations | None:
    if folder is None:
        return None
    try:
        return RetrievedDemonstrations(Retriever.load(folder), task.input_fields, k)
    except ConfigError as exc:
        raise ConfigError(str(exc), field="--retriever" if exc.field is None else "--k") from exc


def _add_model_flags(parser: argparse.ArgumentParser, roles: Sequence[str]) -> None:
    for role in roles:
        parser.add_argument(
            f"--{role}",
            metavar="SPEC",
            help=f"{role} model: 'local' (default), 'openai:MODEL' or 'PROVIDER:MODEL'",
        )
        parser.add_argument(
            f"--{role}-base-url", metavar="URL", help="OpenAI-compatible server for openai:MODEL"
        )
    parser.add_argument("--local-model", type=Path, metavar="GGUF", help="GGUF file for 'local'")
    parser.add_argument("--concurrency", type=_positive_int, help="requests in flight (default 8)")
    parser.add_argument("--rpm", type=_positive_float, help="requests per minute, all calls")
    parser.add_argument("--tpm", type=_positive_float, help="tokens per minute, all calls")
    parser.add_argument("--no-cache", action="store_true", help="do not use the response cache")
    parser.add_argument(
        "--cache-dir", type=Path, help="response cache folder (default ~/.cache/opro-agent)"
    )
    parser.add_argument(
        "--run-dir", type=Path, default=Path("runs"), help="where runs are stored (./runs)"
    )


def _ray_address(text: str) -> str:
    try:
        return check_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_executor_flags(parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    parser.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="ray: serve the local model from replicas on a Ray cluster (the ray extra)"
        if not sweep
        else "ray: one Ray task per run; local: a pool of processes on this machine",
    )
    parser.add_argument(
        "--ray-address",
        type=_ray_address,
        metavar="ADDR",
        help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: start a local one)",
    )
    if not sweep:
        parser.add_argument(
            "--replicas", type=_positive_int, help="model-server replicas on Ray (default 2)"
        )
    parser.add_argument(
        "--replica-cpus",
        type=_positive_float,
        metavar="C",
        help="CPUs per model server on Ray (default 1)",
    )


def _pool(args: argparse.Namespace, specs: Iterable[ModelSpec]) -> PoolSettings | None:
    return pool_settings(
        args.executor,
        address=args.ray_address,
        replicas=args.replicas,
        replica_cpus=args.replica_cpus,
        serves_local=any(spec.provider == LOCAL for spec in specs),
    )


# -- commands ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _OptimizeJob:
    """What `optimize` runs: from the flags, or from a stored run when resuming."""

    task: Task
    strategy: Strategy
    settings: SearchSettings
    optimizer: str
    scorer: str
    optimizer_url: str | None
    scorer_url: str | None
    local_model: Path | None
    resume: str | None
    retriever: str | None = None
    k: int = 3

    def run_metadata(self) -> dict[str, Any]:
        return {
            "cli": {
                "optimizer": self.optimizer,
                "scorer": self.scorer,
                "optimizer_base_url": redact_url(self.optimizer_url),
                "scorer_base_url": redact_url(self.scorer_url),
                "local_model": str(self.local_model) if self.local_model else None,
                "retriever": self.retriever,
                "k": self.k,
            }
        }


@dataclass(frozen=True)
class _RunConfig:
    """A `--config` file: a strategy and search settings, below the flags in precedence."""

    source: str | None = None
    strategy: Any = None
    settings: Mapping[str, Any] = field(default_factory=dict)


_CONFIG_SETTINGS = frozenset(SearchSettings.__dataclass_fields__) - {"budget", "retry"}
# OPRO's flags, kept from before strategies existed: flag -> OPRO setting.
_OPRO_FLAGS = {
    "candidates": "candidates_per_step",
    "exemplars": "exemplar_selection",
    "meta_prompt": "meta_prompt",
    "early_rejection": "early_rejection",
}


def _run_config(path: Path | None) -> _RunConfig:
    if path is None:
        return _RunConfig()
    raw = read_yaml(path)
    src = str(path)
    if not isinstance(raw, dict):
        raise ConfigError("a run config must be a mapping of settings", source=src)
    for key in raw:
        if key != "strategy" and key not in _CONFIG_SETTINGS:
            known = ", ".join(sorted(_CONFIG_SETTINGS | {"strategy"}))
            raise ConfigError(f"unknown setting (known: {known})", source=src, field=str(key))
    settings = {k: v for k, v in raw.items() if k != "strategy"}
    return _RunConfig(src, raw.get("strategy"), settings)


def _search_settings(args: argparse.Namespace, config: _RunConfig) -> SearchSettings:
    flags = {
        "steps": args.steps,
        "patience": args.patience,
        "target_score": args.target_score,
        "seed": args.seed,
        "concurrency": args.concurrency,
        "keep_initial_unless_better": False if args.no_guard else None,
    }
    values = {**config.settings, **{k: v for k, v in flags.items() if v is not None}}
    try:
        return SearchSettings(**values, budget=_budget(args))
    except ConfigError as exc:
        raise ConfigError(exc.message, source=config.source, field=exc.field) from None
    except TypeError as exc:
        raise ConfigError(f"bad setting: {exc}", source=config.source) from None


def _budget(args: argparse.Namespace) -> Budget:
    return Budget(args.max_calls, args.max_tokens, args.max_cost)


def _strategy(
    name: str | None, task: Task, config: _RunConfig, *, field: str = "--strategy"
) -> Strategy:
    """The strategy named (or the one the config file, else the task file, asks for, else
    OPRO), with the settings the config or task file gives for that strategy."""
    chosen = None
    for spec, source in ((task.strategy, task.source), (config.strategy, config.source)):
        if spec is None:
            continue
        strategy = make_strategy(spec, source=source)
        if name is None or strategy.name == name:
            chosen = strategy
    if chosen is None or (name is not None and chosen.name != name):
        chosen = make_strategy(name or "opro", field=field)
    return chosen


def _strategy_from_flags(args: argparse.Namespace, task: Task, config: _RunConfig) -> Strategy:
    strategy = _strategy(args.strategy, task, config)
    for flag, setting in _OPRO_FLAGS.items():
        value = getattr(args, flag)
        if value not in (None, False):
            strategy = make_strategy(
                strategy, {setting: value}, field="--" + flag.replace("_", "-")
            )
    for key, value in _setting_pairs(args.strategy_setting):
        strategy = make_strategy(strategy, {key: value}, field="--strategy-setting")
    return strategy


def _setting_pairs(pairs: Sequence[str]) -> list[tuple[str, Any]]:
    """`-S KEY=VALUE` pairs; values are read as YAML (numbers, booleans, strings)."""
    parsed = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected KEY=VALUE, got {pair!r}", field="--strategy-setting")
        parsed.append((key.strip(), yaml.safe_load(text) if text.strip() else ""))
    return parsed


def _job_from_flags(args: argparse.Namespace) -> _OptimizeJob:
    if not args.task:
        raise ConfigError("give a task YAML file, or --resume RUN", field="TASK")
    task = Task.from_yaml(args.task)
    config = _run_config(args.config)
    job = _runs_job(
        args, task, _strategy_from_flags(args, task, config), _search_settings(args, config)
    )
    retriever = str(args.retriever.resolve()) if args.retriever else None
    return dataclasses.replace(job, retriever=retriever, k=args.k)


def _job_from_run(store: RunStore, args: argparse.Namespace) -> _OptimizeJob:
    run = store.get_run(args.resume)
    if run.config.get("kind") == LABEL_RUN_KIND:
        raise ConfigError(
            f"run {run.id} labels a retriever: continue it with "
            f"opro-agent retriever train --tasks ... --resume {run.id}",
            field="--resume",
        )
    stored = run.config.get("cli", {})
    task_path = args.task or run.config.get("task_path")
    if not task_path:
        raise ConfigError("the run has no task file; give TASK", field="--resume")
    strategy, settings = split_run_config(run.config)
    # Only what cannot change the result may differ from the stored run.
    search = SearchSettings.from_dict(settings).replace(budget=_budget(args))
    if args.concurrency:
        search = search.replace(concurrency=args.concurrency)
    local_model = args.local_model or stored.get("local_model")
    return _OptimizeJob(
        task=Task.from_yaml(task_path),
        strategy=make_strategy(strategy),
        settings=search,
        optimizer=stored.get("optimizer", LOCAL),
        scorer=stored.get("scorer", LOCAL),
        optimizer_url=args.optimizer_base_url or stored.get("optimizer_base_url"),
        scorer_url=args.scorer_base_url or stored.get("scorer_base_url"),
        local_model=Path(local_model) if local_model else None,
        resume=run.id,
        retriever=stored.get("retriever"),
        k=stored.get("k", 3),
    )


@dataclass
class _Session:
    """What every run of one command shares: model specs, options, prices, resources."""

    specs: dict[str, ModelSpec]
    options: dict[str, ModelOptions]
    prices: dict[str, Price | None]

    @classmethod
    def from_job(cls, args: argparse.Namespace, job: _OptimizeJob, *, logprobs: bool) -> _Session:
        specs = {
            "optimizer": ModelSpec.parse(job.optimizer, flag="--optimizer"),
            "scorer": ModelSpec.parse(job.scorer, flag="--scorer"),
        }
        options = {
            "optimizer": ModelOptions(1.0, OPTIMIZER_MAX_TOKENS, job.optimizer_url),
            "scorer": ModelOptions(
                0.0,
                job.task.answer_max_tokens,
                job.scorer_url,
                top_logprobs=SCORER_TOP_LOGPROBS if logprobs else None,
            ),
        }
        return cls(specs, options, _prices(args, specs))

    def identities(self, models: Models) -> dict[str, dict[str, Any]]:
        """What identifies each role's model, as stored with a run."""
        return {role: models.identity(self.specs[role], self.options[role]) for role in self.specs}

    def optimizer(
        self,
        models: Models,
        job: _OptimizeJob,
        args: argparse.Namespace,
        store: RunStore,
        observer: _ProgressBar | None,
    ) -> OproOptimizer:
        specs, options = self.specs, self.options
        identities = self.identities(models)
        return OproOptimizer(
            models.chat_model(specs["optimizer"], options["optimizer"], flag="--optimizer"),
            models.chat_model(specs["scorer"], options["scorer"], flag="--scorer"),
            strategy=job.strategy,
            settings=job.settings,
            resources=RunResources(
                cache=None if args.no_cache else ResponseCache.open(args.cache_dir),
                rate_limits=_rate_limits(args),
                observer=observer,
                prices={role: p for role, p in self.prices.items() if p is not None},
                identities={role: json.dumps(i, sort_keys=True) for role, i in identities.items()},
                rate_limit_errors=rate_limit_errors(),
            ),
            store=store,
            run_metadata={**job.run_metadata(), "models": identities},
            seed_optimizer_calls=specs["optimizer"].accepts_seed,
            demonstrations=_demonstrations(job.retriever, job.k, job.task),
        )


def _run(optimizer: OproOptimizer, job: _OptimizeJob, run_dir: Path) -> OptimizationResult:
    """Run (or resume) one stored run; on Ctrl-C or failing calls, say how to continue."""
    run_id = job.resume or optimizer.prepare_run(job.task)
    try:
        return optimizer.invoke(job.task, run_id=run_id)
    except (KeyboardInterrupt, LLMCallsFailingError) as exc:
        _print_resume_hint(run_id, run_dir, exc)
        raise


def _cmd_optimize(args: argparse.Namespace) -> int:
    store = _existing_store(args.run_dir, resume=args.resume) if args.resume else None
    job = _job_from_run(store, args) if store is not None else _job_from_flags(args)
    # Everything that can be wrong with the input is found before a model server starts.
    job.strategy.check(job.task)
    session = _Session.from_job(args, job, logprobs=job.strategy.needs_logprobs)
    if args.dry_run:
        _print_estimate(job, session.prices, as_json=args.json)
        return 0
    mlflow_uri = _mlflow_uri(args)
    pool = _pool(args, session.specs.values())
    store = store or RunStore.open(args.run_dir)
    with (
        Models(log_dir=args.run_dir, local_model=job.local_model, pool=pool) as models,
        _progress(enabled=not args.json and sys.stdout.isatty()) as observer,
    ):
        result = _run(session.optimizer(models, job, args, store, observer), job, args.run_dir)
    _print_result(result, as_json=args.json)
    _log_to_mlflow(mlflow_uri, result, store)
    return 0


def _compare_strategies(args: argparse.Namespace, task: Task, config: _RunConfig) -> list[Strategy]:
    """The strategies of `--strategies` for a task, with their `-S STRATEGY.KEY=VALUE`
    settings, checked against the task (before any model server starts)."""
    strategies = [_strategy(name, task, config, field="--strategies") for name in args.strategies]
    for dotted, value in _setting_pairs(args.strategy_setting):
        name, dot, key = dotted.partition(".")
        if not dot or name not in args.strategies:
            raise ConfigError(
                f"expected STRATEGY.KEY=VALUE for one of {', '.join(args.strategies)}, "
                f"got {dotted!r}",
                field="--strategy-setting",
            )
        strategies = [
            make_strategy(s, {key: value}, field="--strategy-setting") if s.name == name else s
            for s in strategies
        ]
    for strategy in strategies:
        strategy.check(task)
    return strategies


def _runs_job(
    args: argparse.Namespace,
    task: Task,
    strategy: Strategy,
    settings: SearchSettings,
    resume: str | None = None,
) -> _OptimizeJob:
    """One run of `optimize`, `compare` or `sweep`: the models of the flags."""
    return _OptimizeJob(
        task=task,
        strategy=strategy,
        settings=settings,
        optimizer=args.optimizer or LOCAL,
        scorer=args.scorer or LOCAL,
        optimizer_url=args.optimizer_base_url,
        scorer_url=args.scorer_base_url,
        local_model=args.local_model,
        resume=resume,
    )


def _cmd_compare(args: argparse.Namespace) -> int:
    task = Task.from_yaml(args.task)
    config = _run_config(args.config)
    strategies = _compare_strategies(args, task, config)
    settings = _search_settings(args, config)
    jobs = {
        strategy.name: [
            _runs_job(args, task, strategy, settings.replace(seed=seed)) for seed in args.seeds
        ]
        for strategy in strategies
    }
    # One scorer for every strategy: with log probabilities if any strategy ranks by them.
    logprobs = any(s.needs_logprobs for s in strategies)
    session = _Session.from_job(args, jobs[strategies[0].name][0], logprobs=logprobs)
    mlflow_uri = _mlflow_uri(args)
    pool = _pool(args, session.specs.values())
    store = RunStore.open(args.run_dir)
    results: dict[str, list[RunSummary]] = {}
    with Models(log_dir=args.run_dir, local_model=args.local_model, pool=pool) as models:
        for name, runs in jobs.items():
            for job in runs:
                optimizer = session.optimizer(models, job, args, store, None)
                result = _run(optimizer, job, args.run_dir)
                log.info(
                    "compare.run_done", strategy=name, seed=job.settings.seed, run_id=result.run_id
                )
                _log_to_mlflow(mlflow_uri, result, store)
                results.setdefault(name, []).append(result.summary())
    summaries = summarise(results)
    if args.json:
        print(
            json.dumps(
                {
                    "task": task.name,
                    "seeds": list(args.seeds),
                    "strategies": [s.to_dict() for s in summaries],
                },
                ensure_ascii=False,
            )
        )
    else:
        print(
            f"{task.name}: {', '.join(results)} on the same splits, "
            f"seeds {', '.join(map(str, args.seeds))}"
        )
        print(render_table(summaries))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    if args.executor == "ray":
        import_ray()
    for flag, value in (("--ray-address", args.ray_address), ("--replica-cpus", args.replica_cpus)):
        if args.executor != "ray" and value is not None:
            raise ConfigError("needs --executor ray", field=flag)
    config = _run_config(args.config)
    settings = _search_settings(args, config)
    runs: list[SweepRun] = []
    # Models only for the identities a stored run must match: no model server starts here.
    with Models(log_dir=args.run_dir, local_model=args.local_model) as models:
        for path in args.tasks:
            task = Task.from_yaml(path)
            strategies = _compare_strategies(args, task, config)
            logprobs = any(s.needs_logprobs for s in strategies)  # as compare does
            for strategy in strategies:
                job = _runs_job(args, task, strategy, settings)
                session = _Session.from_job(args, job, logprobs=logprobs)
                for seed in args.seeds:
                    signature = run_signature(
                        task.name,
                        task.fingerprint(),
                        strategy.to_dict(),
                        settings.replace(seed=seed),
                        session.identities(models),
                    )
                    runs.append(SweepRun(str(path), task.name, strategy.name, seed, signature))
    # --rpm and --tpm bound all calls: each run in flight gets its share.
    parallel = args.max_parallel or min(len(runs), os.cpu_count() or 1)
    shares = {
        name: None if getattr(args, name) is None else getattr(args, name) / parallel
        for name in ("rpm", "tpm")
    }
    worker = functools.partial(_sweep_worker, argparse.Namespace(**{**vars(args), **shares}))
    outcome = run_sweep(
        runs,
        worker,
        run_dir=args.run_dir,
        executor=args.executor,
        address=args.ray_address,
        max_parallel=args.max_parallel,
        run_cpus=args.replica_cpus or 1.0,
    )
    tables = {name: summarise(results) for name, results in outcome.by_task(runs).items()}
    if args.json:
        print(
            json.dumps(
                {
                    "seeds": list(args.seeds),
                    "reused": outcome.reused,
                    "tasks": [
                        {"task": name, "strategies": [s.to_dict() for s in summaries]}
                        for name, summaries in tables.items()
                    ],
                    "failed": {run.describe(): why for run, why in outcome.failures.items()},
                },
                ensure_ascii=False,
            )
        )
    else:
        print(
            f"{len(runs)} runs ({outcome.reused} reused from {args.run_dir}), "
            f"seeds {', '.join(map(str, args.seeds))}"
        )
        for name, summaries in tables.items():
            print(f"\n{name}:")
            print(render_table(summaries))
    if outcome.failures:
        for run, why in outcome.failures.items():
            print(f"opro-agent: error: {run.describe()}: {why}", file=sys.stderr)
        print(
            f"{len(outcome.failures)} of {len(runs)} runs did not finish; what they did is "
            "saved: run the same command again to resume them",
            file=sys.stderr,
        )
        return 1
    return 0


def _sweep_worker(args: argparse.Namespace, run: SweepRun) -> RunSummary:
    """One run of a sweep, in a worker process: compare's run, on its own models."""
    _configure_logging(as_json=args.log_json, quiet=args.quiet)
    task = Task.from_yaml(run.task_path)
    config = _run_config(args.config)
    strategies = _compare_strategies(args, task, config)
    strategy = next(s for s in strategies if s.name == run.strategy)
    settings = _search_settings(args, config).replace(seed=run.seed)
    job = _runs_job(args, task, strategy, settings, resume=run.resume)
    session = _Session.from_job(args, job, logprobs=any(s.needs_logprobs for s in strategies))
    store = RunStore.open(args.run_dir)
    with Models(log_dir=args.run_dir, local_model=args.local_model) as models:
        result = _run(session.optimizer(models, job, args, store, None), job, args.run_dir)
    return result.summary()


def _rate_limits(args: argparse.Namespace) -> RateLimits | None:
    return RateLimits(args.rpm, args.tpm) if args.rpm or args.tpm else None


def _prices(args: argparse.Namespace, specs: dict[str, ModelSpec]) -> dict[str, Price | None]:
    table = PriceTable.from_yaml(args.prices) if args.prices else PriceTable.default()
    prices = {role: table.price(str(spec)) for role, spec in specs.items()}
    if args.max_cost is not None:
        for role, price in prices.items():
            if price is None:
                raise ConfigError(
                    f"no price known for {specs[role]}; add it with --prices FILE.yaml",
                    field="--max-cost",
                )
    return prices


class _ProgressBar:
    """A terminal progress bar: step, best train score, calls, tokens, cost, ETA."""

    def __init__(self) -> None:
        self._bar = tqdm(total=0, unit="call", dynamic_ncols=True, file=sys.stderr, leave=False)
        self._tokens = 0
        self._cost = 0.0
        self._cached = 0

    def on_plan(self, calls: int) -> None:
        self._bar.total = self._bar.n + calls
        self._bar.refresh()

    def on_call(self, role: str, *, cached: bool, tokens: int, cost: float) -> None:
        self._tokens += tokens
        self._cost += cost
        self._cached += cached
        self._bar.set_postfix_str(
            f"tokens {self._tokens} ${self._cost:.4f} cached {self._cached}", refresh=False
        )
        self._bar.update(1)

    def on_step(self, step: int, best_train: float) -> None:
        self._bar.set_description(f"step {step} best {best_train:.3f}")

    def close(self) -> None:
        self._bar.close()


@contextmanager
def _progress(*, enabled: bool) -> Iterator[_ProgressBar | None]:
    if not enabled:
        yield None
        return
    bar = _ProgressBar()
    try:
        yield bar
    finally:
        bar.close()


def _print_estimate(job: _OptimizeJob, prices: dict[str, Price | None], *, as_json: bool) -> None:
    task = job.task
    estimate = estimate_run(
        task, job.settings, job.strategy, optimizer_max_tokens=OPTIMIZER_MAX_TOKENS, prices=prices
    )
    figures = {
        "task": task.name,
        "strategy": job.strategy.name,
        "calls": {"optimizer": estimate.optimizer_calls, "scorer": estimate.scorer_calls},
        "tokens": {"prompt": estimate.prompt_tokens, "completion": estimate.completion_tokens},
        "cost": None if estimate.cost is None else round(estimate.cost, 4),
        "token_counts": "tiktoken" if tiktoken_available() else "estimated (~4 chars/token)",
    }
    if as_json:
        print(json.dumps(figures))
        return
    cost = "unknown (no price for a model)" if estimate.cost is None else f"${estimate.cost:.4f}"
    print(
        f"Projected for {task.name} with {job.strategy.name} "
        "(at most; early rejection and the cache spend less):"
    )
    print(f"  calls:  optimizer {estimate.optimizer_calls}, scorer {estimate.scorer_calls}")
    print(
        f"  tokens: {estimate.prompt_tokens} prompt, {estimate.completion_tokens} completion "
        f"({figures['token_counts']})"
    )
    print(f"  cost:   {cost}")


def _print_resume_hint(run_id: str, run_dir: Path, exc: BaseException) -> None:
    why = "interrupted" if isinstance(exc, KeyboardInterrupt) else "stopped"
    print(
        f"run {run_id} {why}; everything so far is saved. Continue with: "
        f"opro-agent optimize --resume {run_id} --run-dir {run_dir}",
        file=sys.stderr,
    )


def _print_result(result: OptimizationResult, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.summary(), ensure_ascii=False))
        return
    scores = "  ".join(
        f"{name} {_with_interval(value, result.intervals.get(name))}"
        for name, value in result.scores.items()
    )
    print(
        f"Best instruction (run {result.run_id}, {result.strategy}, "
        f"stopped on {result.stop_reason}):"
    )
    print(f"  {result.best_instruction!r}")
    if result.selection_reason:
        kept = "kept the initial instruction" if result.kept_initial else "note"
        print(f"  ({kept}: {result.selection_reason})")
    print(f"Scores (95% intervals): {scores}")
    for text, score in result.baselines.items():
        print(
            f"Baseline {text!r}: test {_with_interval(score, result.baseline_intervals.get(text))}"
        )
    comparison = result.test_comparison
    if result.test_gain is not None and result.best_instruction in result.baselines:
        print(
            f"Held-out gain over the best initial instruction: {result.test_gain:+.3f} "
            "(the winner is an initial instruction)"
        )
    elif result.test_gain is not None and comparison is not None:
        print(
            f"Held-out gain over the best initial instruction: {result.test_gain:+.3f} "
            f"(95% CI {comparison.low:+.3f} to {comparison.high:+.3f}, {comparison.method}; "
            f"fixed {len(comparison.fixed)}, broke {len(comparison.broken)} test questions): "
            f"{comparison.verdict()}"
        )
    cost = "" if result.cost is None else f"; ${result.cost:.4f}"
    print(
        f"Calls: optimizer {result.calls['optimizer']}, scorer {result.calls['scorer']} "
        f"({result.cache_hits} answered from cache, {result.saved_by_early_rejection} saved by "
        f"early rejection); tokens: {result.tokens['prompt']} prompt, "
        f"{result.tokens['completion']} completion{cost}; {result.wall_seconds:.1f} s"
    )


def _with_interval(value: float | None, interval: Interval | None) -> str:
    if value is None or interval is None:
        return _fmt(value)
    return f"{value:.3f} [{interval.low:.3f}, {interval.high:.3f}]"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cmd_evaluate(args: argparse.Namespace) -> int:
    task = Task.from_yaml(args.task)
    spec = ModelSpec.parse(args.scorer or LOCAL, flag="--scorer")
    options = ModelOptions(0.0, task.answer_max_tokens, args.scorer_base_url)
    demonstrations = _demonstrations(args.retriever, args.k, task)
    pool = _pool(args, [spec])
    with Models(log_dir=args.run_dir, local_model=args.local_model, pool=pool) as models:
        model = models.chat_model(spec, options, flag="--scorer")
        scored = asyncio.run(
            evaluate_instruction(
                task,
                args.instruction,
                scorer=model,
                split=args.split,
                concurrency=args.concurrency or 8,
                resources=RunResources(
                    cache=None if args.no_cache else ResponseCache.open(args.cache_dir),
                    rate_limits=_rate_limits(args),
                    identities={"scorer": json.dumps(models.identity(spec, options))},
                    rate_limit_errors=rate_limit_errors(),
                ),
                demonstrations=demonstrations,
            )
        )
    failed = sum(1 for r in scored.results.values() if r.error)
    if args.json:
        print(
            json.dumps(
                {
                    "task": task.name,
                    "instruction": scored.instruction,
                    "split": args.split,
                    "score": scored.score,
                    "examples": len(scored.results),
                    "failed": failed,
                    "retriever": None if demonstrations is None else repr(demonstrations),
                },
                ensure_ascii=False,
            )
        )
    else:
        print(
            f"{task.name} {args.split}: {scored.score:.3f} "
            f"({len(scored.results)} examples, {failed} failed calls)"
        )
    return 0


def _cmd_retriever_train(args: argparse.Namespace) -> int:
    tasks = [Task.from_yaml(path) for path in args.tasks]
    # A saved retriever may be replaced; a folder of anything else is not overwritten.
    replaceable = args.out.is_dir() and (
        (args.out / "retriever.json").exists() or not any(args.out.iterdir())
    )
    if args.out.exists() and not replaceable:
        raise ConfigError(f"{args.out} exists and is not a saved retriever", field="--out")
    labels = LabelSettings(args.inputs_per_task, args.candidates, args.seed)
    training = TrainSettings(args.epochs, args.batch_size, args.learning_rate, args.seed)
    if args.epochs == 0:
        retriever = train_retriever(tasks, training=training)
    else:
        store = RunStore.open(args.run_dir)
        run_id = label_run(store, tasks, labels, args.resume)
        spec = ModelSpec.parse(args.scorer or LOCAL, flag="--scorer")
        options = ModelOptions(
            0.0,
            max(task.answer_max_tokens for task in tasks),
            args.scorer_base_url,
            top_logprobs=SCORER_TOP_LOGPROBS if args.label_by == "logprob" else None,
        )
        with Models(log_dir=args.run_dir, local_model=args.local_model) as models:
            try:
                retriever = train_retriever(
                    tasks,
                    models.chat_model(spec, options, flag="--scorer"),
                    labels=labels,
                    training=training,
                    store=store,
                    run_id=run_id,
                    resources=RunResources(
                        cache=None if args.no_cache else ResponseCache.open(args.cache_dir),
                        rate_limits=_rate_limits(args),
                        identities={"scorer": json.dumps(models.identity(spec, options))},
                        rate_limit_errors=rate_limit_errors(),
                    ),
                    budget=Budget(max_calls=args.max_calls),
                    concurrency=args.concurrency or 8,
                )
            except (KeyboardInterrupt, OproError) as exc:
                if not isinstance(exc, ConfigError):
                    print(
                        f"labelling run {run_id} stopped; everything so far is saved. Continue "
                        f"with: opro-agent retriever train ... --resume {run_id} "
                        f"--run-dir {args.run_dir}",
                        file=sys.stderr,
                    )
                raise
    retriever.save(args.out)
    labelled = retriever.info.get("labels", {})
    how = (
        f"trained on {labelled['informative']} of {labelled['labelled']} labelled inputs "
        f"({labelled['by_logprob']} by logprob)"
        if retriever.trained
        else "untrained (the base encoder's nearest neighbours)"
    )
    print(f"retriever: {len(retriever.pool)} demonstrations, {how}; saved to {args.out}")
    return 0


def _cmd_runs_list(args: argparse.Namespace) -> int:
    store = _existing_store(args.run_dir)
    runs = store.list_runs()
    if not runs:
        print(f"no runs in {args.run_dir}")
        return 0
    print(f"{'RUN':<24} {'TASK':<24} {'STATUS':<12} {'TEST':>6}  CREATED")
    for run in runs:
        test = (run.summary or {}).get("scores", {}).get("test")
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.created_at))
        print(f"{run.id:<24} {run.task:<24} {run.status:<12} {_fmt(test):>6}  {created}")
    return 0


def _cmd_runs_show(args: argparse.Namespace) -> int:
    store = _existing_store(args.run_dir)
    run = store.get_run(args.run)
    history = store.history(run.id)
    usage = store.usage(run.id)
    if args.json:
        print(
            json.dumps(
                {
                    "run_id": run.id,
                    "task": run.task,
                    "status": run.status,
                    "config": run.config,
                    "summary": run.summary,
                    "usage": usage,
                    "history": [h.__dict__ for h in history],
                    "test_changes": _test_changes(store, run.id),
                },
                ensure_ascii=False,
            )
        )
        return 0
    print(f"run {run.id}  task {run.task}  status {run.status}")
    models = run.config.get("models", {})
    for role, identity in models.items():
        print(f"{role}: {identity.get('spec')}")
    print(
        f"calls: optimizer {usage['optimizer_calls']}, scorer {usage['scorer_calls']}; "
        f"tokens: {usage['prompt_tokens']} prompt, {usage['completion_tokens']} completion"
    )
    print(f"{'STEP':>4} {'ORIGIN':<9} {'TRAIN':>6} {'VALID':>6} {'TEST':>6}  INSTRUCTION")
    for h in history:
        print(
            f"{h.step:>4} {h.origin:<9} {_fmt(h.train):>6} {_fmt(h.validation):>6} "
            f"{_fmt(h.test):>6}  {h.instruction!r}"
        )
    if run.summary:
        print(f"best: {run.summary.get('best_instruction')!r}")
    return 0


_REPORT_EXTRA = "opro-agent {command} needs the report extra: pip install 'opro-agent[report]'"


def _report_extra_missing() -> bool:
    """Whether the `report` extra's plotting library (matplotlib) cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def _write_output(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}", field="--out") from None


def _cmd_report(args: argparse.Namespace) -> int:
    if _report_extra_missing():
        print(_REPORT_EXTRA.format(command="report"), file=sys.stderr)
        return 2
    # Imported here: charts need the optional `report` extra, other commands do not.
    from opro_agent.reports.html import render_report

    store = _existing_store(args.run_dir)
    try:
        report = RunReport.from_store(store, args.run)
    except RunStoreError as exc:
        raise ConfigError(str(exc), field="RUN") from None
    rendered = render_report(report)
    _write_output(args.out, rendered.html.encode("utf-8"))
    print(f"wrote {args.out}")
    if args.png:
        if rendered.main_chart is None:
            print("no PNG written: the run has no scored instruction yet", file=sys.stderr)
        else:
            png = args.out.with_suffix(".png")
            _write_output(png, rendered.main_chart)
            print(f"wrote {png}")
    return 0


def _cmd_runs_compare(args: argparse.Namespace) -> int:
    if len(args.runs) < 2:
        raise ConfigError("give at least two runs to compare", field="RUN")
    out: Path | None = args.out
    if out is None and not args.json:
        out = Path("compare.html")
    if out is not None and _report_extra_missing():
        print(_REPORT_EXTRA.format(command="runs compare"), file=sys.stderr)
        return 2
    store = _existing_store(args.run_dir)
    try:
        comparison = RunsComparison.from_store(store, args.runs)
    except RunStoreError as exc:
        raise ConfigError(str(exc), field="RUN") from None
    if out is not None:
        from opro_agent.reports.html import render_comparison

        _write_output(out, render_comparison(comparison).encode("utf-8"))
    if args.json:
        if out is not None:
            print(f"wrote {out}")
        print(json.dumps(comparison.to_dict(), ensure_ascii=False))
    else:
        print(comparison.table())
        print(f"wrote {out}")
    return 0


def _test_changes(store: RunStore, run_id: str) -> dict[str, Any] | None:
    """The test examples the winner fixed and broke against the best initial instruction
    (with question and answers when the task file is at hand); None before the test."""
    headline = RunReport.from_store(store, run_id).headline()
    if headline is None:
        return None
    return {
        "baseline": headline.baseline,
        "fixed": [dataclasses.asdict(c) for c in headline.fixed],
        "broken": [dataclasses.asdict(c) for c in headline.broken],
    }


def _existing_store(run_dir: Path, *, resume: str | None = None) -> RunStore:
    if not (run_dir / DB_FILENAME).is_file():
        if resume:
            raise ConfigError(f"no run {resume!r}: {run_dir} holds no runs", field="--resume")
        raise ConfigError(f"no run store in {run_dir}", field="--run-dir")
    return RunStore.open(run_dir)


def _cmd_tasks_validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.paths:
        try:
            task = Task.from_yaml(path)
        except ConfigError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
            continue
        splits = task.splits()
        print(
            f"ok: {path}: {task.name}, {len(task.examples)} examples "
            f"(train {len(splits.train)}, validation {len(splits.validation)}, "
            f"test {len(splits.test)}), metric {task.metric_name}"
        )
    return 2 if failed else 0


# -- entry point ---------------------------------------------------------------------------------


def _configure_logging(*, as_json: bool, quiet: bool) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.WARNING if quiet else logging.INFO
        ),
        # Resolve stderr per logger: it may be replaced after configuration (tests, wrappers).
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    # The progress bar replaces the per-candidate log lines on a terminal.
    shows_progress = args.command == "optimize" and not args.json and sys.stdout.isatty()
    _configure_logging(
        as_json=args.log_json, quiet=args.quiet or (shows_progress and not args.log_json)
    )
    signal.signal(signal.SIGTERM, _interrupt)  # a polite kill stops like Ctrl-C: cleanly
    try:
        code: int = args.handler(args)
        return code
    except ConfigError as exc:
        print(f"opro-agent: error: {exc}", file=sys.stderr)
        return 2
    except OproError as exc:
        print(f"opro-agent: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("opro-agent: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
