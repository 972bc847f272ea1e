"""`factoryd tokens` on the ledger, and the HTTP CLI's refusals when the daemon or token is missing."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from factoryd.api import TokenStore
from factoryd.cli.main import app
from factoryd.ledger import Ledger
from factoryd.ledger.engine import create_ledger_engine
from factoryd.ledger.tables import AuditEntryRow


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config whose ledger lives in tmp_path and whose API port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    path = tmp_path / "factoryd.toml"
    path.write_text(f'[station]\nstate_dir = "{tmp_path}"\n[api]\nport = {free_port}\n')
    return path


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Invoke the CLI; (exit code, stdout, stderr)."""
    result = CliRunner().invoke(app, list(args), env=env or {"FACTORYD_TOKEN": ""})
    return result.exit_code, result.stdout, result.stderr


def test_tokens_create_list_revoke(config: Path, tmp_path: Path) -> None:
    code, out, err = run(
        "tokens",
        "create",
        "--name",
        "acme-portal",
        "--role",
        "customer",
        "--customer",
        "acme",
        "--expires-days",
        "30",
        "--config",
        str(config),
    )
    assert code == 0, err
    secret = out.strip()
    assert secret.startswith("fdt_")
    assert "not shown again" in err
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with TokenStore.open(url) as store:
        assert store.authenticate(secret).customer == "acme"

    code, out, _ = run("tokens", "list", "--config", str(config))
    assert code == 0
    listed = json.loads(out)
    assert [(t["name"], t["role"], t["customer"]) for t in listed] == [("acme-portal", "customer", "acme")]
    assert listed[0]["expires_at"] is not None
    assert secret.split("_", 2)[2] not in out

    code, out, _ = run("tokens", "revoke", "acme-portal", "--config", str(config))
    assert code == 0
    assert "revoked" in out
    with TokenStore.open(url) as store:
        assert store.get("acme-portal").revoked_at is not None

    engine = create_ledger_engine(url)
    try:
        with Session(engine) as session:
            actions = [(r.actor, r.action, r.subject) for r in session.exec(select(AuditEntryRow)).all()]
    finally:
        engine.dispose()
    assert actions == [("cli", "token.created", "acme-portal"), ("cli", "token.revoked", "acme-portal")]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--name", "x", "--role", "root"], "role 'root' is not one of"),
        (["--name", "x", "--role", "customer"], "needs --customer"),
        (["--name", "../x", "--role", "admin"], "token name '../x' must be"),
    ],
)
def test_tokens_create_refusals(config: Path, args: list[str], fragment: str) -> None:
    code, out, err = run("tokens", "create", *args, "--config", str(config))
    assert code == 2
    assert out == ""
    assert fragment in err
    with Ledger.open(f"sqlite:///{config.parent / 'ledger.db'}"):
        pass
    with TokenStore.open(f"sqlite:///{config.parent / 'ledger.db'}") as store:
        assert store.list_tokens() == []


@pytest.fixture
def listening(config: Path) -> Iterator[None]:
    """Something accepts connections on the config's API port (a daemon is up, as far as the CLI sees)."""
    port = int(config.read_text().rsplit("port = ", 1)[1])
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        yield


@pytest.mark.usefixtures("listening")
def test_ports_without_a_token(config: Path) -> None:
    code, _, err = run("ports", "list", "--config", str(config))
    assert code == 2
    assert "no API token: set $FACTORYD_TOKEN or pass --token-file" in err


def test_ports_when_the_daemon_is_not_running(config: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("fdt_1_" + "A" * 43 + "\n")
    code, _, err = run("ports", "retry", "3", "--token-file", str(token_file), "--config", str(config))
    assert code == 2
    port = int(config.read_text().rsplit("port = ", 1)[1])
    assert f"no daemon is running at http://127.0.0.1:{port}; start it with `factoryd run -c {config}`" in err


@pytest.mark.usefixtures("listening")
def test_an_empty_token_file_is_refused(config: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("\n")
    code, _, err = run("status", "--token-file", str(token_file), "--config", str(config))
    assert code == 2
    assert "is empty" in err
