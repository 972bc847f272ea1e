"""The whole customer flow over HTTP against a running station on a simulated hub, plus the CLI.

Admin makes tokens, the operator creates a lot and uploads its IDs and PKCS#12 bundle and
activates it, the station provisions boards, the customer reads progress and downloads a
manifest that lists exactly those boards, another customer sees nothing, and the operator's
port controls reach the station (over the API and through `factoryd ports` / `factoryd status`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from pathlib import Path

import httpx
from typer.testing import CliRunner

from factoryd.api import ApiContext, Role, TokenStore, create_app, serve_api
from factoryd.cli.main import app as cli_app
from factoryd.config import load_settings
from factoryd.daemon import Daemon, DaemonHooks
from factoryd.jobs.scheduler import Station
from factoryd.ledger import Ledger
from factoryd.pki.manifest import verify_manifest
from factoryd.pki.testca import make_test_pki
from factoryd.sim.board import SimBoard
from factoryd.sim.hub import SimHub

BOARDS = 3
IDS = [str(uuid.UUID(int=0x4000_0000_0000_4000_8000_0000_0000_0000 + i)) for i in range(5)]
# Boards on the simulated hub finish in well under a second each; this bounds a hung run.
PROVISION_TIMEOUT_S = 30.0
POLL_S = 0.05


def _cli(args: list[str], token: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, args, env={"FACTORYD_TOKEN": token})
    return result.exit_code, result.output


async def test_customer_flow_against_a_running_station(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        station={"name": "api-station", "state_dir": tmp_path},
        hub={"backend": "sim", "power_cycle_off_s": 0.0, "sim": {"ports": 2}},
        jobs={"rescan_s": 0.05, "reply_timeout_scale": 0.2, "backoff_initial_s": 0.01},
        metrics={"enabled": False},
        api={"enabled": False},
        log={"level": "warning", "format": "console"},
    )
    passphrase = secrets.token_urlsafe(16).encode()
    await asyncio.to_thread(lambda: Ledger.open(settings.ledger_url).close())
    with TokenStore.open(settings.ledger_url) as store:
        _, root = store.create("root", Role.ADMIN)
    pki = await asyncio.to_thread(make_test_pki, passphrase=b"customer-bundle-pass")
    hub = SimHub(2, SimBoard, supply=BOARDS)
    done = asyncio.Event()
    checked: list[str] = []

    async def flow(station: Station) -> None:
        daemon_ctx = ApiContext(
            settings=settings,
            ledger=station.ledger,
            paths=daemon.paths,
            passphrase=passphrase,
            live=daemon.live,
            station=station,
        )
        try:
            async with serve_api(create_app(daemon_ctx), "127.0.0.1", 0) as port:
                await _drive(
                    url=f"http://127.0.0.1:{port}",
                    root=root,
                    pki=pki,
                    station=station,
                    tmp_path=tmp_path,
                    port=port,
                )
                checked.append("flow")
        finally:
            done.set()

    daemon = Daemon(
        settings,
        DaemonHooks(hub=hub, passphrase=passphrase, on_ready=flow, stop_when=lambda _s: done.is_set()),
    )
    async with asyncio.timeout(60):
        station = await daemon.run()
    assert checked == ["flow"]
    assert station.outcomes["provisioned"] == BOARDS


async def _drive(*, url: str, root: str, pki: object, station: Station, tmp_path: Path, port: int) -> None:
    from factoryd.pki.testca import TestPki

    assert isinstance(pki, TestPki)
    auth = {"Authorization": f"Bearer {root}"}
    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=30) as admin:
        assert (await admin.get("/readyz")).json()["status"] == "ready"
        tokens = {}
        for body in (
            {"name": "line-op", "role": "operator"},
            {"name": "acme-portal", "role": "customer", "customer": "acme"},
            {"name": "globex-portal", "role": "customer", "customer": "globex"},
        ):
            created = await admin.post("/tokens", json=body)
            assert created.status_code == 201, created.text
            tokens[body["name"]] = created.json()["token"]

    def client(name: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {tokens[name]}"}, timeout=30
        )

    async with client("line-op") as op, client("acme-portal") as acme, client("globex-portal") as globex:
        lot = await op.post("/lots", json={"name": "order-1", "customer": "acme", "target_quantity": BOARDS})
        assert lot.status_code == 201, lot.text
        csv = ("id,batch\n" + "".join(f"{i},b1\n" for i in IDS)).encode()
        imported = await op.post("/lots/order-1/ids", files={"ids": ("order-1.csv", csv, "text/csv")})
        assert imported.json() == {"lot": "order-1", "imported": len(IDS)}
        bundle = await op.post(
            "/lots/order-1/bundle",
            files={"bundle": ("ca.p12", pki.pkcs12, "application/x-pkcs12")},
            data={"passphrase": "customer-bundle-pass"},
        )
        assert bundle.status_code == 200, bundle.text
        assert (await op.post("/lots/order-1/activate")).json()["state"] == "active"

        async with asyncio.timeout(PROVISION_TIMEOUT_S):
            # Polling is the point: the customer watches progress over HTTP.
            while (progress := (await acme.get("/lots/order-1/progress")).json())["provisioned"] < BOARDS:
                await asyncio.sleep(POLL_S)
        assert progress["total"] == len(IDS)
        assert progress["available"] == len(IDS) - BOARDS

        document = await acme.get("/lots/order-1/manifest")
        signature = await acme.get("/lots/order-1/manifest.p7s")
        manifest = verify_manifest(document.content, signature.content, [pki.root_cert])
        assert manifest["count"] == BOARDS
        assert {d["device_id"] for d in manifest["devices"]} <= set(IDS)
        assert all(d["metadata"] == {"batch": "b1"} for d in manifest["devices"])

        for path in ("/lots/order-1", "/lots/order-1/progress", "/lots/order-1/manifest"):
            assert (await globex.get(path)).status_code == 404
        assert (await globex.get("/lots")).json() == []

        ports = (await op.get("/ports")).json()
        assert [p["port"] for p in ports] == ["1", "2"]
        disabled = (await op.post("/ports/2/disable")).json()
        assert disabled["enabled"] is False
        assert station.ports["2"].enabled is False
        assert (await op.post("/ports/2/enable")).json()["enabled"] is True
        assert (await op.post("/ports/1/retry")).status_code == 200
        assert (await op.post("/ports/1/ack")).status_code == 200
        assert (await op.post("/ports/9/ack")).status_code == 404

        # The CLI talks to the same daemon over HTTP.
        config = tmp_path / "cli.toml"
        config.write_text(f'[station]\nstate_dir = "{tmp_path}"\n[api]\nport = {port}\n')
        code, output = await asyncio.to_thread(
            _cli, ["ports", "disable", "1", "--config", str(config)], tokens["line-op"]
        )
        assert code == 0, output
        assert "DISABLED" in output
        assert station.ports["1"].enabled is False
        code, output = await asyncio.to_thread(
            _cli, ["ports", "list", "--json", "--config", str(config)], tokens["line-op"]
        )
        assert code == 0, output
        assert [p["enabled"] for p in json.loads(output)] == [False, True]
        code, output = await asyncio.to_thread(_cli, ["status", "--config", str(config)], tokens["line-op"])
        assert code == 0, output
        assert f"provisioned {BOARDS}" in output
        assert "2 total, 1 enabled" in output
        code, output = await asyncio.to_thread(
            _cli, ["ports", "list", "--config", str(config)], tokens["acme-portal"]
        )
        assert code == 2
        assert "HTTP 403" in output
