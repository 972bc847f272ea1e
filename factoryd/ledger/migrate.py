"""Programmatic Alembic: upgrade the ledger schema on open, refuse unknown (newer) revisions."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from factoryd.errors import SchemaVersionError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same for every factoryd process on the server.
PG_MIGRATION_LOCK_KEY = 0x6661_6374_6C65_6467  # "factledg"


def alembic_config() -> Config:
    """An Alembic config pointing at the migration scripts shipped in this package."""
    config = Config()
    # ConfigParser interpolation: a literal % in the install path must be doubled.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return config


def head_revision() -> str:
    """The newest schema revision this build knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise SchemaVersionError("this build ships no ledger migrations")
    return head


def current_revisions(connection: Connection) -> tuple[str, ...]:
    """The revision(s) recorded in the database's ``alembic_version`` table (empty if none)."""
    return MigrationContext.configure(connection).get_current_heads()


def upgrade_to_head(engine: Engine) -> str:
    """Bring the database to this build's head revision in one locked transaction; return it."""
    config = alembic_config()
    script = ScriptDirectory.from_config(config)
    head = head_revision()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Several stations may start at once; only one migrates, the others then see head.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK_KEY})
        for revision in current_revisions(connection):
            try:
                script.get_revision(revision)
            except CommandError as exc:
                raise SchemaVersionError(
                    f"the ledger database is at schema revision {revision!r}, which this build of factoryd "
                    f"does not know (its newest is {head!r}); a newer factoryd wrote it, upgrade factoryd"
                ) from exc
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    return head
