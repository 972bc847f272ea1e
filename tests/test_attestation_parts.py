"""Pre-registered parts manifests (Trust&GO style) and the lot's attestation roots through the CLI."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from factoryd.cli.main import app
from factoryd.ledger import LotProfile
from factoryd.pki.parts import PartsManifestError, PartsStore, sign_parts_entry, verify_parts_manifest
from factoryd.pki.testca import make_ca_cert
from factoryd.sim.secure_element import SimSecureElement, SimVendorCa, new_se_serial
from tests.helpers.api import running_api

LOT = "parts-lot"
NOW = dt.datetime.now(dt.UTC)


def _signer(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed P-256 manifest signer, as Microchip's "Manifest Signer 005"."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    cert = make_ca_cert(
        subject, key, serial=5, not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=9)
    )
    return key, cert


def _part() -> tuple[str, bytes]:
    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    return new_se_serial().hex(), point


@pytest.fixture(scope="module")
def signer() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The test vendor's manifest signer."""
    return _signer("factoryd Test Manifest Signer")


def _manifest(
    signer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], parts: list[tuple[str, bytes]]
) -> list[dict[str, object]]:
    return [sign_parts_entry(serial, point, signer[0], signer[1]) for serial, point in parts]


def test_a_signed_manifest_binds_each_serial_to_its_key(
    signer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], tmp_path: Path
) -> None:
    parts = [_part() for _ in range(3)]
    verified = verify_parts_manifest(json.dumps(_manifest(signer, parts)).encode(), [signer[1]])
    assert {s: p.public_key for s, p in verified.items()} == dict(parts)
    assert all(len(p.entry_id) == 64 for p in verified.values())
    store = PartsStore(tmp_path)
    store.save(LOT, verified)
    assert store.load(LOT) == verified


def _refusal(data: bytes, signers: list[x509.Certificate]) -> str:
    with pytest.raises(PartsManifestError) as caught:
        verify_parts_manifest(data, signers)
    return str(caught.value)


def test_a_tampered_entry_is_refused_by_index(
    signer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    entries = _manifest(signer, [_part(), _part()])
    # Swap in another entry's payload: the signature no longer covers it.
    entries[1]["payload"] = entries[0]["payload"]
    assert "entry 1" in _refusal(json.dumps(entries).encode(), [signer[1]])


def test_a_manifest_from_another_signer_is_refused(
    signer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    other = _signer("Rogue Signer")
    data = json.dumps(_manifest(signer, [_part()])).encode()
    assert "signer that was not given" in _refusal(data, [other[1]])
    # Entries of another signer name it, not the pinned one: refused at entry 0.
    impostor = _manifest(other, [_part()])
    assert "entry 0" in _refusal(json.dumps(impostor).encode(), [signer[1]])


def test_a_duplicate_serial_is_refused(signer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> None:
    serial, point = _part()
    data = json.dumps(_manifest(signer, [(serial, point), _part(), (serial, _part()[1])])).encode()
    assert "appears twice" in _refusal(data, [signer[1]])


def test_malformed_manifests_are_refused(signer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> None:
    assert "not JSON" in _refusal(b"{nope", [signer[1]])
    assert "non-empty JSON array" in _refusal(b"[]", [signer[1]])
    assert "no manifest signer" in _refusal(json.dumps(_manifest(signer, [_part()])).encode(), [])
    entries = _manifest(signer, [_part()])
    entries[0]["header"] = {"uniqueId": "0123" + "00" * 7}
    assert "differs from the signed one" in _refusal(json.dumps(entries).encode(), [signer[1]])


# The CLI -----------------------------------------------------------------------------------------


def _cli(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*args, "-c", str(config)])
    return result.exit_code, result.stdout + result.stderr


@pytest.fixture
def station(tmp_path: Path) -> Path:
    """A config whose state directory has lot LOT (attestation required)."""
    state_dir = tmp_path / "state"
    config = tmp_path / "factoryd.toml"
    config.write_text(f'[station]\nstate_dir = "{state_dir}"\n')
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"attestation": "required"}))
    code, out = _cli(config, "lots", "create", LOT, "--customer", "acme", "--profile-file", str(profile))
    assert code == 0, out
    return config


def test_cli_stores_parts_and_refuses_a_bad_manifest_whole(
    station: Path, tmp_path: Path, signer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> None:
    signer_pem = tmp_path / "signer.pem"
    signer_pem.write_bytes(signer[1].public_bytes(serialization.Encoding.PEM))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_manifest(signer, [_part(), _part()])))
    code, out = _cli(station, "lots", "parts", LOT, str(good), "--signer", str(signer_pem))
    assert code == 0, out
    assert "2 pre-registered parts" in out
    stored = tmp_path / "state" / "attestation" / LOT / "parts.json"
    before = stored.read_bytes()
    bad = tmp_path / "bad.json"
    entries = _manifest(signer, [_part()])
    entries[0]["signature"] = str(entries[0]["signature"])[:-4] + "AAAA"
    bad.write_text(json.dumps(entries))
    code, out = _cli(station, "lots", "parts", LOT, str(bad), "--signer", str(signer_pem))
    assert code != 0
    assert "refused, nothing stored" in out
    assert stored.read_bytes() == before


def test_cli_attestation_roots_are_validated_and_activation_asks_for_them(
    station: Path, tmp_path: Path
) -> None:
    code, out = _cli(station, "lots", "activate", LOT)
    assert code != 0
    assert "attestation roots" in out
    vendor = SimVendorCa.make()
    leaf = tmp_path / "leaf.pem"
    chain = vendor.provision(SimSecureElement()).attestation_chain
    leaf.write_bytes(x509.load_der_x509_certificate(chain[0]).public_bytes(serialization.Encoding.PEM))
    code, out = _cli(station, "lots", "attestation-roots", LOT, str(leaf))
    assert code != 0
    assert "not a CA certificate" in out
    assert not (tmp_path / "state" / "attestation" / LOT / "roots.pem").exists()
    roots = tmp_path / "roots.pem"
    roots.write_bytes(vendor.root_pem)
    code, out = _cli(station, "lots", "attestation-roots", LOT, str(roots))
    assert code == 0, out
    assert (tmp_path / "state" / "attestation" / LOT / "roots.pem").read_bytes() == vendor.root_pem


# The API (customer role) ---------------------------------------------------------------------------


async def test_customer_uploads_attestation_roots_refused_whole_when_bad(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        await api.make_lot("acme-att", "acme", profile=LotProfile(attestation="required"))
        await api.make_lot("globex-att", "globex", profile=LotProfile(attestation="required"))
        vendor = SimVendorCa.make()
        leaf = x509.load_der_x509_certificate(vendor.provision(SimSecureElement()).attestation_chain[0])
        where = api.ctx.paths.attestation / "acme-att" / "roots.pem"
        async with api.client("acme") as acme:
            leaf_pem = leaf.public_bytes(serialization.Encoding.PEM)
            bad = await acme.post("/lots/acme-att/attestation-roots", files={"roots": ("r.pem", leaf_pem)})
            assert bad.status_code == 422
            assert "not a CA certificate" in bad.json()["detail"]
            assert not where.exists()
            good = await acme.post(
                "/lots/acme-att/attestation-roots", files={"roots": ("r.pem", vendor.root_pem)}
            )
            assert good.status_code == 200, good.text
            assert good.json() == {"lot": "acme-att", "roots": [vendor.root_cert.subject.rfc4514_string()]}
            # Another customer's lot is not visible to this token.
            other = await acme.post(
                "/lots/globex-att/attestation-roots", files={"roots": ("r.pem", vendor.root_pem)}
            )
            assert other.status_code == 404
        assert where.read_bytes() == vendor.root_pem


# A real Microchip Trust&GO manifest entry (ATECC608C-TNGTLSU-B) and Microchip's published manifest signer
# certificates, as aws-iot-builder-tools/thingpress ships them in its test artifacts.
REAL = Path(__file__).parent / "data" / "parts"


def test_a_real_microchip_manifest_entry_verifies_against_microchips_signer() -> None:
    signers = [
        x509.load_pem_x509_certificate((REAL / name).read_bytes())
        for name in ("mchp-manifest-signer-4.crt", "mchp-manifest-signer-5.crt")
    ]
    data = (REAL / "mchp-ecc608c-tngtlsu-one-entry.json").read_bytes()
    parts = verify_parts_manifest(data, signers)
    assert set(parts) == {"0123f2408ea1fcf201"}
    part = parts["0123f2408ea1fcf201"]
    # The registered slot-0 key is the key of the chip's device certificate in the entry's x5c.
    payload = json.loads(_b64url(json.loads(data)[0]["payload"]))
    leaf = x509.load_der_x509_certificate(_b64(payload["publicKeySet"]["keys"][0]["x5c"][0]))
    leaf_key = leaf.public_key()
    assert isinstance(leaf_key, ec.EllipticCurvePublicKey)
    assert part.public_key == leaf_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    # Signed by Manifest Signer 005 only: with the older Log Signer 004 alone it is refused.
    with pytest.raises(PartsManifestError):
        verify_parts_manifest(data, signers[:1])


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


def test_the_device_certificate_in_an_entry_must_carry_its_key_and_chain_to_its_signer_ca(
    signer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    """The x5c check, with the real entry's device certificate and Microchip signer CA."""
    real = json.loads((REAL / "mchp-ecc608c-tngtlsu-one-entry.json").read_bytes())[0]
    x5c = json.loads(_b64url(real["payload"]))["publicKeySet"]["keys"][0]["x5c"]
    leaf_key = x509.load_der_x509_certificate(_b64(x5c[0])).public_key()
    assert isinstance(leaf_key, ec.EllipticCurvePublicKey)
    point = leaf_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    key, cert = signer
    serial = "0123f2408ea1fcf201"

    def manifest(entry_point: bytes, chain: list[str]) -> bytes:
        return json.dumps([sign_parts_entry(serial, entry_point, key, cert, x5c=chain)]).encode()

    assert verify_parts_manifest(manifest(point, x5c), [cert])[serial].public_key == point
    other = SimSecureElement()
    other.genkey(0)
    with pytest.raises(PartsManifestError, match="device certificate in x5c is not for the slot-0 key"):
        verify_parts_manifest(manifest(other.public_point(0), x5c), [cert])
    with pytest.raises(PartsManifestError, match=r"x5c: .* is not signed by"):
        verify_parts_manifest(manifest(point, [x5c[0], x5c[0]]), [cert])
    with pytest.raises(PartsManifestError, match="does not parse"):
        verify_parts_manifest(manifest(point, ["bm90IGEgY2VydA=="]), [cert])
