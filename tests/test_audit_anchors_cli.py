"""A real station's manifest anchors its audit chains: a tail cut later, head rewound, is named by the CLI.

`factoryd demo` provisions a simulated line and exports the signed manifest (service.export_manifest);
then the station's chain loses its last entries and its head row is rewound to match, so the trail is
consistent on its own: `factoryd audit verify` alone passes, with `--manifest` it names the cut.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from typer.testing import CliRunner

from factoryd.cli.main import app

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_a_cut_tail_of_a_station_chain_is_caught_only_by_the_manifest(tmp_path: Path) -> None:
    state = tmp_path / "line"
    code, output = _run("demo", "--state-dir", str(state), "--boards", "4", "--ports", "2", "--json")
    assert code == 0, output
    config = str(state / "factoryd.toml")
    manifest = state / "manifests" / "demo-lot.manifest.json"
    ca = state / "bundles" / "demo-lot" / "ca-chain.pem"
    anchors = {a["chain"]: a for a in json.loads(manifest.read_text())["audit_chains"]}
    station_chain = next(name for name in anchors if name.endswith("station"))
    anchored_seq = anchors[station_chain]["seq"]
    assert anchored_seq >= 4  # a reservation, a job and a record per board at least

    code, output = _run("audit", "verify", "-c", config, "--manifest", str(manifest), "--ca", str(ca))
    assert code == 0, output

    with sqlite3.connect(state / "ledger.db") as db:
        db.execute(
            "DELETE FROM audit_entry WHERE chain = ? AND chain_seq > ?", (station_chain, anchored_seq - 2)
        )
        (kept_hash,) = db.execute(
            "SELECT hash FROM audit_entry WHERE chain = ? AND chain_seq = ?",
            (station_chain, anchored_seq - 2),
        ).fetchone()
        db.execute(
            "UPDATE audit_head SET seq = ?, hash = ? WHERE chain = ?",
            (anchored_seq - 2, kept_hash, station_chain),
        )

    code, output = _run("audit", "verify", "-c", config)
    assert code == 0, output  # consistent on its own: only the signed anchors show the cut
    code, output = _run("audit", "verify", "-c", config, "--manifest", str(manifest), "--ca", str(ca))
    assert code == 1, output
    assert f"'{station_chain}' broken at seq {anchored_seq - 1}" in output
    assert f"anchors seq {anchored_seq}" in output
