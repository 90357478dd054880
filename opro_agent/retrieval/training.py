"""Train a retriever on the scorer's feedback (UPRISE): label, then contrastive training.

Each informative labelled input gives one training row: the input (anchor), the demonstration
that helped the scorer most (positive) and the one that helped least (hard negative); the
other rows' demonstrations in the batch are negatives too. The loss is InfoNCE
(sentence-transformers' `MultipleNegativesRankingLoss`), trained with its
`SentenceTransformerTrainer` on the CPU; the input and prompt towers are trained apart
(`router_mapping`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import structlog
from langchain_core.runnables import Runnable, RunnableConfig

from opro_agent.budget import Budget, Meter, spend_from_usage
from opro_agent.errors import ConfigError, RunStoreError
from opro_agent.llm_calls import Caller, RetryPolicy
from opro_agent.optimizer import call_policy
from opro_agent.retrieval.encoder import BASE_ENCODER, bi_encoder
from opro_agent.retrieval.labels import LabelledInput, LabelSettings, label_inputs
from opro_agent.retrieval.pool import PromptPool, build_pool
from opro_agent.retrieval.retriever import Retriever
from opro_agent.scorer import Scorer
from opro_agent.settings import RunResources
from opro_agent.store import RunStore
from opro_agent.task import Task

__all__ = ["LABEL_RUN_KIND", "TrainSettings", "label_run", "train_encoder", "train_retriever"]

log = structlog.get_logger()
LABEL_RUN_KIND = "retriever-labels"


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 2  # 0: no labels, no training: the base encoder's nearest neighbours
    batch_size: int = 8
    learning_rate: float = 2e-5
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run_config(tasks: Sequence[Task], pool: PromptPool, labels: LabelSettings) -> dict[str, Any]:
    return {
        "kind": LABEL_RUN_KIND,
        "tasks": {task.name: task.fingerprint() for task in tasks},
        "pool": pool.fingerprint(),
        "labels": labels.to_dict(),
    }


def label_run(
    store: RunStore, tasks: Sequence[Task], labels: LabelSettings, run_id: str | None = None
) -> str:
    """The stored run that holds the labelling answers: a new one, or `run_id` checked to be
    the same labelling (same task data, pool and label settings) so it can be resumed."""
    config = _run_config(tasks, build_pool(tasks), labels)
    if run_id is None:
        return store.create_run("retriever", config)
    run = store.get_run(run_id)
    if run.config != config:
        raise RunStoreError(
            f"run {run.id} labelled other tasks, data or label settings; start a new one"
        )
    return run.id


async def _label(
    tasks: Sequence[Task],
    pool: PromptPool,
    scorer: Runnable[Any, Any],
    store: RunStore,
    run_id: str,
    labels: LabelSettings,
    resources: RunResources,
    budget: Budget,
    concurrency: int,
    config: RunnableConfig | None,
) -> list[LabelledInput]:
    meter = Meter(
        budget, spent=spend_from_usage(store.usage(run_id), resources.prices), observer=None
    )
    caller = Caller(
        scorer,
        role="scorer",
        policy=call_policy("scorer", scorer, resources, RetryPolicy(), meter),
    )
    scorers = {
        task.name: Scorer(
            task,
            caller,
            "chat_model",
            store=store,
            run_id=run_id,
            concurrency=concurrency,
            config=config,
        )
        for task in tasks
    }
    return await label_inputs(scorers, pool, labels)


def train_encoder(rows: Sequence[LabelledInput], settings: TrainSettings) -> Any:
    """A bi-encoder trained on the informative rows (a SentenceTransformer)."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    from transformers import PrinterCallback

    data = Dataset.from_dict(
        {
            "anchor": [row.question for row in rows],
            "positive": [row.candidates[0].demonstration.text for row in rows],
            "negative": [row.candidates[-1].demonstration.text for row in rows],
        }
    )
    model = bi_encoder()
    # A widget already set skips the model card's widget pass, which draws a progress bar.
    model.model_card_data.widget = [{"text": rows[0].question}]
    with tempfile.TemporaryDirectory(prefix="opro-retriever-") as scratch:
        args = SentenceTransformerTrainingArguments(
            output_dir=scratch,
            num_train_epochs=settings.epochs,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            seed=settings.seed,
            data_seed=settings.seed,
            # Identical texts in one batch would be false negatives for each other.
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            router_mapping={"anchor": "query", "positive": "document", "negative": "document"},
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        trainer = SentenceTransformerTrainer(
            model=model,
            args=args,
            train_dataset=data,
            loss=MultipleNegativesRankingLoss(model),
        )
        trainer.remove_callback(PrinterCallback)  # it prints metrics to stdout; we log them
        output = trainer.train()
    log.info("retriever.trained", rows=len(rows), loss=round(float(output.training_loss), 4))
    return model


def train_retriever(
    tasks: Sequence[Task],
    scorer: Runnable[Any, Any] | None = None,
    *,
    labels: LabelSettings | None = None,
    training: TrainSettings | None = None,
    store: RunStore | None = None,
    run_id: str | None = None,
    resources: RunResources | None = None,
    budget: Budget | None = None,
    concurrency: int = 8,
    config: RunnableConfig | None = None,
) -> Retriever:
    """Build the prompt pool from the tasks' train splits, label inputs with the frozen
    `scorer` (a chat model; with `logprobs=True, top_logprobs=N` it is labelled by log
    probability), and train a bi-encoder on the labels.

    With `training.epochs == 0` nothing is labelled or trained: the result is the base
    encoder's nearest neighbours. `store` and `run_id` (from `label_run`) keep the labelling
    resumable; without them it is kept in memory.
    """
    from opro_agent.optimizer import run_sync

    labels = labels or LabelSettings()
    training = training or TrainSettings()
    pool = build_pool(tasks)
    if training.epochs == 0:
        return Retriever.untrained(pool)
    if scorer is None:
        raise ConfigError("training a retriever needs a scorer to label demonstrations")
    store = store or RunStore(":memory:")
    run_id = label_run(store, tasks, labels, run_id)
    session = store.start_session(run_id)
    status = "failed"
    try:
        labelled = run_sync(
            _label(
                tasks,
                pool,
                scorer,
                store,
                run_id,
                labels,
                resources or RunResources(),
                budget or Budget(),
                concurrency,
                config,
            )
        )
        rows = [row for row in labelled if row.informative]
        summary = {
            "labelled": len(labelled),
            "informative": len(rows),
            "by_logprob": sum(row.by == "logprob" for row in labelled),
        }
        store.set_status(run_id, "done", summary)
        status = "done"
    finally:
        store.end_session(session, status)
        if status != "done":
            store.set_status(run_id, "interrupted")
    if not rows:
        raise ConfigError(
            f"the scorer told no input's {labels.candidates} candidates apart: nothing to "
            "train on (label more inputs or candidates, or use a scorer with logprobs)"
        )
    log.info("retriever.labelled", run_id=run_id, **summary)
    encoder = train_encoder(rows, training)
    made = {
        "base_encoder": BASE_ENCODER,
        "tasks": sorted(task.name for task in tasks),
        "labels": {**labels.to_dict(), **summary, "run_id": run_id},
        "training": training.to_dict(),
    }
    digest = json.dumps([made, [[r.example_id, r.candidates[0].demonstration.id] for r in rows]])
    made["encoder_fingerprint"] = hashlib.sha256(digest.encode()).hexdigest()[:12]
    return Retriever(encoder, pool, trained=True, info=made)
