"""The lot CA key in a PKCS#11 token (HSM, smart card; SoftHSM in tests): a ``Signer`` and token access.

The key never leaves the token: certificates are built by cryptography with a throwaway key of
the same type (so the TBSCertificate carries the right signatureAlgorithm), the TBS bytes are
signed on the token, the signature BIT STRING is replaced (``der``) and the result is verified
with the CA certificate's key before it is returned. Manifests reuse ``sign_bytes`` (see
``manifest.sign_detached``).

A lot whose bundle directory holds ``pkcs11.json`` (module, token label, key label; never the
PIN) instead of ``ca-key.pem`` issues through the token (``open_token_lot``). The PIN comes from
systemd credential ``factoryd-pkcs11-pin`` or env ``FACTORYD_PKCS11_PIN``. Moving a software key
into a token is ``keyimport``.

PKCS#11 login state is per process and token, and a session is not thread-safe: this module keeps
one logged-in session per (module, token) for the whole process and serialises calls on it with
a lock. Every call blocks (a network HSM may take milliseconds): run it off the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from factoryd.errors import SignerError
from factoryd.pki import der
from factoryd.pki.bundle import device_chain_pem
from factoryd.pki.challenge import raw_to_der_signature
from factoryd.pki.passphrase import Secret, load_secret
from factoryd.pki.signer import CaPrivateKey, CaPublicKey, hash_for_key, key_problem
from factoryd.pki.store import ANCHORS_FILE, CHAIN_FILE

try:
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11 import exceptions as p11_errors
except ImportError:  # pragma: no cover - the optional extra is not installed
    HAVE_PKCS11 = False
else:
    HAVE_PKCS11 = True

log = structlog.get_logger(__name__)

REFERENCE_FILE = "pkcs11.json"
REFERENCE_VERSION = 1
# A reference file is a few hundred bytes; a bigger one is not ours.
MAX_REFERENCE_BYTES = 4096
DEFAULT_PIN_CREDENTIAL = "factoryd-pkcs11-pin"
DEFAULT_PIN_ENV = "FACTORYD_PKCS11_PIN"
# CK_TOKEN_INFO.label is 32 bytes, blank-padded.
MAX_TOKEN_LABEL_BYTES = 32
MAX_KEY_LABEL_CHARS = 128
# Printable, no control characters: labels end up in logs and error messages.
LABEL_RE = re.compile(r"[\x20-\x7e]+")
# A deliberately failing sign must not hide behind a stale session: one reconnect, then give up.
RECONNECT_ATTEMPTS = 1
SELF_TEST_BYTES = 32
# Size of the throwaway RSA key that gives cryptography the certificate structure (never used to sign
# anything that leaves this module).
THROWAWAY_RSA_BITS = 2048
_REFERENCE_FIELDS = {"version", "module_path", "token_label", "key_label", "key_id", "ca_sha256"}

T = TypeVar("T")


def require_library() -> None:
    """Raise SignerError naming the extra to install when python-pkcs11 is missing."""
    if not HAVE_PKCS11:
        raise SignerError("python-pkcs11 is not installed; install the extra: pip install 'factoryd[pkcs11]'")


def load_pkcs11_pin(name: str = DEFAULT_PIN_CREDENTIAL, env: str = DEFAULT_PIN_ENV) -> Secret:
    """Read the token user PIN from ``$CREDENTIALS_DIRECTORY/<name>``, else from env var ``env``."""
    return load_secret(name, env, what="PKCS#11 PIN")


def check_label(what: str, value: str, max_bytes: int) -> None:
    """Refuse a token or key label that is empty, not printable ASCII, or too long."""
    if not isinstance(value, str) or not LABEL_RE.fullmatch(value):
        raise SignerError(f"{what} must be non-empty printable ASCII, got {value!r}")
    if len(value.encode()) > max_bytes:
        raise SignerError(f"{what} {value!r} is longer than {max_bytes} characters")


def _pin_text(pin: Secret) -> str:
    if not pin:
        raise SignerError("the PKCS#11 PIN is empty")
    try:
        return bytes(pin).decode("utf-8")
    except UnicodeDecodeError:
        raise SignerError("the PKCS#11 PIN is not valid UTF-8") from None


@dataclass(frozen=True)
class TokenReference:
    """What ``pkcs11.json`` in a lot directory says: where the CA key lives (never the PIN)."""

    module_path: str
    token_label: str
    key_label: str
    key_id: bytes
    ca_sha256: str  # hex SHA-256 of the CA certificate DER the key belongs to

    def to_json(self) -> bytes:
        """The file content (sorted keys, one trailing newline)."""
        document = {
            "version": REFERENCE_VERSION,
            "module_path": self.module_path,
            "token_label": self.token_label,
            "key_label": self.key_label,
            "key_id": self.key_id.hex(),
            "ca_sha256": self.ca_sha256,
        }
        return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def parse(cls, data: bytes, where: str = REFERENCE_FILE) -> TokenReference:
        """Parse and check a reference file, naming the offending field."""
        if len(data) > MAX_REFERENCE_BYTES:
            raise SignerError(f"{where}: larger than {MAX_REFERENCE_BYTES} bytes")
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SignerError(f"{where}: not JSON ({exc})") from None
        if not isinstance(document, dict):
            raise SignerError(f"{where}: expected a JSON object")
        if any("pin" in str(key).lower() for key in document):
            # Never print the value: it may be the PIN someone pasted in.
            raise SignerError(f"{where}: must not hold a PIN (use credential {DEFAULT_PIN_CREDENTIAL!r})")
        missing = sorted(_REFERENCE_FIELDS - document.keys())
        unknown = sorted(document.keys() - _REFERENCE_FIELDS)
        if missing or unknown:
            raise SignerError(f"{where}: missing fields {missing}, unknown fields {unknown}")
        if document["version"] != REFERENCE_VERSION:
            raise SignerError(
                f"{where}: field version must be {REFERENCE_VERSION}, got {document['version']!r}"
            )
        for name in ("module_path", "token_label", "key_label", "key_id", "ca_sha256"):
            if not isinstance(document[name], str) or not document[name]:
                raise SignerError(f"{where}: field {name} must be a non-empty string")
        if not Path(document["module_path"]).is_absolute():
            raise SignerError(f"{where}: field module_path must be an absolute path")
        if not re.fullmatch(r"[0-9a-f]{64}", document["ca_sha256"]):
            raise SignerError(f"{where}: field ca_sha256 must be 64 lowercase hex digits")
        try:
            key_id = bytes.fromhex(document["key_id"])
        except ValueError:
            raise SignerError(f"{where}: field key_id must be hex") from None
        check_label(f"{where}: field token_label", document["token_label"], MAX_TOKEN_LABEL_BYTES)
        check_label(f"{where}: field key_label", document["key_label"], MAX_KEY_LABEL_CHARS)
        return cls(
            module_path=document["module_path"],
            token_label=document["token_label"],
            key_label=document["key_label"],
            key_id=key_id,
            ca_sha256=document["ca_sha256"],
        )


# --- one logged-in session per (module, token) per process ------------------------------------------

_libraries: dict[str, Any] = {}
_connections: dict[tuple[str, str], TokenConnection] = {}
_registry_lock = threading.Lock()
# PINs are compared through an HMAC under a per-process key, so no PIN copy stays in the registry.
_PIN_MAC_KEY = secrets.token_bytes(32)


def _pin_mac(pin: Secret) -> bytes:
    return hmac.new(_PIN_MAC_KEY, bytes(pin), hashlib.sha256).digest()


def _library(module_path: str) -> Any:
    library = _libraries.get(module_path)
    if library is None:
        if not Path(module_path).is_file():
            raise SignerError(f"PKCS#11 module {module_path} does not exist")
        try:
            library = pkcs11.lib(module_path)
        except p11_errors.PKCS11Error as exc:
            raise SignerError(f"cannot load PKCS#11 module {module_path}: {type(exc).__name__}") from None
        _libraries[module_path] = library
    return library


def reload_module(module_path: str) -> None:
    """Close the module's token sessions and re-initialise it, so it reads its configuration again.

    A PKCS#11 module reads its configuration (SoftHSM: ``SOFTHSM2_CONF``) once per process, in
    C_Initialize, whoever loaded it first: a process that must see another token directory (the test
    suite, a replaced token) calls this.
    """
    with _registry_lock:
        for key in [key for key in _connections if key[0] == module_path]:
            _connections.pop(key).close()
    library = _library(module_path)
    try:
        library.reinitialize()
    except p11_errors.PKCS11Error as exc:
        raise SignerError(
            f"cannot re-initialise PKCS#11 module {module_path}: {type(exc).__name__}"
        ) from None


def _describe(exc: BaseException, token_label: str) -> str:
    """A message for a token failure; python-pkcs11 exceptions never carry the PIN."""
    where = f"PKCS#11 token {token_label!r}"
    if isinstance(exc, p11_errors.PinIncorrect):
        return f"{where}: wrong PIN (CKR_PIN_INCORRECT); check credential {DEFAULT_PIN_CREDENTIAL!r}"
    if isinstance(exc, p11_errors.PinLocked):
        return f"{where}: the user PIN is locked (too many wrong PINs); the security officer must reset it"
    if isinstance(exc, p11_errors.PinExpired):
        return f"{where}: the user PIN has expired"
    if isinstance(exc, p11_errors.PinInvalid | p11_errors.PinLenRange):
        return f"{where}: the PIN has characters or a length the token does not accept"
    if isinstance(exc, p11_errors.NoSuchToken):
        return f"no PKCS#11 token labelled {token_label!r} (is it plugged in and initialised?)"
    if isinstance(exc, p11_errors.MultipleTokensReturned):
        return f"several PKCS#11 tokens are labelled {token_label!r}; labels must be unique"
    detail = str(exc).strip()
    return f"{where}: {type(exc).__name__}" + (f" ({detail})" if detail else "")


class TokenConnection:
    """One logged-in session on one token, shared by the signers of this process, used under a lock."""

    def __init__(self, module_path: str, token_label: str, pin: Secret) -> None:
        self.module_path = module_path
        self.token_label = token_label
        self.pin_mac = _pin_mac(pin)
        self.users = 0
        self.lock = threading.Lock()
        self._pin = pin
        self._session: Any = None
        self._open()

    def _open(self) -> None:
        library = _library(self.module_path)
        try:
            token = library.get_token(token_label=self.token_label)
            try:
                # RW: the import path creates objects; login state is per token and process anyway.
                self._session = token.open(rw=True, user_pin=_pin_text(self._pin))
            except p11_errors.UserAlreadyLoggedIn:
                # Another library user in this process already logged this token in.
                self._session = token.open(rw=True)
        except p11_errors.PKCS11Error as exc:
            raise SignerError(_describe(exc, self.token_label)) from None

    def close(self) -> None:
        """Close the session (the token logs out when its last session closes)."""
        with self.lock:
            if self._session is not None:
                with contextlib.suppress(p11_errors.PKCS11Error):
                    self._session.close()
                self._session = None

    def run(self, action: Callable[[Any], T]) -> T:
        """Run ``action(session)`` under the lock; reconnect once if the session went stale."""
        with self.lock:
            for attempt in range(RECONNECT_ATTEMPTS + 1):
                try:
                    if self._session is None:
                        self._open()
                    return action(self._session)
                except (
                    p11_errors.SessionHandleInvalid,
                    p11_errors.SessionClosed,
                    p11_errors.UserNotLoggedIn,
                    p11_errors.DeviceRemoved,
                    p11_errors.TokenNotPresent,
                ) as exc:
                    log.warning(
                        "pkcs11_session_lost",
                        token=self.token_label,
                        error=type(exc).__name__,
                        attempt=attempt,
                    )
                    self._session = None
                    if attempt == RECONNECT_ATTEMPTS:
                        raise SignerError(_describe(exc, self.token_label)) from None
                except p11_errors.PKCS11Error as exc:
                    raise SignerError(_describe(exc, self.token_label)) from None
        raise SignerError(f"PKCS#11 token {self.token_label!r}: unreachable")  # pragma: no cover


def _connect(module_path: str, token_label: str, pin: Secret) -> TokenConnection:
    require_library()
    check_label("token label", token_label, MAX_TOKEN_LABEL_BYTES)
    _pin_text(pin)
    key = (module_path, token_label)
    with _registry_lock:
        connection = _connections.get(key)
        if connection is None:
            connection = TokenConnection(module_path, token_label, pin)
            _connections[key] = connection
        elif not hmac.compare_digest(connection.pin_mac, _pin_mac(pin)):
            # The token is already logged in for this process, so the module cannot check the PIN.
            raise SignerError(
                f"PKCS#11 token {token_label!r}: wrong PIN (differs from the PIN this process logged in with)"
            )
        connection.users += 1
        return connection


def _release(connection: TokenConnection) -> None:
    with _registry_lock:
        connection.users -= 1
        if connection.users > 0:
            return
        _connections.pop((connection.module_path, connection.token_label), None)
    connection.close()


@contextlib.contextmanager
def open_token(module_path: str, token_label: str, pin: Secret) -> Iterator[TokenConnection]:
    """This process's logged-in session on a token, shared with its signers, for one block (blocking)."""
    connection = _connect(module_path, token_label, pin)
    try:
        yield connection
    finally:
        _release(connection)


# --- the signer ---------------------------------------------------------------------------------------


def _signature_size(public_key: ec.EllipticCurvePublicKey) -> int:
    return (public_key.curve.key_size + 7) // 8


def _verify(public_key: CaPublicKey, signature: bytes, data: bytes) -> bool:
    algorithm = hash_for_key(public_key)
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(algorithm))
        else:
            public_key.verify(signature, data, padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        return False
    return True


def replace_certificate_signature(certificate_der: bytes, signature: bytes) -> bytes:
    """The Certificate DER with its signatureValue BIT STRING replaced by ``signature``."""
    outer = der.expect(der.read_single(certificate_der), der.TAG_SEQUENCE, "Certificate")
    parts = outer.children()
    if len(parts) != 3:
        raise der.DerError(f"Certificate has {len(parts)} elements, expected 3")
    der.expect(parts[0], der.TAG_SEQUENCE, "tbsCertificate")
    der.expect(parts[1], der.TAG_SEQUENCE, "signatureAlgorithm")
    der.expect(parts[2], der.TAG_BIT_STRING, "signatureValue")
    # A signature is a whole number of bytes: no unused bits.
    bit_string = der.encode(der.TAG_BIT_STRING, b"\x00" + signature)
    return der.encode(der.TAG_SEQUENCE, parts[0].raw + parts[1].raw + bit_string)


class Pkcs11Signer:
    """A Signer whose CA key (EC P-256/P-384 or RSA >= 2048) stays in a PKCS#11 token."""

    # Each signature is a round trip to the token (milliseconds on a network HSM): off the event loop.
    blocking = True

    def __init__(
        self,
        module_path: str,
        token_label: str,
        key_label: str,
        pin: Secret,
        certificate: x509.Certificate,
        *,
        key_id: bytes | None = None,
    ) -> None:
        require_library()
        public_key = certificate.public_key()
        problem = key_problem(public_key)
        if problem or not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise SignerError(problem or "unsupported CA key type")
        check_label("key label", key_label, MAX_KEY_LABEL_CHARS)
        self._certificate = certificate
        self._public_key: CaPublicKey = public_key
        self._algorithm = hash_for_key(public_key)
        self._key_label = key_label
        self._key_id = key_id
        self._throwaway: CaPrivateKey
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            self._key_type = "EC"
            self._throwaway = ec.generate_private_key(public_key.curve)
        else:
            self._key_type = "RSA"
            self._throwaway = rsa.generate_private_key(65537, THROWAWAY_RSA_BITS)
        self._connection: TokenConnection | None = _connect(module_path, token_label, pin)
        try:
            self._check_key()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        connection = self._connection
        token = connection.token_label if connection else "closed"
        return (
            f"Pkcs11Signer(token={token!r}, key={self._key_label!r}, "
            f"subject={self._certificate.subject.rfc4514_string()!r})"
        )

    def __enter__(self) -> Pkcs11Signer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release this signer's share of the token session (idempotent)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            _release(connection)

    @property
    def certificate(self) -> x509.Certificate:
        """The issuing CA certificate."""
        return self._certificate

    @property
    def public_key(self) -> CaPublicKey:
        """The CA public key."""
        return self._public_key

    def _run(self, action: Callable[[Any], T]) -> T:
        if self._connection is None:
            raise SignerError(f"PKCS#11 signer for key {self._key_label!r} is closed")
        return self._connection.run(action)

    def _find_key(self, session: Any) -> Any:
        try:
            return session.get_key(
                object_class=ObjectClass.PRIVATE_KEY, label=self._key_label, id=self._key_id
            )
        except p11_errors.NoSuchKey:
            raise SignerError(
                f"PKCS#11 token has no private key labelled {self._key_label!r}"
                + (f" with id {self._key_id.hex()}" if self._key_id else "")
            ) from None
        except p11_errors.MultipleObjectsReturned:
            raise SignerError(
                f"PKCS#11 token has several private keys labelled {self._key_label!r}; "
                "give the key id (key_id) to choose one"
            ) from None

    def _check_key(self) -> None:
        def key_type(session: Any) -> Any:
            return self._find_key(session)[Attribute.KEY_TYPE]

        found = self._run(key_type)
        expected = KeyType.EC if self._key_type == "EC" else KeyType.RSA
        if found != expected:
            raise SignerError(
                f"PKCS#11 key {self._key_label!r} is {getattr(found, 'name', found)}, "
                f"but the CA certificate holds an {self._key_type} key"
            )
        probe = secrets.token_bytes(SELF_TEST_BYTES)
        if not _verify(self._public_key, self._sign(probe), probe):
            raise SignerError(
                f"PKCS#11 key {self._key_label!r} does not match the CA certificate "
                f"{self._certificate.subject.rfc4514_string()!r}"
            )

    def key_attributes(self) -> dict[str, bool]:
        """The token key's protection flags (sensitive, extractable, always_sensitive, never_extractable)."""
        names = {
            "sensitive": Attribute.SENSITIVE,
            "extractable": Attribute.EXTRACTABLE,
            "always_sensitive": Attribute.ALWAYS_SENSITIVE,
            "never_extractable": Attribute.NEVER_EXTRACTABLE,
        }

        def read(session: Any) -> dict[str, bool]:
            key = self._find_key(session)
            return {name: bool(key[attribute]) for name, attribute in names.items()}

        return self._run(read)

    def _sign(self, data: bytes) -> bytes:
        """Token signature over ``data``: ECDSA as DER, RSA PKCS#1 v1.5; not yet verified."""
        if isinstance(self._public_key, ec.EllipticCurvePublicKey):
            digest = hashes.Hash(self._algorithm)
            digest.update(data)
            to_sign, mechanism = digest.finalize(), Mechanism.ECDSA
        else:
            to_sign, mechanism = data, Mechanism.SHA256_RSA_PKCS

        def sign(session: Any) -> bytes:
            return bytes(self._find_key(session).sign(to_sign, mechanism=mechanism))

        raw = self._run(sign)
        if isinstance(self._public_key, ec.EllipticCurvePublicKey):
            try:
                return raw_to_der_signature(raw, _signature_size(self._public_key))
            except ValueError as exc:
                raise SignerError(f"PKCS#11 token returned a malformed ECDSA signature: {exc}") from None
        return raw

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign a fully populated certificate builder on the token; verified before it is returned."""
        try:
            template = builder.sign(self._throwaway, self._algorithm)
        except (ValueError, TypeError) as exc:
            raise SignerError(f"signing the certificate failed: {exc}") from exc
        signature = self._sign(template.tbs_certificate_bytes)
        try:
            certificate = x509.load_der_x509_certificate(
                replace_certificate_signature(template.public_bytes(serialization.Encoding.DER), signature)
            )
        except ValueError as exc:
            raise SignerError(f"assembling the token-signed certificate failed: {exc}") from None
        if not _verify(self._public_key, certificate.signature, certificate.tbs_certificate_bytes):
            raise SignerError(
                "the token's signature on the certificate does not verify with the CA certificate's key"
            )
        return certificate

    def sign_bytes(self, data: bytes) -> bytes:
        """Sign ``data`` (ECDSA DER or RSA PKCS#1 v1.5, digest from ``hash_for_key``); verified."""
        signature = self._sign(data)
        if not _verify(self._public_key, signature, data):
            raise SignerError("the token's signature does not verify with the CA certificate's key")
        return signature


# --- lots whose key is in a token ---------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class TokenLot:
    """A lot bundle whose CA key is in a token: the signer, the chain and the device trust anchors."""

    signer: Pkcs11Signer
    reference: TokenReference
    chain: tuple[x509.Certificate, ...]
    trust_anchors: tuple[x509.Certificate, ...]

    def __repr__(self) -> str:
        return f"TokenLot({self.signer!r})"

    @property
    def chain_pem(self) -> bytes:
        """What the device gets as CA chain (as ``bundle.chain_pem``): chain, then anchors, no repeats."""
        return device_chain_pem(self.chain, self.trust_anchors)


def read_certificates(path: Path, what: str) -> tuple[x509.Certificate, ...]:
    """The PEM certificates in ``path`` (SignerError naming ``what`` when missing or corrupt)."""
    try:
        data = path.read_bytes()
        return tuple(x509.load_pem_x509_certificates(data)) if data.strip() else ()
    except FileNotFoundError:
        raise SignerError(f"{what} {path} is missing") from None
    except ValueError as exc:
        raise SignerError(f"{what} {path} is corrupt: {exc}") from None


def certificate_sha256(certificate: x509.Certificate) -> str:
    """Hex SHA-256 of the certificate's DER (``ca_sha256`` in the reference file)."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def open_token_lot(directory: Path, *, pin: Secret | None = None) -> TokenLot | None:
    """Open the token signer of a lot directory holding ``pkcs11.json``; None when it has none (blocking)."""
    path = directory / REFERENCE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    reference = TokenReference.parse(data, str(path))
    chain = read_certificates(directory / CHAIN_FILE, "CA chain file")
    anchors = (
        read_certificates(directory / ANCHORS_FILE, "trust anchor file")
        if (directory / ANCHORS_FILE).exists()
        else ()
    )
    if not chain:
        raise SignerError(f"CA chain file {directory / CHAIN_FILE} holds no certificate")
    if certificate_sha256(chain[0]) != reference.ca_sha256:
        raise SignerError(f"{path}: ca_sha256 does not match the CA certificate in {CHAIN_FILE}")
    signer = Pkcs11Signer(
        reference.module_path,
        reference.token_label,
        reference.key_label,
        pin if pin is not None else load_pkcs11_pin(),
        chain[0],
        key_id=reference.key_id,
    )
    return TokenLot(signer, reference, chain, anchors)
