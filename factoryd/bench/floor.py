"""The floor of `factoryd bench overhead`: the essential per-board work, done directly.

Per board a station cannot avoid: verifying the CSR (parse, proof-of-possession signature,
subject, key type), issuing the device certificate (the same extensions the issuer puts in, signed
with a P-256 CA key), verifying the challenge signature with the issued certificate's key, and the
durable ledger writes, here as plain ``sqlite3`` transactions in WAL mode with
``synchronous=FULL`` (one INSERT each), as many as the daemon commits per board in the same run.
Everything the board does (key generation, CSR and challenge signing) is prepared beforehand and
not counted. No factoryd code runs inside the measured loop.
"""

from __future__ import annotations

import datetime as dt
import secrets
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The challenge the station sends (jobs/board.py CHALLENGE_BYTES).
CHALLENGE_BYTES = 32
P256_COORDINATE_BYTES = 32
# A row about the size of the daemon's audit entries (canonical JSON details, two hashes).
ROW_BYTES = 400
DEVICE_VALIDITY_DAYS = 365


@dataclass(frozen=True, slots=True)
class BoardWork:
    """What one simulated board hands the station: its CSR, a challenge and its signature."""

    common_name: str
    csr_der: bytes
    challenge: bytes
    signature_raw: bytes


def _prepare(boards: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, list[BoardWork]]:
    """A P-256 CA and every board's CSR and signed challenge (the boards' work: not measured)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "floor CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    work = []
    for index in range(boards):
        key = ec.generate_private_key(ec.SECP256R1())
        cn = f"floor-device-{index:06d}"
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .sign(key, hashes.SHA256())
        )
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        r, s = decode_dss_signature(key.sign(challenge, ec.ECDSA(hashes.SHA256())))
        raw = r.to_bytes(P256_COORDINATE_BYTES, "big") + s.to_bytes(P256_COORDINATE_BYTES, "big")
        work.append(BoardWork(cn, csr.public_bytes(Encoding.DER), challenge, raw))
    return ca_key, ca, work


def _open_db(path: Path) -> sqlite3.Connection:
    """A SQLite database as the ledger opens it: WAL, synchronous=FULL, explicit transactions."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    return db


def run_floor(boards: int, transactions_per_board: int) -> dict[str, Any]:
    """Measure the floor's CPU for ``boards`` boards; ms per board split into crypto and ledger."""
    ca_key, ca, work = _prepare(boards)
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
        ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    )
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    body = "x" * ROW_BYTES
    with tempfile.TemporaryDirectory(prefix="factoryd-floor-") as tmp:
        db = _open_db(Path(tmp) / "floor.db")
        try:
            crypto_s = 0.0
            ledger_s = 0.0
            cpu_started = time.process_time()
            for board in work:
                t0 = time.process_time()
                # CSR: parse, proof of possession, subject, key type.
                csr = x509.load_der_x509_csr(board.csr_der)
                if not csr.is_signature_valid:
                    raise RuntimeError("floor CSR does not verify")
                cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
                public = csr.public_key()
                if cn != board.common_name or not isinstance(public, ec.EllipticCurvePublicKey):
                    raise RuntimeError("floor CSR has the wrong subject or key")
                now = dt.datetime.now(dt.UTC)
                cert = (
                    x509.CertificateBuilder()
                    .subject_name(csr.subject)
                    .issuer_name(ca.subject)
                    .public_key(public)
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now)
                    .not_valid_after(now + dt.timedelta(days=DEVICE_VALIDITY_DAYS))
                    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                    .add_extension(usage, critical=True)
                    .add_extension(eku, critical=False)
                    .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
                    .add_extension(aki, critical=False)
                    .sign(ca_key, hashes.SHA256())
                )
                half = P256_COORDINATE_BYTES
                der_signature = encode_dss_signature(
                    int.from_bytes(board.signature_raw[:half], "big"),
                    int.from_bytes(board.signature_raw[half:], "big"),
                )
                cert_key = cert.public_key()
                if not isinstance(cert_key, ec.EllipticCurvePublicKey):
                    raise TypeError("floor certificate key is not EC")
                cert_key.verify(der_signature, board.challenge, ec.ECDSA(hashes.SHA256()))
                t1 = time.process_time()
                for _ in range(transactions_per_board):
                    db.execute("BEGIN IMMEDIATE")
                    db.execute("INSERT INTO t (body) VALUES (?)", (body,))
                    db.execute("COMMIT")
                t2 = time.process_time()
                crypto_s += t1 - t0
                ledger_s += t2 - t1
            cpu_s = time.process_time() - cpu_started
        finally:
            db.close()
    return {
        "boards": boards,
        "transactions_per_board": transactions_per_board,
        "floor_ms_per_board": round(cpu_s / boards * 1000, 3),
        "crypto_ms_per_board": round(crypto_s / boards * 1000, 3),
        "ledger_ms_per_board": round(ledger_s / boards * 1000, 3),
    }


class CommitCounter:
    """Counts the write transactions (BEGIN IMMEDIATE … COMMIT) every SQLite connection commits.

    Installed with :meth:`install` before the daemon opens its ledger: a SQLAlchemy ``connect``
    listener on every engine sets sqlite3's trace callback, which sees the hot path's statements
    too (they run on the driver cursor).
    """

    def __init__(self) -> None:
        """Start at zero."""
        self.commits = 0
        self._lock = threading.Lock()

    def install(self) -> None:
        """Trace every SQLite connection any engine opens from now on."""
        from sqlalchemy import event  # noqa: PLC0415
        from sqlalchemy.engine import Engine  # noqa: PLC0415

        event.listen(Engine, "connect", self._on_connect)

    def _on_connect(self, dbapi_connection: Any, _record: Any) -> None:
        if not isinstance(dbapi_connection, sqlite3.Connection):
            return
        writer = [False]

        def trace(statement: str) -> None:
            if statement.startswith("BEGIN IMMEDIATE"):
                writer[0] = True
            elif statement.startswith("COMMIT"):
                if writer[0]:
                    with self._lock:
                        self.commits += 1
                writer[0] = False
            elif statement.startswith("ROLLBACK"):
                writer[0] = False

        dbapi_connection.set_trace_callback(trace)
