"""The Fleet gateway forwards the Fleet API and nothing else: Control and Runtime API calls never reach the
SuperLink (here a recording stand-in on 127.0.0.1)."""

from __future__ import annotations

import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from deploy.gateway import REFUSED, gateway_app
from deploy.processes import free_port, port_open


@pytest.fixture(scope="module")
def upstream():
    """A stand-in SuperLink that records every request it gets and echoes the body back."""
    seen: list[tuple[str, str, bytes, str | None]] = []

    async def record(request: Request) -> Response:
        body = await request.body()
        seen.append((request.method, request.url.path, body, request.headers.get("x-flwr-node-signature")))
        return Response(b"echo:" + body, status_code=200, headers={"x-upstream": "superlink"})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/{p:path}", record, methods=["GET", "POST"])]),
                                          host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not port_open("127.0.0.1", port):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield f"127.0.0.1:{port}", seen
    server.should_exit = True
    thread.join(timeout=10)


def test_fleet_calls_go_through_with_body_and_headers(upstream):
    address, seen = upstream
    seen.clear()
    with TestClient(gateway_app(address, ca_file=None)) as client:
        reply = client.post("/v1/fleet/pull-messages", content=b"\x08\x01",
                            headers={"x-flwr-node-signature": "sig"})
    assert reply.status_code == 200 and reply.content == b"echo:\x08\x01"
    assert reply.headers["x-upstream"] == "superlink"
    assert seen == [("POST", "/v1/fleet/pull-messages", b"\x08\x01", "sig")]


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/control/start-run"), ("POST", "/v1/control/register-supernode"), ("POST", "/v1/runtime/pull-task"),
    ("GET", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/../control/start-run"), ("GET", "/docs"),
])
def test_everything_else_is_refused_without_reaching_the_superlink(upstream, method, path):
    address, seen = upstream
    seen.clear()
    with TestClient(gateway_app(address, ca_file=None)) as client:
        reply = client.request(method, path, content=b"x")
    assert reply.status_code == 403 and reply.text == REFUSED
    assert seen == []


def test_an_unreachable_superlink_is_a_503(tmp_path):
    with TestClient(gateway_app(f"127.0.0.1:{free_port()}", ca_file=None)) as client:
        assert client.post("/v1/fleet/pull-messages", content=b"").status_code == 503


def _asgi_post(app, path: str, chunks: int, chunk: bytes, headers: list | None = None) -> tuple[int, int]:
    """POST a body of ``chunks`` × ``chunk`` to the ASGI ``app`` as a server would stream it; returns (status, how
    many chunks the app read)."""
    import asyncio

    read, status = [0], []

    async def receive():
        read[0] += 1
        return {"type": "http.request", "body": chunk, "more_body": read[0] < chunks}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "https",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": headers or [], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 9092)}
    asyncio.run(app(scope, receive, send))
    return status[0], read[0]


def test_an_oversized_body_is_refused_before_it_is_read_whole(upstream):
    """A body over the limit is answered with 413 once the bytes read pass the limit (or at once, when its declared
    length does): the gateway does not read the rest, and the SuperLink never sees it."""
    address, seen = upstream
    seen.clear()
    chunk, limit = b"x" * 65536, 4 * 65536
    app = gateway_app(address, ca_file=None, max_body=limit)
    status, read = _asgi_post(app, "/v1/fleet/push-object", 64, chunk)  # streamed, no declared length
    assert status == 413 and read == limit // len(chunk) + 1  # not the 64 chunks
    status, read = _asgi_post(app, "/v1/fleet/push-object", 64, chunk, [(b"content-length", b"4194304")])
    assert status == 413 and read == 0  # the declared length says it all
    with TestClient(app) as client:
        assert client.post("/v1/fleet/push-object", content=b"x" * limit).status_code == 200
    assert [path for _, path, _, _ in seen] == ["/v1/fleet/push-object"]
