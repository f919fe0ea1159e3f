"""The Fleet gateway: the only door of the consortium server that hospitals can reach (``retune gateway``).

Flower 1.41's SuperLink serves its Fleet API (SuperNodes), Control API (``flwr run``, ``flwr supernode register``)
and Runtime API (the ServerApp) on one HTTPS port, and the Control API has no authentication in open-source Flower:
whoever reaches that port can submit a run, whose app package then runs on the server side, or register and
unregister hospitals. So the SuperLink listens on an address only the operator's host reaches (``127.0.0.1`` or a
private interface), and hospitals connect to this gateway instead. It terminates TLS with the SuperLink's
certificate, forwards ``POST /v1/fleet/*`` to the SuperLink over TLS, and answers every other request with 403
without contacting the SuperLink. A request body over :data:`MAX_BODY` is answered with 413 as soon as its declared
length or the bytes read so far pass the limit: the gateway never holds more than the limit of one request.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

log = logging.getLogger(__name__)
#: The only path prefix forwarded: Flower's Fleet API (what a SuperNode calls).
FLEET_PREFIX = "/v1/fleet/"
#: Largest request body forwarded (Flower pushes message objects in pieces far below this).
MAX_BODY = 64 * 1024 * 1024
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "host", "content-length"}
REFUSED = "this gateway forwards the Fleet API only; the Control and Runtime APIs stay with the operator\n"


def forwarded(method: str, path: str) -> bool:
    """Whether a request goes through to the SuperLink."""
    return method == "POST" and path.startswith(FLEET_PREFIX) and ".." not in path


def _headers(items) -> dict[str, str]:
    return {k: v for k, v in items if k.lower() not in _HOP_BY_HOP}


async def _body(request: Request, limit: int) -> bytes | None:
    """The request's body, or None once it is known to be longer than ``limit`` (read no further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def gateway_app(superlink: str, ca_file: str | None, max_body: int = MAX_BODY) -> Starlette:
    """An ASGI app forwarding the Fleet API to ``https://superlink`` (``ca_file`` verifies its certificate; None:
    plain HTTP, for a SuperLink started with ``--insecure`` in tests only); bodies over ``max_body`` get 413."""
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else False
    scheme = "https" if ca_file else "http"
    client = httpx.AsyncClient(base_url=f"{scheme}://{superlink}", verify=verify,
                               timeout=httpx.Timeout(120.0, connect=10.0))

    async def proxy(request: Request) -> Response:
        path = request.url.path
        if not forwarded(request.method, path):
            log.warning("refused %s %s from %s", request.method, path, request.client.host if request.client else "?")
            return PlainTextResponse(REFUSED, status_code=403)
        body = await _body(request, max_body)
        if body is None:
            return PlainTextResponse("request too large\n", status_code=413)
        try:
            upstream = await client.post(path, content=body, headers=_headers(request.headers.items()),
                                         params=request.query_params)
        except httpx.TransportError as exc:
            log.warning("the SuperLink at %s is unreachable: %s", superlink, exc)
            return PlainTextResponse("the SuperLink is unavailable\n", status_code=503)
        return Response(upstream.content, status_code=upstream.status_code,
                        headers=_headers(upstream.headers.items()))

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(routes=[Route("/{path:path}", proxy, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])],
                     lifespan=lifespan)


def serve(listen_host: str, listen_port: int, superlink: str, certfile: str, keyfile: str,
          ca_file: str | None) -> None:
    """Serve the gateway over HTTPS until interrupted."""
    import uvicorn

    uvicorn.run(gateway_app(superlink, ca_file), host=listen_host, port=listen_port, ssl_certfile=certfile,
                ssl_keyfile=keyfile, log_level="warning", access_log=False)
