"""API tokens: 32 random bytes shown once, stored as SHA-256, each with a role.

A token reads ``fdt_<id>_<secret>``: the id finds the row, the secret's hash is compared in
constant time. A plain hash (no KDF) is enough because the secret is 256 random bits, not a
password. The table lives in the ledger database (migration ``0002_api_tokens``); the store
has its own engine on the same URL and is thread-safe (each call is one transaction).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import TracebackType
from typing import Any, Self

from sqlalchemy import Column, DateTime, String, UniqueConstraint, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, col, select

from factoryd.api.errors import TokenExistsError, TokenNotFoundError, TokenRejectedError
from factoryd.errors import InputError, LedgerError
from factoryd.ledger.audit import as_utc
from factoryd.ledger.engine import create_ledger_engine
from factoryd.ledger.errors import LedgerUnavailableError

TOKEN_PREFIX = "fdt_"  # noqa: S105 - a public prefix, not a secret
# 32 random bytes: the brief's "high-entropy" bar that makes a plain SHA-256 sufficient.
TOKEN_SECRET_BYTES = 32
TOKEN_NAME_MAX_CHARS = 64
CUSTOMER_MAX_CHARS = 128
# Ten years; longer is a typo (and a token that should have been rotated long ago).
MAX_EXPIRES_DAYS = 3650
# last_used_at is a hint for operators, not an audit record: one write a minute per token is plenty.
LAST_USED_RESOLUTION_S = 60.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_TOKEN = re.compile(r"fdt_([1-9][0-9]{0,17})_([A-Za-z0-9_-]{43})")


class Role(StrEnum):
    """What a token may do; each role includes nothing implicitly (see ``docs/api.md``)."""

    CUSTOMER = "customer"  # its own lots: read, upload IDs and bundle, download the manifest
    SUPERVISOR = "supervisor"  # read-only: lots, progress, manifests, ports, status
    OPERATOR = "operator"  # lots (create, upload, state) and ports
    ADMIN = "admin"  # tokens and everything else


class ApiTokenRow(SQLModel, table=True):
    """One API token; the schema is owned by migration 0002_api_tokens."""

    __tablename__ = "api_tokens"
    __table_args__ = (UniqueConstraint("name", name="uq_api_tokens_name"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(String(TOKEN_NAME_MAX_CHARS), nullable=False))
    role: str = Field(sa_column=Column(String(16), nullable=False))
    customer: str | None = Field(default=None, sa_column=Column(String(CUSTOMER_MAX_CHARS), nullable=True))
    token_hash: str = Field(sa_column=Column(String(64), nullable=False))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    expires_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    revoked_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    last_used_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as callers see it (never its secret or hash)."""

    id: int
    name: str
    role: Role
    customer: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "name": self.name,
            "role": self.role.value,
            "customer": self.customer,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None,
        }


def _now() -> datetime:
    return datetime.now(UTC)


def _opt(moment: datetime | None) -> datetime | None:
    return None if moment is None else as_utc(moment)


def hash_secret(secret: str) -> str:
    """Hex SHA-256 of a token secret (what the table stores)."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _info(row: ApiTokenRow) -> TokenInfo:
    if row.id is None:
        raise LedgerError("an API token row has no id")
    return TokenInfo(
        id=row.id,
        name=row.name,
        role=Role(row.role),
        customer=row.customer,
        created_at=as_utc(row.created_at),
        expires_at=_opt(row.expires_at),
        revoked_at=_opt(row.revoked_at),
        last_used_at=_opt(row.last_used_at),
    )


def check_token_request(name: str, role: str, customer: str | None, expires_days: int | None) -> Role:
    """Validate what a new token would be; InputError names the field and the problem."""
    if not _NAME.fullmatch(name):
        raise InputError(
            f"token name {name!r} must be 1..{TOKEN_NAME_MAX_CHARS} characters of letters, digits, "
            "'.', '_', '@' or '-', starting with a letter or digit"
        )
    try:
        parsed = Role(role)
    except ValueError:
        raise InputError(f"role {role!r} is not one of {', '.join(Role)}") from None
    if parsed is Role.CUSTOMER:
        if customer is None:
            raise InputError("a customer token needs --customer (the customer whose lots it may see)")
        if not customer or len(customer) > CUSTOMER_MAX_CHARS or not customer.isprintable():
            raise InputError(
                f"customer must be 1..{CUSTOMER_MAX_CHARS} printable characters, got {customer!r}"
            )
    elif customer is not None:
        raise InputError(f"only customer tokens name a customer; a {parsed} token sees every lot")
    if expires_days is not None and not 1 <= expires_days <= MAX_EXPIRES_DAYS:
        raise InputError(f"expires_days must be 1..{MAX_EXPIRES_DAYS}, got {expires_days}")
    return parsed


class TokenStore:
    """Creates, lists, revokes and checks API tokens in the ledger database."""

    def __init__(self, engine: Engine) -> None:
        """Wrap an engine on a ledger database already migrated to head (see :meth:`open`)."""
        self._engine = engine

    @classmethod
    def open(cls, url: str) -> TokenStore:
        """A store on the ledger at ``url`` (open the Ledger first: it migrates the schema)."""
        return cls(create_ledger_engine(url))

    def close(self) -> None:
        """Close pooled connections."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        try:
            with Session(self._engine, expire_on_commit=False) as session, session.begin():
                yield session
        except (OperationalError, InterfaceError) as exc:
            raise LedgerUnavailableError(f"token store unavailable: {exc.orig or exc}") from exc
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            raise LedgerError(f"token store error: {exc}") from exc

    def create(
        self,
        name: str,
        role: Role | str,
        *,
        customer: str | None = None,
        expires_days: int | None = None,
        now: datetime | None = None,
    ) -> tuple[TokenInfo, str]:
        """Create a token; return it and its secret string, which is never shown again."""
        parsed = check_token_request(name, str(role), customer, expires_days)
        secret = secrets.token_urlsafe(TOKEN_SECRET_BYTES)
        created = now or _now()
        row = ApiTokenRow(
            name=name,
            role=parsed.value,
            customer=customer,
            token_hash=hash_secret(secret),
            created_at=created,
            expires_at=created + timedelta(days=expires_days) if expires_days else None,
        )
        try:
            # The INSERT is the transaction's first statement: SQLite takes the write lock there.
            with self._session() as session:
                session.add(row)
                session.flush()
                info = _info(row)
        except IntegrityError:
            raise TokenExistsError(
                f"a token named {name!r} already exists (names are never reused)"
            ) from None
        return info, f"{TOKEN_PREFIX}{info.id}_{secret}"

    def list_tokens(self) -> list[TokenInfo]:
        """Every token, revoked and expired ones included, oldest first."""
        with self._session() as session:
            rows = session.exec(select(ApiTokenRow).order_by(col(ApiTokenRow.id))).all()
            return [_info(row) for row in rows]

    def get(self, name: str) -> TokenInfo:
        """The token named ``name``; TokenNotFoundError if none."""
        if not _NAME.fullmatch(name):
            raise TokenNotFoundError(f"no token named {name!r}")
        with self._session() as session:
            row = session.exec(select(ApiTokenRow).where(ApiTokenRow.name == name)).first()
            if row is None:
                raise TokenNotFoundError(f"no token named {name!r}")
            return _info(row)

    def revoke(self, name: str, *, now: datetime | None = None) -> TokenInfo:
        """Revoke a token for good (revoking twice keeps the first time)."""
        if not _NAME.fullmatch(name):
            raise TokenNotFoundError(f"no token named {name!r}")
        with self._session() as session:
            session.connection().execute(
                update(ApiTokenRow)
                .where(col(ApiTokenRow.name) == name, col(ApiTokenRow.revoked_at).is_(None))
                .values(revoked_at=now or _now())
            )
        return self.get(name)

    def authenticate(self, token: str, *, now: datetime | None = None) -> TokenInfo:
        """The live token ``token`` stands for; TokenRejectedError says why not."""
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise TokenRejectedError("malformed API token")
        token_id, secret = int(match.group(1)), match.group(2)
        with self._session() as session:
            row = session.exec(select(ApiTokenRow).where(ApiTokenRow.id == token_id)).first()
            info = _info(row) if row is not None else None
            stored = row.token_hash if row is not None else "0" * 64
        # Compared even for unknown ids, so timing does not tell which ids exist.
        if not hmac.compare_digest(stored, hash_secret(secret)) or info is None:
            raise TokenRejectedError("unknown API token")
        moment = now or _now()
        if info.revoked_at is not None:
            raise TokenRejectedError(f"API token {info.name!r} was revoked", name=info.name)
        if info.expires_at is not None and info.expires_at <= moment:
            raise TokenRejectedError(f"API token {info.name!r} has expired", name=info.name)
        last = info.last_used_at
        if last is None or (moment - last).total_seconds() >= LAST_USED_RESOLUTION_S:
            with self._session() as session:
                session.connection().execute(
                    update(ApiTokenRow).where(col(ApiTokenRow.id) == info.id).values(last_used_at=moment)
                )
        return info
