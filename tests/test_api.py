"""The HTTP API over real HTTP: authentication, roles, customer isolation, limits, uploads, audit."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlmodel import Session, col, select

from factoryd.api.tokens import Role
from factoryd.errors import ConfigError
from factoryd.ledger.engine import create_ledger_engine
from factoryd.ledger.tables import AuditEntryRow
from factoryd.pki.manifest import verify_manifest
from factoryd.pki.store import BundleStore
from factoryd.pki.testca import make_test_pki
from tests.helpers.api import STATION_PASSPHRASE, Api, running_api

UUIDS = [f"123e4567-e89b-12d3-a456-4266141740{i:02d}" for i in range(10)]
BUNDLE_PASSPHRASE = b"bundle-passphrase"
CORPUS = Path(__file__).parent / "data" / "bad" / "api"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    """A live API without a station, tokens for every role and two customers."""
    async with running_api(tmp_path) as served:
        yield served


def multipart(parts: list[tuple[str, bytes | None, bytes]]) -> tuple[bytes, str]:
    """A hand-made multipart body: (field name, raw file name or None, content) per part."""
    boundary = "factorydTestBoundary7MA4YWxkTrZu0gW"
    out = bytearray()
    for name, filename, content in parts:
        out += f"--{boundary}\r\n".encode()
        disposition = f'Content-Disposition: form-data; name="{name}"'.encode()
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        out += disposition + b"\r\n"
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


async def post_multipart(
    client: httpx.AsyncClient, path: str, parts: list[tuple[str, bytes | None, bytes]]
) -> httpx.Response:
    """POST a hand-made multipart body."""
    body, content_type = multipart(parts)
    return await client.post(path, content=body, headers={"Content-Type": content_type})


def ids_text(ids: list[str]) -> bytes:
    """A plain-text ID list."""
    return ("\n".join(ids) + "\n").encode()


def audit_rows(api: Api) -> list[AuditEntryRow]:
    """Every audit entry of the API's ledger, in order."""
    engine = create_ledger_engine(api.settings.ledger_url)
    try:
        with Session(engine) as session:
            return list(session.exec(select(AuditEntryRow).order_by(col(AuditEntryRow.seq))).all())
    finally:
        engine.dispose()


# Health and spec ------------------------------------------------------------------------------------


async def test_liveness_readiness_and_openapi_need_no_token(api: Api) -> None:
    async with api.client() as anon:
        assert (await anon.get("/healthz")).json() == {"status": "ok", "checks": {}}
        ready = await anon.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"] == {"ledger": "ok", "station": "not running in this process"}
        spec = (await anon.get("/openapi.json")).json()
    assert {"/lots", "/lots/{lot}/ids", "/lots/{lot}/manifest.p7s", "/ports/{port}/ack", "/tokens"} <= set(
        spec["paths"]
    )
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert "multipart/form-data" in spec["paths"]["/lots/{lot}/bundle"]["post"]["requestBody"]["content"]


# Authentication ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (None, "missing API token"),
        ("Basic YWRtaW46YWRtaW4=", "must be 'Bearer <token>'"),
        ("Bearer", "must be 'Bearer <token>'"),
        ("Bearer not-a-token", "malformed API token"),
        ("Bearer fdt_1_" + "A" * 43, "unknown API token"),
        ("Bearer fdt_999999_" + "A" * 43, "unknown API token"),
    ],
)
async def test_bad_tokens_get_401(api: Api, header: str | None, fragment: str) -> None:
    async with api.client() as anon:
        response = await anon.get("/lots", headers={"Authorization": header} if header else None)
    assert response.status_code == 401
    assert fragment in response.json()["detail"]
    assert response.headers["www-authenticate"] == "Bearer"


async def test_expired_and_revoked_tokens_get_401(api: Api) -> None:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    _, expired = await asyncio.to_thread(api.tokens.create, "old", Role.ADMIN, expires_days=1, now=long_ago)
    _, revoked = await asyncio.to_thread(api.tokens.create, "gone", Role.ADMIN)
    async with api.client("admin") as admin:
        assert (await admin.delete("/tokens/gone")).json()["revoked_at"] is not None
        for secret, fragment in ((expired, "'old' has expired"), (revoked, "'gone' was revoked")):
            response = await admin.get("/lots", headers={"Authorization": f"Bearer {secret}"})
            assert response.status_code == 401
            assert fragment in response.json()["detail"]
    # The refused calls are audited under the token's name.
    refused = [(r.actor, r.action) for r in audit_rows(api) if json.loads(r.details)["status"] == 401]
    assert ("old", "GET /lots") in refused
    assert ("gone", "GET /lots") in refused


@pytest.mark.parametrize(
    ("who", "method", "path", "status"),
    [
        ("supervisor", "POST", "/lots/l1/activate", 403),
        ("supervisor", "GET", "/lots/l1/progress", 200),
        ("supervisor", "GET", "/ports", 503),  # allowed, but no station runs here
        ("supervisor", "GET", "/tokens", 403),
        ("operator", "GET", "/tokens", 403),
        ("operator", "POST", "/lots/l1/pause", 409),  # allowed; a draft lot cannot pause
        ("operator", "POST", "/ports/1/retry", 503),
        ("acme", "GET", "/ports", 403),
        ("acme", "GET", "/status", 403),
        ("acme", "POST", "/lots/l1/activate", 403),
        ("acme", "GET", "/lots/l1/progress", 200),
        ("acme", "DELETE", "/tokens/admin", 403),
        ("admin", "GET", "/tokens", 200),
        ("admin", "GET", "/status", 200),
    ],
)
async def test_roles(api: Api, who: str, method: str, path: str, status: int) -> None:
    await api.make_lot("l1", "acme")
    async with api.client(who) as client:
        response = await client.request(method, path)
    assert response.status_code == status, response.text
    if status == 403:
        assert f"a {Role.CUSTOMER if who == 'acme' else who} token may not call" in response.json()["detail"]


# Customer isolation -----------------------------------------------------------------------------------


async def test_a_customer_sees_only_its_own_lots_and_others_look_missing(api: Api) -> None:
    await api.make_lot("acme-1", "acme")
    await api.make_lot("globex-1", "globex")
    async with api.client("acme") as acme:
        assert [lot["name"] for lot in (await acme.get("/lots")).json()] == ["acme-1"]
        assert (await acme.get("/lots/acme-1")).status_code == 200
        missing = await acme.get("/lots/no-such-lot")
        for path in ("/lots/globex-1", "/lots/globex-1/progress", "/lots/globex-1/manifest"):
            response = await acme.get(path)
            assert response.status_code == 404, path
            # Same words as for a lot that does not exist: existence does not leak.
            assert response.json()["detail"] == missing.json()["detail"].replace("no-such-lot", "globex-1")
        upload = await post_multipart(acme, "/lots/globex-1/ids", [("ids", b"ids.txt", ids_text(UUIDS[:2]))])
        assert upload.status_code == 404
    assert (await api.ledger.progress("globex-1")).total == 0
    async with api.client("supervisor") as supervisor:
        assert len((await supervisor.get("/lots")).json()) == 2


# Lots ----------------------------------------------------------------------------------------------------


async def test_lot_life_cycle_and_conflicts(api: Api) -> None:
    async with api.client("operator") as op:
        created = await op.post("/lots", json={"name": "lot-a", "customer": "acme", "target_quantity": 5})
        assert created.status_code == 201
        assert created.json()["state"] == "draft"
        duplicate = await op.post("/lots", json={"name": "lot-a", "customer": "acme"})
        assert duplicate.status_code == 409
        assert "already exists" in duplicate.json()["detail"]
        refused = await op.post("/lots/lot-a/activate")
        assert refused.status_code == 409
        assert "no device IDs" in refused.json()["detail"]
        assert "no CA bundle" in refused.json()["detail"]
        assert (
            await post_multipart(op, "/lots/lot-a/ids", [("ids", b"ids.txt", ids_text(UUIDS[:2]))])
        ).is_success
        pki = await asyncio.to_thread(make_test_pki, passphrase=BUNDLE_PASSPHRASE)
        bundle = [("bundle", b"ca.p12", pki.pkcs12), ("passphrase", None, BUNDLE_PASSPHRASE)]
        assert (await post_multipart(op, "/lots/lot-a/bundle", bundle)).is_success
        assert (await op.post("/lots/lot-a/activate")).json()["state"] == "active"
        assert (await op.post("/lots/lot-a/pause")).json()["state"] == "paused"
        assert (await op.post("/lots/lot-a/close")).json()["state"] == "closed"
        again = await op.post("/lots/lot-a/activate")
        assert again.status_code == 409
        assert "cannot go from closed to active" in again.json()["detail"]
        assert (await op.post("/lots/nope/activate")).status_code == 404
        progress = (await op.get("/lots/lot-a/progress")).json()
    assert progress == {
        "lot": "lot-a",
        "total": 2,
        "available": 2,
        "reserved": 0,
        "provisioned": 0,
        "void": 0,
        "target_quantity": 5,
    }


async def test_id_list_upload_by_the_customer(api: Api) -> None:
    await api.make_lot("acme-1", "acme")
    async with api.client("acme") as acme:
        response = await post_multipart(acme, "/lots/acme-1/ids", [("ids", b"ids.txt", ids_text(UUIDS[:4]))])
        assert response.status_code == 200, response.text
        assert response.json() == {"lot": "acme-1", "imported": 4}
        # The same IDs again: refused whole, naming the line and the ID.
        again = await post_multipart(acme, "/lots/acme-1/ids", [("ids", b"ids.txt", ids_text(UUIDS[:4]))])
        assert again.status_code == 422
        assert "line 1" in again.json()["detail"]
        assert "already exists" in again.json()["detail"]
        # Format from the form field when the file name says nothing.
        as_json = json.dumps(UUIDS[4:6]).encode()
        fielded = await post_multipart(
            acme, "/lots/acme-1/ids", [("ids", b"upload", as_json), ("format", None, b"json")]
        )
        assert fielded.json() == {"lot": "acme-1", "imported": 2}
    assert (await api.ledger.progress("acme-1")).available == 6


async def test_bundle_upload_pkcs12_and_pem(api: Api) -> None:
    await api.make_lot("p12-lot", "acme")
    await api.make_lot("pem-lot", "acme")
    pki = await asyncio.to_thread(make_test_pki, passphrase=BUNDLE_PASSPHRASE)
    async with api.client("operator") as op:
        wrong = await post_multipart(
            op, "/lots/p12-lot/bundle", [("bundle", b"ca.p12", pki.pkcs12), ("passphrase", None, b"nope")]
        )
        assert wrong.status_code == 422
        assert "wrong passphrase" in wrong.json()["detail"]
        stored = await post_multipart(
            op,
            "/lots/p12-lot/bundle",
            [("bundle", b"ca.p12", pki.pkcs12), ("passphrase", None, BUNDLE_PASSPHRASE)],
        )
        assert stored.status_code == 200, stored.text
        assert stored.json()["ca_subject"] == pki.issuing_cert.subject.rfc4514_string()
        no_key = await post_multipart(
            op, "/lots/pem-lot/bundle", [("bundle", b"chain.pem", pki.chain_pem), ("passphrase", None, b"x")]
        )
        assert no_key.status_code == 422
        assert "needs the encrypted private key" in no_key.json()["detail"]
        pem = await post_multipart(
            op,
            "/lots/pem-lot/bundle",
            [
                ("bundle", b"chain.pem", pki.chain_pem),
                ("key", b"key.pem", pki.key_pem),
                ("anchors", b"anchors.pem", pki.trust_anchors_pem),
                ("passphrase", None, BUNDLE_PASSPHRASE),
            ],
        )
        assert pem.status_code == 200, pem.text
        assert pem.json()["trust_anchors"] == 1
    store = BundleStore(api.ctx.paths.bundles, STATION_PASSPHRASE)
    assert store.load("pem-lot").certificate == pki.issuing_cert  # re-encrypted under the station passphrase
    assert BUNDLE_PASSPHRASE not in b"".join(p.read_bytes() for p in store.path("p12-lot").iterdir())


async def test_manifest_json_and_signature_match(api: Api) -> None:
    await api.make_lot("acme-1", "acme")
    pki = await asyncio.to_thread(make_test_pki, passphrase=BUNDLE_PASSPHRASE)
    async with api.client("acme") as acme:
        early = await acme.get("/lots/acme-1/manifest")
        assert early.status_code == 409
        assert "no CA bundle yet" in early.json()["detail"]
        parts = [("bundle", b"ca.p12", pki.pkcs12), ("passphrase", None, BUNDLE_PASSPHRASE)]
        assert (await post_multipart(acme, "/lots/acme-1/bundle", parts)).status_code == 200
        document = await acme.get("/lots/acme-1/manifest")
        signature = await acme.get("/lots/acme-1/manifest.p7s")
    assert document.headers["content-type"] == "application/json"
    assert signature.headers["content-type"] == "application/pkcs7-signature"
    assert document.headers["x-manifest-sha256"] == signature.headers["x-manifest-sha256"]
    verified = verify_manifest(document.content, signature.content, [pki.root_cert])
    assert verified["lot"] == "acme-1"
    assert verified["count"] == 0


# Limits and content types ----------------------------------------------------------------------------


async def _raw_request(api: Api, head: bytes) -> tuple[int, bytes]:
    """Send only a request head and read the answer (the body is never sent)."""
    port = int(api.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read(65536)
    finally:
        writer.close()
        await writer.wait_closed()
    status = int(answer.split(b" ", 2)[1])
    return status, answer


async def test_declared_oversize_upload_is_refused_before_the_body_is_sent(api: Api) -> None:
    await api.make_lot("acme-1", "acme")
    head = (
        b"POST /lots/acme-1/ids HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + api.secrets["operator"].encode() + b"\r\n"
        b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 1000000000\r\n\r\n"
    )
    status, answer = await _raw_request(api, head)
    assert status == 413
    assert b"over the limit" in answer


async def test_streamed_oversize_upload_is_cut_off(api: Api) -> None:
    await api.make_lot("acme-1", "acme")
    body, content_type = multipart([("ids", b"ids.txt", b"x" * (200 * 1024))])

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 16 * 1024):
            yield body[start : start + 16 * 1024]

    async with api.client("operator") as op:
        response = await op.post("/lots/acme-1/ids", content=chunks(), headers={"Content-Type": content_type})
    assert response.status_code == 413
    assert "over the limit" in response.json()["detail"]
    assert (await api.ledger.progress("acme-1")).total == 0


async def test_a_file_over_its_own_limit_is_413(api: Api) -> None:
    await api.make_lot("acme-1", "acme")
    too_big = b"x" * (api.ctx.limits.id_list_bytes + 1)
    async with api.client("operator") as op:
        response = await post_multipart(op, "/lots/acme-1/ids", [("ids", b"ids.txt", too_big)])
    assert response.status_code == 413
    assert "file 'ids' is over the limit" in response.json()["detail"]


def _corpus() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((CORPUS / "expected.json").read_text())
    return cases


def _case_request(case: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    headers: dict[str, str] = {}
    if "multipart" in case:
        parts = []
        for part in case["multipart"]:
            filename = part.get("filename")
            raw_name = (
                filename.encode("utf-8").decode("unicode_escape").encode("latin-1") if filename else None
            )
            content = (CORPUS / part["file"]).read_bytes() if "file" in part else part["text"].encode()
            parts.append((part["name"], raw_name, content))
        body, headers["Content-Type"] = multipart(parts)
        return body, headers
    if "content_type" in case:
        headers["Content-Type"] = case["content_type"]
    body = (CORPUS / case["body_file"]).read_bytes() if "body_file" in case else case.get("body", "").encode()
    return body, headers


async def test_hostile_payload_corpus(api: Api) -> None:
    """Every case in tests/data/bad/api/expected.json gets its status and message; nothing is stored."""
    await api.make_lot("target", "acme")
    failures = []
    for case in _corpus():
        body, headers = _case_request(case)
        async with api.client(case.get("as", "operator")) as client:
            response = await client.request(case["method"], case["path"], content=body, headers=headers)
        detail = response.json().get("detail", "") if response.content else ""
        if response.status_code != case["status"] or case["message"] not in str(detail):
            failures.append(f"{case['name']}: got {response.status_code} {detail!r}")
    assert not failures, "\n".join(failures)
    assert [lot.name for lot in await api.ledger.list_lots()] == ["target"]
    assert (await api.ledger.progress("target")).total == 0
    assert not (api.ctx.paths.bundles / "target").exists()
    assert not (api.ctx.paths.state_dir / "etc").exists()


# Tokens ------------------------------------------------------------------------------------------------


async def test_admin_manages_tokens_over_the_api(api: Api) -> None:
    async with api.client("admin") as admin:
        created = await admin.post("/tokens", json={"name": "line-op", "role": "operator", "expires_days": 7})
        assert created.status_code == 201, created.text
        secret = created.json()["token"]
        assert secret.startswith("fdt_")
        assert created.json()["expires_at"] is not None
        listed = (await admin.get("/tokens")).json()
        assert "line-op" in [t["name"] for t in listed]
        assert all("token" not in t and "token_hash" not in t for t in listed)
        duplicate = await admin.post("/tokens", json={"name": "line-op", "role": "operator"})
        assert duplicate.status_code == 409
        no_customer = await admin.post("/tokens", json={"name": "cust", "role": "customer"})
        assert no_customer.status_code == 422
        assert "needs --customer" in no_customer.json()["detail"]
        bad_role = await admin.post("/tokens", json={"name": "x", "role": "root"})
        assert bad_role.status_code == 422
        assert "role" in bad_role.json()["detail"]
        async with api.client() as fresh:
            fresh.headers["Authorization"] = f"Bearer {secret}"
            assert (await fresh.get("/lots")).status_code == 200
            assert (await admin.delete("/tokens/line-op")).status_code == 200
            assert (await fresh.get("/lots")).status_code == 401
        assert (await admin.delete("/tokens/nobody")).status_code == 404
    assert (await asyncio.to_thread(api.tokens.get, "line-op")).last_used_at is not None


# Audit ---------------------------------------------------------------------------------------------


async def test_every_call_is_audited_including_refusals(api: Api) -> None:
    await api.make_lot("acme-1", "acme")
    async with api.client("acme") as acme, api.client() as anon:
        await acme.get("/lots/acme-1/progress")
        await acme.post("/lots/acme-1/activate")  # 403
        await anon.get("/lots")  # 401
        await acme.get("/lots/ghost")  # 404
        await anon.get("/no/such/route")  # 404 without a route
        await anon.get("/healthz")  # not audited
    entries = [
        (r.actor, r.action, r.subject, json.loads(r.details)["status"])
        for r in audit_rows(api)
        if r.action.startswith(("GET", "POST"))
    ]
    assert entries == [
        ("acme", "GET /lots/{lot}/progress", "acme-1", 200),
        ("acme", "POST /lots/{lot}/activate", "acme-1", 403),
        ("(anonymous)", "GET /lots", "/lots", 401),
        ("acme", "GET /lots/{lot}", "ghost", 404),
        ("(anonymous)", "GET (no route)", "(no route)", 404),
    ]
    assert await api.ledger.verify_audit() == len(audit_rows(api))


# TLS -------------------------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "factoryd test station")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "api.crt", directory / "api.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    async with running_api(tmp_path, tls=(cert, key)) as api:
        assert api.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(
            base_url=api.url, verify=context, headers=api.headers("admin")
        ) as client:
            assert (await client.get("/lots")).status_code == 200
        plain = api.url.replace("https://", "http://")
        async with httpx.AsyncClient(base_url=plain) as client:
            with pytest.raises(httpx.HTTPError):
                await client.get("/healthz")


async def test_tls_needs_both_files(tmp_path: Path) -> None:
    cert, _ = _self_signed(tmp_path)
    with pytest.raises(ConfigError, match="both tls_cert and tls_key"):
        async with running_api(tmp_path, tls=(cert, None)):  # type: ignore[arg-type]
            pass
