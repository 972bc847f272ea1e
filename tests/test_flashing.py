"""Flashing the lot's MCUboot image with an external tool, its hash checked first."""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from factoryd.errors import FirmwareRejectedError, HubCommandError
from factoryd.firmware import LotFirmware
from factoryd.flashing import ExternalFlasher
from factoryd.ledger.model import DeviceState
from factoryd.mcuboot import verify_image
from factoryd.sim.mcuboot_signer import sign_image
from tests.helpers.station import LOT, make_line

# A flashing tool writes the MCUboot image; the board's MCUboot reports the image hash (SHA-256 of
# header, body and protected TLVs: the SHA256 TLV), not the file's.
TOOL = """
import hashlib, pathlib, struct, sys
tty, image = sys.argv[1], pathlib.Path(sys.argv[2])
pathlib.Path(sys.argv[3]).write_text(f"{tty} {image.stat().st_mode & 0o777:o}")
if sys.argv[4] == "fail":
    print("error: no device found on", tty)
    sys.exit(3)
data = image.read_bytes()
hdr_size, protect_tlv_size, img_size = struct.unpack_from("<HHI", data, 8)
digest = hashlib.sha256(data[: hdr_size + img_size + protect_tlv_size]).hexdigest()
with open(tty, "wb", buffering=0) as port:
    port.write(b"FACTORYD-SIM-FLASH " + digest.encode() + b"\\n")
"""


def _tool(tmp_path: Path, mode: str) -> list[str]:
    script = tmp_path / "fake-flasher.py"
    script.write_text(TOOL)
    return [sys.executable, str(script), "{tty}", "{image}", str(tmp_path / "tool-ran"), mode]


async def test_blank_board_is_flashed_then_provisioned(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    jobs = line.settings.jobs.model_copy(update={"flash_command": _tool(tmp_path, "ok")})
    settings = line.settings.model_copy(update={"jobs": jobs})
    blank = line.board()
    blank.blank = True
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", blank)
    station = await line.run(hub, settings=settings)
    assert station.outcomes == Counter({"provisioned": 1})
    ran = (tmp_path / "tool-ran").read_text().split()
    assert ran[0].startswith("/dev/pts/")
    assert ran[1] == "600"  # the image file handed to the tool is private
    with line.ledger() as ledger:
        lot_sha = ledger.get_lot(LOT).profile.firmware_sha256
    assert blank.fw_sha256.hex() == lot_sha


async def test_failing_tool_fails_the_port_and_touches_no_id(tmp_path: Path) -> None:
    line = await make_line(tmp_path)
    jobs = line.settings.jobs.model_copy(update={"flash_command": _tool(tmp_path, "fail")})
    settings = line.settings.model_copy(update={"jobs": jobs})
    blank = line.board()
    blank.blank = True
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", blank)
    station = await line.run(hub, settings=settings)
    assert station.outcomes == Counter({"failed": 1})
    assert station.results[0].reason == "hub_command"
    with line.ledger() as ledger:
        assert ledger.find_by_serial(LOT, blank.serial_hex) is None
        assert ledger.progress(LOT).reserved == 0
    assert DeviceState.RESERVED  # enum still importable: the ledger model is intact


def _firmware(version: str) -> LotFirmware:
    key = ec.generate_private_key(ec.SECP256R1())
    data = sign_image(b"application" * 100, key, version)
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return LotFirmware(data, verify_image(data, key.public_key()), pem)


async def test_image_with_the_wrong_digest_never_reaches_the_tool(tmp_path: Path) -> None:
    firmware = _firmware("9.9.0")
    flasher = ExternalFlasher(_tool(tmp_path, "ok"))
    with pytest.raises(FirmwareRejectedError, match="the lot asks for"):
        await flasher.flash("/dev/null", firmware, hashlib.sha256(b"other").hexdigest())
    assert not (tmp_path / "tool-ran").exists()


async def test_missing_tool_is_a_clear_error(tmp_path: Path) -> None:
    flasher = ExternalFlasher(["/nonexistent/bossac", "{tty}"])
    with pytest.raises(HubCommandError, match="cannot run flashing tool"):
        await flasher.flash("/dev/null", _firmware("1.0.0"), None)
