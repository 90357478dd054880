"""A retriever: an encoder, the prompt pool, and the pool's embeddings (the index).

The pool is encoded once, with the prompt (`document`) tower; an input is encoded with the
input (`query`) tower and the K most similar demonstrations are returned, most similar first.
Saved as a folder: `retriever.json` (what it is), `pool.jsonl`, `index.npy` and `encoder/`
(absent for the untrained retriever, which is the packaged base encoder itself).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from opro_agent.errors import ConfigError
from opro_agent.prompts import Demonstration
from opro_agent.retrieval.encoder import BASE_ENCODER, load_encoder
from opro_agent.retrieval.pool import PromptPool

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["Retriever"]

_MANIFEST = "retriever.json"
_FORMAT = 1
Vectors = npt.NDArray[np.float32]


def _normalised(vectors: Any) -> Vectors:
    array = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(array, axis=-1, keepdims=True)
    normalised: Vectors = array / np.maximum(norms, 1e-12)
    return normalised


class Retriever:
    """Ranks a prompt pool's demonstrations for an input.

    `info` says how it was made (base encoder, training labels and settings) and is saved
    with it.
    """

    def __init__(
        self,
        encoder: SentenceTransformer,
        pool: PromptPool,
        *,
        trained: bool,
        info: Mapping[str, Any] | None = None,
        index: Vectors | None = None,
    ) -> None:
        if len(pool) == 0:
            raise ConfigError("the prompt pool is empty: give tasks with train examples")
        self.encoder = encoder
        self.pool = pool
        self.trained = trained
        self.info = dict(info or {})
        self.index = self._encode_documents([d.text for d in pool]) if index is None else index
        self._queries: dict[str, Vectors] = {}

    @classmethod
    def untrained(cls, pool: PromptPool) -> Retriever:
        """The base encoder's nearest neighbours: the baseline a trained retriever must beat."""
        return cls(load_encoder(), pool, trained=False, info={"base_encoder": BASE_ENCODER})

    @property
    def fingerprint(self) -> str:
        """Names what its rankings depend on: the pool and how the encoder was made."""
        return f"{self.pool.fingerprint()}-{self.info.get('encoder_fingerprint', 'base')}"

    def top_k(self, question: str, k: int) -> list[Demonstration]:
        """The `k` demonstrations most similar to `question`, most similar first (ties: pool
        order)."""
        query = self._queries.get(question)
        if query is None:
            query = self._encode_queries([question])[0]
            self._queries[question] = query
        similarities = self.index @ query
        order = np.argsort(-similarities, kind="stable")[:k]
        return [self.pool.demonstrations[i] for i in order]

    def add(self, demonstrations: Sequence[Demonstration]) -> None:
        """Add demonstrations to the pool (encoded now)."""
        vectors = self._encode_documents([d.text for d in demonstrations])
        self.pool = PromptPool(self.pool.demonstrations + tuple(demonstrations))
        self.index = np.concatenate([self.index, vectors])

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if self.trained:
            self.encoder.save(str(folder / "encoder"))
        self.pool.save(folder / "pool.jsonl")
        np.save(folder / "index.npy", self.index)
        manifest = {"format": _FORMAT, "trained": self.trained, **self.info}
        (folder / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path | str) -> Retriever:
        folder = Path(folder)
        try:
            manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
            index = np.load(folder / "index.npy")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"not a saved retriever ({exc})", source=str(folder)) from exc
        if manifest.get("format") != _FORMAT:
            raise ConfigError(
                f"unknown retriever format {manifest.get('format')!r}", source=str(folder)
            )
        trained = bool(manifest.pop("trained"))
        manifest.pop("format")
        pool = PromptPool.load(folder / "pool.jsonl")
        if index.shape[0] != len(pool):
            raise ConfigError("index.npy and pool.jsonl disagree in length", source=str(folder))
        encoder = load_encoder(folder / "encoder" if trained else None)
        return cls(encoder, pool, trained=trained, info=manifest, index=index)

    def _encode_queries(self, texts: list[str]) -> Vectors:
        return _normalised(self.encoder.encode_query(texts, show_progress_bar=False))

    def _encode_documents(self, texts: list[str]) -> Vectors:
        return _normalised(self.encoder.encode_document(texts, show_progress_bar=False))

    def __repr__(self) -> str:
        kind = "trained" if self.trained else "untrained"
        return f"Retriever({kind}, {len(self.pool)} demonstrations, {self.fingerprint})"
