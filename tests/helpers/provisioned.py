"""Lots of provisioned devices made straight through the ledger (no boards): for exports and clouds."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factoryd.ledger import Ledger, LotProfile, LotState, ProvisionedDevice
from factoryd.pki import CertProfile, Issuer, SoftwareSigner
from factoryd.pki.testca import TestPki

ACTOR = "test"
STATION = "line1-st1"
# Readable IDs in tests; any character a cloud might refuse is allowed here so refusals can be tested.
TEST_ID_FORMAT = r"regex:[A-Za-z0-9:_.@#-]{1,128}"


def issuer_for(pki: TestPki) -> Issuer:
    """An issuer on the test PKI's issuing CA."""
    return Issuer(SoftwareSigner(pki.issuing_key, pki.issuing_cert), [pki.issuing_cert], CertProfile())


def provision_lot(
    ledger: Ledger, lot: str, ids: Sequence[str], pki: TestPki, *, customer: str = "acme"
) -> list[ProvisionedDevice]:
    """Create an active lot with ``ids`` and provision every one (one shared device key: cheap)."""
    ledger.create_lot(
        lot,
        customer=customer,
        profile=LotProfile(id_format=TEST_ID_FORMAT),
        target_quantity=None,
        actor=ACTOR,
    )
    ledger.import_ids(lot, "".join(f"{i}\n" for i in ids).encode(), fmt="txt", actor=ACTOR)
    ledger.set_lot_state(lot, LotState.ACTIVE, actor=ACTOR)
    issuer = issuer_for(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    for n, _ in enumerate(ids):
        serial = f"{lot}-se{n:06d}"
        reservation = ledger.reserve(
            lot, serial, station=STATION, port=str(n % 16 + 1), job_id=None, actor=ACTOR
        )
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, reservation.device_id)]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )
        issued = issuer.issue(issuer.verify_csr(csr, reservation.device_id), reservation.device_id)
        ledger.mark_provisioned(
            lot,
            reservation.device_id,
            serial,
            cert_der=issued.der,
            cert_serial=issued.serial_hex,
            fingerprint_sha256=issued.fingerprint_sha256,
            station=STATION,
            port=str(n % 16 + 1),
            actor=ACTOR,
        )
    return ledger.provisioned_devices(lot)
