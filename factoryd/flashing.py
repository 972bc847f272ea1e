"""Flashing the provisioning firmware with an external tool (arduino-cli, bossac, esptool, dfu-util).

Used when a board does not speak the provisioning protocol yet (fresh from the board maker).
The tool is given the lot's MCUboot image file, as uploaded (`factoryd lots firmware`): it was
verified before it was stored, again when the lot was opened (FirmwareStore.load_current), and
its MCUboot hash is checked here against the one the lot names. The tool runs as an async
subprocess in its own process group, killed whole on timeout.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from factoryd.errors import FirmwareRejectedError, HubCommandError
from factoryd.files import write_new
from factoryd.firmware import LotFirmware
from factoryd.procs import run_tool

log = structlog.get_logger(__name__)
# Output kept from a failing tool for the error message.
TOOL_OUTPUT_TAIL = 600


@dataclass(frozen=True)
class ExternalFlasher:
    """A command template: ``{tty}`` and ``{image}`` are replaced per board."""

    command: Sequence[str]
    timeout_s: float = 120.0

    def argv(self, tty: str, image: Path) -> list[str]:
        """The command line for one board."""
        return [part.replace("{tty}", tty).replace("{image}", str(image)) for part in self.command]

    async def flash(self, tty: str, firmware: LotFirmware, expected_sha256: str | None) -> None:
        """Write the MCUboot image to a private temp file and run the tool; raise on any failure."""
        if expected_sha256 is not None and firmware.sha256.hex() != expected_sha256:
            raise FirmwareRejectedError(
                f"firmware {firmware.version} has MCUboot hash {firmware.sha256.hex()[:12]}…, "
                f"the lot asks for {expected_sha256[:12]}…",
                0,
            )
        with tempfile.TemporaryDirectory(prefix="factoryd-flash-") as tmp:
            image = Path(tmp) / "firmware.signed.bin"
            write_new(image, firmware.data)
            argv = self.argv(tty, image)
            log.info("flashing", tool=argv[0], tty=tty, version=firmware.version)
            try:
                # procs.run_tool: no fork of the daemon; the tool's process group is killed on a
                # timeout or a cancellation.
                result = await run_tool(argv, self.timeout_s, merge_stderr=True)
            except OSError as exc:
                raise HubCommandError(f"cannot run flashing tool {argv[0]!r}: {exc.strerror}") from exc
            except TimeoutError:
                raise HubCommandError(
                    f"flashing tool {argv[0]!r} did not finish in {self.timeout_s:.0f} s"
                ) from None
        if result.returncode != 0:
            tail = result.stdout.decode("utf-8", "replace")[-TOOL_OUTPUT_TAIL:].strip()
            raise HubCommandError(f"flashing tool {argv[0]!r} failed (exit {result.returncode}): {tail}")
