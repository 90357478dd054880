"""The replica pool's routing, hermetic: fake replicas with scripted chat models (no Ray, no
sockets). Calls spread over replicas by load, a replica that cannot be reached is marked down
and its calls go elsewhere, it comes back when its replica reports a URL again, and a whole
optimization through the pool gives the result of the same run on one model."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.outputs import ChatResult

from opro_agent import ConfigError, OproOptimizer, RunStore, Task
from opro_agent.errors import LocalServerError
from opro_agent.ray_pool import (
    PooledChatModel,
    PoolSettings,
    ReplicaGoneError,
    ReplicaSet,
    check_address,
    pool_settings,
)
from tests.conftest import FAST_OPRO, optimizer_reply, scorer_reply
from tests.fakes import ScriptedChatModel
from tests.test_cli_inputs import _run


class SlowModel(ScriptedChatModel):
    """A scripted model that takes a little while, so calls overlap; `down` makes it fail
    as an unreachable server does."""

    down: bool = False

    async def _agenerate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        await asyncio.sleep(0.01)
        if self.down:
            raise ConnectionError("connection refused")
        return self._reply(messages, run_manager)


class FakeReplica:
    """A replica whose server comes back on a new URL each time it is asked (as a restarted
    actor's does), or is gone for good."""

    def __init__(self, name: str, *, gone: bool = False) -> None:
        self.name = name
        self.gone = gone
        self.asked = 0

    async def base_url(self) -> str:
        self.asked += 1
        if self.gone:
            raise ReplicaGoneError(f"replica {self.name} is gone")
        return f"fake://{self.name}/{self.asked}"


def _echo(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
    return "answer to " + messages[-1].text


class Models:
    """The chat models behind each URL, built on demand, as ChatOpenAI would be."""

    def __init__(self, respond: Any = _echo) -> None:
        self.by_url: dict[str, SlowModel] = {}
        self.respond = respond

    def __call__(self, url: str) -> SlowModel:
        if url not in self.by_url:
            self.by_url[url] = SlowModel(respond=self.respond)
        return self.by_url[url]

    def calls(self, prefix: str) -> int:
        return sum(len(m.calls) for url, m in self.by_url.items() if url.startswith(prefix))


def _pool(
    replicas: Sequence[FakeReplica], models: Models, *, wait_timeout: float = 5.0
) -> PooledChatModel:
    urls = [f"fake://{r.name}/0" for r in replicas]
    replica_set = ReplicaSet(
        replicas, urls, down_errors=(ConnectionError,), wait_timeout=wait_timeout
    )
    return PooledChatModel(replicas=replica_set, make_model=models)


async def _ask(model: PooledChatModel, count: int) -> list[str]:
    replies = await asyncio.gather(*(model.ainvoke([HumanMessage(f"q{i}")]) for i in range(count)))
    return [r.text for r in replies]


def test_calls_spread_evenly_over_replicas() -> None:
    models = Models()
    pool = _pool([FakeReplica("a"), FakeReplica("b"), FakeReplica("c")], models)
    replies = asyncio.run(_ask(pool, 30))
    assert replies == [f"answer to q{i}" for i in range(30)]
    assert pool.replicas.served() == {"a": 10, "b": 10, "c": 10}


def test_sequential_calls_alternate() -> None:
    pool = _pool([FakeReplica("a"), FakeReplica("b")], Models())
    for i in range(6):
        assert pool.invoke(f"q{i}").text == f"answer to q{i}"
    assert pool.replicas.served() == {"a": 3, "b": 3}


def test_a_down_replicas_calls_go_to_another_and_it_comes_back() -> None:
    models = Models()
    a, b = FakeReplica("a"), FakeReplica("b")
    pool = _pool([a, b], models)

    async def scenario() -> None:
        await _ask(pool, 4)
        models.by_url["fake://a/0"].down = True
        # Nothing is lost: every call is answered, by b, while a is down.
        assert await _ask(pool, 8) == [f"answer to q{i}" for i in range(8)]
        await asyncio.sleep(0.05)  # a's replica reports its new URL
        assert a.asked >= 1
        before = models.calls("fake://a/")
        await _ask(pool, 8)
        assert models.calls("fake://a/") > before, "a serves again on its new URL"

    asyncio.run(scenario())


def test_a_replica_gone_for_good_leaves_the_others_serving() -> None:
    models = Models()
    a, b = FakeReplica("a", gone=True), FakeReplica("b")
    pool = _pool([a, b], models)

    async def scenario() -> None:
        models("fake://a/0").down = True
        assert await _ask(pool, 6) == [f"answer to q{i}" for i in range(6)]
        await asyncio.sleep(0.05)
        assert await _ask(pool, 6) == [f"answer to q{i}" for i in range(6)]

    asyncio.run(scenario())
    assert models.calls("fake://a/") == 0
    assert models.calls("fake://b/") == 12


def test_every_replica_gone_is_an_error() -> None:
    models = Models()
    pool = _pool([FakeReplica("a", gone=True)], models)
    models("fake://a/0").down = True
    with pytest.raises((ConnectionError, LocalServerError)):
        asyncio.run(_ask(pool, 1))
    with pytest.raises(LocalServerError, match="every model-server replica is gone"):
        asyncio.run(_ask(pool, 1))


def test_a_call_waits_for_a_replica_to_come_back() -> None:
    class Late(FakeReplica):
        async def base_url(self) -> str:
            await asyncio.sleep(0.1)
            return await super().base_url()

    models = Models()
    pool = _pool([Late("a")], models)

    async def scenario() -> list[str]:
        models("fake://a/0").down = True
        return await _ask(pool, 3)

    assert asyncio.run(scenario()) == ["answer to q0", "answer to q1", "answer to q2"]


def test_other_errors_are_not_routed_around() -> None:
    def broken(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
        raise ValueError("bad request")

    pool = _pool([FakeReplica("a"), FakeReplica("b")], Models(broken))
    with pytest.raises(ValueError, match="bad request"):
        asyncio.run(_ask(pool, 1))
    assert pool.replicas.served() == {"a": 0, "b": 0}


def test_an_optimization_through_a_failing_pool_matches_one_model(yes_no_task: Task) -> None:
    """A replica dies mid-run: nothing is lost, the result and the usage are those of the
    same run on a single scorer, and each answer is counted once."""
    from tests.conftest import split_settings

    settings, _ = split_settings(steps=2)
    alone = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply),
        ScriptedChatModel(respond=scorer_reply),
        strategy=FAST_OPRO,
        settings=settings,
    ).invoke(yes_no_task)

    answered = 0

    def dies_later(messages: Sequence[BaseMessage], metadata: Mapping[str, Any]) -> str:
        nonlocal answered
        answered += 1
        if answered == 25:
            models.by_url["fake://a/0"].down = True
        return scorer_reply(messages, metadata)

    models = Models(dies_later)
    pooled = OproOptimizer(
        ScriptedChatModel(respond=optimizer_reply),
        _pool([FakeReplica("a"), FakeReplica("b")], models),
        strategy=FAST_OPRO,
        settings=settings,
        store=RunStore(":memory:"),
    ).invoke(yes_no_task)
    assert pooled.best_instruction == alone.best_instruction
    assert pooled.scores == alone.scores
    assert pooled.calls == alone.calls
    assert pooled.tokens == alone.tokens
    assert models.calls("fake://a/") >= 24 and models.calls("fake://b/") > 0


# -- settings and flags ------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["auto", "10.0.0.5:6379", "ray://head.example:10001"])
def test_good_addresses(address: str) -> None:
    assert check_address(address) == address
    assert PoolSettings(address=address).address == address


@pytest.mark.parametrize("address", ["", "head", "http://head:80", "head:0", "head:99999", "a b:1"])
def test_bad_addresses(address: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        check_address(address)
    with pytest.raises(ConfigError, match="--ray-address"):
        PoolSettings(address=address)


@pytest.mark.parametrize(
    ("values", "flag"),
    [({"replicas": 0}, "--replicas"), ({"replica_cpus": 0}, "--replica-cpus")],
)
def test_bad_pool_settings(values: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        PoolSettings(**values)


def test_pool_settings_from_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pool_settings("local") is None
    with pytest.raises(ConfigError, match="--replicas: needs --executor ray"):
        pool_settings("local", replicas=2)
    monkeypatch.setitem(sys.modules, "ray", object())  # installed, as far as the check goes
    assert pool_settings("ray", replicas=3) == PoolSettings(replicas=3)
    with pytest.raises(ConfigError, match="--executor: the replicas serve the 'local' model"):
        pool_settings("ray", serves_local=False)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--executor", "ray"], "--executor: ray needs the ray extra"),
        (["--replicas", "2"], "--replicas: needs --executor ray"),
        (["--executor", "ray", "--ray-address", "nowhere"], "--ray-address: expected auto"),
        (["--executor", "ray", "--replicas", "0"], "--replicas: must be at least 1"),
        (["--executor", "spark"], "--executor: invalid choice"),
    ],
)
def test_executor_flag_errors_are_one_line(
    task_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    message: str,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    for command in ("optimize", "evaluate", "compare"):
        extra = {"evaluate": ["--instruction", "x"], "compare": ["--strategies", "opro"]}
        argv = [command, str(task_file), *extra.get(command, []), *flags]
        code, _, err = _run(capsys, [*argv, "--run-dir", str(tmp_path / "runs")])
        assert code == 2, command
        assert "Traceback" not in err
        assert message in err and len(err.strip().splitlines()) == 1, err
