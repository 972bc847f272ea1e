"""The subject template is rendered once per board; a change of the device's fields renders anew (#20b)."""

from __future__ import annotations

from typing import Any
from unittest.mock import patch

from factoryd.ledger.profile import LotProfile
from factoryd.pki.issuer import IDENTITY_CACHE_MAX_ENTRIES
from factoryd.pki.template import SubjectTemplate
from factoryd.pki.testca import TestPki
from tests.test_pki_template import DEVICE_ID, _csr, _issuer, pki  # noqa: F401 - pytest fixture

TEMPLATE = LotProfile(subject="serialNumber={meta.sn}, CN=dev-{meta.sn}-{id}")


def _counting() -> tuple[list[str], Any]:
    """A patch of the template's render that records every call (device IDs, in order)."""
    calls: list[str] = []
    real = SubjectTemplate.render

    def render(self: SubjectTemplate, device_id: str, fields: Any = None) -> Any:
        calls.append(device_id)
        return real(self, device_id, fields)

    return calls, patch.object(SubjectTemplate, "render", render)


def test_one_render_per_board_and_a_new_one_when_fields_change(pki: TestPki) -> None:  # noqa: F811
    issuer = _issuer(pki, TEMPLATE)
    calls, counting = _counting()
    with counting:
        fields = {"sn": "A1"}
        common_name = issuer.common_name(DEVICE_ID, fields)
        assert common_name == f"dev-A1-{DEVICE_ID}"
        csr = issuer.verify_csr(_csr(common_name), DEVICE_ID, fields=fields)
        issued = issuer.issue(csr, DEVICE_ID, fields=dict(fields))
        assert issued.cert.subject.rfc4514_string() == f"CN=dev-A1-{DEVICE_ID},2.5.4.5=A1"
        assert calls == [DEVICE_ID]  # CN, CSR check and certificate: one render
        fields["sn"] = "B2"  # the caller's dict changed after the first render: not served stale
        assert issuer.common_name(DEVICE_ID, fields) == f"dev-B2-{DEVICE_ID}"
        assert calls == [DEVICE_ID, DEVICE_ID]


def test_the_cache_is_bounded(pki: TestPki) -> None:  # noqa: F811
    issuer = _issuer(pki, LotProfile())
    for index in range(IDENTITY_CACHE_MAX_ENTRIES + 10):
        issuer.common_name(f"{index:08x}-0000-4000-8000-000000000000")
    assert len(issuer._identities) == IDENTITY_CACHE_MAX_ENTRIES
