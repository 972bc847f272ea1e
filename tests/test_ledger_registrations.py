"""The ledger's record of cloud registrations: the migration, forward-only steps, audit of final steps."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData
from sqlmodel import SQLModel

from factoryd.errors import InputError, LotNotFoundError
from factoryd.ledger import Ledger, LotProfile
from factoryd.ledger.engine import create_ledger_engine
from factoryd.ledger.migrate import alembic_config
from factoryd.ledger.registrations import RegistrationStep
from factoryd.ledger.tables import CloudRegistrationRow
from factoryd.ledger.testing import throwaway_postgres_database

ACTOR = "test"
TARGET = "123456789012/eu-west-1"
CERT = hashlib.sha256(b"a device certificate").hexdigest()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    with throwaway_postgres_database() as pg_url:
        yield pg_url


@pytest.fixture
def ledger(url: str) -> Iterator[Ledger]:
    with Ledger.open(url) as opened:
        opened.create_lot("LOT-1", customer="acme", profile=LotProfile(), target_quantity=None, actor=ACTOR)
        yield opened


def _record(ledger: Ledger, step: RegistrationStep, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "cloud": "aws",
        "target": TARGET,
        "cert_sha256": CERT,
        "device_id": "dev-1",
        "step": step,
        "cloud_cert_id": "c" * 64,
        "cloud_cert_arn": "arn:aws:iot:eu-west-1:123456789012:cert/" + "c" * 64,
        "actor": ACTOR,
    }
    options.update(overrides)
    return ledger.record_cloud_step("LOT-1", **options)


def test_migration_0003_follows_0002_and_matches_the_model(url: str) -> None:
    scripts = ScriptDirectory.from_config(alembic_config())
    assert scripts.get_revision("0003_cloud_registration").down_revision == "0002_api_tokens"
    assert len(scripts.get_heads()) == 1
    Ledger.open(url).close()
    metadata = MetaData()
    for name in ("lot", CloudRegistrationRow.__tablename__):
        SQLModel.metadata.tables[name].to_metadata(metadata)
    engine = create_ledger_engine(url)

    def only_registrations(
        _obj: Any, name: str | None, kind: str, _reflected: bool, _compare_to: Any
    ) -> bool:
        return kind != "table" or name == CloudRegistrationRow.__tablename__

    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"include_object": only_registrations})
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


def test_steps_move_forward_only_and_keep_the_cloud_ids(ledger: Ledger) -> None:
    first = _record(ledger, RegistrationStep.CERTIFICATE_REGISTERED)
    assert first.step is RegistrationStep.CERTIFICATE_REGISTERED
    later = _record(ledger, RegistrationStep.PRINCIPAL_ATTACHED, cloud_cert_id=None, cloud_cert_arn=None)
    assert later.step is RegistrationStep.PRINCIPAL_ATTACHED
    assert later.cloud_cert_id == "c" * 64  # a step that names no ID keeps the recorded one
    stale = _record(ledger, RegistrationStep.THING_CREATED)  # a late writer of an earlier step
    assert stale.step is RegistrationStep.PRINCIPAL_ATTACHED
    (only,) = ledger.cloud_registrations("LOT-1", cloud="aws", target=TARGET)
    assert (only.device_id, only.step, only.cert_sha256) == (
        "dev-1",
        RegistrationStep.PRINCIPAL_ATTACHED,
        CERT,
    )
    assert ledger.cloud_registrations("LOT-1", cloud="aws", target="999999999999/eu-west-1") == []


def test_final_steps_are_audited_in_the_same_transaction(ledger: Ledger) -> None:
    before = ledger.verify_audit()
    _record(ledger, RegistrationStep.CERTIFICATE_REGISTERED)
    _record(ledger, RegistrationStep.THING_CREATED)
    assert ledger.verify_audit() == before  # intermediate steps are not audited
    _record(ledger, RegistrationStep.POLICY_ATTACHED)
    assert ledger.verify_audit() == before + 1
    _record(ledger, RegistrationStep.POLICY_ATTACHED)  # a retry changes nothing
    assert ledger.verify_audit() == before + 1


def test_bad_input_is_refused_naming_it(ledger: Ledger) -> None:
    with pytest.raises(InputError, match="cert_sha256"):
        _record(ledger, RegistrationStep.CERTIFICATE_REGISTERED, cert_sha256="abc")
    with pytest.raises(InputError, match="cloud must be"):
        _record(ledger, RegistrationStep.CERTIFICATE_REGISTERED, cloud="AWS!")
    with pytest.raises(LotNotFoundError):
        ledger.record_cloud_step(
            "nope",
            cloud="aws",
            target=TARGET,
            cert_sha256=CERT,
            device_id="dev-1",
            step=RegistrationStep.CERTIFICATE_REGISTERED,
            cloud_cert_id=None,
            cloud_cert_arn=None,
            actor=ACTOR,
        )
    _record(ledger, RegistrationStep.CERTIFICATE_REGISTERED)
    with pytest.raises(InputError, match="recorded for device 'dev-1', not 'dev-2'"):
        _record(ledger, RegistrationStep.THING_CREATED, device_id="dev-2")
    assert ledger.cloud_registrations("LOT-1", cloud="aws", target=TARGET)[0].step is (
        RegistrationStep.CERTIFICATE_REGISTERED
    )
