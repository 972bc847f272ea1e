"""The allocation ledger (sync core): lots, device IDs, jobs and the audit trail.

:class:`Ledger` is the public facade; its parts live next to it, one job each:

- :mod:`~factoryd.ledger.engine`: the engine, transactions, error translation, the audit append;
- :mod:`~factoryd.ledger.lots`: lots and their life cycle;
- :mod:`~factoryd.ledger.imports`: customer ID lists, imported whole or not at all;
- :mod:`~factoryd.ledger.jobs`: job records and step attempts;
- :mod:`~factoryd.ledger.states`: the device-ID state machine (reserve, provision, void) and records;
- :mod:`~factoryd.ledger.certificates`: every certificate issued for a lot, which stand, CRL numbers;
- :mod:`~factoryd.ledger.registrations`: how far each certificate got in registering with a cloud;
- :mod:`~factoryd.ledger.matter`: Matter devices' onboarding codes, sealed under the station secret;
- :mod:`~factoryd.ledger.labels`: each lot's label template and the durable label print queue.

Every public method is one database transaction that is committed before it returns. Writers
are serialised per claim with ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL and
``BEGIN IMMEDIATE`` on SQLite; each actor's audit chain (a station's, ``cli``'s…) is serialised by
its own head row, so stations never wait for each other's audit appends.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Self

from sqlalchemy.exc import SQLAlchemyError

from factoryd.errors import LedgerError
from factoryd.ledger.audit import ChainHead, VerifiedChain
from factoryd.ledger.certificates import CertificateBook
from factoryd.ledger.engine import WRITE_OPTION, create_ledger_engine
from factoryd.ledger.errors import LedgerUnavailableError
from factoryd.ledger.imports import IdImport
from factoryd.ledger.labels import LabelBook
from factoryd.ledger.matter import MatterBook
from factoryd.ledger.migrate import upgrade_to_head
from factoryd.ledger.registrations import RegistrationBook
from factoryd.ledger.states import DeviceBook


class Ledger(DeviceBook, IdImport, RegistrationBook, CertificateBook, MatterBook, LabelBook):
    """The allocation ledger; thread-safe, each call is its own committed transaction."""

    @classmethod
    def open(cls, url: str, *, onboarding_secret: bytes | None = None) -> Ledger:
        """Open (and migrate to head) the ledger at ``url``; SchemaVersionError on unknown revisions.

        ``onboarding_secret`` (the station's CA passphrase) seals and opens Matter onboarding codes.
        """
        engine = create_ledger_engine(url)
        try:
            upgrade_to_head(engine.execution_options(**{WRITE_OPTION: True}))
        except LedgerError:
            engine.dispose()
            raise
        except SQLAlchemyError as exc:
            engine.dispose()
            where = engine.url.render_as_string(hide_password=True)
            raise LedgerUnavailableError(f"cannot open the ledger database {where}: {exc}") from exc
        ledger = cls(engine)
        if onboarding_secret is not None:
            ledger.use_onboarding_secret(onboarding_secret)
        return ledger

    def close(self) -> None:
        """Close every pooled connection; the ledger cannot be used afterwards."""
        self._closed = True
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name


def audit_chain_heads(ledger: Ledger) -> list[ChainHead]:
    """Every audit chain's head now, by chain name: what a lot's signed manifest anchors."""
    return ledger._audit_heads()


def verify_audit_chains(
    ledger: Ledger, anchors: Sequence[ChainHead] = (), *, source: str = "the manifest"
) -> dict[str, VerifiedChain]:
    """Verify every audit chain, then that each anchored head (a signed manifest's) is still in its chain.

    AuditChainError names the chain and the first bad position; ``source`` names the anchors' origin.
    """
    return ledger._verify_audit_chains(anchors, source=source)


def verify_audit(url: str) -> int:
    """Verify the audit chain of the ledger at ``url``; return the entry count (``factoryd audit verify``)."""
    with Ledger.open(url) as ledger:
        return ledger.verify_audit()
