"""Customer quotas: a JWS any JOSE library reads, checked against the lot's chain, refused whole if wrong."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws
from joserfc.jwk import ECKey

from factoryd.pki.testca import TestPki, make_ca_cert, make_test_pki
from factoryd.signer.errors import QuotaError, SigningRefusedError
from factoryd.signer.quota import QuotaStore, make_quota, verify_quota

LOT = "lot-q"
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def pki() -> TestPki:
    """A customer PKI: root (the customer keeps its key) and issuing CA (its key goes to the signer)."""
    return make_test_pki(passphrase=b"quota-test")


def _quota(pki: TestPki, *, lot: str = LOT, maximum: int = 5, days: int = 30) -> bytes:
    return make_quota(
        lot=lot,
        max_certificates=maximum,
        not_after=NOW + dt.timedelta(days=days),
        key=pki.root_key,
        certificate=pki.root_cert,
        now=NOW,
    )


def test_a_quota_verifies_with_an_independent_jose_library(pki: TestPki) -> None:
    token = _quota(pki)
    # joserfc, not our decoder, is the oracle: header, payload and ES256 signature as RFC 7515/7518 say.
    decoded = jws.deserialize_compact(
        token, ECKey.import_key(pki.root_cert.public_key()), algorithms=["ES256"]
    )
    assert decoded.protected["alg"] == "ES256"
    assert decoded.protected["typ"] == "factoryd-quota+jws"
    payload = json.loads(decoded.payload)
    assert payload["lot"] == LOT
    assert payload["max_certificates"] == 5
    quota = verify_quota(token, (pki.issuing_cert, pki.root_cert), lot=LOT)
    assert quota.max_certificates == 5
    assert quota.lot == LOT
    assert quota.not_after == NOW + dt.timedelta(days=30)


def test_a_quota_joserfc_signed_is_accepted(pki: TestPki) -> None:
    # The other direction: a customer's own JOSE tooling can make the quota.
    from factoryd.signer.quota import cert_sha256

    header = {"alg": "ES256", "typ": "factoryd-quota+jws", "x5t#S256": cert_sha256(pki.root_cert)}
    payload = {
        "v": 1,
        "quota_id": "q-joserfc",
        "lot": LOT,
        "max_certificates": 7,
        "not_after": (NOW + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "issued_at": NOW.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    token = jws.serialize_compact(header, json.dumps(payload).encode(), ECKey.import_key(pki.root_key))
    assert verify_quota(token.encode(), (pki.issuing_cert, pki.root_cert), lot=LOT).max_certificates == 7


def _tamper_payload(token: bytes, **changes: object) -> bytes:
    header, payload, signature = token.split(b".")
    data = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    data.update(changes)
    raw = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=")
    return b".".join([header, raw, signature])


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda t: _tamper_payload(t, max_certificates=500), "signature does not verify"),
        (lambda t: t[:-4] + (b"AAAA" if not t.endswith(b"AAAA") else b"BBBB"), "signature does not verify"),
        (lambda t: t.replace(b".", b"", 1), "compact JWS"),
        (lambda t: b"not a quota", "compact JWS"),
    ],
)
def test_a_tampered_quota_is_refused(pki: TestPki, mutate: object, expected: str) -> None:
    token = mutate(_quota(pki))  # type: ignore[operator]
    with pytest.raises(QuotaError, match=expected):
        verify_quota(token, (pki.issuing_cert, pki.root_cert), lot=LOT)


def test_a_quota_for_another_lot_is_refused(pki: TestPki) -> None:
    with pytest.raises(QuotaError, match="not 'lot-q'"):
        verify_quota(_quota(pki, lot="other-lot"), (pki.issuing_cert, pki.root_cert), lot=LOT)


def test_a_quota_signed_with_the_issuing_ca_key_bounds_nothing(pki: TestPki) -> None:
    # The signer holds the issuing CA's key: a quota it could make itself is refused.
    token = make_quota(
        lot=LOT,
        max_certificates=5,
        not_after=NOW + dt.timedelta(days=1),
        key=pki.issuing_key,
        certificate=pki.issuing_cert,
        now=NOW,
    )
    with pytest.raises(QuotaError, match="outside lot 'lot-q'"):
        verify_quota(token, (pki.issuing_cert, pki.root_cert), lot=LOT)
    with pytest.raises(QuotaError, match="issuing CA alone"):
        verify_quota(token, (pki.issuing_cert,), lot=LOT)


def test_a_quota_signed_by_a_stranger_is_refused(pki: TestPki) -> None:
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    stranger = make_ca_cert(
        pki.root_cert.subject, stranger_key, serial=7, not_before=NOW, not_after=NOW + dt.timedelta(days=9)
    )
    token = make_quota(
        lot=LOT,
        max_certificates=5,
        not_after=NOW + dt.timedelta(days=1),
        key=stranger_key,
        certificate=stranger,
    )
    with pytest.raises(QuotaError, match="outside lot"):
        verify_quota(token, (pki.issuing_cert, pki.root_cert), lot=LOT)


def test_the_store_refuses_expired_and_older_quotas_and_rechecks_the_file(
    pki: TestPki, tmp_path: Path
) -> None:
    store = QuotaStore(tmp_path / "quotas")
    chain = (pki.issuing_cert, pki.root_cert)
    assert store.current(LOT, chain, now=NOW) is None
    newer = make_quota(
        lot=LOT,
        max_certificates=9,
        not_after=NOW + dt.timedelta(days=3),
        key=pki.root_key,
        certificate=pki.root_cert,
        now=NOW,
    )
    store.install(LOT, newer, chain, now=NOW)
    assert oct(store.path(LOT).stat().st_mode & 0o777) == "0o600"
    older = make_quota(
        lot=LOT,
        max_certificates=99,
        not_after=NOW + dt.timedelta(days=3),
        key=pki.root_key,
        certificate=pki.root_cert,
        now=NOW - dt.timedelta(days=1),
    )
    with pytest.raises(QuotaError, match="older quota never replaces a newer one"):
        store.install(LOT, older, chain, now=NOW)
    assert store.current(LOT, chain, now=NOW).max_certificates == 9  # type: ignore[union-attr]
    with pytest.raises(QuotaError, match="expired"):
        store.install(LOT, newer, chain, now=NOW + dt.timedelta(days=4))
    # Expired in place: the signer refuses with a reason the station reports.
    with pytest.raises(SigningRefusedError) as expired:
        store.current(LOT, chain, now=NOW + dt.timedelta(days=4))
    assert expired.value.code == "quota_expired"
    # Changed on disk after it was installed: refused, never silently honoured.
    store.path(LOT).write_bytes(_tamper_payload(newer, max_certificates=10_000))
    with pytest.raises(SigningRefusedError) as tampered:
        store.current(LOT, chain, now=NOW)
    assert tampered.value.code == "quota_invalid"
    assert tampered.value.reason == "signer_quota_invalid"
