"""The one-off move of a lot's software CA key into a PKCS#11 token (``factoryd lots key-to-token``).

The key is written as a sensitive, non-extractable, sign-only private key object (with its public
half), proved by a signature on the token that verifies with the CA certificate, and only then
named in the lot's ``pkcs11.json``; the encrypted ``ca-key.pem`` is wiped last. Until that point a
failure leaves the token and the lot directory as they were. See docs/pkcs11.md.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from factoryd.errors import SignerError
from factoryd.files import fsync_dir, wipe, write_private
from factoryd.pki import der
from factoryd.pki.bundle import CaBundle
from factoryd.pki.passphrase import Secret
from factoryd.pki.pkcs11 import (
    MAX_KEY_LABEL_CHARS,
    REFERENCE_FILE,
    Pkcs11Signer,
    TokenReference,
    certificate_sha256,
    check_label,
    open_token,
    read_certificates,
    require_library,
)
from factoryd.pki.signer import CaPrivateKey, key_problem, spki_der
from factoryd.pki.store import CHAIN_FILE, KEY_FILE

# The optional extra may be missing: import_key_to_token then stops at require_library().
with contextlib.suppress(ImportError):
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11 import exceptions as p11_errors
    from pkcs11.util.ec import encode_named_curve_parameters

log = structlog.get_logger(__name__)

_CURVE_OIDS = {"secp256r1": "1.2.840.10045.3.1.7", "secp384r1": "1.3.132.0.34"}


def _key_templates(key: CaPrivateKey, label: str, key_id: bytes) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """PKCS#11 templates for the private key (sensitive, not extractable, sign only) and its public half."""
    common = {Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: key_id}
    private: dict[Any, Any] = {
        **common,
        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
    public: dict[Any, Any] = {
        **common,
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: True,
    }
    if isinstance(key, ec.EllipticCurvePrivateKey):
        params = encode_named_curve_parameters(_CURVE_OIDS[key.curve.name])
        size = (key.curve.key_size + 7) // 8
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        private |= {
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.EC_PARAMS: params,
            Attribute.VALUE: key.private_numbers().private_value.to_bytes(size, "big"),
        }
        public |= {
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.EC_PARAMS: params,
            Attribute.EC_POINT: der.encode(der.TAG_OCTET_STRING, point),
        }
        return private, public

    def big(value: int) -> bytes:
        return value.to_bytes((value.bit_length() + 7) // 8, "big")

    numbers = key.private_numbers()
    private |= {
        Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.MODULUS: big(numbers.public_numbers.n),
        Attribute.PUBLIC_EXPONENT: big(numbers.public_numbers.e),
        Attribute.PRIVATE_EXPONENT: big(numbers.d),
        Attribute.PRIME_1: big(numbers.p),
        Attribute.PRIME_2: big(numbers.q),
        Attribute.EXPONENT_1: big(numbers.dmp1),
        Attribute.EXPONENT_2: big(numbers.dmq1),
        Attribute.COEFFICIENT: big(numbers.iqmp),
    }
    public |= {
        Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.MODULUS: big(numbers.public_numbers.n),
        Attribute.PUBLIC_EXPONENT: big(numbers.public_numbers.e),
    }
    return private, public


def import_key_to_token(
    bundle: CaBundle,
    module_path: str,
    token_label: str,
    pin: Secret,
    key_label: str,
    *,
    lot_dir: Path,
    remove_software_key: bool = True,
) -> TokenReference:
    """Write the lot CA key into the token (sensitive, not extractable) and ``pkcs11.json`` into ``lot_dir``.

    ``lot_dir`` is the lot's saved bundle directory (``BundleStore.path(lot)``). With
    ``remove_software_key`` (the default) its encrypted ``ca-key.pem`` is overwritten and removed
    once the token key has signed and verified. Any failure before that leaves the token and the
    directory as they were.
    """
    require_library()
    problem = key_problem(bundle.private_key.public_key())
    if problem:
        raise SignerError(problem)
    check_label("key label", key_label, MAX_KEY_LABEL_CHARS)
    reference_path = lot_dir / REFERENCE_FILE
    if not lot_dir.is_dir():
        raise SignerError(f"lot directory {lot_dir} does not exist (save the bundle first)")
    if reference_path.exists():
        raise SignerError(f"{reference_path} exists: the lot's key is already in a token")
    chain = read_certificates(lot_dir / CHAIN_FILE, "CA chain file")
    if not chain or chain[0] != bundle.certificate:
        raise SignerError(f"{lot_dir / CHAIN_FILE} does not start with this bundle's CA certificate")
    if spki_der(bundle.private_key.public_key()) != spki_der(bundle.certificate):
        raise SignerError("CA private key does not match the CA certificate")
    key_id = x509.SubjectKeyIdentifier.from_public_key(bundle.private_key.public_key()).digest
    private_template, public_template = _key_templates(bundle.private_key, key_label, key_id)
    created: list[Any] = []

    def create(session: Any) -> None:
        for attributes, what in (
            ({Attribute.LABEL: key_label}, f"label {key_label!r}"),
            ({Attribute.ID: key_id}, f"id {key_id.hex()}"),
        ):
            if any(True for _ in session.get_objects(attributes)):
                raise SignerError(f"PKCS#11 token {token_label!r} already holds an object with {what}")
        created.append(session.create_object(private_template))
        created.append(session.create_object(public_template))

    def destroy(session: Any) -> None:
        for item in created:
            with contextlib.suppress(p11_errors.PKCS11Error):
                item.destroy()

    with open_token(module_path, token_label, pin) as token:
        try:
            token.run(create)
            with Pkcs11Signer(module_path, token_label, key_label, pin, bundle.certificate, key_id=key_id):
                pass  # the constructor's self-test signs on the token and verifies
            reference = TokenReference(
                module_path=module_path,
                token_label=token_label,
                key_label=key_label,
                key_id=key_id,
                ca_sha256=certificate_sha256(bundle.certificate),
            )
            _write_reference(reference_path, reference)
        except BaseException:
            if created:
                with contextlib.suppress(SignerError):
                    token.run(destroy)
            raise
    if remove_software_key and (lot_dir / KEY_FILE).exists():
        wipe(lot_dir / KEY_FILE)
        fsync_dir(lot_dir)
    log.info(
        "ca_key_imported_to_token",
        token=token_label,
        key_label=key_label,
        ca_subject=bundle.certificate.subject.rfc4514_string(),
        software_key_removed=remove_software_key,
    )
    return reference


def _write_reference(path: Path, reference: TokenReference) -> None:
    """Create ``pkcs11.json`` (never over an existing one); on failure no reference is left behind."""
    try:
        write_private(path, reference.to_json(), replace=False)
    except FileExistsError:
        raise SignerError(f"{path} exists: the lot's key is already in a token") from None
    except BaseException:
        path.unlink(missing_ok=True)  # linked, but the directory fsync failed: not durable, undo it
        raise
