"""How many CSRs per second one station can verify and turn into certificates."""

from __future__ import annotations

import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factoryd.pki.bundle import load_pkcs12_bundle
from factoryd.pki.issuer import Issuer
from factoryd.pki.profile import CertProfile, ProfileKind
from factoryd.pki.testca import make_test_pki

# Protects only the throwaway key of a throwaway test PKI.
_BENCH_PASSPHRASE = b"factoryd-bench"


def run_pki_bench(n: int, *, profile_kind: ProfileKind = "factoryd-v1") -> dict[str, Any]:
    """Time ``n`` CSR verifications plus issues (CSRs are generated beforehand, outside the timing)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    pki = make_test_pki(profile_kind=profile_kind, passphrase=_BENCH_PASSPHRASE)
    profile = CertProfile(kind=profile_kind)
    bundle = load_pkcs12_bundle(pki.pkcs12, pki.passphrase, profile=profile)
    issuer = Issuer(bundle.signer(), bundle.chain, profile)
    requests: list[tuple[str, bytes]] = []
    for index in range(n):
        device_id = f"00000000-0000-4000-8000-{index:012d}"
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .sign(key, hashes.SHA256())
        )
        requests.append((device_id, csr.public_bytes(serialization.Encoding.DER)))
    started = time.perf_counter()
    for device_id, csr_der in requests:
        issuer.issue(issuer.verify_csr(csr_der, device_id), device_id)
    elapsed_s = time.perf_counter() - started
    return {
        "n": n,
        "profile": profile_kind,
        "elapsed_s": round(elapsed_s, 6),
        "per_second": round(n / elapsed_s, 1) if elapsed_s > 0 else float("inf"),
        "mean_ms": round(1000 * elapsed_s / n, 3),
    }
