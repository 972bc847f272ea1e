"""The mcumgr profile end to end: the firmware step (resume, test, confirm, revert, downgrade) and the
whole job on simulated Zephyr/MCUboot boards behind real PTYs, through the real pipeline."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from factoryd.demo import DemoOptions, run_demo
from factoryd.errors import FirmwareRejectedError
from factoryd.jobs.mcumgr import FirmwareRevertedError, McumgrSession
from factoryd.ledger.model import DeviceState
from factoryd.protocol.mcumgr import ImageSlot
from factoryd.protocol.messages import ObjectId
from factoryd.sim.board import Fault, FaultPlan
from factoryd.sim.mcumgr import SimMcumgrBoard, read_image
from tests.helpers.station import LOT, Line, make_line


async def mcumgr_line(tmp_path: Path) -> Line:
    return await make_line(tmp_path, profile="mcumgr")


def mcumgr_board(line: Line, faults: FaultPlan | None = None, **kwargs: object) -> SimMcumgrBoard:
    return SimMcumgrBoard(firmware_key=line.fw_public, faults=faults or FaultPlan(), **kwargs)  # type: ignore[arg-type]


def lot_hash(line: Line) -> str:
    with line.ledger() as ledger:
        wanted = ledger.get_lot(LOT).profile.firmware_sha256
    assert wanted is not None
    return wanted


def runs_lot_image(board: SimMcumgrBoard, wanted: str) -> bool:
    image = board.primary_image()
    return image is not None and image.hash.hex() == wanted and board.primary_confirmed and not board.testing


async def test_boards_get_the_lot_image_confirmed_then_their_identity(tmp_path: Path) -> None:
    line = await mcumgr_line(tmp_path)
    hub = line.hub(ports=3, supply=6, factory=lambda: mcumgr_board(line))
    station = await line.run(hub)
    assert station.outcomes == Counter({"provisioned": 6})
    wanted = lot_hash(line)
    with line.ledger() as ledger:
        records = {r.hw_serial: r for r in ledger.provisioned_devices(LOT)}
    for board in hub.finished:
        assert isinstance(board, SimMcumgrBoard)
        assert runs_lot_image(board, wanted)
        assert board.boot_log == ["swapped"]  # one test boot, then confirmed from the application
        # The image became permanent: the hardware security counter rose to its SEC_CNT (2.0.0).
        assert board.bootloader.security_counter == 0x02000000
        assert board.se.locked
        record = records[board.serial_hex]
        cert = x509.load_der_x509_certificate(board.se.objects[ObjectId.DEVICE_CERT])
        assert cert.fingerprint(cert.signature_hash_algorithm).hex() == record.fingerprint_sha256  # type: ignore[arg-type]
        assert board.se.objects[ObjectId.DEVICE_ID].decode() == record.device_id
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert (
            key.public_numbers()
            == ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), board.se.public_point(0)
            ).public_numbers()
        )


async def test_upload_resumes_at_the_offset_the_board_reports_after_a_reset(tmp_path: Path) -> None:
    line = await mcumgr_line(tmp_path)
    # Exactly one reset during the first chunks of every power-on: the chunk being written is lost.
    board = mcumgr_board(line, FaultPlan(reset_mid_write=1.0, per_power_on=True, seed=4))
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)
    station = await line.run(hub)
    assert station.outcomes == Counter({"provisioned": 1})
    assert board.injected[Fault.RESET_MID_WRITE] == 1
    image = read_image(board.primary)
    assert image is not None
    # Resumed, not restarted: every byte of the image was accepted exactly once.
    assert board.upload_bytes_received == len(image.data)
    assert runs_lot_image(board, lot_hash(line))


async def test_a_board_that_forgets_its_upload_at_reset_restarts_it_from_zero(tmp_path: Path) -> None:
    line = await mcumgr_line(tmp_path)
    board = mcumgr_board(
        line, FaultPlan(reset_mid_write=1.0, per_power_on=True, seed=4), resume_after_reset=False
    )
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)
    station = await line.run(hub)
    assert station.outcomes == Counter({"provisioned": 1})
    image = board.primary_image()
    assert image is not None
    assert board.upload_bytes_received > len(image.data)  # the part before the reset went twice
    assert runs_lot_image(board, lot_hash(line))


async def test_an_image_that_does_not_boot_reverts_and_fails_the_job_for_good(tmp_path: Path) -> None:
    line = await mcumgr_line(tmp_path)
    board = mcumgr_board(line)
    board.crashing_images.add(bytes.fromhex(lot_hash(line)))
    factory_hash = board.fw_sha256
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)
    station = await line.run(hub)
    assert station.outcomes == Counter({"failed": 1})
    result = station.results[0]
    assert result.reason == "firmware_reverted"
    assert result.attempts == 1  # permanent: no power cycle and retry
    assert board.boot_log == ["swapped", "watchdog", "reverted"]
    assert board.fw_sha256 == factory_hash
    with line.ledger() as ledger:
        assert ledger.find_by_serial(LOT, board.serial_hex) is None  # no ID was touched


def test_the_revert_reason_tells_a_crash_from_a_refusal() -> None:
    new, old = b"\x11" * 32, b"\x22" * 32
    running = ImageSlot(0, 0, "1.0.0", old, True, False, True, True, False)
    kept = ImageSlot(0, 1, "2.0.0", new, True, False, False, False, False)
    crashed = McumgrSession._revert_reason([running, kept], new, "1.0.0")
    assert crashed.startswith("image 111111111111… did not boot: MCUboot reverted to 1.0.0")
    refused = McumgrSession._revert_reason([running], new, "1.0.0")
    assert refused.startswith("MCUboot refused image 111111111111… at boot and erased it")
    assert issubclass(FirmwareRevertedError, FirmwareRejectedError)
    assert not FirmwareRevertedError("x", 0).transient
    assert FirmwareRevertedError("x", 0).reason == "firmware_reverted"


async def test_an_image_signed_with_another_key_is_refused_by_the_bootloader(tmp_path: Path) -> None:
    line = await mcumgr_line(tmp_path)
    other_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    board = SimMcumgrBoard(firmware_key=other_key)
    factory_hash = board.fw_sha256
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)
    station = await line.run(hub)
    assert station.outcomes == Counter({"failed": 1})
    assert station.results[0].reason == "firmware_reverted"
    assert len(board.boot_log) == 1
    assert board.boot_log[0].startswith("refused: signed by a different key")
    assert board.fw_sha256 == factory_hash
    assert board.secondary_image() is None  # MCUboot erased the invalid image


async def test_a_security_counter_downgrade_is_refused(tmp_path: Path) -> None:
    line = await mcumgr_line(tmp_path)
    board = mcumgr_board(line)
    board.bootloader.security_counter = 0x03000000  # the board already ran a 3.0.0 image for good
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)
    station = await line.run(hub)
    assert station.outcomes == Counter({"failed": 1})
    assert station.results[0].reason == "firmware_reverted"
    assert board.boot_log == [
        f"refused: security counter {0x02000000} is lower than the board's stored {0x03000000}"
    ]
    assert board.bootloader.security_counter == 0x03000000


async def test_a_reinserted_board_is_rechecked_without_a_second_upload(tmp_path: Path) -> None:
    line = await mcumgr_line(tmp_path)
    hub = line.hub(ports=1, supply=1, factory=lambda: mcumgr_board(line))
    await line.run(hub)
    done = hub.finished[0]
    assert isinstance(done, SimMcumgrBoard)
    uploaded, resets = done.upload_bytes_received, done.resets
    again = line.hub(ports=1, supply=0)
    again.insert("1", done)
    station = await line.run(again)
    assert station.outcomes == Counter({"rechecked": 1})
    assert (done.upload_bytes_received, done.resets) == (uploaded, resets)
    with line.ledger() as ledger:
        record = ledger.find_by_serial(LOT, done.serial_hex)
        assert record is not None
        assert record.state is DeviceState.PROVISIONED


@pytest.mark.parametrize(
    ("fault", "reason"),
    [(Fault.WRONG_CN, "csr_rejected"), (Fault.WEAK_KEY, "csr_rejected"), (Fault.HANG, "board_timeout")],
)
async def test_permanent_board_faults_fail_with_their_reason(
    tmp_path: Path, fault: Fault, reason: str
) -> None:
    line = await mcumgr_line(tmp_path)
    board = mcumgr_board(line, FaultPlan.only(fault))
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", board)
    station = await line.run(hub)
    assert station.outcomes == Counter({"failed": 1})
    assert station.results[0].reason == reason
    with line.ledger() as ledger:
        record = ledger.find_by_serial(LOT, board.serial_hex)
    if fault is Fault.HANG:
        assert record is None  # it never answered: no ID was touched
    else:
        assert record is not None  # the ID stays bound to this board (rule 1)
        assert record.state is DeviceState.RESERVED


async def test_transient_faults_on_the_line_recover(tmp_path: Path) -> None:
    line = await mcumgr_line(tmp_path)
    plan = FaultPlan(
        corrupt_byte=0.03, drop_reply=0.03, reset_mid_write=0.02, readback_differs=0.1, boot_garbage=0.5,
        oversize_frame=0.05, seed=11,
    )  # fmt: skip

    def chatty() -> SimMcumgrBoard:
        board = mcumgr_board(line, plan)
        board.chatty = True
        return board

    hub = line.hub(ports=4, supply=12, factory=chatty)
    station = await line.run(hub, timeout_s=120)
    assert station.outcomes["provisioned"] >= 11
    injected = Counter[str]()
    for board in hub.finished:
        injected.update(board.injected)
    assert injected[Fault.RESET_MID_WRITE] > 0
    assert injected[Fault.CORRUPT_BYTE] > 0
    wanted = lot_hash(line)
    with line.ledger() as ledger:
        provisioned = {r.hw_serial for r in ledger.provisioned_devices(LOT)}
    for board in hub.finished:
        if board.serial_hex in provisioned:
            assert isinstance(board, SimMcumgrBoard)
            assert runs_lot_image(board, wanted)


async def test_demo_with_the_mcumgr_profile(tmp_path: Path) -> None:
    result = await run_demo(DemoOptions(ports=2, boards=4, profile="mcumgr", state_dir=tmp_path))
    assert result.outcomes == {"provisioned": 4}
    assert result.certificates_verified == 4


async def test_a_usb_cdc_board_whose_tty_vanishes_at_reset_is_found_again(tmp_path: Path) -> None:
    import asyncio
    import contextlib

    from factoryd.firmware import LotFirmware
    from factoryd.jobs.pipeline import PipelineSettings
    from factoryd.mcuboot import verify_image
    from factoryd.sim.mcuboot_signer import sign_image
    from factoryd.sim.pty import serve_pty

    key = ec.generate_private_key(ec.SECP256R1())
    data = sign_image(b"\x17" * 5000, key, "2.0.0")
    firmware = LotFirmware(data, verify_image(data, key.public_key()), b"")
    board = SimMcumgrBoard(firmware_key=key.public_key())
    board.usb_cdc = True
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(serve_pty(board))

        class ReEnumeratingHub:
            def __init__(self) -> None:
                self.paths: list[str] = []

            async def wait_for_tty(self, port: str, timeout_s: float) -> str:
                # The board's application enumerates again after its reset: a new tty.
                again = await stack.enter_async_context(serve_pty(board))
                self.paths.append(again.path)
                return again.path

        hub = ReEnumeratingHub()
        session = McumgrSession(hub, "1", first.path, PipelineSettings(station="test"))  # type: ignore[arg-type]
        async with session:
            await session.identify()
            before = session.client
            await asyncio.wait_for(session._update(firmware, await before.image_state()), 30)
            # The first tty closed with the reset; the session asked the hub and opened the new one.
            assert before.closed
            assert session.client is not before
            assert session.client.link.path == hub.paths[-1]
    assert len(hub.paths) == 1
    assert board.primary_image() is not None
    assert board.fw_sha256 == firmware.sha256
    assert board.primary_confirmed


async def test_an_upload_cut_by_a_slow_reboot_resumes_from_the_boards_offset(tmp_path: Path) -> None:
    import asyncio

    from factoryd.firmware import LotFirmware
    from factoryd.jobs.pipeline import PipelineSettings
    from factoryd.mcuboot import verify_image
    from factoryd.protocol.native import Timeouts
    from factoryd.sim.mcuboot_signer import sign_image
    from factoryd.sim.mcumgr import McumgrTiming
    from factoryd.sim.pty import serve_pty

    key = ec.generate_private_key(ec.SECP256R1())
    data = sign_image(b"\x29" * 12000, key, "2.0.0")
    firmware = LotFirmware(data, verify_image(data, key.public_key()), b"")
    # The reboot outlasts every resend of the chunk the reset cut (4 x 0.3 s): the upload call fails,
    # the job waits for the board and starts the upload again; the board answers with its offset.
    board = SimMcumgrBoard(
        firmware_key=key.public_key(),
        timing=McumgrTiming(boot_s=1.5),
        faults=FaultPlan(reset_mid_write=1.0, per_power_on=True, seed=4),
    )
    fast = Timeouts(hello_s=0.1)  # scales the SMP timeouts by 0.1: upload chunks 0.3 s
    settings = PipelineSettings(station="test", timeouts=fast)
    async with serve_pty(board) as pty:
        session = McumgrSession(None, "1", pty.path, settings)  # type: ignore[arg-type]
        async with session:
            await session.identify()
            await asyncio.wait_for(session._update(firmware, await session.client.image_state()), 30)
    assert board.injected[Fault.RESET_MID_WRITE] == 1
    assert board.upload_resumes == 1
    assert board.upload_bytes_received == len(data)  # nothing sent twice
    assert board.fw_sha256 == firmware.sha256
    assert board.primary_confirmed
