"""Shared helpers of the API tests (no tests here): a live API server on a throwaway SQLite ledger."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from factoryd.api import ApiContext, TokenStore, UploadLimits, create_app, serve_api
from factoryd.config import Settings, load_settings
from factoryd.jobs.scheduler import Station
from factoryd.ledger import AsyncLedger, LotProfile
from factoryd.pki.testca import make_test_pki
from factoryd.service import StationPaths, parse_bundle, store_bundle
from factoryd.telemetry.live import LiveState

STATION_PASSPHRASE = b"station-passphrase-for-tests"
TEST_BUNDLE_PASSPHRASE = b"bundle-passphrase-for-tests"
# Small limits so refusals are quick to provoke; the bundle limit stays at the real 1 MiB.
TEST_LIMITS = UploadLimits(id_list_bytes=64 * 1024, json_bytes=16 * 1024, overhead_bytes=8 * 1024)
ROLES = ("admin", "operator", "supervisor")
CUSTOMERS = ("acme", "globex")


@dataclass
class Api:
    """A served API and what a test needs around it."""

    url: str
    settings: Settings
    ledger: AsyncLedger
    tokens: TokenStore
    ctx: ApiContext
    secrets: dict[str, str] = field(default_factory=dict)

    def headers(self, who: str) -> dict[str, str]:
        """Authorization header of the token named ``who`` (admin, operator, acme, ...)."""
        return {"Authorization": f"Bearer {self.secrets[who]}"}

    def client(self, who: str | None = None) -> httpx.AsyncClient:
        """An HTTP client, authenticated as ``who`` when given."""
        return httpx.AsyncClient(base_url=self.url, headers=self.headers(who) if who else None, timeout=30)

    async def make_lot(self, name: str, customer: str, *, profile: LotProfile | None = None) -> None:
        """Create a lot straight in the ledger."""
        await self.ledger.create_lot(
            name, customer=customer, profile=profile or LotProfile(), target_quantity=None, actor="test"
        )

    async def make_provisionable(self, name: str, *, ids: int = 4) -> None:
        """Give a lot what activation checks for: device IDs and a CA bundle (a fresh test PKI)."""
        lot = await self.ledger.get_lot(name)
        id_list = "".join(f"{uuid.uuid4()}\n" for _ in range(ids)).encode()
        await self.ledger.import_ids(name, id_list, filename="ids.txt", actor="test")
        pki = await asyncio.to_thread(make_test_pki, passphrase=TEST_BUNDLE_PASSPHRASE)
        bundle = parse_bundle(pki.pkcs12, TEST_BUNDLE_PASSPHRASE, lot)
        store_bundle(self.ctx.paths, STATION_PASSPHRASE, name, bundle)


def api_settings(state_dir: Path, **overrides: object) -> Settings:
    """Settings for a station whose ledger is a SQLite file in ``state_dir``."""
    return load_settings(None, station={"state_dir": state_dir}, **overrides)


@asynccontextmanager
async def running_api(
    state_dir: Path,
    *,
    station: Station | None = None,
    limits: UploadLimits = TEST_LIMITS,
    tls: tuple[Path, Path] | None = None,
) -> AsyncIterator[Api]:
    """Serve the API on 127.0.0.1:0 with one token per role and two customers."""
    settings = api_settings(state_dir)
    async with AsyncLedger.open(settings.ledger_url) as ledger:
        store = TokenStore.open(settings.ledger_url)
        try:
            secrets: dict[str, str] = {}
            for role in ROLES:
                secrets[role] = (await asyncio.to_thread(store.create, role, role))[1]
            for customer in CUSTOMERS:
                secrets[customer] = (
                    await asyncio.to_thread(store.create, customer, "customer", customer=customer)
                )[1]
            ctx = ApiContext(
                settings=settings,
                ledger=ledger,
                paths=StationPaths(state_dir),
                passphrase=STATION_PASSPHRASE,
                live=LiveState(),
                station=station,
                limits=limits,
            )
            cert, key = tls if tls else (None, None)
            async with serve_api(create_app(ctx), "127.0.0.1", 0, tls_cert=cert, tls_key=key) as port:
                scheme = "https" if tls else "http"
                yield Api(f"{scheme}://127.0.0.1:{port}", settings, ledger, store, ctx, secrets)
        finally:
            store.close()
