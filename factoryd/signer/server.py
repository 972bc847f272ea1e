"""Serve the signer with mutual TLS, run as ``factoryd signer run`` (systemd/factoryd-signer.service).

uvicorn hands an ASGI app neither the peer certificate nor a failed handshake, so the TLS layer is ours:
uvicorn listens on plain TCP with :class:`_MutualTls` as its protocol class, which pauses the socket,
runs the handshake with ``loop.start_tls`` (``CERT_REQUIRED``, the line CA as the only client CA, its
CRL checked for the leaf, TLS 1.2 or newer), then gives the TLS transport to uvicorn's own
``H11Protocol``. The verified client certificate reaches the app through the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``, PEM, leaf first). A handshake that fails
(no certificate, another CA, revoked, expired) is audited (``signer.refused``, code
``tls_handshake_refused`` with OpenSSL's reason) and counted, with the peer's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from factoryd import __version__
from factoryd.api.server import bind_socket, running_server
from factoryd.config import Settings
from factoryd.errors import ConfigError
from factoryd.ledger.issuance import open_issuance_ledger
from factoryd.pki.store import BundleStore
from factoryd.sdnotify import Notifier
from factoryd.service import StationPaths, prepare_state_dir, station_passphrase
from factoryd.signer.lineca import LINE_CA_CERT, LINE_CA_CRL
from factoryd.signer.metrics import SignerMetrics
from factoryd.signer.quota import QuotaStore
from factoryd.signer.service import WORKER_THREADS, Authority, SignerPolicy, create_signer_app
from factoryd.telemetry.events import TelemetrySink
from factoryd.telemetry.mqtt import MqttPublisher, mqtt_settings

log = structlog.get_logger(__name__)

# A station's handshake is a few ms on a LAN; a peer that stalls longer is dropped.
HANDSHAKE_TIMEOUT_S = 10.0
# Requests in flight get this long to finish when the signer stops.
SHUTDOWN_GRACE_S = 5.0
SIGNER_DIRNAME = "signer"
QUOTA_DIRNAME = "quotas"
LINE_CA_DIRNAME = "line-ca"

# Unauthenticated peers can fail handshakes at will: at most this many reach the audit trail per
# window (the rest are logged and counted in factoryd_signer_refusals_total).
HANDSHAKE_AUDITS_PER_WINDOW = 20
HANDSHAKE_AUDIT_WINDOW_S = 60.0

HandshakeRefused = Callable[[str, str], None]


class _AuditBudget:
    """A fixed window of audit entries (the event loop's clock)."""

    def __init__(self, limit: int, window_s: float) -> None:
        self._limit = limit
        self._window_s = window_s
        self._start = float("-inf")
        self._used = 0

    def take(self, now: float) -> bool:
        """True while this window has room left."""
        if now - self._start >= self._window_s:
            self._start, self._used = now, 0
        if self._used >= self._limit:
            return False
        self._used += 1
        return True


def signer_dir(settings: Settings) -> Path:
    """The signer's own state: ``<state_dir>/signer`` (line CA, quotas, TLS files)."""
    return settings.station.state_dir / SIGNER_DIRNAME


def line_ca_dir(settings: Settings) -> Path:
    """The line CA directory of the settings."""
    return settings.signer.line_ca_dir or signer_dir(settings) / LINE_CA_DIRNAME


def quota_store(settings: Settings) -> QuotaStore:
    """Where the signer keeps the lots' quotas."""
    return QuotaStore(signer_dir(settings) / QUOTA_DIRNAME)


def server_ssl_context(cert: Path, key: Path, client_ca: Path, crl: Path | None) -> ssl.SSLContext:
    """TLS 1.2+ server context that requires a client certificate from the line CA (CRL checked)."""
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(cert), str(key))
        context.load_verify_locations(cafile=str(client_ca))
        if crl is not None:
            context.load_verify_locations(cafile=str(crl))
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"the signer's TLS files cannot be used: {exc}") from exc
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _peer(transport: asyncio.BaseTransport) -> str:
    address = transport.get_extra_info("peername")
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) and len(address) >= 2 else "unknown"


def _mutual_tls_protocol(context: ssl.SSLContext, on_refused: HandshakeRefused) -> type[asyncio.Protocol]:
    """uvicorn's protocol class for one server: our handshake first, then uvicorn's HTTP/1.1."""

    class _MutualTls(asyncio.Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._inner = H11Protocol(*args, **kwargs)
            self._task: asyncio.Task[None] | None = None
            # Decrypted bytes the handshake's first read delivers before uvicorn's protocol is connected.
            self._early: list[bytes] = []
            self._early_eof = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            if not isinstance(transport, asyncio.Transport):
                transport.close()
                return
            transport.pause_reading()  # no byte is read before the handshake owns the socket
            self._task = asyncio.get_running_loop().create_task(self._handshake(transport))

        def data_received(self, data: bytes) -> None:
            self._early.append(data)

        def eof_received(self) -> bool | None:
            self._early_eof = True
            return None

        def connection_lost(self, exc: Exception | None) -> None:
            # Before the TLS transport was handed over: the handshake task ends with the socket.
            if self._task is not None and not self._task.done():
                self._task.cancel()

        async def _handshake(self, transport: asyncio.Transport) -> None:
            loop = asyncio.get_running_loop()
            peer = _peer(transport)
            try:
                tls = await loop.start_tls(
                    transport,
                    self,
                    context,
                    server_side=True,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
                )
            except (OSError, ConnectionError, TimeoutError) as exc:
                reason = getattr(exc, "reason", None) or type(exc).__name__
                on_refused(peer, str(reason))
                transport.close()
                return
            if tls is None:  # the peer went away during the handshake
                transport.close()
                return
            ssl_object = tls.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            pem = ssl.DER_cert_to_PEM_cert(der) if der else None
            version = ssl_object.version() if ssl_object is not None else None
            inner_app = self._inner.app

            async def app(scope: Any, receive: Any, send: Any) -> None:
                extensions = dict(scope.get("extensions") or {})
                extensions["tls"] = {"client_cert_chain": [pem] if pem else [], "tls_version": version}
                await inner_app({**scope, "extensions": extensions}, receive, send)

            self._inner.app = app  # an ASGI 3 app like the one it wraps
            self._inner.connection_made(tls)
            tls.set_protocol(self._inner)
            for data in self._early:
                self._inner.data_received(data)
            self._early.clear()
            if self._early_eof:
                self._inner.eof_received()

    return _MutualTls


@contextlib.asynccontextmanager
async def serve_signer(
    app: Any,
    host: str,
    port: int,
    *,
    context: ssl.SSLContext,
    on_refused: HandshakeRefused,
    max_connections: int,
) -> AsyncIterator[int]:
    """Listen with mutual TLS on host:port (0 = any free port); yield the bound port."""
    sock = bind_socket(host, port, what="the signer", backlog=512)
    bound = int(sock.getsockname()[1])
    quiet = logging.getLogger().getEffectiveLevel() > logging.DEBUG
    config = uvicorn.Config(
        app,
        http=_mutual_tls_protocol(context, on_refused),
        log_config=None,
        log_level=logging.WARNING if quiet else logging.DEBUG,
        access_log=False,  # every decision is in the audit trail and the metrics
        lifespan="off",
        server_header=False,
        limit_concurrency=max_connections,
        timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S),
    )
    async with running_server(config, sock, name="signer-server", what="the signer's server"):
        log.info("signer listening", address=f"https://{host}:{bound}")
        yield bound


class SignerService:
    """The signing service of one line: ledger, lots' CA keys, quotas, metrics, the mTLS server."""

    def __init__(self, settings: Settings, *, passphrase: bytes | None = None) -> None:
        self.settings = settings
        self.passphrase = passphrase
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.metrics = SignerMetrics(signer=settings.station.name, version=__version__)
        self.stopping = asyncio.Event()
        self._reload: Callable[[], None] | None = None

    def reload(self) -> None:
        """Re-read the line CA's CRL (a revoked station fails its next handshake) and reopen the lots."""
        if self._reload is not None:
            self._reload()

    def _tls_files(self) -> tuple[Path, Path, Path, Path | None]:
        cfg = self.settings.signer
        if cfg.tls_cert is None or cfg.tls_key is None:
            raise ConfigError(
                "signer.tls_cert and signer.tls_key are required (factoryd signer issue-signer-cert)"
            )
        ca_dir = line_ca_dir(self.settings)
        client_ca = ca_dir / LINE_CA_CERT
        if not client_ca.is_file():
            raise ConfigError(f"no line CA certificate {client_ca} (factoryd signer init-line-ca)")
        crl = ca_dir / LINE_CA_CRL
        return cfg.tls_cert, cfg.tls_key, client_ca, crl if crl.is_file() else None

    async def run(self) -> None:
        """Serve until ``stopping`` is set (SIGTERM/SIGINT in ``factoryd signer run``)."""
        settings = self.settings
        paths = StationPaths(settings.station.state_dir)
        prepare_state_dir(paths)
        cert, key, client_ca, crl = self._tls_files()
        context = server_ssl_context(cert, key, client_ca, crl)
        passphrase = self.passphrase or station_passphrase(settings)
        bundles = BundleStore(paths.bundles, passphrase)
        notifier = Notifier()
        async with contextlib.AsyncExitStack() as stack:
            ledger = await asyncio.to_thread(open_issuance_ledger, settings.ledger_url)
            stack.callback(ledger.close)
            events: TelemetrySink | None = None
            if settings.mqtt.enabled:
                events = await stack.enter_async_context(MqttPublisher(mqtt_settings(settings)))
            authority = Authority(
                ledger=ledger,
                bundles=bundles,
                paths=paths,
                quotas=quota_store(settings),
                policy=SignerPolicy(
                    actor=settings.station.name,
                    max_per_device=settings.signer.max_per_device,
                    require_quota=settings.signer.require_quota,
                ),
                metrics=self.metrics,
                events=events,
            )
            stack.callback(authority.close)
            if settings.metrics.enabled:
                self.metrics_port = await stack.enter_async_context(
                    self.metrics.serve(settings.metrics.host, settings.metrics.port)
                )
                log.info("signer metrics listening", port=self.metrics_port)
            executor = ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="factoryd-signer")
            stack.callback(executor.shutdown, wait=True)
            loop = asyncio.get_running_loop()

            budget = _AuditBudget(HANDSHAKE_AUDITS_PER_WINDOW, HANDSHAKE_AUDIT_WINDOW_S)

            def refused(peer: str, reason: str) -> None:
                log.warning("TLS handshake refused", peer=peer, reason=reason)
                self.metrics.refused(
                    lot="unknown", station="unknown", reason="tls_handshake_refused", duration_s=0.0
                )
                if budget.take(loop.time()):
                    # Whoever can reach the port can fail handshakes: the trail gets a bounded share.
                    loop.run_in_executor(
                        executor, authority.audit_unidentified, "tls_handshake_refused", f"{peer}: {reason}"
                    )

            self.port = await stack.enter_async_context(
                serve_signer(
                    create_signer_app(authority, executor),
                    settings.signer.host,
                    settings.signer.port,
                    context=context,
                    on_refused=refused,
                    max_connections=settings.signer.max_connections,
                )
            )
            crl_path = line_ca_dir(settings) / LINE_CA_CRL

            def reload() -> None:
                notifier.notify("RELOADING=1")
                if crl_path.is_file():
                    # The re-signed CRL joins the store; OpenSSL checks with the newest (lastUpdate).
                    context.load_verify_locations(cafile=str(crl_path))
                    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
                authority.close()  # each lot's CA reopens from its bundle on its next request
                log.info("signer reloaded (CRL, lots)")
                notifier.notify("READY=1")

            self._reload = reload
            notifier.notify("READY=1", f"STATUS=signing on port {self.port}")
            await self.stopping.wait()
            self._reload = None
            notifier.stopping()

    async def run_until_signalled(self) -> None:
        """``run`` until SIGTERM or SIGINT, reloading on SIGHUP (``factoryd signer run``, systemd)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.run()

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("signer stopping on signal", signal=sig.name)
        self.stopping.set()
