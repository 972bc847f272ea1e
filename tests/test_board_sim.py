"""Every command against a simulated board over a real PTY, and every fault kind."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from factoryd.errors import (
    BoardLockedError,
    BoardResetError,
    BoardStatusError,
    BoardTimeoutError,
    FirmwareRejectedError,
    LinkClosedError,
    LinkOpenError,
    ReadbackMismatchError,
)
from factoryd.mcuboot import verify_image
from factoryd.protocol.messages import READBACK_REVISION, ObjectId, Status
from factoryd.protocol.native import BoardClient
from factoryd.sim.board import Fault, FaultPlan, SimBoard
from factoryd.sim.mcuboot_signer import sign_image
from factoryd.sim.pty import PtyBoard, serve_pty
from tests.helpers.boards import FAST_TIMEOUTS

CN = "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b"


def _verify_raw(public_point: bytes, message: bytes, raw: bytes) -> None:
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_point)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key.verify(der, message, ec.ECDSA(hashes.SHA256()))


async def test_hello_reports_identity(client: BoardClient, sim_board: PtyBoard) -> None:
    info = await client.hello()
    assert info.se_serial == sim_board.board.se.serial
    assert info.serial_hex == sim_board.board.serial_hex
    assert not info.locked
    assert info.objects == frozenset()
    assert info.key_slots == frozenset()


async def test_full_command_set(client: BoardClient, sim_board: PtyBoard) -> None:
    point = await client.genkey()
    assert len(point) == 65
    assert point[0] == 0x04
    csr = x509.load_der_x509_csr(await client.get_csr(CN))
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == f"CN={CN}"
    # The CSR carries the key GENKEY made.
    assert csr.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint) == point
    written = [
        (ObjectId.DEVICE_ID, CN.encode()),
        (ObjectId.DEVICE_CERT, b"\x30" * 900),
        (ObjectId.CA_CHAIN, b"-----BEGIN CERTIFICATE-----\n" * 100),
        (ObjectId.ENDPOINT, b'{"endpoint": "mqtts://x:8883"}'),
    ]
    for obj, data in written:
        await client.write(obj, data)
        assert await client.read(obj) == data
    challenge = b"c" * 32
    _verify_raw(point, challenge, await client.sign(challenge))
    info = await client.hello()
    # Exactly what was written (the Matter objects 5..7 stay absent until a Matter lot writes them).
    assert info.objects == frozenset(obj for obj, _ in written)
    assert info.key_slots == frozenset({0})
    await client.lock()
    assert (await client.hello()).locked
    with pytest.raises(BoardLockedError):
        await client.genkey()
    with pytest.raises(BoardLockedError):
        await client.write(ObjectId.DEVICE_ID, b"other")
    # Signing still works after lock: the key is usable, only not replaceable.
    _verify_raw(point, b"after", await client.sign(b"after"))
    assert client.pending == 0


async def test_errors_are_typed(client: BoardClient) -> None:
    with pytest.raises(BoardStatusError) as info:
        await client.get_csr(CN)  # no key yet
    assert info.value.status == Status.NO_KEY
    assert not info.value.transient
    with pytest.raises(BoardStatusError) as too_large:
        await client.write(ObjectId.DEVICE_CERT, b"x" * 4001)
    assert too_large.value.status == Status.TOO_LARGE


async def test_reboot_sends_boot_event(client: BoardClient, sim_board: PtyBoard) -> None:
    await client.hello()
    await client.reboot()
    await asyncio.wait_for(client.booted.wait(), 2)
    assert client.last_boot is not None
    assert client.last_boot.se_serial == sim_board.board.se.serial


async def test_firmware_update_verified_by_bootloader() -> None:
    """The native FW_BEGIN/CHUNK/END carries an MCUboot image; the board's MCUboot verifies it."""
    fw_key = ec.generate_private_key(ec.SECP256R1())
    board = SimBoard(firmware_key=fw_key.public_key())
    payload = bytes(range(256)) * 40  # 10 KiB: several chunks
    good = sign_image(payload, fw_key, "2.0.0")
    good_hash = bytes.fromhex(verify_image(good, fw_key.public_key()).hash)
    forged = sign_image(payload, ec.generate_private_key(ec.SECP256R1()), "2.0.0")
    older = sign_image(payload, fw_key, "1.9.0")
    async with serve_pty(board) as pty, await BoardClient.open(pty.path, timeouts=FAST_TIMEOUTS) as client:
        with pytest.raises(FirmwareRejectedError) as refused:
            await client.update_firmware(forged, "2.0.0", good_hash)
        assert refused.value.status == Status.FW_SIGNATURE
        info = await client.hello()
        assert info.fw_version != "2.0.0+0"
        digest = await client.update_firmware(good, "2.0.0", good_hash)
        assert digest == good_hash != hashlib.sha256(good).digest()  # the SHA256 TLV, not the file's
        info = await client.hello()
        assert (info.fw_version, info.fw_sha256) == ("2.0.0+0", digest)
        # Rollback protection: the board's stored security counter refuses a downgrade.
        older_hash = bytes.fromhex(verify_image(older, fw_key.public_key()).hash)
        with pytest.raises(FirmwareRejectedError):
            await client.update_firmware(older, "1.9.0", older_hash)
        assert (await client.hello()).fw_sha256 == good_hash
    assert board.bootloader.security_counter == 0x02000000


async def test_unplug_fails_pending_waiters_with_typed_error() -> None:
    board = SimBoard(faults=FaultPlan.only(Fault.HANG))
    async with serve_pty(board) as pty:
        client = await BoardClient.open(pty.path, timeouts=FAST_TIMEOUTS)
        try:
            request = asyncio.ensure_future(client.hello())
            await asyncio.sleep(0.05)
            pty.close()
            with pytest.raises(LinkClosedError):
                await request
            assert client.pending == 0
            with pytest.raises(LinkClosedError):
                await client.hello()
        finally:
            await client.close()


async def test_open_missing_tty_names_path() -> None:
    with pytest.raises(LinkOpenError, match="/dev/nonexistent-tty"):
        await BoardClient.open("/dev/nonexistent-tty")


# Fault kinds the link layer recovers from by itself: the request still succeeds.
@pytest.mark.parametrize(
    "fault", [Fault.CORRUPT_BYTE, Fault.DROP_REPLY, Fault.OVERSIZE_FRAME, Fault.BOOT_GARBAGE]
)
async def test_link_recovers_from_transient_faults(fault: Fault) -> None:
    board = SimBoard(faults=FaultPlan.only(fault, 0.25, seed=3))
    async with (
        serve_pty(board) as pty,
        await BoardClient.open(pty.path, timeouts=FAST_TIMEOUTS, resends=8) as client,
    ):
        await client.genkey()
        for _ in range(20):
            await client.write(ObjectId.DEVICE_ID, CN.encode())
        assert await client.read(ObjectId.DEVICE_ID) == CN.encode()
        assert (await client.hello()).key_slots == frozenset({0})
        assert client.pending == 0
    if fault is not Fault.BOOT_GARBAGE:
        assert board.injected.get(fault, 0) > 0
        assert client.stats.resends > 0


async def test_resend_does_not_run_genkey_twice() -> None:
    board = SimBoard(faults=FaultPlan.only(Fault.DROP_REPLY, 1.0))
    async with serve_pty(board) as pty, await BoardClient.open(pty.path, timeouts=FAST_TIMEOUTS) as client:
        with pytest.raises(BoardTimeoutError):
            await client.genkey()
        assert client.pending == 0
        assert client.stats.resends == client.resends
    # Four transmissions of one seq, but the board generated one key.
    assert board.commands_handled == 1


async def test_hang_times_out_and_leaves_no_waiter() -> None:
    board = SimBoard(faults=FaultPlan.only(Fault.HANG))
    async with serve_pty(board) as pty, await BoardClient.open(pty.path, timeouts=FAST_TIMEOUTS) as client:
        with pytest.raises(BoardTimeoutError, match="HELLO") as info:
            await client.hello()
        assert isinstance(info.value, TimeoutError)
        assert info.value.transient
        assert client.pending == 0
        assert client.stats.timeouts == 1


async def test_reset_mid_write_is_a_typed_transient_error() -> None:
    board = SimBoard(faults=FaultPlan.only(Fault.RESET_MID_WRITE))
    async with serve_pty(board) as pty, await BoardClient.open(pty.path, timeouts=FAST_TIMEOUTS) as client:
        await client.hello()
        with pytest.raises(BoardResetError) as info:
            await client.write(ObjectId.DEVICE_ID, CN.encode())
        assert info.value.transient
        assert await client.read(ObjectId.DEVICE_ID) == b""  # nothing was stored


async def test_readback_differs_is_caught_on_read_with_revision_1_firmware() -> None:
    board = SimBoard(faults=FaultPlan.only(Fault.READBACK_DIFFERS))
    board.revision = 1
    async with serve_pty(board) as pty, await BoardClient.open(pty.path, timeouts=FAST_TIMEOUTS) as client:
        assert (await client.hello()).version == 1
        assert not client.write_reply_reads_back
        await client.write(ObjectId.DEVICE_ID, CN.encode())
        # The board acknowledged the right digest but keeps something else: only a read-back shows it.
        assert await client.read(ObjectId.DEVICE_ID) != CN.encode()


async def test_readback_differs_is_caught_by_the_write_digest_from_revision_2() -> None:
    board = SimBoard(faults=FaultPlan.only(Fault.READBACK_DIFFERS))
    board.revision = READBACK_REVISION
    async with serve_pty(board) as pty, await BoardClient.open(pty.path, timeouts=FAST_TIMEOUTS) as client:
        assert (await client.hello()).version == READBACK_REVISION
        assert client.write_reply_reads_back
        # The digest is over what the store gives back, so the WRITE itself shows the bad store.
        with pytest.raises(ReadbackMismatchError, match="DEVICE_ID"):
            await client.write(ObjectId.DEVICE_ID, CN.encode())
        assert await client.read(ObjectId.DEVICE_ID) != CN.encode()


@pytest.mark.parametrize("fault", [Fault.WRONG_CN, Fault.BAD_CSR_SIGNATURE, Fault.WEAK_KEY])
async def test_csr_faults_produce_csrs_that_fail_verification(fault: Fault) -> None:
    board = SimBoard(faults=FaultPlan.only(fault))
    async with serve_pty(board) as pty, await BoardClient.open(pty.path, timeouts=FAST_TIMEOUTS) as client:
        await client.genkey()
        csr = x509.load_der_x509_csr(await client.get_csr(CN))
    if fault is Fault.WRONG_CN:
        assert csr.subject.rfc4514_string() != f"CN={CN}"
    elif fault is Fault.BAD_CSR_SIGNATURE:
        assert not csr.is_signature_valid
    else:
        assert not isinstance(csr.public_key(), ec.EllipticCurvePublicKey)


def test_fault_plan_is_reproducible() -> None:
    plan = FaultPlan.uniform(0.3, seed=42)
    se_serial = b"\x01\x23" + b"\x00" * 7
    from factoryd.sim.secure_element import SimSecureElement

    draws = []
    for _ in range(2):
        board = SimBoard(faults=plan, se=SimSecureElement(serial=se_serial))
        draws.append([board.fault(Fault.CORRUPT_BYTE) for _ in range(50)])
    assert draws[0] == draws[1]
    assert any(draws[0])
    assert not all(draws[0])


async def test_link_works_with_descriptors_above_1023(sim_board: PtyBoard) -> None:
    # A station with a few hundred ports passes FD_SETSIZE; pyserial's select()-based read cannot.
    filler: list[int] = []
    try:
        while not filler or filler[-1] < 1100:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        async with await BoardClient.open(sim_board.path, timeouts=FAST_TIMEOUTS) as client:
            assert client.link._transport is not None
            assert client.link._transport.get_extra_info("serial").fd >= 1024  # type: ignore[attr-defined]
            info = await client.hello()
            assert info.se_serial == sim_board.board.se.serial
            await client.write(ObjectId.DEVICE_ID, CN.encode())
            assert await client.read(ObjectId.DEVICE_ID) == CN.encode()
    finally:
        for fd in filler:
            os.close(fd)
