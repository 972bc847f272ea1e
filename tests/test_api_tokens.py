"""API tokens: hashed at rest, shown once, roles, expiry, revocation; the migration matches the model."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, inspect, text
from sqlmodel import SQLModel

from factoryd.api.errors import TokenExistsError, TokenNotFoundError, TokenRejectedError
from factoryd.api.tokens import LAST_USED_RESOLUTION_S, ApiTokenRow, Role, TokenStore
from factoryd.errors import InputError
from factoryd.ledger import Ledger
from factoryd.ledger.engine import create_ledger_engine
from factoryd.ledger.migrate import alembic_config
from factoryd.ledger.testing import throwaway_postgres_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated ledger database: a SQLite file, or a throwaway PostgreSQL database."""
    if request.param == "sqlite":
        ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
        Ledger.open(ledger_url).close()
        yield ledger_url
        return
    with throwaway_postgres_database() as ledger_url:
        Ledger.open(ledger_url).close()
        yield ledger_url


@pytest.fixture
def store(url: str) -> Iterator[TokenStore]:
    """A token store on it."""
    with TokenStore.open(url) as token_store:
        yield token_store


def test_migration_0002_follows_0001_and_matches_the_model(url: str) -> None:
    scripts = ScriptDirectory.from_config(alembic_config())
    assert scripts.get_revision("0002_api_tokens").down_revision == "0001_initial"
    assert len(scripts.get_heads()) == 1
    metadata = MetaData()
    SQLModel.metadata.tables[ApiTokenRow.__tablename__].to_metadata(metadata)
    engine = create_ledger_engine(url)

    def only_tokens(_obj: Any, name: str | None, kind: str, _reflected: bool, _compare_to: Any) -> bool:
        return kind != "table" or name == "api_tokens"

    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"include_object": only_tokens})
            assert compare_metadata(context, metadata) == []
            assert "api_tokens" in inspect(connection).get_table_names()
    finally:
        engine.dispose()


def test_the_secret_is_shown_once_and_stored_only_as_its_hash(store: TokenStore, url: str) -> None:
    info, secret = store.create("line-admin", Role.ADMIN)
    assert secret.startswith(f"fdt_{info.id}_")
    engine = create_ledger_engine(url)
    try:
        with engine.connect() as connection:
            stored = connection.execute(text("SELECT token_hash FROM api_tokens")).scalar_one()
    finally:
        engine.dispose()
    raw = secret.split("_", 2)[2]  # the secret itself may contain "_"
    assert stored == hashlib.sha256(raw.encode()).hexdigest()
    assert raw not in stored
    assert store.authenticate(secret).name == "line-admin"


def test_a_wrong_secret_for_a_real_id_is_unknown(store: TokenStore) -> None:
    _, secret = store.create("op", Role.OPERATOR)
    forged = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    with pytest.raises(TokenRejectedError, match="unknown API token") as caught:
        store.authenticate(forged)
    assert caught.value.name is None  # a guessed token does not learn whose id it hit


@pytest.mark.parametrize(
    "token", ["", "fdt_", "fdt_1_short", "Bearer fdt_1_" + "A" * 43, "fdt_0_" + "A" * 43]
)
def test_malformed_tokens(store: TokenStore, token: str) -> None:
    with pytest.raises(TokenRejectedError, match="malformed API token"):
        store.authenticate(token)


def test_expiry_and_revocation(store: TokenStore) -> None:
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    info, secret = store.create("temp", Role.SUPERVISOR, expires_days=2, now=start)
    assert info.expires_at == start + dt.timedelta(days=2)
    assert store.authenticate(secret, now=start + dt.timedelta(days=1)).role is Role.SUPERVISOR
    with pytest.raises(TokenRejectedError, match="'temp' has expired") as caught:
        store.authenticate(secret, now=start + dt.timedelta(days=2))
    assert caught.value.name == "temp"
    _, other = store.create("other", Role.OPERATOR)
    first = store.revoke("other", now=start)
    assert store.revoke("other").revoked_at == first.revoked_at == start  # revoking twice keeps the first
    with pytest.raises(TokenRejectedError, match="'other' was revoked"):
        store.authenticate(other)


def test_last_used_is_recorded_at_most_once_a_minute(store: TokenStore) -> None:
    _, secret = store.create("poller", Role.SUPERVISOR)
    t0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    store.authenticate(secret, now=t0)
    store.authenticate(secret, now=t0 + dt.timedelta(seconds=LAST_USED_RESOLUTION_S / 2))
    assert store.get("poller").last_used_at == t0
    later = t0 + dt.timedelta(seconds=LAST_USED_RESOLUTION_S)
    store.authenticate(secret, now=later)
    assert store.get("poller").last_used_at == later


def test_names_are_never_reused(store: TokenStore) -> None:
    store.create("dup", Role.ADMIN)
    store.revoke("dup")
    with pytest.raises(TokenExistsError, match="'dup' already exists"):
        store.create("dup", Role.ADMIN)
    assert [t.name for t in store.list_tokens()] == ["dup"]


@pytest.mark.parametrize(
    ("name", "role", "customer", "days", "fragment"),
    [
        ("../x", "admin", None, None, "token name '../x' must be"),
        ("", "admin", None, None, "token name '' must be"),
        ("a" * 65, "admin", None, None, "must be 1..64"),
        ("ok", "root", None, None, "role 'root' is not one of"),
        ("ok", "customer", None, None, "needs --customer"),
        ("ok", "customer", "", None, "customer must be 1..128 printable"),
        ("ok", "customer", "ac\x00me", None, "printable"),
        ("ok", "operator", "acme", None, "only customer tokens name a customer"),
        ("ok", "admin", None, 0, "expires_days must be 1..3650"),
        ("ok", "admin", None, 3651, "expires_days must be 1..3650"),
    ],
)
def test_bad_token_requests_are_refused(  # noqa: PLR0917 - one argument per parametrized column
    store: TokenStore, name: str, role: str, customer: str | None, days: int | None, fragment: str
) -> None:
    with pytest.raises(InputError, match=None) as caught:
        store.create(name, role, customer=customer, expires_days=days)
    assert fragment in str(caught.value)
    assert store.list_tokens() == []


def test_revoke_unknown(store: TokenStore) -> None:
    with pytest.raises(TokenNotFoundError, match="no token named 'ghost'"):
        store.revoke("ghost")
    with pytest.raises(TokenNotFoundError):
        store.get("a\x00b")


def test_a_customer_token_carries_its_customer(store: TokenStore) -> None:
    _, secret = store.create("acme-portal", "customer", customer="ACME Corp")
    info = store.authenticate(secret)
    assert (info.role, info.customer) == (Role.CUSTOMER, "ACME Corp")
    assert info.as_dict()["customer"] == "ACME Corp"
    assert "token_hash" not in info.as_dict()
