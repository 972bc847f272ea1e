"""provision_arduino end to end: simulated sketch behind a PTY, a test customer CA, every reply checked."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from factoryd.errors import (
    BoardStatusError,
    BoardTimeoutError,
    CsrRejectedError,
    FactorydError,
    IssuanceError,
    VerificationError,
)
from factoryd.jobs.arduino import CertificateNotStoredError, provision_arduino
from factoryd.jobs.pipeline import restart_job, retry_in_step
from factoryd.pki.arduino import public_key_raw64
from factoryd.pki.bundle import load_pkcs12_bundle
from factoryd.pki.issuer import IssuedCertificate, Issuer
from factoryd.pki.profile import CertProfile
from factoryd.pki.testca import TestPki, make_test_pki
from factoryd.protocol.arduino import ArduinoClient, ArduinoTimeouts
from factoryd.sim.arduino import DEVICE_ID_SLOT, SimArduinoBoard, arduino_timing, serve_arduino_pty
from factoryd.sim.board import Fault, FaultPlan
from factoryd.sim.secure_element import SimSecureElement

T = TypeVar("T")
DEVICE_ID = "0b7a3c52-9d1e-4f60-8a2b-c3d4e5f60718"
OTHER_ID = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
PASSPHRASE = b"arduino test passphrase"
PROFILE = CertProfile(kind="arduino-v1")
FAST = ArduinoTimeouts(
    get_csr_s=0.3,
    begin_storage_s=0.2,
    set_field_s=0.2,
    end_storage_s=0.2,
    reconstruct_s=0.2,
    sketch_info_s=0.2,
    late_reply_s=0.05,
)


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return make_test_pki(profile_kind="arduino-v1", passphrase=PASSPHRASE)


@pytest.fixture(scope="module")
def issuer(pki: TestPki) -> Issuer:
    bundle = load_pkcs12_bundle(pki.pkcs12, PASSPHRASE, profile=PROFILE)
    return Issuer(bundle.signer(), bundle.chain, PROFILE)


class Steps:
    """A step runner like the pipeline's: names recorded, transient errors retried in the step."""

    def __init__(self, attempts: int = 1) -> None:
        self.names: list[str] = []
        self.attempts = attempts

    async def __call__(self, name: str, action: Callable[[], Awaitable[T]]) -> T:
        self.names.append(name)
        for attempt in range(1, self.attempts + 1):
            try:
                return await action()
            except FactorydError as exc:
                if attempt == self.attempts or not retry_in_step(exc):
                    raise
        raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def arduino(board: SimArduinoBoard, timeouts: ArduinoTimeouts = FAST) -> AsyncIterator[ArduinoClient]:
    async with (
        serve_arduino_pty(board) as pty,
        await ArduinoClient.open(pty.path, timeouts=timeouts) as client,
    ):
        yield client


def check_board_holds(board: SimArduinoBoard, issued: IssuedCertificate, pki: TestPki) -> None:
    """The board's rebuilt certificate is the issued one, byte for byte, and the CA's signature holds."""
    rebuilt = board.rebuilt_certificate()
    assert rebuilt == issued.der
    cert = x509.load_der_x509_certificate(rebuilt)
    cert.verify_directly_issued_by(pki.issuing_cert)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert public_key_raw64(key) == board.se.public_point(0)[1:]


async def test_provision_flow_rebuilds_the_issued_certificate(issuer: Issuer, pki: TestPki) -> None:
    board = SimArduinoBoard()
    steps = Steps()
    seen_before_store: list[bool] = []

    async def on_issued(issued: IssuedCertificate) -> None:
        seen_before_store.append(DEVICE_ID_SLOT in board.data_slots)

    async with arduino(board) as client:
        issued = await provision_arduino(
            client, device_id=DEVICE_ID, issuer=issuer, step=steps, on_issued=on_issued
        )
        assert client.pending == 0
        # GetCSR, 10 storage commands, ReconstructCert: every one answered and read.
        assert client.stats.requests == 12
        assert client.stats.replies == 12
    assert steps.names == ["csr", "issue", "store", "reconstruct"]
    assert seen_before_store == [False]  # the hook runs before anything is written
    assert issued.cert.subject.rfc4514_string() == f"CN={DEVICE_ID}"
    check_board_holds(board, issued, pki)
    assert board.stored_device_id() == DEVICE_ID


async def test_reworked_board_gets_a_new_key_and_certificate(issuer: Issuer, pki: TestPki) -> None:
    board = SimArduinoBoard()
    async with arduino(board) as client:
        first = await provision_arduino(client, device_id=DEVICE_ID, issuer=issuer, step=Steps())
        second = await provision_arduino(client, device_id=OTHER_ID, issuer=issuer, step=Steps())
    assert first.cert.public_key() != second.cert.public_key()
    check_board_holds(board, second, pki)
    assert board.stored_device_id() == OTHER_ID


@pytest.mark.parametrize("fault", [Fault.WRONG_CN, Fault.BAD_CSR_SIGNATURE, Fault.WEAK_KEY])
async def test_bad_csr_is_refused_and_nothing_is_written(issuer: Issuer, fault: Fault) -> None:
    board = SimArduinoBoard(faults=FaultPlan.only(fault))
    steps = Steps(attempts=3)
    async with arduino(board) as client:
        with pytest.raises(CsrRejectedError):
            await provision_arduino(client, device_id=DEVICE_ID, issuer=issuer, step=steps)
    assert steps.names == ["csr", "issue"]
    assert board.data_slots == {}
    assert board.injected == {fault: 1}


async def test_board_that_acks_but_stores_nothing_is_caught(issuer: Issuer) -> None:
    board = SimArduinoBoard(store_nothing=True)
    steps = Steps(attempts=3)
    async with arduino(board) as client:
        with pytest.raises(CertificateNotStoredError, match="ReconstructCert answered ERROR") as caught:
            await provision_arduino(client, device_id=DEVICE_ID, issuer=issuer, step=steps)
        assert client.pending == 0
    error = caught.value
    assert isinstance(error, VerificationError)
    assert isinstance(error.__cause__, BoardStatusError)
    # Not retried on the same link (reading back again cannot help); the job starts over.
    assert not retry_in_step(error)
    assert restart_job(error)
    assert error.reason == "certificate_not_stored"
    assert steps.names == ["csr", "issue", "store", "reconstruct"]
    assert board.rebuilt_certificate() is None


async def test_board_that_never_answers_get_csr(issuer: Issuer) -> None:
    board = SimArduinoBoard(csr_never_answers=True)
    async with arduino(board) as client:
        with pytest.raises(BoardTimeoutError, match="GET_CSR"):
            await provision_arduino(client, device_id=DEVICE_ID, issuer=issuer, step=Steps(attempts=3))
        assert client.pending == 0
    assert board.data_slots == {}


async def test_flow_survives_line_faults(issuer: Issuer, pki: TestPki) -> None:
    # Fixed secure-element serial and seed: the fault draws are the same on every run.
    se = SimSecureElement(serial=bytes.fromhex("0123a1b2c3d4e5f607"))
    board = SimArduinoBoard(se=se, faults=FaultPlan(corrupt_byte=0.25, seed=3))
    async with arduino(board) as client:
        issued = await provision_arduino(client, device_id=DEVICE_ID, issuer=issuer, step=Steps(attempts=3))
        assert client.stats.resends >= board.injected[Fault.CORRUPT_BYTE] >= 1
    check_board_holds(board, issued, pki)


async def test_flow_at_57600_baud_with_realistic_timing(issuer: Issuer, pki: TestPki) -> None:
    board = SimArduinoBoard(timing=dataclasses.replace(arduino_timing(), jitter=0.0))
    started = time.monotonic()
    async with arduino(board, ArduinoTimeouts()) as client:
        issued = await provision_arduino(client, device_id=DEVICE_ID, issuer=issuer, step=Steps())
    # Boot, keygen and CSR, writes, and ~700 bytes each way at 57600 baud are all modelled.
    assert board.physical_s > 0.5 + 0.115 + 0.06
    assert time.monotonic() - started < 5
    check_board_holds(board, issued, pki)


async def test_refused_before_touching_the_board(issuer: Issuer, pki: TestPki) -> None:
    board = SimArduinoBoard()
    bundle = load_pkcs12_bundle(pki.pkcs12, PASSPHRASE, profile=PROFILE)
    native = Issuer(bundle.signer(), bundle.chain, CertProfile())
    async with arduino(board) as client:
        with pytest.raises(IssuanceError, match="Arduino boards need arduino-v1"):
            await provision_arduino(client, device_id=DEVICE_ID, issuer=native, step=Steps())
        with pytest.raises(IssuanceError, match="36 printable ASCII"):
            await provision_arduino(client, device_id="not-a-uuid", issuer=issuer, step=Steps())
        assert client.stats.requests == 0
    assert board.commands_handled == 0
