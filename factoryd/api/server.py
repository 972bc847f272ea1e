"""Serve the API with uvicorn inside the daemon's event loop, as a task this context owns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Generator
from pathlib import Path

import structlog
import uvicorn
from fastapi import FastAPI

from factoryd.api.limits import refusal_bytes
from factoryd.errors import ConfigError
from factoryd.telemetry.limits import RejectListener, TokenBuckets

log = structlog.get_logger(__name__)

# Requests in flight get this long to finish when the daemon stops.
SHUTDOWN_GRACE_S = 5.0
# Start-up is binding a socket we already hold plus the app's lifespan: seconds at most.
STARTUP_TIMEOUT_S = 10.0
STARTUP_POLL_S = 0.01
# Concurrent connections beyond this get 503: a station API has a handful of clients.
MAX_CONNECTIONS = 64


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its process (the daemon, the signer)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Install nothing: SIGTERM/SIGINT belong to the process, which stops us by context exit."""
        yield


def bind_socket(host: str, port: int, *, what: str = "the API", backlog: int = 128) -> socket.socket:
    """A non-blocking listening socket on host:port (0: any free port); ConfigError naming ``what``."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{what}: host {host!r} does not resolve: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{what} cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _refusing_protocol(app: FastAPI) -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol, answering 429 on a connection's first bytes when its address is over.

    A flood from one address is then refused before its request is parsed or reaches the app (a few
    microseconds each instead of the whole ASGI stack); what passes meets api/limits.py as before.
    """
    buckets: TokenBuckets | None = getattr(app.state, "address_buckets", None)
    on_reject: RejectListener | None = getattr(app.state, "on_reject", None)
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: PLC0415 - optional C parser
    except ImportError:
        return "auto"
    if buckets is None:
        return HttpToolsProtocol
    limits = buckets

    class RefusingProtocol(HttpToolsProtocol):
        _first = True

        def data_received(self, data: bytes) -> None:
            if self._first:
                self._first = False
                # uvicorn sets ``client`` (host, port) in connection_made; without it, no early refusal.
                client = getattr(self, "client", None)
                wait_s = limits.peek(str(client[0])) if client else 0.0
                if wait_s:
                    if on_reject is not None:
                        on_reject("api", 429)
                    detail = "too many requests from this client; slow down"
                    self.transport.write(refusal_bytes(429, "Too Many Requests", detail, wait_s))
                    self.transport.close()
                    return
            super().data_received(data)

    return RefusingProtocol


@contextlib.asynccontextmanager
async def serve_api(
    app: FastAPI,
    host: str,
    port: int,
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> AsyncIterator[int]:
    """Listen on host:port (0 = any free port), yield the bound port, shut down cleanly on exit."""
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("API TLS needs both tls_cert and tls_key")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise ConfigError(f"API TLS file {path} does not exist")
    sock = bind_socket(host, port)
    bound = int(sock.getsockname()[1])
    # uvicorn's own start/stop lines ("Started server process", "Application startup complete")
    # repeat what "api listening" says; they show only when the station logs at debug level.
    quiet = logging.getLogger().getEffectiveLevel() > logging.DEBUG
    config = uvicorn.Config(
        app,
        log_config=None,
        log_level=logging.WARNING if quiet else logging.DEBUG,
        access_log=False,  # every call is in the ledger's audit trail instead
        lifespan="on",
        server_header=False,
        limit_concurrency=MAX_CONNECTIONS,
        http=_refusing_protocol(app),
        timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S),
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
    )
    async with running_server(config, sock, name="api-server", what="the API server"):
        scheme = "https" if tls_cert else "http"
        log.info("api listening", address=f"{scheme}://{host}:{bound}")
        yield bound


@contextlib.asynccontextmanager
async def running_server(
    config: uvicorn.Config, sock: socket.socket, *, name: str, what: str
) -> AsyncIterator[None]:
    """Serve ``config`` on ``sock`` as a task until the block ends; the socket is closed afterwards."""
    server = EmbeddedServer(config)
    try:
        task = asyncio.create_task(server.serve(sockets=[sock]), name=name)
    except BaseException:
        sock.close()
        raise
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            while not server.started:
                if task.done():
                    break
                await asyncio.sleep(STARTUP_POLL_S)
        if not server.started:
            raise ConfigError(f"{what} did not start (see the log for why)")
        yield
    finally:
        server.should_exit = True
        try:
            await task
        finally:
            sock.close()
