"""Third-party check: smpclient (intercreate's SMP client, its own serial transport) against the
simulated Zephyr/MCUboot board over its PTY. What it reads and what the board accepts from it must
agree with factoryd's view and with MCUboot's rules, not with our own encoder."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from smpclient import SMPClient
from smpclient.exceptions import SMPUploadError
from smpclient.generics import error, success
from smpclient.requests.image_management import ImageStatesRead, ImageStatesWrite
from smpclient.requests.os_management import EchoWrite, ResetWrite
from smpclient.transport.serial import SMPSerialTransport

from factoryd.sim.mcuboot_signer import sign_image
from factoryd.sim.mcumgr import SimMcumgrBoard, read_image
from factoryd.sim.pty import serve_pty
from tests.helpers.station import LOT, make_line

TIMEOUT_S = 5.0


async def states(client: SMPClient) -> list[tuple[int, bytes, bool, bool, bool]]:
    response = await client.request(ImageStatesRead(), timeout_s=TIMEOUT_S)
    assert success(response), response
    return [
        (i.slot, bytes(i.hash or b""), bool(i.active), bool(i.confirmed), bool(i.pending))
        for i in response.images
    ]


async def upload_test_and_reset(client: SMPClient, image: bytes, image_hash: bytes) -> None:
    async for _offset in client.upload(image, first_timeout_s=TIMEOUT_S, subsequent_timeout_s=TIMEOUT_S):
        pass
    marked = await client.request(ImageStatesWrite(hash=image_hash, confirm=False), timeout_s=TIMEOUT_S)
    assert success(marked), marked
    assert (1, image_hash, False, False, True) in await states(client)
    reset = await client.request(ResetWrite(), timeout_s=TIMEOUT_S)
    assert success(reset), reset


async def echo_until_back(client: SMPClient) -> None:
    for _ in range(50):
        try:
            response = await client.request(EchoWrite(d="back?"), timeout_s=0.2)
        except TimeoutError:
            continue
        if success(response):
            return
    raise AssertionError("the board did not answer smpclient after its reset")


async def test_smpclient_reads_the_hash_factoryd_recorded(tmp_path: Path) -> None:
    line = await make_line(tmp_path, profile="mcumgr")
    hub = line.hub(ports=1, supply=1, factory=lambda: SimMcumgrBoard(firmware_key=line.fw_public))
    station = await line.run(hub)
    assert station.outcomes == Counter({"provisioned": 1})
    with line.ledger() as ledger:
        wanted = ledger.get_lot(LOT).profile.firmware_sha256
    assert wanted is not None
    board = hub.finished[0]
    async with serve_pty(board) as pty, SMPClient(SMPSerialTransport(), pty.path) as client:
        slots = await states(client)
    assert (0, bytes.fromhex(wanted), True, True, False) in slots


async def test_an_image_uploaded_by_smpclient_is_accepted_as_mcuboot_would(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    board = SimMcumgrBoard(firmware_key=key.public_key())
    image = sign_image(b"\x42" * 20000, key, "3.1.0")
    async with serve_pty(board) as pty, SMPClient(SMPSerialTransport(), pty.path) as client:
        new_hash = next(h for slot, h, *_ in await states(client) if slot == 0)
        assert new_hash == board.fw_sha256
        header = read_image(image)
        assert header is not None
        await upload_test_and_reset(client, image, header.hash)
        await echo_until_back(client)
        slots = await states(client)
        # MCUboot verified it and swapped it in for a test boot: active, not yet confirmed.
        assert (0, header.hash, True, False, False) in slots
        confirmed = await client.request(ImageStatesWrite(confirm=True), timeout_s=TIMEOUT_S)
        assert success(confirmed), confirmed
        assert (0, header.hash, True, True, False) in await states(client)
    assert board.boot_log == ["swapped"]
    assert board.bootloader.security_counter == 0x03010000


async def test_an_image_of_a_foreign_key_uploaded_by_smpclient_is_refused_at_boot(tmp_path: Path) -> None:
    board = SimMcumgrBoard(firmware_key=ec.generate_private_key(ec.SECP256R1()).public_key())
    foreign = sign_image(b"\x66" * 9000, ec.generate_private_key(ec.SECP256R1()), "9.0.0")
    header = read_image(foreign)
    assert header is not None
    factory_hash = board.fw_sha256
    async with serve_pty(board) as pty, SMPClient(SMPSerialTransport(), pty.path) as client:
        # img_mgmt takes the upload (it checks no signature); MCUboot refuses it at the next boot.
        await upload_test_and_reset(client, foreign, header.hash)
        await echo_until_back(client)
        slots = await states(client)
        assert slots == [(0, factory_hash, True, True, False)]
        # Marking an image that is no longer there fails with img_mgmt's error.
        again = await client.request(ImageStatesWrite(hash=header.hash, confirm=False), timeout_s=TIMEOUT_S)
        assert error(again)
    assert board.boot_log[0].startswith("refused: signed by a different key")


async def test_smpclient_upload_not_an_mcuboot_image_is_refused_at_once() -> None:
    board = SimMcumgrBoard(firmware_key=ec.generate_private_key(ec.SECP256R1()).public_key())

    async def upload_all(client: SMPClient) -> None:
        async for _offset in client.upload(b"\x00" * 4096, first_timeout_s=TIMEOUT_S):
            pass

    async with serve_pty(board) as pty, SMPClient(SMPSerialTransport(), pty.path) as client:
        with pytest.raises(SMPUploadError, match="INVALID_IMAGE_HEADER_MAGIC"):
            await upload_all(client)
    assert board.secondary_image() is None
