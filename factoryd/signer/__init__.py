"""The line's signing service (``factoryd signer``): one place holds the lots' CA keys.

Stations send the board's CSR and the facts of its reservation over HTTPS with mutual TLS; the
signer checks them against the shared ledger (``ledger/issuance.py``) and the CSR itself with the
station's own rules, signs with the lot's CA (software key or PKCS#11 token), and records the
certificate and its audit entry in one transaction. ``docs/signer.md`` is the operator's guide.
"""
