"""The signer with the lot's CA key in a PKCS#11 token (SoftHSM2): a station provisions through it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from factoryd.ledger.issuance import open_issuance_ledger
from factoryd.ledger.testing import throwaway_postgres_database
from factoryd.pki.bundle import CaBundle
from factoryd.pki.keyimport import import_key_to_token
from factoryd.pki.passphrase import Secret
from factoryd.pki.pkcs11 import reload_module
from factoryd.pki.store import KEY_FILE
from factoryd.sim.hub import SimHub
from tests.helpers.signer import LOT, SignerProcess, make_signer_line, run_station

pytestmark = pytest.mark.postgres

SOFTHSM_UTIL = shutil.which("softhsm2-util")
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN = "factoryd-signer"
PIN = "271828-user"
SO_PIN = "so-pin-5678"
BOARDS = 4


@pytest.fixture
def softhsm(tmp_path: Path) -> Iterator[Path]:
    """A private SoftHSM2 token directory with one token; yields its config file."""
    if SOFTHSM_UTIL is None or not Path(MODULE).is_file():
        pytest.fail("SoftHSM2 is not installed: apt-get install -y softhsm2")
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(  # noqa: S603 - fixed argv
        [SOFTHSM_UTIL, "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", SO_PIN],
        check=True,
        capture_output=True,
        timeout=30,
        env=env,
    )
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    reload_module(MODULE)  # the module reads SOFTHSM2_CONF in C_Initialize only
    try:
        yield conf
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
        reload_module(MODULE)


async def test_a_token_backed_signer_signs_for_a_station(softhsm: Path, tmp_path: Path) -> None:
    def to_token(bundle: CaBundle, lot_dir: Path) -> None:
        import_key_to_token(bundle, MODULE, TOKEN, Secret(PIN.encode()), "lot-ca", lot_dir=lot_dir)

    with throwaway_postgres_database() as url:
        line = make_signer_line(tmp_path, url, ids=BOARDS + 4, to_token=to_token)
        # The software key is gone: only the token can sign for the lot.
        assert not (line.signer_state / "bundles" / LOT / KEY_FILE).exists()
        signer = SignerProcess(line, env={"SOFTHSM2_CONF": str(softhsm), "FACTORYD_PKCS11_PIN": PIN})
        signer.start()
        try:
            hub = SimHub(2, line.board, supply=BOARDS)
            station = await run_station(
                line.station_settings("st-hsm", tmp_path / "st-hsm", ports=2),
                hub,
                line.passphrase,
                timeout_s=60,
            )
        finally:
            assert signer.stop() == 0
        assert station.outcomes["provisioned"] == BOARDS, station.outcomes
        ledger = open_issuance_ledger(url)
        try:
            records = ledger.issuances(LOT)
            provisioned = {d.fingerprint_sha256 for d in ledger.provisioned_devices(LOT)}
        finally:
            ledger.close()
    assert line.pki is not None
    assert len(records) == BOARDS
    for record in records:
        cert = x509.load_der_x509_certificate(record.cert_der)
        cert.verify_directly_issued_by(line.pki.issuing_cert)
        assert record.fingerprint_sha256 in provisioned
