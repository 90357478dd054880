"""Model-server replicas on Ray, and a chat model that spreads calls over them.

Each replica is a Ray actor that starts one model server (the embedded llama.cpp server, or
any GGUF) on its node and reports its base URL. The driver keeps everything else: the one
`Caller` per role with its cache, budget, rate limits and retries, and the run store. The
chat model the driver calls, `PooledChatModel`, sends each call over HTTP to the least
loaded live replica, so no Ray serialization sits on the per-call path. A call that cannot
reach its replica (connection refused or reset, timeout) marks the replica down and is
retried on another at once; meanwhile the replica is asked for its URL again, which waits
for Ray to restart a crashed actor (`max_restarts`) or, for an actor gone for good, starts
a new one in its place while the pool's restarts last.

Ray is an optional extra and is imported only when a pool or a sweep starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TypeVar

import structlog
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatResult
from pydantic import ConfigDict, PrivateAttr

from opro_agent.errors import ConfigError, LocalServerError
from opro_agent.local_server import LocalServer

__all__ = [
    "RAY_EXTRA_HINT",
    "ModelServer",
    "PoolSettings",
    "PooledChatModel",
    "Replica",
    "ReplicaGoneError",
    "ReplicaPool",
    "ReplicaSet",
    "ServerSpec",
    "check_address",
    "import_ray",
    "pool_settings",
    "ray_cluster",
]

log = structlog.get_logger()
T = TypeVar("T")

RAY_EXTRA_HINT = "needs the ray extra: pip install 'opro-agent[ray]'"
# A local cluster for one machine: a small object store (only actor handles, URLs and run
# summaries travel through it) and no dashboard, so it starts in seconds.
_OBJECT_STORE_BYTES = 100 * 1024 * 1024
_REVIVE_PAUSE = 1.0  # seconds between attempts to bring a down replica back
_WAIT_STEP = 0.05  # how often a call waiting for a replica looks again
_ADDRESS = re.compile(r"(?:ray://)?(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})")


def import_ray(*, flag: str = "--executor") -> ModuleType:
    """The `ray` module, or a ConfigError naming the flag that asked for it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"ray {RAY_EXTRA_HINT}", field=flag) from None
    return ray


def check_address(address: str) -> str:
    """`auto`, `HOST:PORT` or `ray://HOST:PORT`; ValueError saying what is expected."""
    address = address.strip()
    if address == "auto":
        return address
    match = _ADDRESS.fullmatch(address)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"expected auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    return address


@dataclass(frozen=True)
class PoolSettings:
    """Where and how many model-server replicas run.

    `address`: a Ray cluster (`auto`, `HOST:PORT`, `ray://HOST:PORT`); None starts a local
    one. `replicas` servers, each reserving `replica_cpus` of Ray's CPUs (and as many
    llama.cpp threads, at least one). A replica that dies is restarted or replaced up to
    `max_restarts` times; `startup_timeout` bounds each server's start.
    """

    address: str | None = None
    replicas: int = 2
    replica_cpus: float = 1.0
    max_restarts: int = 3
    startup_timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.address is not None:
            try:
                check_address(self.address)
            except ValueError as exc:
                raise ConfigError(str(exc), field="--ray-address") from None
        if self.replicas < 1:
            raise ConfigError(f"must be at least 1, got {self.replicas}", field="--replicas")
        if not self.replica_cpus > 0:
            raise ConfigError(f"must be positive, got {self.replica_cpus}", field="--replica-cpus")
        if self.max_restarts < 0:
            raise ConfigError("must not be negative", field="max_restarts")
        if not self.startup_timeout > 0:
            raise ConfigError("must be positive", field="startup_timeout")

    @property
    def threads(self) -> int:
        """llama.cpp threads per replica: its CPUs, at least one."""
        return max(1, math.floor(self.replica_cpus))


@contextlib.contextmanager
def ray_cluster(address: str | None) -> Iterator[ModuleType]:
    """Ray, connected: to `address`, else to the cluster this process already joined, else
    to a local cluster started here and shut down on exit."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address is None:
        options["object_store_memory"] = _OBJECT_STORE_BYTES
    try:
        ray.init(address=address, **options)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError, ...
        field = "--ray-address" if address else "--executor"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot start or reach a Ray cluster: {first}", field=field) from None
    try:
        yield ray
    finally:
        ray.shutdown()


# -- the replicas (Ray actors) --------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """What every replica serves: a GGUF file through llama.cpp's server, or `command` (a
    LocalServer command line with placeholders, for stand-ins such as a latency stub)."""

    model_path: Path
    log_dir: Path
    n_ctx: int = 4096
    command: tuple[str, ...] | None = None

    @property
    def model_name(self) -> str:
        return self.model_path.stem


class ModelServer:
    """The body of a replica actor: one server on this actor's node, on its network address
    (the driver may be on another node), killed by the kernel if the actor dies."""

    def __init__(self, spec: ServerSpec, name: str, threads: int) -> None:
        import ray

        self._server = LocalServer(
            spec.model_path,
            spec.log_dir / f"llama-server-{name}.log",
            host=ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
            n_ctx=spec.n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            die_with_parent=True,
            command=spec.command,
        )
        self._server.start()

    def base_url(self) -> str:
        """The server's URL; a server that died under a live actor is started again."""
        if not self._server.alive():
            self._server.start()
        return self._server.base_url

    def stop(self) -> None:
        self._server.stop()


class ReplicaGoneError(LocalServerError):
    """A replica is dead and will not come back (its restarts are used up)."""


class Replica(Protocol):
    """A model server the pool can route calls to."""

    name: str

    async def base_url(self) -> str:
        """Its current URL, once it serves (waiting for a restart); ReplicaGoneError if it
        never will again."""
        ...


class _ActorReplica:
    """A replica on a Ray actor. An actor Ray cannot restart any more is replaced by a new
    one while `replacements` last."""

    def __init__(self, name: str, create: Callable[[], Any], replacements: int) -> None:
        self.name = name
        self.actor = create()
        self._create = create
        self._replacements = replacements

    async def base_url(self) -> str:
        from ray.exceptions import ActorDiedError

        try:
            url: str = await self.actor.base_url.remote()
            return url
        except ActorDiedError:
            if self._replacements <= 0:
                raise ReplicaGoneError(f"replica {self.name} died, no restarts left") from None
            self._replacements -= 1
            log.warning("ray_pool.replace", replica=self.name, left=self._replacements)
            self.actor = self._create()
            url = await self.actor.base_url.remote()
            return url


# -- routing ----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Slot:
    replica: Replica
    url: str | None  # None while down
    in_flight: int = 0
    served: int = 0
    gone: bool = False
    generation: int = 0  # bumped each time it comes back
    next_revival: float = 0.0
    reviving: asyncio.Task[None] | None = None


class ReplicaSet:
    """The driver's view of the replicas: their URLs, load, and which are up.

    `route(call)` runs `call(url)` on the least loaded live replica; when it raises one of
    `down_errors`, the replica is marked down (and brought back in the background) and the
    call goes to another replica, until every live replica has failed it once. A call that
    finds no replica up waits for one, up to `wait_timeout` seconds.
    """

    def __init__(
        self,
        replicas: Sequence[Replica],
        urls: Sequence[str | None],
        *,
        down_errors: tuple[type[BaseException], ...],
        wait_timeout: float = 120.0,
    ) -> None:
        self._slots = [_Slot(r, u) for r, u in zip(replicas, urls, strict=True)]
        self._down_errors = down_errors
        self._wait_timeout = wait_timeout

    def served(self) -> dict[str, int]:
        """Calls answered so far, by replica name."""
        return {s.replica.name: s.served for s in self._slots}

    async def route(self, call: Callable[[str], Awaitable[T]]) -> T:
        # Each replica gets a call at most twice (once more after it came back), then the
        # error goes to the caller's own retries.
        attempts = 0
        tried: set[tuple[int, int]] = set()
        while True:
            slot, url = await self._acquire(tried)
            slot.in_flight += 1
            try:
                result = await call(url)
            except self._down_errors as exc:
                attempts += 1
                tried.add((id(slot), slot.generation))
                self._mark_down(slot, url, exc)
                if attempts >= 2 * len(self._slots):
                    raise
                continue
            finally:
                slot.in_flight -= 1
            slot.served += 1
            return result

    async def _acquire(self, tried: set[tuple[int, int]]) -> tuple[_Slot, str]:
        deadline = time.monotonic() + self._wait_timeout
        while True:
            self._revive_down()
            candidates = [
                s
                for s in self._slots
                if s.url is not None and not s.gone and (id(s), s.generation) not in tried
            ]
            if candidates:
                slot = min(candidates, key=lambda s: (s.in_flight, s.served))
                assert slot.url is not None
                return slot, slot.url
            if all(s.gone for s in self._slots):
                raise LocalServerError("every model-server replica is gone")
            if time.monotonic() >= deadline:
                raise LocalServerError(
                    f"no model-server replica answered within {self._wait_timeout:g} s"
                )
            await asyncio.sleep(_WAIT_STEP)

    def _mark_down(self, slot: _Slot, url: str, exc: BaseException) -> None:
        if slot.url != url:  # an older call's failure: the replica came back since
            return
        slot.url = None
        log.warning("ray_pool.replica_down", replica=slot.replica.name, error=type(exc).__name__)
        self._revive_down()

    def _revive_down(self) -> None:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for slot in self._slots:
            if slot.url is not None or slot.gone or now < slot.next_revival:
                continue
            task = slot.reviving
            # A task of an earlier event loop (an earlier run) no longer runs.
            if task is not None and not task.done() and task.get_loop() is loop:
                continue
            slot.reviving = loop.create_task(self._revive(slot))

    async def _revive(self, slot: _Slot) -> None:
        try:
            url = await asyncio.wait_for(slot.replica.base_url(), self._wait_timeout)
        except ReplicaGoneError as exc:
            slot.gone = True
            log.error("ray_pool.replica_gone", replica=slot.replica.name, error=str(exc))
            return
        except Exception as exc:  # still restarting, or its server fails to start: try later
            slot.next_revival = time.monotonic() + _REVIVE_PAUSE
            log.warning("ray_pool.revive_failed", replica=slot.replica.name, error=repr(exc))
            return
        slot.url = url
        slot.generation += 1
        log.info("ray_pool.replica_up", replica=slot.replica.name, base_url=url)


class PooledChatModel(BaseChatModel):
    """A chat model whose calls go to the replicas of a `ReplicaSet`; `make_model(url)` is
    the chat model that talks to one replica (a ChatOpenAI on its URL)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    replicas: ReplicaSet
    make_model: Callable[[str], BaseChatModel]
    _models: dict[str, BaseChatModel] = PrivateAttr(default_factory=dict)

    @property
    def _llm_type(self) -> str:
        return "opro-agent-replica-pool"

    def _model(self, url: str) -> BaseChatModel:
        model = self._models.get(url)
        if model is None:
            model = self._models[url] = self.make_model(url)
        return model

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # The replica's model is called without our callbacks: they see this model's run,
        # once, with the usage of the answer (counting it twice would double the spend).
        async def call(url: str) -> ChatResult:
            return await self._model(url)._agenerate(messages, stop=stop, **kwargs)

        return await self.replicas.route(call)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # Routing is async (it waits for replicas to come back): it gets a loop of its own,
        # and calls each replica's sync client (async clients are bound to their first loop).
        async def call(url: str) -> ChatResult:
            model = self._model(url)
            return await asyncio.to_thread(model._generate, messages, stop=stop, **kwargs)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="opro-agent-pool") as pool:
            return pool.submit(asyncio.run, self.replicas.route(call)).result()


@dataclass
class ReplicaPool:
    """Replica actors on a Ray cluster; `start()` them, build chat models on them with
    `chat_model(make_model)`, and `close()` (or use as a context manager)."""

    settings: PoolSettings
    server: ServerSpec
    down_errors: tuple[type[BaseException], ...]
    replicas: list[_ActorReplica] = field(default_factory=list)
    _set: ReplicaSet | None = None
    _cluster: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def start(self) -> ReplicaPool:
        settings = self.settings
        ray = self._cluster.enter_context(ray_cluster(settings.address))
        try:
            self._check_fits(ray)
            actor = ray.remote(ModelServer).options(
                num_cpus=settings.replica_cpus, max_restarts=settings.max_restarts
            )
            for index in range(settings.replicas):
                name = f"r{index}"

                def create(name: str = name) -> Any:
                    return actor.remote(self.server, name, settings.threads)

                self.replicas.append(_ActorReplica(name, create, settings.max_restarts))
            refs = [r.actor.base_url.remote() for r in self.replicas]
            started = time.monotonic()
            urls = ray.get(refs, timeout=settings.startup_timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise LocalServerError(
                f"the model-server replicas did not start within {settings.startup_timeout:g} s"
            ) from None
        except ray.exceptions.RayError as exc:
            self.close()
            raise LocalServerError(
                f"a model-server replica failed to start: {_cause(exc)}"
            ) from None
        except BaseException:
            self.close()
            raise
        log.info(
            "ray_pool.ready",
            replicas=len(urls),
            cpus_each=settings.replica_cpus,
            seconds=round(time.monotonic() - started, 2),
        )
        self._set = ReplicaSet(
            self.replicas,
            urls,
            down_errors=self.down_errors,
            wait_timeout=settings.startup_timeout,
        )
        return self

    def _check_fits(self, ray: ModuleType) -> None:
        # Actors that do not fit would wait for resources forever; say so instead.
        cpus = float(ray.cluster_resources().get("CPU", 0))
        wanted = self.settings.replicas * self.settings.replica_cpus
        if wanted > cpus + 1e-9:
            raise ConfigError(
                f"{self.settings.replicas} replicas x {self.settings.replica_cpus:g} CPUs need "
                f"{wanted:g} CPUs; the Ray cluster has {cpus:g} (lower --replica-cpus)",
                field="--replicas",
            )

    @property
    def replica_set(self) -> ReplicaSet:
        if self._set is None:
            raise LocalServerError("the replica pool has not been started")
        return self._set

    def chat_model(self, make_model: Callable[[str], BaseChatModel]) -> PooledChatModel:
        return PooledChatModel(replicas=self.replica_set, make_model=make_model)

    def close(self) -> None:
        """Stop every replica's server, end the actors, and a cluster started here."""
        if self.replicas:
            import ray

            stops = [r.actor.stop.remote() for r in self.replicas]
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(stops, timeout=30)
            for replica in self.replicas:
                with contextlib.suppress(ray.exceptions.RayError):
                    ray.kill(replica.actor)
            self.replicas.clear()
        self._set = None
        self._cluster.close()

    def __enter__(self) -> ReplicaPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cause(exc: BaseException) -> str:
    """One line saying what went wrong inside a Ray task or actor: the error it raised (our
    errors are one line), else the last line of Ray's report (its traceback's last line)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and str(cause).strip():
        return str(cause).strip().splitlines()[0]
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def pool_settings(
    executor: str,
    *,
    address: str | None = None,
    replicas: int | None = None,
    replica_cpus: float | None = None,
    serves_local: bool = True,
) -> PoolSettings | None:
    """The pool the executor flags ask for: None for `local`. With `ray`, Ray must be
    installed and some role must use the `local` model (the replicas serve it)."""
    given = {"--ray-address": address, "--replicas": replicas, "--replica-cpus": replica_cpus}
    if executor != "ray":
        for flag, value in given.items():
            if value is not None:
                raise ConfigError("needs --executor ray", field=flag)
        return None
    import_ray()
    if not serves_local:
        raise ConfigError(
            "the replicas serve the 'local' model (or --local-model): use it for "
            "--scorer or --optimizer",
            field="--executor",
        )
    defaults = PoolSettings()
    return PoolSettings(
        address=address,
        replicas=defaults.replicas if replicas is None else replicas,
        replica_cpus=defaults.replica_cpus if replica_cpus is None else replica_cpus,
    )
