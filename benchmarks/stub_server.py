"""A minimal OpenAI-compatible chat-completions stub for benchmarks.

Every POST /v1/chat/completions is answered with one choice and a `usage` block, after
`--latency-ms` of `asyncio.sleep` (so concurrent requests overlap, as they would on a real
server). The answer is a fixed short one ("yes"), except for a request that asks for an
instruction between <INS> and </INS> (an OPRO meta-prompt): that one gets a new instruction
in those tags, numbered by a counter, so every proposal of an optimizer run is distinct and
accepted. GET /v1/models lists the one model, and GET /stats says how many completions were
served (`completions_served`, both kinds) and how many were proposals, so a benchmark can
check that every call it timed reached the server.
With `--serial`, requests are answered one at a time, each after the latency, as llama.cpp's
server answers them (one model, one lock): a stand-in replica whose capacity is bounded.
It is a raw ASGI callable served by uvicorn (one worker, warnings only, no access log), so
the server does as little work per request as possible.

    python benchmarks/stub_server.py --port 8000 --latency-ms 100

or, from Python::

    with running_stub(latency_ms=0) as base_url:  # "http://127.0.0.1:PORT/v1"
        ChatOpenAI(base_url=base_url, api_key="unused", model="stub")
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

__all__ = ["ANSWER", "PROPOSAL_MARK", "completions_served", "make_app", "running_stub"]

ANSWER = "yes"
MODEL = "stub"
PROPOSAL_MARK = b"<INS>"  # a request containing this asks for an instruction

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

_JSON_HEADERS = [(b"content-type", b"application/json")]


def _completion(content: str, completion_tokens: int) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": 0,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": completion_tokens,
                "total_tokens": 12 + completion_tokens,
            },
        }
    ).encode()


_COMPLETION = _completion(ANSWER, 1)
_MODELS = json.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "stub"}]}
).encode()
_NOT_FOUND = json.dumps({"error": {"message": "not found", "type": "invalid_request_error"}})


def make_app(latency_ms: float, *, serial: bool = False) -> App:
    """The ASGI app: a completion after `latency_ms` (a numbered instruction for a request
    asking for one, "yes" otherwise), the model list, the counts, 404 otherwise. With
    `serial`, one completion at a time."""
    latency = latency_ms / 1000
    served = proposals = 0
    one_at_a_time = asyncio.Lock() if serial else contextlib.nullcontext()

    async def respond(send: Send, status: int, body: bytes) -> None:
        headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal served, proposals
        if scope["type"] != "http":
            return
        # Read the request body; it is only searched for PROPOSAL_MARK, never parsed.
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        method, path = scope["method"], scope["path"].rstrip("/")
        if method == "POST" and path == "/v1/chat/completions":
            body = _COMPLETION
            if PROPOSAL_MARK in b"".join(chunks):
                proposals += 1
                body = _completion(f"<INS>Answer the question, variant {proposals}.</INS>", 9)
            async with one_at_a_time:
                if latency > 0:
                    await asyncio.sleep(latency)
            served += 1
            await respond(send, 200, body)
        elif method == "GET" and path == "/v1/models":
            await respond(send, 200, _MODELS)
        elif method == "GET" and path == "/stats":
            stats = {"completions": served, "proposals": proposals}
            await respond(send, 200, json.dumps(stats).encode())
        else:
            await respond(send, 404, _NOT_FOUND.encode())

    return app


def serve(host: str, port: int, latency_ms: float, *, serial: bool = False) -> None:
    import uvicorn

    uvicorn.run(
        make_app(latency_ms, serial=serial),
        host=host,
        port=port,
        workers=1,
        log_level="warning",
        access_log=False,
        lifespan="off",
        # Never close an idle keep-alive connection first: a client reusing it at that moment
        # gets a connection error (the client's own pool expires idle connections after 5 s).
        timeout_keep_alive=600,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def completions_served(base_url: str) -> int:
    """How many chat completions the stub at `base_url` (".../v1") has answered so far."""
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats", timeout=5) as response:
        return int(json.load(response)["completions"])


@contextlib.contextmanager
def running_stub(latency_ms: float, *, startup_timeout: float = 20.0) -> Iterator[str]:
    """Run the stub in a subprocess on a free loopback port; yield its base URL (".../v1")."""
    for _attempt in range(3):  # another process may take the free port before uvicorn binds it
        port = _free_port()
        base_url = f"http://127.0.0.1:{port}/v1"
        command = [sys.executable, __file__, "--port", str(port), "--latency-ms", str(latency_ms)]
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + startup_timeout
            while process.poll() is None and time.monotonic() < deadline:
                if _answers(f"{base_url}/models"):
                    break
                time.sleep(0.05)
            else:
                if process.poll() is None:
                    raise RuntimeError(f"the stub server did not answer within {startup_timeout}s")
                continue  # it exited (port taken?): try another port
            yield base_url
            return
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    raise RuntimeError("the stub server failed to start (exited three times)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before each answer")
    parser.add_argument("--serial", action="store_true", help="answer one request at a time")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.latency_ms, serial=args.serial)


if __name__ == "__main__":
    main()
