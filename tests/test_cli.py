"""The command line: lot administration, ledger and job repair, audit, demo, errors as one line."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from typer.testing import CliRunner

from factoryd.cli.main import app

runner = CliRunner()


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "factoryd.toml"
    config.write_text(f'[station]\nname = "cli-station"\nstate_dir = "{tmp_path}"\n')
    return config


def _ok(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_lot_administration_and_repairs(tmp_path: Path) -> None:
    config = str(_config(tmp_path))
    ids = [str(uuid.uuid4()) for _ in range(3)]
    (tmp_path / "ids.csv").write_text(
        "id,mac\n" + "".join(f"{i},00:11:22:33:44:{n:02x}\n" for n, i in enumerate(ids))
    )
    assert "created lot acme-1" in _ok("lots", "create", "acme-1", "--customer", "acme", "-c", config)
    assert "imported 3 IDs" in _ok("lots", "import", "acme-1", str(tmp_path / "ids.csv"), "-c", config)
    shown = json.loads(_ok("lots", "show", "acme-1", "-c", config))
    assert shown["ids"]["available"] == 3
    assert shown["profile"]["id_format"] == "uuid"
    assert "voided" in _ok("ledger", "void", "--id", ids[0], "--reason", "board crushed", "-c", config)
    listed = json.loads(_ok("lots", "list", "--json", "-c", config))
    assert listed[0]["void"] == 1
    assert listed[0]["available"] == 2
    assert "closed 0 open job(s)" in _ok("jobs", "abandon", "--station", "dead-station", "-c", config)
    assert "audit chain verified" in _ok("audit", "verify", "-c", config)


def test_refusals_are_one_clear_line(tmp_path: Path) -> None:
    config = str(_config(tmp_path))
    _ok("lots", "create", "acme-2", "--customer", "acme", "-c", config)
    (tmp_path / "dup.txt").write_text(
        "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b\n6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b\n"
    )
    result = runner.invoke(app, ["lots", "import", "acme-2", str(tmp_path / "dup.txt"), "-c", config])
    assert result.exit_code == 2
    assert "duplicate" in result.output.lower()
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["ledger", "void", "--id", "nope", "--reason", "x", "-c", config])
    assert result.exit_code == 2
    assert "no device ID 'nope'" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[hub]\nmax_powerd = 3\n")
    result = runner.invoke(app, ["lots", "list", "-c", str(bad)])
    assert result.exit_code == 2
    assert "hub.max_powerd" in result.output


def test_hubs_detect_says_clearly_when_there_is_none() -> None:
    output = _ok("hubs", "detect")
    assert "no switchable USB hub found" in output
