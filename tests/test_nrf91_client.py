"""The nrf91-at client against the simulated modem over a real PTY; Nordic's nrfcredstore as the oracle."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import sys
import types
from collections.abc import AsyncIterator

import pytest
from cryptography import x509
from nrfcredstore.command_interface import ATCommandInterface  # type: ignore[import-untyped]
from nrfcredstore.comms import Comms  # type: ignore[import-untyped]
from nrfcredstore.credstore import CredStore, CredType  # type: ignore[import-untyped]

from factoryd.errors import BoardResetError, BoardTimeoutError, ProtocolViolationError
from factoryd.jobs.nrf91 import (
    check_keygen,
    csr_without_null_parameter,
    parse_attestation_token,
    parse_keygen_cose,
    pem_text,
    sha256_upper,
)
from factoryd.jobs.pipeline import restart_job, retry_in_step
from factoryd.protocol.nrf91 import (
    AtCommand,
    AtCommandError,
    CmeError,
    CredentialType,
    ModemFirmware,
    Nrf91Client,
    Nrf91Timeouts,
    luhn_ok,
)
from factoryd.sim.board import Fault, FaultPlan
from factoryd.sim.nrf91 import SimNrf91Modem, serve_nrf91_pty
from factoryd.sim.secure_element import SimSecureElement, seeded_se_serial

TAG = 16_842_753
FAST = Nrf91Timeouts(default_s=0.3, cfun_s=0.3, keygen_s=0.5, cmng_write_s=0.3, late_reply_s=0.05)
PEM = "-----BEGIN CERTIFICATE-----\r\nMIIBszCCAVmgAwIBAgIUOK\r\n-----END CERTIFICATE-----"


@contextlib.asynccontextmanager
async def modem_client(modem: SimNrf91Modem, *, offline: bool = True) -> AsyncIterator[Nrf91Client]:
    async with serve_nrf91_pty(modem) as pty, await Nrf91Client.open(pty.path, timeouts=FAST) as client:
        await client.enable_error_codes()
        if offline:
            await client.set_function_mode(4)
        yield client


async def test_identity_commands() -> None:
    modem = SimNrf91Modem(echo=True, urc_rate=0.5)
    async with modem_client(modem) as client:
        assert await client.function_mode() == 4
        imei = await client.imei()
        assert imei == modem.imei
        assert luhn_ok(imei)
        firmware = await client.modem_firmware()
        assert firmware.version == (1, 3, 5)
        assert client.pending == 0
    assert client.link.decoder.echoes >= 4  # echo on: our lines came back and were dropped
    assert client.urcs  # and URCs came between them, never as an answer


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("mfw_nrf9160_1.3.0", (1, 3, 0)),
        ("mfw_nrf9160_1.3.0-FOTA-TEST", (1, 3, 0)),
        ("mfw_nrf9161_2.0.0", (2, 0, 0)),
    ],
)
def test_modem_firmware_versions(text: str, version: tuple[int, int, int]) -> None:
    assert ModemFirmware.parse(text).version == version


def test_a_firmware_string_without_one_version_is_refused() -> None:
    with pytest.raises(ProtocolViolationError, match=r"exactly one x\.y\.z"):
        ModemFirmware.parse("mfw_nrf9160_1.3.0_2.0.0")


async def test_write_list_delete_with_hashes() -> None:
    modem = SimNrf91Modem()
    async with modem_client(modem) as client:
        await client.write_credential(TAG, CredentialType.ROOT_CA, PEM)
        listed = await client.list_credentials(TAG)
        assert [(c.sec_tag, c.type, c.sha256) for c in listed] == [(TAG, 0, sha256_upper(PEM))]
        assert modem.credential(TAG, 0) == PEM.encode()
        assert await client.delete_credential(TAG, CredentialType.ROOT_CA)
        assert await client.list_credentials(TAG) == []
        assert not await client.delete_credential(TAG, CredentialType.ROOT_CA, missing_ok=True)
        with pytest.raises(AtCommandError) as missing:
            await client.delete_credential(TAG, CredentialType.ROOT_CA)
    assert missing.value.cme is CmeError.NOT_FOUND
    assert missing.value.reason == "cme_not_found"
    assert not missing.value.transient


async def test_keygen_returns_a_csr_its_attestation_names() -> None:
    modem = SimNrf91Modem()
    async with modem_client(modem) as client:
        reply = await client.keygen(TAG, "CN=nrf-352656100367872")
        attestation = check_keygen(reply, TAG)
        assert attestation.device_uuid == modem.device_uuid
        assert attestation.verify(modem.identity_key.public_key())
        csr = x509.load_der_x509_csr(reply.csr_der)
        assert csr.subject.rfc4514_string() == "CN=nrf-352656100367872"
        with pytest.raises(AtCommandError) as exists:
            await client.keygen(TAG, "CN=again")
    assert exists.value.cme is CmeError.EXISTS


async def test_online_modem_refuses_writes_with_518_which_is_transient() -> None:
    async with modem_client(SimNrf91Modem(), offline=False) as client:
        await client.set_function_mode(1)
        with pytest.raises(AtCommandError) as active:
            await client.write_credential(TAG, CredentialType.ROOT_CA, PEM)
        with pytest.raises(AtCommandError):
            await client.keygen(TAG)
    assert active.value.cme is CmeError.ACTIVE
    assert active.value.transient
    assert retry_in_step(active.value)


async def test_without_cmee_every_error_is_a_plain_transient_error() -> None:
    modem = SimNrf91Modem()
    async with serve_nrf91_pty(modem) as pty, await Nrf91Client.open(pty.path, timeouts=FAST) as client:
        with pytest.raises(AtCommandError) as plain:
            await client.delete_credential(TAG, CredentialType.ROOT_CA)
    assert plain.value.cme is None
    assert plain.value.reason == "at_error"
    assert plain.value.transient


async def test_keygen_failure_523_is_transient() -> None:
    modem = SimNrf91Modem()
    async with modem_client(modem) as client:
        modem.cme_error = 1.0
        with pytest.raises(AtCommandError) as failed:
            await client.keygen(TAG)
    assert failed.value.cme is CmeError.KEYGEN_FAILED
    assert failed.value.transient


@pytest.mark.parametrize(
    ("cme", "transient", "reason"),
    [
        (513, False, "cme_not_found"),
        (514, False, "cme_no_access"),
        (515, False, "cme_memory_full"),
        (518, True, "cme_active"),
        (519, False, "cme_exists"),
        (523, True, "cme_keygen_failed"),
        (528, True, "cme_power_off_warning"),
        (999, False, "cme_unknown"),
        (None, True, "at_error"),
    ],
)
def test_cme_codes_map_to_transient_or_permanent(cme: int | None, transient: bool, reason: str) -> None:
    error = AtCommandError("x", cme)
    assert error.transient is transient
    assert error.reason == reason
    assert retry_in_step(error) is transient


async def test_a_security_tag_of_the_modem_is_refused_with_514() -> None:
    async with modem_client(SimNrf91Modem()) as client:
        with pytest.raises(AtCommandError) as refused:
            await client.command(AtCommand.CMNG_DELETE, "AT%CMNG=3,2147483650,0")
    assert refused.value.cme is CmeError.NO_ACCESS


async def test_boot_noise_and_an_oversize_junk_line_do_not_hide_the_answer() -> None:
    modem = SimNrf91Modem(faults=FaultPlan(boot_garbage=1.0, oversize_frame=1.0))
    async with modem_client(modem) as client:
        assert await client.imei() == modem.imei
        decoder = client.link.decoder
    assert decoder.stats.oversize >= 1
    assert decoder.stats.garbage_bytes > 9000
    assert modem.injected[Fault.BOOT_GARBAGE] == 1


async def test_a_hung_modem_times_out_with_nothing_left_behind() -> None:
    modem = SimNrf91Modem(faults=FaultPlan.only(Fault.HANG))
    async with serve_nrf91_pty(modem) as pty, await Nrf91Client.open(pty.path, timeouts=FAST) as client:
        with pytest.raises(BoardTimeoutError):
            await client.imei()
        assert client.pending == 0
        assert client.stats.timeouts == 2  # CGSN is asked twice: it is a read
    assert restart_job(BoardTimeoutError("x"))


async def test_a_truncated_answer_to_a_read_is_asked_again() -> None:
    modem = SimNrf91Modem(faults=FaultPlan(drop_reply=1.0, per_power_on=True, seed=3))
    async with modem_client(modem) as client:
        assert await client.imei() == modem.imei
        assert await client.modem_firmware()
    assert modem.injected == {Fault.DROP_REPLY: 1}


async def test_a_truncated_keygen_answer_is_not_asked_again() -> None:
    modem = SimNrf91Modem()
    async with modem_client(modem) as client:
        modem.faults = FaultPlan.only(Fault.DROP_REPLY)
        with pytest.raises(BoardTimeoutError):
            await client.keygen(TAG)
        assert client.stats.requests == 3  # CMEE, CFUN, one KEYGEN
    assert modem.keygen_count == 1


async def test_a_reset_during_a_write_fails_it_with_a_reset_error() -> None:
    modem = SimNrf91Modem(faults=FaultPlan.only(Fault.RESET_MID_WRITE))
    async with modem_client(modem) as client:
        with pytest.raises(BoardResetError) as reset:
            await client.write_credential(TAG, CredentialType.ROOT_CA, PEM)
        assert client.boots_seen >= 1
        assert client.stats.boots == 1  # the reset, after answers
    assert retry_in_step(reset.value)
    assert modem.credential(TAG, 0) is None
    assert modem.cfun == 0  # the write and the mode are lost


@pytest.mark.parametrize("seed", range(6))
async def test_a_changed_keygen_answer_is_caught_or_harmless(seed: int) -> None:
    # The fault draws mix in the SE serial: pin it, so each seed replays the same corruption.
    se = SimSecureElement(serial=seeded_se_serial(seed))
    modem = SimNrf91Modem(se=se, faults=FaultPlan(corrupt_byte=1.0, seed=seed))
    async with modem_client(modem) as client:
        try:
            reply = await client.keygen(TAG, "CN=x")
            attestation = check_keygen(reply, TAG)
        except ProtocolViolationError as exc:
            caught: ProtocolViolationError | None = exc
        else:
            caught = None
    if caught is not None:
        assert retry_in_step(caught)  # the step makes a new key
        return
    assert modem.injected.get(Fault.CORRUPT_BYTE) == 1
    # Not caught by the digest: the change hit the COSE signature (only the identity key can tell)
    # or a base64 character's unused bits (the bytes are the modem's).
    if attestation.verify(modem.identity_key.public_key()):
        assert x509.load_der_x509_csr(reply.csr_der).is_signature_valid


async def test_a_command_line_longer_than_the_modem_buffer_is_refused() -> None:
    modem = SimNrf91Modem(max_line=512)
    async with modem_client(modem) as client:
        client.max_line = 4096  # the host does not know the modem's smaller buffer
        with pytest.raises(AtCommandError):
            await client.write_credential(TAG, CredentialType.ROOT_CA, "A" * 600)
        client.max_line = 512
        with pytest.raises(ValueError, match="line limit"):
            await client.write_credential(TAG, CredentialType.ROOT_CA, "A" * 600)


async def test_csr_with_a_null_parameter_is_re_encoded_and_still_verifies() -> None:
    modem = SimNrf91Modem(null_param=True)
    async with modem_client(modem) as client:
        reply = await client.keygen(TAG, "CN=nrf-1")
    check_keygen(reply, TAG)  # the digest is over the bytes as sent
    fixed = csr_without_null_parameter(reply.csr_der)
    assert len(fixed) == len(reply.csr_der) - 2
    assert x509.load_der_x509_csr(fixed).is_signature_valid


async def test_attestation_token_verifies_with_the_identity_key_only() -> None:
    modem = SimNrf91Modem()
    async with modem_client(modem) as client:
        token = parse_attestation_token(*await client.attestation_token())
    assert token.device_uuid == modem.device_uuid
    assert token.verify(modem.identity_key.public_key())
    assert not token.verify(SimNrf91Modem().identity_key.public_key())
    with pytest.raises(ProtocolViolationError, match="identity message"):
        parse_attestation_token(b"\x01", b"\x01")


def test_cose_that_is_not_cbor_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolationError, match="not CBOR"):
        parse_keygen_cose(b"\xff\xff")


# nrfcredstore: Nordic's own AT credential client as the oracle --------------------------------


def _nordic_comms(path: str) -> Comms:
    """nrfcredstore's Comms on a PTY.

    ``Comms(port=...)`` looks the port up in ``serial.tools.list_ports.comports()`` first, which
    lists only devices with a sysfs entry (ttyACM, ttyUSB, ...), never a /dev/pts PTY, and raises
    "No device found with port". Its serial layer itself (``_init_serial``: pyserial at 115200 with
    RTS/CTS, CRLF, flush and input reset) opens a PTY fine, so the test skips only the look-up.
    """
    comms = Comms.__new__(Comms)
    comms.timeout = 1
    comms.jlink_api = None
    comms.serial_api = None
    comms.line_ending = "\r\n"
    comms._rtt_line_buffer = ""
    comms._init_serial(types.SimpleNamespace(device=path), 115200, False, True, False)
    return comms


async def test_nrfcredstore_refuses_a_pty_by_port_lookup() -> None:
    async with serve_nrf91_pty(SimNrf91Modem()) as pty:
        with pytest.raises(Exception, match="No device found with port"):
            await asyncio.to_thread(Comms, port=pty.path)


@pytest.mark.timeout(30)
async def test_nrfcredstore_writes_lists_and_deletes_and_agrees_with_our_client() -> None:
    # No URCs: nrfcredstore takes the last line before OK as the answer, so a URC there misleads it.
    modem = SimNrf91Modem()
    pem_lf = PEM.replace("\r\n", "\n") + "\n"

    def nordic(path: str) -> dict[str, object]:
        comms = _nordic_comms(path)
        try:
            at = ATCommandInterface(comms)
            at.detect_shell_mode()
            store = CredStore(at)
            seen: dict[str, object] = {
                "imei": at.get_imei(),
                "mfw": at.get_mfw_version(),
                "offline": at.go_offline(),
            }
            store.write(TAG, CredType.ROOT_CA_CERT, io.StringIO(pem_lf))
            seen["listed"] = [(c.tag, c.type.value, c.sha) for c in store.list(TAG)]
            seen["expected"] = at.calculate_expected_hash(pem_lf.rstrip())
            seen["exists"] = at.check_credential_exists(TAG, CredType.ROOT_CA_CERT.value)
            seen["csr"] = at.get_csr(TAG, "CN=nrf-oracle")
            return seen
        finally:
            comms.close()

    def nordic_delete(path: str) -> list[tuple[int, int, str]]:
        comms = _nordic_comms(path)
        try:
            store = CredStore(ATCommandInterface(comms))
            store.delete(TAG, CredType.ROOT_CA_CERT)
            return [(c.tag, c.type.value, c.sha) for c in store.list(TAG)]
        finally:
            comms.close()

    async with serve_nrf91_pty(modem) as pty:
        seen = await asyncio.to_thread(nordic, pty.path)
        stored = modem.credential(TAG, 0)
        async with await Nrf91Client.open(pty.path, timeouts=FAST) as client:
            ours = {(c.sec_tag, c.type): c.sha256 for c in await client.list_credentials(TAG)}
        after_delete = await asyncio.to_thread(nordic_delete, pty.path)
    assert seen["imei"] == modem.imei
    assert seen["mfw"] == modem.modem_fw
    assert seen["offline"] is True
    written = pem_lf.rstrip()
    expected = hashlib.sha256(written.encode()).hexdigest().upper()
    # Nordic's client computes the hash the modem lists for what it wrote, and our client reads the same.
    assert seen["expected"] == expected
    assert (TAG, 0, expected) in seen["listed"]  # type: ignore[operator]
    assert seen["exists"] == (True, expected)
    assert ours[(TAG, 0)] == expected == sha256_upper(written)
    assert stored == written.encode()
    # Its %KEYGEN blob is the one our attestation check accepts.
    blob = seen["csr"]
    assert isinstance(blob, str)
    assert blob.count(".") == 1
    # The delete went through: only the key nrfcredstore's KEYGEN made is left in the tag.
    assert [(t, k) for t, k, _ in after_delete] == [(TAG, 2)]
    assert pem_text(written) == PEM


async def test_sim_board_cli_serves_a_modem_on_a_tty() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "factoryd", "sim", "board", "--profile", "nrf91-at",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        path = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        async with await Nrf91Client.open(path, timeouts=FAST) as client:
            imei = await client.imei()
            firmware = await client.modem_firmware()
        assert luhn_ok(imei)
        assert firmware.version >= (1, 3, 2)
    finally:
        proc.terminate()
        await proc.wait()
