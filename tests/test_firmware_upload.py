"""A lot's MCUboot image: uploaded by the CLI and the HTTP API, verified whole, stored, recorded.

Images come from `imgtool sign` (tests/helpers/imgtool.py). Every refusal is checked to leave the
firmware store (every file and directory) and the ledger (lot profile, audit chain) exactly as before.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from factoryd.api import UploadLimits
from factoryd.cli.main import app
from factoryd.errors import FirmwareRejectedError, InputError, LotStateError
from factoryd.firmware import FirmwareStore, store_lot_firmware
from factoryd.jobs.lots import activation_gaps
from factoryd.ledger import Ledger, LotProfile, LotState
from factoryd.ledger.engine import create_ledger_engine
from factoryd.ledger.tables import AuditEntryRow
from factoryd.mcuboot import signing_key_hash, verify_image
from factoryd.sim.mcuboot_signer import auto_security_counter, sign_image
from tests.helpers.api import TEST_LIMITS, Api, running_api
from tests.helpers.imgtool import (
    COUNTER_1_2_3,
    HEADER_BYTES,
    SLOT_BYTES,
    VERSION,
    Tools,
    flip,
    layout,
    make_tools,
    run_imgtool,
)

pytest.importorskip("imgtool.main")

LOT = "acme-1"
PROFILE = {"slot_size": SLOT_BYTES}
COUNTER_1_1_0 = 0x01010000
COUNTER_1_3_0 = 0x01030000


@pytest.fixture(scope="session")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Tools:
    """The session's imgtool keys and signed images (tests/helpers/imgtool.py)."""
    return make_tools(tmp_path_factory)


def pem(tools: Tools, name: str) -> bytes:
    """A key's public PEM, as the customer gives it."""
    return tools.public_pem(name).read_bytes()


def key_hash(tools: Tools, name: str) -> str:
    """`imgtool getpubhash` of a key, hex."""
    return signing_key_hash(tools.public[name])


def good_hash(tools: Tools) -> str:
    """The MCUboot hash of the good image (imgtool verify's "Image digest")."""
    return verify_image(tools.images["good"], tools.public["lot"]).hash


def snapshot(firmware_dir: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) under the firmware store, hidden ones included."""
    if not firmware_dir.exists():
        return {}
    return {
        str(path.relative_to(firmware_dir)): path.read_bytes() if path.is_file() else None
        for path in sorted(firmware_dir.rglob("*"))
    }


# --- the refusals, shared by the CLI and the API ----------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """One upload the station must refuse whole, with the message it must give."""

    image: bytes
    key_pem: bytes
    message: str
    profile: dict[str, object] = field(default_factory=lambda: dict(PROFILE))
    after_good: bool = False  # the lot already has the good image (key and counter recorded)


def refusals(tools: Tools) -> dict[str, Refusal]:
    """Every category of refused upload: the verifier's corpus and the lot's own rules."""
    good = tools.images["good"]
    lay = layout(good)
    sig_pos, _ = lay.tlvs[0x22]
    lot_pem = pem(tools, "lot")
    lot_hash, foreign_hash = key_hash(tools, "lot"), key_hash(tools, "foreign")
    return {
        "flipped payload byte": Refusal(
            flip(good, HEADER_BYTES + 100), lot_pem, "image hash does not match the SHA256 TLV"
        ),
        "flipped protected TLV byte": Refusal(
            flip(good, lay.tlv_off + 8), lot_pem, "image hash does not match the SHA256 TLV"
        ),
        "flipped signature byte": Refusal(
            flip(good, sig_pos + 4 + 20),
            lot_pem,
            "the ECDSA P-256 signature does not verify with the lot's key",
        ),
        "foreign key image": Refusal(
            tools.images["foreign"],
            lot_pem,
            f"signed by a different key (key hash {foreign_hash[:16]}…; the lot's key hash is "
            f"{lot_hash[:16]}…)",
        ),
        "another key than the lot's": Refusal(
            tools.images["foreign"],
            pem(tools, "foreign"),
            f"the signing key given (key hash {foreign_hash[:16]}…) is not the lot's firmware-signing key "
            f"(key hash {lot_hash[:16]}…); an admin may replace the lot's key (--replace-signing-key)",
            after_good=True,
        ),
        "key pinned in the profile": Refusal(
            tools.images["foreign"],
            pem(tools, "foreign"),
            f"the signing key given (key hash {foreign_hash[:16]}…) is not the lot's firmware-signing key "
            f"(key hash {lot_hash[:16]}…); an admin may replace the lot's key (--replace-signing-key)",
            profile={**PROFILE, "firmware_key_hash": lot_hash},
        ),
        "lower security counter": Refusal(
            tools.images["old_version"],
            lot_pem,
            f"security counter {COUNTER_1_1_0} is lower than the lot's previous image ({COUNTER_1_2_3})",
            after_good=True,
        ),
        "no security counter after one": Refusal(
            tools.images["no_counter"],
            lot_pem,
            f"image has no security counter (SEC_CNT TLV); the lot's previous image had {COUNTER_1_2_3}",
            after_good=True,
        ),
        "oversize for the slot": Refusal(
            good,
            lot_pem,
            f"image is {len(good)} bytes (0x{len(good):x}); with the 432-byte trailer it does not fit the "
            "4096-byte (0x1000) slot",
            profile={"slot_size": 4096},
        ),
        "oversize with a larger trailer": Refusal(
            good,
            lot_pem,
            f"image is {len(good)} bytes (0x{len(good):x}); with the 12448-byte trailer it does not fit the "
            "16384-byte (0x4000) slot",
            profile={"slot_size": 0x4000, "trailer_align": 32, "trailer_max_align": 32},
        ),
        "RSA image": Refusal(
            tools.images["rsa"],
            pem(tools, "rsa"),
            "image is signed with RSA-2048; the lot expects ECDSA P-256",
        ),
        "Ed25519 image": Refusal(
            tools.images["ed25519"], lot_pem, "image is signed with Ed25519; the lot expects ECDSA P-256"
        ),
        "truncated": Refusal(
            good[:-1],
            lot_pem,
            f"TLV area at offset 0x{lay.unprot_off:x} ({lay.end - lay.unprot_off} bytes) runs past the end "
            f"of the file ({len(good) - 1} bytes): the file is truncated",
        ),
        "truncated in the header": Refusal(
            good[:16], lot_pem, "file is 16 bytes, shorter than the 32-byte MCUboot image header"
        ),
        "bad header magic": Refusal(
            flip(good, 0), lot_pem, "bad header magic 0x96F3B83C: not an MCUboot image (expected 0x96F3B83D)"
        ),
        "unsigned": Refusal(
            tools.images["unsigned"], lot_pem, "image carries no signature TLV: it is unsigned"
        ),
        "full public key for a hash bootloader": Refusal(
            tools.images["pubkey"],
            lot_pem,
            "image names its signing key in full (PUBKEY TLV), but the lot's bootloader expects it by its "
            "hash (KEYHASH TLV): sign with --public-key-format hash",
        ),
        "encrypted image": Refusal(
            tools.images["clear"],
            lot_pem,
            "image is marked encrypted (AES-128 flag, ENC_EC256 TLV); the station does not support "
            "encrypted images",
        ),
        "a private key as the signing key": Refusal(
            good,
            tools.pems["lot"].read_bytes(),
            "the firmware-signing key given is a private key; the station takes only the public key "
            "(imgtool getpub -k KEY.pem -e pem)",
        ),
        "not a key": Refusal(good, b"hello", "firmware-signing key is not a PEM public key"),
        "no slot size in the profile": Refusal(
            good,
            lot_pem,
            "the lot profile has no slot_size: the station cannot check that the image fits the board's slot "
            '(create the lot with "slot_size": <bytes> in its profile)',
            profile={},
        ),
    }


REFUSALS = [
    "flipped payload byte",
    "flipped protected TLV byte",
    "flipped signature byte",
    "foreign key image",
    "another key than the lot's",
    "key pinned in the profile",
    "lower security counter",
    "no security counter after one",
    "oversize for the slot",
    "oversize with a larger trailer",
    "RSA image",
    "Ed25519 image",
    "truncated",
    "truncated in the header",
    "bad header magic",
    "unsigned",
    "full public key for a hash bootloader",
    "encrypted image",
    "a private key as the signing key",
    "not a key",
    "no slot size in the profile",
]


def test_the_refusal_list_covers_every_case(tools: Tools) -> None:
    assert sorted(REFUSALS) == sorted(refusals(tools))
    assert len(REFUSALS) >= 12


# --- the CLI --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Station:
    """A state directory and config for CLI calls."""

    tmp: Path
    state_dir: Path
    config: Path

    def cli(self, *args: str) -> tuple[int, str, str]:
        """Run `factoryd ARGS -c CONFIG`; (exit code, stdout, stderr)."""
        result = CliRunner().invoke(app, [*args, "-c", str(self.config)])
        return result.exit_code, result.stdout, result.stderr

    def file(self, name: str, data: bytes) -> str:
        """Write an input file; return its path."""
        path = self.tmp / name
        path.write_bytes(data)
        return str(path)

    def upload(self, image: bytes, key_pem: bytes, *extra: str) -> tuple[int, str, str]:
        """`factoryd lots firmware LOT IMAGE --signing-key KEY`."""
        return self.cli(
            "lots",
            "firmware",
            LOT,
            self.file("fw.bin", image),
            "--signing-key",
            self.file("key.pem", key_pem),
            *extra,
        )

    def ledger(self) -> Ledger:
        """The station's ledger, opened directly."""
        return Ledger.open(f"sqlite:///{self.state_dir / 'ledger.db'}")

    def state(self) -> tuple[dict[str, bytes | None], LotProfile, int]:
        """Store files, lot profile, audit entry count."""
        with self.ledger() as ledger:
            return snapshot(self.state_dir / "firmware"), ledger.get_lot(LOT).profile, ledger.verify_audit()


def make_station(tmp_path: Path, profile: dict[str, object]) -> Station:
    """A station with lot LOT created by the CLI with ``profile``."""
    state_dir = tmp_path / "state"
    config = tmp_path / "factoryd.toml"
    config.write_text(f'[station]\nstate_dir = "{state_dir}"\n')
    station = Station(tmp_path, state_dir, config)
    profile_file = station.file("profile.json", json.dumps(profile).encode())
    code, _, err = station.cli("lots", "create", LOT, "--customer", "acme", "--profile-file", profile_file)
    assert code == 0, err
    return station


def test_cli_upload_stores_records_and_shows_the_image(tools: Tools, tmp_path: Path) -> None:
    station = make_station(tmp_path, PROFILE)
    digest = good_hash(tools)
    code, out, err = station.upload(tools.images["good"], pem(tools, "lot"))
    assert (code, err) == (0, ""), err
    stored = station.state_dir / "firmware" / LOT / digest
    assert out == (
        f"firmware {VERSION} (hash {digest}, security counter 0x{COUNTER_1_2_3:08x}) is lot {LOT}'s image; "
        f"stored in {stored}\n"
    )
    assert snapshot(station.state_dir / "firmware") == {
        LOT: None,
        f"{LOT}/{digest}": None,
        f"{LOT}/{digest}/image.bin": tools.images["good"],
        f"{LOT}/{digest}/signing-key.pem": pem(tools, "lot"),
        f"{LOT}/signing-key.pem": pem(tools, "lot"),  # the lot's current key, for the simulator
    }
    assert (stored / "image.bin").stat().st_mode & 0o777 == 0o600

    code, out, _ = station.cli("lots", "show", LOT)
    shown = json.loads(out)
    assert shown["firmware"] == {
        "sha256": digest,
        "version": VERSION,
        "security_counter": COUNTER_1_2_3,
        "signing_key_hash": key_hash(tools, "lot"),
    }
    assert shown["profile"]["firmware_sha256"] == digest
    assert shown["profile"]["firmware_format"] == "mcuboot"

    with station.ledger() as ledger:
        info = ledger.get_lot(LOT)
        gaps = activation_gaps(
            info, ledger.progress(LOT), station.state_dir / "bundles", stored.parent.parent
        )
        entries = ledger.verify_audit()
    assert not [gap for gap in gaps if "firmware" in gap]
    assert entries == 2  # lot.created, lot.firmware
    loaded = FirmwareStore(station.state_dir / "firmware").load_current(LOT, info.profile)
    assert loaded is not None
    assert loaded.data == tools.images["good"]
    assert loaded.sha256.hex() == digest


def test_cli_upload_audits_the_image(tools: Tools, tmp_path: Path) -> None:
    station = make_station(tmp_path, PROFILE)
    assert station.upload(tools.images["good"], pem(tools, "lot"))[0] == 0
    with station.ledger() as ledger:
        details = _audit_details(ledger, "lot.firmware")
    assert details == [
        {
            "sha256": good_hash(tools),
            "version": VERSION,
            "security_counter": COUNTER_1_2_3,
            "key_hash": key_hash(tools, "lot"),
            "previous_sha256": None,
            "signing_key_replaced": False,
        }
    ]


def _audit_details(ledger: Ledger, action: str) -> list[dict[str, object]]:
    """The details of every audit entry with this action, oldest first."""
    with Session(ledger._engine) as session:
        rows = session.exec(select(AuditEntryRow).order_by(col(AuditEntryRow.seq))).all()
        return [json.loads(row.details) for row in rows if row.action == action]


@pytest.mark.parametrize("name", REFUSALS)
def test_cli_refusals_change_nothing(tools: Tools, tmp_path: Path, name: str) -> None:
    case = refusals(tools)[name]
    station = make_station(tmp_path, case.profile)
    if case.after_good:
        assert station.upload(tools.images["good"], pem(tools, "lot"))[0] == 0
    before = station.state()
    code, out, err = station.upload(case.image, case.key_pem)
    assert code == 2
    assert out == ""
    assert err.startswith(f"error: {tmp_path / 'fw.bin'}: refused, nothing stored: ")
    assert case.message in err
    assert "Traceback" not in err
    assert station.state() == before


def test_cli_a_newer_image_replaces_the_current_one(tools: Tools, tmp_path: Path) -> None:
    station = make_station(tmp_path, PROFILE)
    assert station.upload(tools.images["good"], pem(tools, "lot"))[0] == 0
    again = station.state()
    assert station.upload(tools.images["good"], pem(tools, "lot"))[0] == 0  # the same: equal counter
    assert station.state()[:2] == again[:2]
    code, out, err = station.upload(tools.images["newer"], pem(tools, "lot"))
    assert code == 0, err
    newer = verify_image(tools.images["newer"], tools.public["lot"])
    assert f"security counter 0x{COUNTER_1_3_0:08x}" in out
    _, profile, _ = station.state()
    assert (profile.firmware_sha256, profile.firmware_version, profile.firmware_security_counter) == (
        newer.hash,
        "1.3.0+0",
        COUNTER_1_3_0,
    )
    # The old image stays on disk (unused); the profile names the current one.
    assert (station.state_dir / "firmware" / LOT / good_hash(tools) / "image.bin").exists()


def test_cli_admin_replaces_the_signing_key_explicitly(tools: Tools, tmp_path: Path) -> None:
    station = make_station(tmp_path, PROFILE)
    assert station.upload(tools.images["good"], pem(tools, "lot"))[0] == 0
    code, out, err = station.upload(tools.images["foreign"], pem(tools, "foreign"), "--replace-signing-key")
    assert code == 0, err
    assert "(signing key replaced)" in out
    _, profile, _ = station.state()
    assert profile.firmware_key_hash == key_hash(tools, "foreign")
    assert (station.state_dir / "firmware" / LOT / "signing-key.pem").read_bytes() == pem(tools, "foreign")
    # The same MCUboot hash (the signature is not hashed): the stored image now carries the new key.
    assert verify_image(tools.images["foreign"], tools.public["foreign"]).hash == good_hash(tools)
    stored = station.state_dir / "firmware" / LOT / good_hash(tools)
    assert (stored / "image.bin").read_bytes() == tools.images["foreign"]
    assert (stored / "signing-key.pem").read_bytes() == pem(tools, "foreign")
    with station.ledger() as ledger:
        assert _audit_details(ledger, "lot.firmware")[-1]["signing_key_replaced"] is True
        # A replacement the ledger refuses (the lot closed meanwhile) leaves the stored image alone.
        ledger.set_lot_state(LOT, LotState.CLOSED, actor="t")
        before = snapshot(station.state_dir / "firmware")
        with pytest.raises(LotStateError):
            store_lot_firmware(
                ledger,
                FirmwareStore(station.state_dir / "firmware"),
                LOT,
                tools.images["good"],
                pem(tools, "lot"),
                actor="t",
                replace_signing_key=True,
            )
    assert snapshot(station.state_dir / "firmware") == before


def test_cli_refuses_an_unknown_lot_and_an_oversize_file(
    tools: Tools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    station = make_station(tmp_path, PROFILE)
    code, _, err = station.cli(
        "lots", "firmware", "nope", station.file("fw.bin", tools.images["good"]),
        "--signing-key", station.file("k.pem", pem(tools, "lot")),
    )  # fmt: skip
    assert code == 2
    assert "no lot named 'nope'" in err
    before = station.state()
    monkeypatch.setattr("factoryd.firmware.FIRMWARE_IMAGE_MAX_BYTES", 4096)
    code, _, err = station.upload(tools.images["good"], pem(tools, "lot"))
    assert code == 2
    assert f"refused, nothing stored: file is {len(tools.images['good'])} bytes, over 4096" in err
    assert station.state() == before == ({}, LotProfile(**PROFILE), 1)


def test_a_tampered_stored_image_is_refused_on_load_and_at_activation(tools: Tools, tmp_path: Path) -> None:
    station = make_station(tmp_path, PROFILE)
    assert station.upload(tools.images["good"], pem(tools, "lot"))[0] == 0
    image = station.state_dir / "firmware" / LOT / good_hash(tools) / "image.bin"
    image.write_bytes(flip(tools.images["good"], HEADER_BYTES + 7))
    with station.ledger() as ledger:
        info = ledger.get_lot(LOT)
        gaps = activation_gaps(info, ledger.progress(LOT), station.state_dir / "bundles", image.parents[2])
    with pytest.raises(FirmwareRejectedError, match="no longer verifies: image hash does not match"):
        FirmwareStore(station.state_dir / "firmware").load_current(LOT, info.profile)
    assert any("cannot be used" in gap and "no longer verifies" in gap for gap in gaps)
    # Uploading the image again repairs the store.
    assert station.upload(tools.images["good"], pem(tools, "lot"))[0] == 0
    assert image.read_bytes() == tools.images["good"]
    assert sorted(p.name for p in image.parents[1].iterdir()) == sorted([good_hash(tools), "signing-key.pem"])


def test_an_image_signed_by_another_key_than_the_lot_s_is_not_loaded(tools: Tools, tmp_path: Path) -> None:
    store = FirmwareStore(tmp_path / "firmware")
    store.save(LOT, tools.images["good"], tools.public["lot"])
    profile = LotProfile(firmware_sha256=good_hash(tools), firmware_key_hash=key_hash(tools, "foreign"))
    with pytest.raises(FirmwareRejectedError, match="is signed by key"):
        store.load_current(LOT, profile)
    assert store.load_current(LOT, LotProfile()) is None


# --- the ledger method: the same rules under the lot's row lock ---------------------------------------


def test_ledger_rechecks_key_counter_and_state(tools: Tools, tmp_path: Path) -> None:
    with Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        ledger.create_lot(
            LOT, customer="acme", profile=LotProfile(**PROFILE), target_quantity=None, actor="t"
        )

        def record(
            *,
            sha256: str = good_hash(tools),
            counter: int | None = COUNTER_1_2_3,
            key: str = key_hash(tools, "lot"),
        ) -> LotProfile:
            return ledger.record_lot_firmware(
                LOT, sha256=sha256, version=VERSION, security_counter=counter, key_hash=key, actor="t"
            ).profile

        assert record().firmware_sha256 == good_hash(tools)
        before = (ledger.get_lot(LOT).profile, ledger.verify_audit())
        with pytest.raises(InputError, match="is lower than the lot's previous image"):
            record(counter=1)
        with pytest.raises(InputError, match="image has no security counter"):
            record(counter=None)
        with pytest.raises(InputError, match="not the lot's firmware-signing key"):
            record(key="0" * 64)
        with pytest.raises(InputError, match="firmware record refused"):
            record(sha256="XYZ")
        assert (ledger.get_lot(LOT).profile, ledger.verify_audit()) == before
        ledger.set_lot_state(LOT, LotState.CLOSED, actor="t")
        with pytest.raises(LotStateError, match="is closed"):
            record()


def test_a_ledger_refusal_removes_what_the_store_wrote(tools: Tools, tmp_path: Path) -> None:
    store = FirmwareStore(tmp_path / "firmware")
    with Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        ledger.create_lot(
            LOT, customer="acme", profile=LotProfile(**PROFILE), target_quantity=None, actor="t"
        )
        ledger.set_lot_state(LOT, LotState.CLOSED, actor="t")
        before = (snapshot(store.directory), ledger.get_lot(LOT).profile, ledger.verify_audit())
        with pytest.raises(LotStateError):
            store_lot_firmware(ledger, store, LOT, tools.images["good"], pem(tools, "lot"), actor="t")
        # The lot's directory may stay (empty); no image, no staging left behind.
        after = snapshot(store.directory)
        assert {k: v for k, v in after.items() if k != LOT} == before[0]
        assert (ledger.get_lot(LOT).profile, ledger.verify_audit()) == before[1:]


# --- the HTTP API ------------------------------------------------------------------------------------


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    """A live API without a station; firmware uploads limited to 64 KiB."""
    limits = UploadLimits(
        id_list_bytes=TEST_LIMITS.id_list_bytes,
        json_bytes=TEST_LIMITS.json_bytes,
        overhead_bytes=TEST_LIMITS.overhead_bytes,
        firmware_image_bytes=SLOT_BYTES,
    )
    async with running_api(tmp_path, limits=limits) as served:
        yield served


async def post_firmware(
    api: Api, who: str, lot: str, image: bytes, key_pem: bytes, **fields: str
) -> httpx.Response:
    """POST /lots/{lot}/firmware as ``who``."""
    async with api.client(who) as client:
        return await client.post(
            f"/lots/{lot}/firmware",
            files={"image": ("zephyr.signed.bin", image), "signing_key": ("pub.pem", key_pem)},
            data=fields,
        )


async def api_state(api: Api, lot: str) -> tuple[dict[str, bytes | None], LotProfile, list[str]]:
    """Store files, lot profile, the ledger's own audit entries (the API audits every call besides)."""
    return snapshot(api.ctx.paths.firmware), (await api.ledger.get_lot(lot)).profile, audit_actions(api)[0]


def audit_actions(api: Api) -> tuple[list[str], list[tuple[str, object]]]:
    """(the ledger's own audit actions, (action, status) of every audited API call)."""
    engine = create_ledger_engine(api.settings.ledger_url)
    try:
        with Session(engine) as session:
            rows = session.exec(select(AuditEntryRow).order_by(col(AuditEntryRow.seq))).all()
    finally:
        engine.dispose()
    calls = [(r.action, json.loads(r.details).get("status")) for r in rows if " /" in r.action]
    return [r.action for r in rows if " /" not in r.action], calls


async def test_api_customer_uploads_and_the_lot_view_shows_the_image(tools: Tools, api: Api) -> None:
    await api.make_lot(LOT, "acme", profile=LotProfile(**PROFILE))
    digest = good_hash(tools)
    response = await post_firmware(api, "acme", LOT, tools.images["good"], pem(tools, "lot"))
    assert response.status_code == 200, response.text
    expected = {
        "sha256": digest,
        "version": VERSION,
        "security_counter": COUNTER_1_2_3,
        "signing_key_hash": key_hash(tools, "lot"),
    }
    assert response.json() == {"lot": LOT, "firmware": expected, "signing_key_replaced": False}
    async with api.client("acme") as client:
        shown = (await client.get(f"/lots/{LOT}")).json()
    assert shown["firmware"] == expected
    assert shown["profile"]["firmware_security_counter"] == COUNTER_1_2_3
    assert (api.ctx.paths.firmware / LOT / digest / "image.bin").read_bytes() == tools.images["good"]


async def test_api_roles(tools: Tools, api: Api) -> None:
    await api.make_lot(LOT, "acme", profile=LotProfile(**PROFILE))
    before = await api_state(api, LOT)
    good, lot_pem = tools.images["good"], pem(tools, "lot")
    assert (await post_firmware(api, "globex", LOT, good, lot_pem)).status_code == 404  # not its lot
    assert (await post_firmware(api, "operator", LOT, good, lot_pem)).status_code == 403
    assert (await post_firmware(api, "supervisor", LOT, good, lot_pem)).status_code == 403
    replace = await post_firmware(api, "acme", LOT, good, lot_pem, replace_signing_key="true")
    assert replace.status_code == 403
    assert "only an admin may replace" in replace.json()["detail"]
    bad_flag = await post_firmware(api, "admin", LOT, good, lot_pem, replace_signing_key="yes")
    assert bad_flag.status_code == 422
    assert await api_state(api, LOT) == before
    assert (await post_firmware(api, "admin", LOT, good, lot_pem)).status_code == 200
    replaced = await post_firmware(
        api, "admin", LOT, tools.images["foreign"], pem(tools, "foreign"), replace_signing_key="true"
    )
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["signing_key_replaced"] is True
    assert (await api.ledger.get_lot(LOT)).profile.firmware_key_hash == key_hash(tools, "foreign")


async def test_api_refusals_change_nothing(tools: Tools, api: Api) -> None:
    for n, (name, case) in enumerate(refusals(tools).items()):
        lot = f"lot-{n:02d}"
        await api.make_lot(lot, "acme", profile=LotProfile.model_validate(case.profile))
        if case.after_good:
            first = await post_firmware(api, "acme", lot, tools.images["good"], pem(tools, "lot"))
            assert first.status_code == 200, (name, first.text)
        before = await api_state(api, lot)
        response = await post_firmware(api, "acme", lot, case.image, case.key_pem)
        assert response.status_code == 422, (name, response.text)
        assert case.message in response.json()["detail"], name
        assert await api_state(api, lot) == before, name
    refused = [call for call in audit_actions(api)[1] if call == ("POST /lots/{lot}/firmware", 422)]
    assert len(refused) == len(REFUSALS)  # each refusal is in the audit trail as an API call


async def test_api_an_image_over_the_limit_is_413_and_stores_nothing(tools: Tools, api: Api) -> None:
    await api.make_lot(LOT, "acme", profile=LotProfile(**PROFILE))
    before = await api_state(api, LOT)
    response = await post_firmware(api, "acme", LOT, tools.images["padded"] + b"\xff", pem(tools, "lot"))
    assert response.status_code == 413
    assert await api_state(api, LOT) == before


async def test_api_spec_documents_the_upload(api: Api) -> None:
    async with api.client() as client:
        spec = (await client.get("/openapi.json")).json()
    body = spec["paths"]["/lots/{lot}/firmware"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["required"] == ["image", "signing_key"]


# --- the simulator's signer, judged by imgtool ------------------------------------------------------


def test_sim_signed_images_pass_imgtool_verify_and_the_lot_checks(tools: Tools, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    image = sign_image(b"demo application" * 300, key, "2.1.7+9")
    (tmp_path / "sim.bin").write_bytes(image)
    (tmp_path / "sim.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    done = run_imgtool("verify", "-k", tmp_path / "sim.pem", tmp_path / "sim.bin")
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    verified = verify_image(image, key.public_key())
    assert f"Image digest: {verified.hash}" in out
    assert "Image version: 2.1.7+9" in out
    assert verified.security_counter == auto_security_counter("2.1.7+9") == 0x02010007
    dumped = run_imgtool("dumpinfo", "-f", "json", tmp_path / "sim.bin")
    assert dumped.returncode == 0, dumped.stderr
    prot = json.loads(dumped.stdout)["tlv_area"]["tlvs_prot"]
    assert [t["type_name"] for t in prot] == ["SEC_CNT"]
    assert struct.unpack("<I", bytes.fromhex(prot[0]["data"]))[0] == 0x02010007
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        ledger.create_lot(
            LOT, customer="acme", profile=LotProfile(**PROFILE), target_quantity=None, actor="t"
        )
        upload = store_lot_firmware(ledger, FirmwareStore(tmp_path / "fw"), LOT, image, pub, actor="t")
    assert upload.lot.profile.firmware_sha256 == verified.hash


def test_sim_signer_refuses_what_it_cannot_sign() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InputError, match=r"not major\.minor\.revision"):
        sign_image(b"x", key, "v1")
    with pytest.raises(InputError, match="does not fit the MCUboot header"):
        sign_image(b"x", key, "256.0.0")
    with pytest.raises(InputError, match="ECDSA P-256 only"):
        sign_image(b"x", ec.generate_private_key(ec.SECP384R1()), "1.0.0")
