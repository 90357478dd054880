"""Prompt retrieval (UPRISE): a retriever, trained on the frozen scorer's own feedback, picks
the demonstrations shown before each input.

    pool (train splits of some tasks) -> labels (the scorer answers after each candidate)
    -> bi-encoder trained contrastively -> for a new input, the top K, as `p_K ... p_1 x`

Encoders and training need the `retrieval` extra (sentence-transformers, torch); nothing is
imported from it until a retriever is built or loaded.
"""

from opro_agent.retrieval.labels import CandidateScore, LabelledInput, LabelSettings
from opro_agent.retrieval.pool import PromptPool, build_pool
from opro_agent.retrieval.retriever import Retriever
from opro_agent.retrieval.selectors import RandomDemonstrations, RetrievedDemonstrations
from opro_agent.retrieval.training import (
    LABEL_RUN_KIND,
    TrainSettings,
    label_run,
    train_retriever,
)

__all__ = [
    "LABEL_RUN_KIND",
    "CandidateScore",
    "LabelSettings",
    "LabelledInput",
    "PromptPool",
    "RandomDemonstrations",
    "RetrievedDemonstrations",
    "Retriever",
    "TrainSettings",
    "build_pool",
    "label_run",
    "train_retriever",
]
