"""Attested key generation on the mcumgr profile: the provisioning group's attest command on simulated
Zephyr boards, through the real pipeline, with a lot requiring attestation (docs/protocol-smp.md)."""

from __future__ import annotations

import secrets
from collections import Counter
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from smp import error as smperr
from smpclient import SMPClient
from smpclient.generics import success
from smpclient.transport.serial import SMPSerialTransport

from factoryd.jobs.scheduler import Station
from factoryd.pki.attestation import statement_bytes
from factoryd.protocol.mcumgr import (
    AttestationCertReadRequest,
    AttestWriteRequest,
    AttestWriteResponse,
    McumgrClient,
    McumgrCommand,
    encode_request,
)
from factoryd.protocol.messages import ObjectId
from factoryd.sim.board import IMPOSTOR_REASONS, Impostor, equip_attestation
from factoryd.sim.mcumgr import SimMcumgrBoard
from factoryd.sim.pty import serve_pty
from factoryd.sim.secure_element import SimVendorCa
from factoryd.transport.smp_framing import SmpDecoder, SmpOp
from tests.helpers.station import LOT, Line, make_line
from tests.test_attestation_line import _audit
from tests.test_mcumgr_job import mcumgr_board


async def attesting_line(tmp_path: Path) -> Line:
    return await make_line(tmp_path, profile="mcumgr", attestation=True)


def vendor(line: Line) -> SimVendorCa:
    # The lot's stored attestation root is this vendor's (same seed, same keys).
    return SimVendorCa.make(seed=line.options.seed)


def genuine(line: Line) -> SimMcumgrBoard:
    board = mcumgr_board(line)
    equip_attestation(board, vendor(line))
    return board


async def test_genuine_mcumgr_boards_provision_with_the_attested_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = await attesting_line(tmp_path)

    async def no_keygen(self: McumgrClient, slot: int = 0) -> bytes:
        raise AssertionError("KEYGEN after an attested key generation")

    monkeypatch.setattr(McumgrClient, "genkey", no_keygen)
    hub = line.hub(ports=2, supply=3, factory=lambda: genuine(line))
    station = await line.run(hub)
    assert station.outcomes == Counter({"provisioned": 3})
    for board in hub.finished:
        cert = x509.load_der_x509_certificate(board.se.objects[ObjectId.DEVICE_CERT])
        point = cert.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        # One key: the certified one is the one in the slot, which is the attested one (no KEYGEN after).
        assert point == board.se.public_point(0)
        assert board.se.attestation_chain  # the chain came over the chunked cert reads
    with line.ledger() as ledger:
        attested = _audit(ledger, "board.attested")
    assert sorted(subject for subject, _ in attested) == sorted(b.serial_hex for b in hub.finished)


@pytest.mark.parametrize("impostor", list(Impostor))
async def test_each_mcumgr_impostor_is_refused_before_reservation(tmp_path: Path, impostor: Impostor) -> None:
    line = await attesting_line(tmp_path)
    original = genuine(line)
    board = mcumgr_board(line)
    equip_attestation(board, vendor(line), impostor, copied_serial=original.se.serial)
    with line.ledger() as ledger:
        before = ledger.progress(LOT)
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)

    def finished(station: Station) -> bool:
        return bool(station.results)

    station = await line.run(hub, finished)
    [result] = station.results
    assert (result.outcome, result.reason) == ("refused", IMPOSTOR_REASONS[impostor])
    assert ObjectId.DEVICE_ID not in board.se.objects
    with line.ledger() as ledger:
        after = ledger.progress(LOT)
    assert (after.available, after.reserved, after.provisioned, after.void) == (
        before.available, 0, 0, before.void,
    )  # fmt: skip
    assert station.ports["1"].failures_in_row == 0


async def test_attest_command_round_trips_on_the_framer_with_the_native_statement() -> None:
    board = SimMcumgrBoard()
    equip_attestation(board, SimVendorCa.make())
    nonce = secrets.token_bytes(32)
    decoder = SmpDecoder()
    request = encode_request(AttestWriteRequest(slot=0, nonce=nonce, sequence=7))
    [packet] = decoder.feed(request.lines())
    assert (packet.group, packet.command) == (McumgrCommand.ATTEST.group, McumgrCommand.ATTEST.command_id)
    assert cbor2.loads(packet.payload) == {"slot": 0, "nonce": nonce}
    reply = await board.answer(packet)
    assert reply is not None
    assert reply.op is SmpOp.WRITE_RSP
    assert reply.seq == 7
    [decoded] = decoder.feed(reply.lines())
    body = cbor2.loads(decoded.payload)
    assert body["nonce"] == nonce
    assert body["pub"] == board.se.public_point(0)
    assert body["certs"] == len(board.se.attestation_chain) == 2
    # The signature covers the same statement bytes as the native profile's GENKEY_ATTESTED.
    leaf = x509.load_der_x509_certificate(board.se.attestation_chain[0])
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(
        body["sig"], statement_bytes(0, nonce, board.serial_hex, body["pub"]), ec.ECDSA(hashes.SHA256())
    )
    # The chain does not fit one 384-byte buffer: each certificate comes in offset chunks.
    cert = b""
    while True:
        ask = encode_request(AttestationCertReadRequest(cert=0, off=len(cert), sequence=8))
        answer = await board.answer(ask)
        assert answer is not None
        assert len(answer.encode()) <= 380
        chunk = cbor2.loads(answer.payload)
        cert += chunk["data"]
        if len(cert) == len(board.se.attestation_chain[0]):
            break
        assert chunk["data"]
    assert cert == board.se.attestation_chain[0]


class _SmpclientAttest(AttestWriteRequest):
    _Response = AttestWriteResponse
    _ErrorV1 = smperr.ErrorV1
    _ErrorV2 = smperr.ErrorV2


async def test_smpclient_reads_the_attest_reply_as_specified() -> None:
    board = SimMcumgrBoard()
    equip_attestation(board, SimVendorCa.make())
    nonce = secrets.token_bytes(32)
    async with serve_pty(board) as pty, SMPClient(SMPSerialTransport(), pty.path) as client:
        response = await client.request(_SmpclientAttest(slot=0, nonce=nonce), timeout_s=5.0)  # type: ignore[arg-type]
    assert success(response), response
    assert isinstance(response, AttestWriteResponse)
    assert response.nonce == nonce
    assert response.pub == board.se.public_point(0)
    assert response.certs == len(board.se.attestation_chain)
