"""Model specs -> LangChain chat models. The only module that knows about providers.

Specs: `local` (the embedded SmolLM2 on a llama.cpp server started here), `openai:MODEL`
(OpenAI or any OpenAI-compatible server via a base URL), or any `provider:model` that
LangChain's `init_chat_model` knows.
"""

from __future__ import annotations

import importlib
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from langchain_core.language_models import BaseChatModel

from opro_agent.errors import ConfigError
from opro_agent.local_server import LocalServer, find_embedded_model
from opro_agent.ray_pool import PoolSettings, ReplicaPool, ServerSpec

__all__ = [
    "LOCAL",
    "ModelOptions",
    "ModelSpec",
    "Models",
    "connection_errors",
    "openai_chat_model",
    "rate_limit_errors",
    "redact_url",
]

LOCAL = "local"


@dataclass(frozen=True)
class ModelSpec:
    provider: str
    model: str

    @classmethod
    def parse(cls, spec: str, *, flag: str) -> ModelSpec:
        spec = spec.strip()
        if spec == LOCAL:
            return cls(LOCAL, "")
        provider, sep, model = spec.partition(":")
        if not sep or not provider or not model:
            raise ConfigError(
                f"{spec!r} is not a model spec: use 'local', 'openai:MODEL' or 'PROVIDER:MODEL'",
                field=flag,
            )
        return cls(provider, model)

    def __str__(self) -> str:
        return LOCAL if self.provider == LOCAL else f"{self.provider}:{self.model}"

    @property
    def accepts_seed(self) -> bool:
        """Whether calls may carry a `seed` (OpenAI's API and servers compatible with it)."""
        return self.provider in (LOCAL, "openai")


@dataclass(frozen=True)
class ModelOptions:
    temperature: float
    max_tokens: int | None = None
    base_url: str | None = None
    timeout: float = 120.0
    # Ask for token log probabilities (OpenAI-compatible models; llama.cpp returns them only
    # with top_logprobs set), for strategies that rank by the gold answer's log probability.
    top_logprobs: int | None = None


def openai_chat_model(
    model: str, options: ModelOptions, *, base_url: str | None, api_key: str = "unused"
) -> BaseChatModel:
    """A ChatOpenAI for OpenAI or any OpenAI-compatible server (llama.cpp, vLLM, Ollama)."""
    from langchain_openai import ChatOpenAI
    from pydantic import SecretStr

    limit: dict[str, Any] = {}
    if options.max_tokens is not None:
        # LangChain sends max_tokens as max_completion_tokens, which llama.cpp (and other
        # OpenAI-compatible servers) ignore; they all honour the classic field.
        if base_url:
            limit["extra_body"] = {"max_tokens": options.max_tokens}
        else:
            limit["max_tokens"] = options.max_tokens
    if options.top_logprobs is not None:
        limit.update(logprobs=True, top_logprobs=options.top_logprobs)
    return ChatOpenAI(
        model=model,
        base_url=base_url,
        api_key=SecretStr(api_key),
        temperature=options.temperature,
        timeout=options.timeout,
        max_retries=0,  # opro-agent retries itself, with backoff, per call
        **limit,
    )


def rate_limit_errors() -> tuple[type[BaseException], ...]:
    """The exception types installed providers raise for HTTP 429 (rate limited)."""
    found: list[type[BaseException]] = []
    for module_name in ("openai", "anthropic", "groq", "mistralai"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        error = getattr(module, "RateLimitError", None)
        if isinstance(error, type) and issubclass(error, BaseException):
            found.append(error)
    return tuple(found)


def connection_errors() -> tuple[type[BaseException], ...]:
    """What an OpenAI-compatible client raises when it cannot reach its server (refused,
    reset, timed out): the server, not the request, is at fault."""
    from openai import APIConnectionError

    return (APIConnectionError, ConnectionError)


def redact_url(url: str | None) -> str | None:
    """A URL without credentials, fit for logs and the run store."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class Models:
    """Builds chat models from specs; starts the embedded server once, stops it on close.

    With `pool` settings, `local` models are served by replicas on Ray instead (started on
    first use), and each `local` chat model spreads its calls over them.
    """

    def __init__(
        self, *, log_dir: Path, local_model: Path | None = None, pool: PoolSettings | None = None
    ) -> None:
        self._log_dir = log_dir
        self._local_model = local_model
        self._pool_settings = pool
        self._server: LocalServer | None = None
        self._pool: ReplicaPool | None = None
        self._stack = ExitStack()

    def __enter__(self) -> Models:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def chat_model(self, spec: ModelSpec, options: ModelOptions, *, flag: str) -> BaseChatModel:
        if spec.provider == LOCAL and self._pool_settings is not None:
            pool = self._replica_pool(self._pool_settings)
            name = pool.server.model_name
            return pool.chat_model(lambda url: self._openai(name, options, url, "local", flag))
        if spec.provider == LOCAL:
            server = self._local_server()
            return self._openai(server.model_name, options, server.base_url, "local", flag)
        if spec.provider == "openai":
            base_url = options.base_url or os.environ.get("OPENAI_BASE_URL") or None
            api_key = os.environ.get("OPENAI_API_KEY")
            if not api_key and not base_url:
                raise ConfigError(
                    "OPENAI_API_KEY is not set (or give a base URL for an OpenAI-compatible "
                    "server)",
                    field=flag,
                )
            return self._openai(spec.model, options, base_url, api_key or "unused", flag)
        return self._init_chat_model(spec, options, flag)

    def identity(self, spec: ModelSpec, options: ModelOptions) -> dict[str, Any]:
        """What identifies a model's answers (stored with a run); never credentials."""
        identity: dict[str, Any] = {
            "spec": str(spec),
            "temperature": options.temperature,
            "max_tokens": options.max_tokens,
        }
        if options.top_logprobs is not None:
            identity["top_logprobs"] = options.top_logprobs
        if spec.provider == LOCAL:
            # The weights, not the (random) port, decide what the local server answers.
            model_file = self._local_model or find_embedded_model()
            size = model_file.stat().st_size if model_file.is_file() else None
            identity["model_file"] = f"{model_file.name}:{size}"
        else:
            base_url = options.base_url
            if spec.provider == "openai":
                base_url = base_url or os.environ.get("OPENAI_BASE_URL")
            identity["base_url"] = redact_url(base_url)
        return identity

    def _replica_pool(self, settings: PoolSettings) -> ReplicaPool:
        """The replicas serving `local`, started once."""
        if self._pool is None:
            # Absolute: a replica actor runs in a working directory of Ray's, not ours.
            spec = ServerSpec(self._model_path().resolve(), self._log_dir.resolve(), n_ctx=4096)
            pool = ReplicaPool(settings, spec, connection_errors()).start()
            self._stack.callback(pool.close)
            self._pool = pool
        return self._pool

    def _model_path(self) -> Path:
        model_path = self._local_model or find_embedded_model()
        if not model_path.is_file():
            raise ConfigError(f"no such file {model_path}", field="--local-model")
        return model_path

    def _local_server(self) -> LocalServer:
        if self._server is None:
            model_path = self._model_path()
            # 4096 tokens of context: a meta-prompt with 20 past instructions fits easily.
            # Killed with us, even by SIGKILL: it must not outlive the run it serves.
            server = LocalServer(
                model_path, self._log_dir / "llama-server.log", n_ctx=4096, die_with_parent=True
            )
            self._stack.enter_context(server)
            self._server = server
        return self._server

    @staticmethod
    def _openai(
        model: str, options: ModelOptions, base_url: str | None, api_key: str, flag: str
    ) -> BaseChatModel:
        try:
            return openai_chat_model(model, options, base_url=base_url, api_key=api_key)
        except ValueError as exc:
            raise ConfigError(str(exc).splitlines()[0], field=flag) from None

    @staticmethod
    def _init_chat_model(spec: ModelSpec, options: ModelOptions, flag: str) -> BaseChatModel:
        from langchain.chat_models import init_chat_model

        kwargs: dict[str, Any] = {"temperature": options.temperature, "timeout": options.timeout}
        if options.max_tokens is not None:
            kwargs["max_tokens"] = options.max_tokens
        if options.base_url:
            kwargs["base_url"] = options.base_url
        try:
            model: BaseChatModel = init_chat_model(
                spec.model, model_provider=spec.provider, **kwargs
            )
            return model
        except ImportError as exc:
            raise ConfigError(
                f"provider {spec.provider!r} needs a package: {exc}", field=flag
            ) from None
        except Exception as exc:  # unknown provider, missing credentials: the provider's words
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"cannot use {spec}: {message}", field=flag) from None
