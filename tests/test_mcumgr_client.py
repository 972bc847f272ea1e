"""The mcumgr client against the simulated Zephyr board over a real PTY: every group, errors, faults."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from factoryd.errors import BoardLockedError, BoardStatusError, BoardTimeoutError, ProtocolViolationError
from factoryd.protocol.mcumgr import McumgrClient, McumgrTimeouts, ProvError
from factoryd.protocol.messages import ObjectId
from factoryd.sim.board import Fault, FaultPlan
from factoryd.sim.mcumgr import SimMcumgrBoard
from factoryd.sim.pty import serve_pty

FAST = McumgrTimeouts(
    echo_s=0.2, params_s=0.2, identity_s=0.2, reset_s=0.2, image_state_s=0.2, upload_first_s=0.5,
    upload_chunk_s=0.3, keygen_s=0.3, csr_s=0.3, write_s=0.3, read_s=0.2, sign_s=0.3, lock_s=0.2, boot_s=3.0,
)  # fmt: skip


@pytest.fixture
async def board() -> SimMcumgrBoard:
    return SimMcumgrBoard(firmware_key=ec.generate_private_key(ec.SECP256R1()).public_key())


@pytest.fixture
async def client(board: SimMcumgrBoard) -> AsyncIterator[McumgrClient]:
    async with serve_pty(board) as pty, await McumgrClient.open(pty.path, timeouts=FAST) as c:
        await c.read_params()
        yield c


async def test_os_group_echo_and_params(client: McumgrClient, board: SimMcumgrBoard) -> None:
    assert await client.echo("hello board") == "hello board"
    assert client.params.buf_size == board.buf_size == 384
    assert client.params.max_packet == 380
    assert client.pending == 0


async def test_identity_reports_the_secure_element(client: McumgrClient, board: SimMcumgrBoard) -> None:
    identity = await client.identity()
    assert identity.serial == board.se.serial
    assert identity.serial_hex == board.serial_hex
    assert (identity.locked, identity.objects, identity.keys) == (False, frozenset(), frozenset())
    assert identity.model == board.model


async def test_keygen_csr_sign_verify_against_the_generated_key(
    client: McumgrClient, board: SimMcumgrBoard
) -> None:
    point = await client.genkey()
    assert point == board.se.public_point(0)
    csr = x509.load_der_x509_csr(await client.get_csr("device-42"))
    assert csr.is_signature_valid
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint) == point
    assert csr.subject.rfc4514_string() == "CN=device-42"
    signature = await client.sign(b"c" * 32)
    assert len(signature) == 64
    assert board.se.has_key(0)


async def test_objects_larger_than_one_packet_are_written_and_read_in_chunks(
    client: McumgrClient, board: SimMcumgrBoard
) -> None:
    data = bytes(range(256)) * 12  # 3 KiB: about ten packets of a 384-byte buffer
    sent_before = client.link.stats.frames_sent
    await client.write(ObjectId.CA_CHAIN, data)
    assert client.link.stats.frames_sent - sent_before >= 8
    assert board.se.objects[ObjectId.CA_CHAIN] == data
    assert await client.read(ObjectId.CA_CHAIN) == data
    assert await client.read(ObjectId.ENDPOINT) == b""
    assert ObjectId.CA_CHAIN in (await client.identity()).objects


async def test_write_refuses_a_board_that_stores_something_else(board: SimMcumgrBoard) -> None:
    board.faults = FaultPlan.only(Fault.READBACK_DIFFERS)
    async with serve_pty(board) as pty, await McumgrClient.open(pty.path, timeouts=FAST) as client:
        await client.write(ObjectId.DEVICE_ID, b"id-1")  # the board's digest is of what it was sent
        assert await client.read(ObjectId.DEVICE_ID) != b"id-1"


async def test_provisioning_errors_are_typed_smp_v2_errors(
    client: McumgrClient, board: SimMcumgrBoard
) -> None:
    with pytest.raises(BoardStatusError, match="NO_KEY") as no_key:
        await client.sign(b"x" * 32)
    assert no_key.value.status == ProvError.NO_KEY
    assert not no_key.value.transient
    with pytest.raises(BoardStatusError, match="SERIAL_MISMATCH"):
        await client.lock(b"\x01\x23another")
    assert not board.se.locked
    await client.lock(board.se.serial)
    assert board.se.locked
    with pytest.raises(BoardLockedError):
        await client.genkey()
    with pytest.raises(BoardLockedError):
        await client.write(ObjectId.DEVICE_ID, b"late")


async def test_image_state_lists_the_factory_image(client: McumgrClient, board: SimMcumgrBoard) -> None:
    slots = await client.image_state()
    assert len(slots) == 1
    primary = slots[0]
    assert (primary.slot, primary.active, primary.confirmed) == (0, True, True)
    assert primary.hash == board.fw_sha256
    assert primary.version == "1.0.0"


async def test_an_upload_not_an_mcuboot_image_is_refused_at_the_first_chunk(client: McumgrClient) -> None:
    from factoryd.errors import FirmwareRejectedError

    with pytest.raises(FirmwareRejectedError, match="INVALID_IMAGE_HEADER_MAGIC"):
        await client.upload(b"\x00" * 4096)


async def test_garbled_and_dropped_replies_are_asked_again(board: SimMcumgrBoard) -> None:
    board.faults = FaultPlan(corrupt_byte=0.15, drop_reply=0.1, seed=3)
    board.chatty = True
    async with serve_pty(board) as pty, await McumgrClient.open(pty.path, timeouts=FAST, resends=6) as client:
        for i in range(15):
            assert await client.echo(f"ping {i}") == f"ping {i}"
        data = hashlib.sha256(b"x").digest() * 40
        await client.write(ObjectId.CA_CHAIN, data)
        assert await client.read(ObjectId.CA_CHAIN) == data
        assert client.stats.resends > 0
        assert client.link.decoder.stats.crc_errors + client.link.decoder.stats.malformed > 0
        assert client.pending == 0


async def test_a_hung_board_times_out_and_leaves_no_waiter(board: SimMcumgrBoard) -> None:
    async with serve_pty(board) as pty, await McumgrClient.open(pty.path, timeouts=FAST) as client:
        await client.echo("before")
        board.faults = FaultPlan.only(Fault.HANG)
        with pytest.raises(BoardTimeoutError, match="ECHO"):
            await client.echo("after")
        assert client.pending == 0
        assert client.stats.timeouts == 1


async def test_keygen_is_not_resent_on_a_timeout(board: SimMcumgrBoard) -> None:
    board.faults = FaultPlan.only(Fault.DROP_REPLY)
    async with serve_pty(board) as pty, await McumgrClient.open(pty.path, timeouts=FAST) as client:
        with pytest.raises(BoardTimeoutError, match="1 attempt"):
            await client.genkey()
        assert board.commands_handled == 1


async def test_a_reply_for_another_command_is_a_protocol_violation(client: McumgrClient) -> None:
    from factoryd.protocol.mcumgr import _REPLIES, McumgrCommand
    from factoryd.transport.smp_framing import SmpOp, SmpPacket

    reply = SmpPacket(SmpOp.WRITE_RSP, 0x4644, 1, 5, b"\xa0")
    assert _REPLIES.mismatch(McumgrCommand.ECHO, reply) is not None
    assert _REPLIES.mismatch(McumgrCommand.SIGN, reply) is None


async def test_v1_rc_errors_map_to_typed_errors(client: McumgrClient) -> None:
    from factoryd.protocol.mcumgr import McumgrCommand, _raise_error

    with pytest.raises(BoardStatusError, match="ENOTSUP") as notsup:
        _raise_error(McumgrCommand.ECHO, {"rc": 8})
    assert not notsup.value.transient
    from factoryd.errors import BoardBusyError

    with pytest.raises(BoardBusyError):
        _raise_error(McumgrCommand.IDENTITY, {"rc": 10, "rsn": "busy"})
    with pytest.raises(ProtocolViolationError, match="malformed SMP v2 err"):
        _raise_error(McumgrCommand.ECHO, {"err": {"rc": "x"}})
    _raise_error(McumgrCommand.ECHO, {"rc": 0})  # success carries no error


async def test_challenge_signature_verifies_with_the_generated_key(client: McumgrClient) -> None:
    point = await client.genkey()
    challenge = b"\x5a" * 32
    raw = await client.sign(challenge)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    key.verify(der, challenge, ec.ECDSA(hashes.SHA256()))  # raises InvalidSignature otherwise


async def test_factoryd_sim_board_profile_mcumgr_prints_a_tty_that_speaks_smp() -> None:
    import asyncio
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "factoryd", "sim", "board", "--profile", "mcumgr",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        path = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert path.startswith("/dev/pts/")
        async with await McumgrClient.open(path, timeouts=FAST) as client:
            assert await client.echo("over the CLI") == "over the CLI"
            assert len((await client.identity()).serial) == 9
    finally:
        proc.terminate()
        await proc.wait()
