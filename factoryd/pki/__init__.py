"""Customer CA bundles, device certificate issuing, challenge checks and the signed manifest.

Module map: ``bundle`` (upload parsing/validation), ``store`` (at rest), ``passphrase``
(station secret), ``signer`` (who holds the CA key), ``profile`` + ``issuer`` (device
certificates), ``arduino`` (the sketch's compressed form), ``challenge``, ``manifest``,
``testca`` (generated PKI for demo/tests), ``bench``, ``der`` (minimal DER codec).
"""

from factoryd.pki.arduino import (
    ArduinoCertFields,
    arduino_compressed_fields,
    arduino_pack_dates,
    arduino_reconstruct_certificate,
    arduino_unpack_dates,
    public_key_raw64,
)
from factoryd.pki.bundle import (
    MAX_BUNDLE_BYTES,
    CaBundle,
    chain_pem,
    load_pem_bundle,
    load_pkcs12_bundle,
    validate_bundle,
)
from factoryd.pki.challenge import der_to_raw_signature, raw_to_der_signature, verify_challenge
from factoryd.pki.issuer import IssuedCertificate, Issuer, verify_csr
from factoryd.pki.manifest import (
    ManifestError,
    ManifestRecord,
    SignedManifest,
    build_manifest,
    verify_manifest,
)
from factoryd.pki.passphrase import Secret, load_passphrase
from factoryd.pki.profile import ARDUINO_ISSUER, CertProfile, ProfileKind
from factoryd.pki.signer import Signer, SoftwareSigner
from factoryd.pki.store import BundleStore

__all__ = [
    "ARDUINO_ISSUER",
    "MAX_BUNDLE_BYTES",
    "ArduinoCertFields",
    "BundleStore",
    "CaBundle",
    "CertProfile",
    "IssuedCertificate",
    "Issuer",
    "ManifestError",
    "ManifestRecord",
    "ProfileKind",
    "Secret",
    "SignedManifest",
    "Signer",
    "SoftwareSigner",
    "arduino_compressed_fields",
    "arduino_pack_dates",
    "arduino_reconstruct_certificate",
    "arduino_unpack_dates",
    "build_manifest",
    "chain_pem",
    "der_to_raw_signature",
    "load_passphrase",
    "load_pem_bundle",
    "load_pkcs12_bundle",
    "public_key_raw64",
    "raw_to_der_signature",
    "validate_bundle",
    "verify_challenge",
    "verify_csr",
    "verify_manifest",
]
