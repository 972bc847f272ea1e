"""The station passphrase and CA bundles at rest: modes, encryption, atomicity, no leaks."""

from __future__ import annotations

import logging
import os
import stat
import traceback
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from structlog.testing import capture_logs

from factoryd.errors import BundleError, ConfigError, SignerError
from factoryd.pki import BundleStore, CertProfile, Issuer, Secret, load_passphrase, load_pkcs12_bundle
from factoryd.pki.bundle import CaBundle
from factoryd.pki.store import ANCHORS_FILE, CHAIN_FILE, KEY_FILE
from factoryd.pki.testca import TestPki, make_test_pki

STATION_PASSPHRASE = b"station-passphrase-7f3a9c"
UPLOAD_PASSPHRASE = b"upload-passphrase-51be02"


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return make_test_pki(passphrase=UPLOAD_PASSPHRASE)


@pytest.fixture(scope="module")
def bundle(pki: TestPki) -> CaBundle:
    return load_pkcs12_bundle(pki.pkcs12, UPLOAD_PASSPHRASE)


# --- passphrase -------------------------------------------------------------------------------


def test_passphrase_from_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "factoryd-ca-passphrase").write_bytes(STATION_PASSPHRASE + b"\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("FACTORYD_CA_PASSPHRASE", "from-env-loses")
    secret = load_passphrase()
    assert secret == STATION_PASSPHRASE
    assert isinstance(secret, Secret)


def test_passphrase_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("MY_PASS", STATION_PASSPHRASE.decode())
    assert load_passphrase(env="MY_PASS") == STATION_PASSPHRASE


def test_passphrase_falls_back_to_env_when_credential_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("FACTORYD_CA_PASSPHRASE", "env-value")
    assert load_passphrase() == b"env-value"


def test_passphrase_file_after_credential_before_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "ca-passphrase"
    file.write_bytes(STATION_PASSPHRASE + b"\n")
    file.chmod(0o600)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("FACTORYD_CA_PASSPHRASE", "from-env-loses")
    secret = load_passphrase(file=file)
    assert secret == STATION_PASSPHRASE
    assert isinstance(secret, Secret)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "factoryd-ca-passphrase").write_bytes(b"from-credential")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_passphrase(file=file) == b"from-credential"


def test_passphrase_file_must_be_private_regular_and_not_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    file = tmp_path / "ca-passphrase"
    file.write_bytes(STATION_PASSPHRASE)
    file.chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by others .*0644.*chmod 600"):
        load_passphrase(file=file)
    file.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(file)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_passphrase(file=link)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_passphrase(file=tmp_path / "missing")
    file.write_bytes(b"\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_passphrase(file=file)


def test_passphrase_absent_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("FACTORYD_CA_PASSPHRASE", raising=False)
    with pytest.raises(ConfigError, match="FACTORYD_CA_PASSPHRASE"):
        load_passphrase()


@pytest.mark.parametrize("content", [b"", b"\n"])
def test_passphrase_empty_credential_is_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes
) -> None:
    (tmp_path / "factoryd-ca-passphrase").write_bytes(content)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(ConfigError, match="is empty"):
        load_passphrase()


def test_passphrase_empty_env_and_bad_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("FACTORYD_CA_PASSPHRASE", "")
    with pytest.raises(ConfigError, match="is empty"):
        load_passphrase()
    with pytest.raises(ConfigError, match="invalid credential name"):
        load_passphrase(name="../etc/shadow")


def test_secret_never_prints_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("FACTORYD_CA_PASSPHRASE", STATION_PASSPHRASE.decode())
    secret = load_passphrase()
    plain = STATION_PASSPHRASE.decode()
    percent = "%s" % (secret,)  # noqa: UP031 - stdlib logging formats arguments this way
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", percent, repr([secret])):
        assert plain not in text
        assert "***" in text
    assert bytes(secret) == STATION_PASSPHRASE


# --- store ------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_creates_private_files_and_directories(tmp_path: Path, bundle: CaBundle) -> None:
    old_umask = os.umask(0)  # the store must not rely on a friendly umask
    try:
        store = BundleStore(tmp_path / "ca", STATION_PASSPHRASE)
        lot_dir = store.save("LOT-2024_03.a", bundle)
    finally:
        os.umask(old_umask)
    assert _mode(tmp_path / "ca") == 0o700
    assert _mode(lot_dir) == 0o700
    for name in (KEY_FILE, CHAIN_FILE, ANCHORS_FILE):
        assert _mode(lot_dir / name) == 0o600, name
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["LOT-2024_03.a"]


def test_existing_loose_directory_is_tightened(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)  # noqa: S103 - the loose mode the store must tighten
    BundleStore(directory, STATION_PASSPHRASE)
    assert _mode(directory) == 0o700


def test_key_at_rest_is_encrypted_under_station_passphrase(tmp_path: Path, bundle: CaBundle) -> None:
    store = BundleStore(tmp_path, STATION_PASSPHRASE)
    lot_dir = store.save("lot1", bundle)
    key_pem = (lot_dir / KEY_FILE).read_bytes()
    assert key_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(key_pem, None)
    # A wrong passphrase is a ValueError: "Incorrect password", or (about one time in 200, when the
    # garbage it decrypts to has valid padding) an ASN.1 error.
    with pytest.raises(ValueError, match=r"password|deserialize"):
        serialization.load_pem_private_key(key_pem, UPLOAD_PASSPHRASE)
    for path in lot_dir.iterdir():
        assert STATION_PASSPHRASE not in path.read_bytes()


def test_load_round_trip_and_issue(tmp_path: Path, bundle: CaBundle, pki: TestPki) -> None:
    store = BundleStore(tmp_path, STATION_PASSPHRASE)
    store.save("lot1", bundle)
    loaded = BundleStore(tmp_path, STATION_PASSPHRASE).load("lot1")
    assert loaded.certificate == pki.issuing_cert
    assert loaded.chain == bundle.chain
    assert loaded.trust_anchors == (pki.server_ca_cert,)
    issuer = Issuer(loaded.signer(), loaded.chain, CertProfile())
    assert issuer.chain[-1] == pki.root_cert


def test_load_with_wrong_station_passphrase(tmp_path: Path, bundle: CaBundle) -> None:
    BundleStore(tmp_path, STATION_PASSPHRASE).save("lot1", bundle)
    with pytest.raises(SignerError, match="does not decrypt") as info:
        BundleStore(tmp_path, b"another-passphrase").load("lot1")
    assert "another-passphrase" not in str(info.value)


def test_save_refuses_existing_lot_and_bad_names(tmp_path: Path, bundle: CaBundle) -> None:
    store = BundleStore(tmp_path, STATION_PASSPHRASE)
    store.save("lot1", bundle)
    with pytest.raises(BundleError, match="already has a CA bundle"):
        store.save("lot1", bundle)
    for bad in ("../escape", "", ".hidden", "a/b", "x" * 200):
        with pytest.raises(BundleError, match="invalid lot name"):
            store.save(bad, bundle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lot1"]


def test_delete_and_missing_lot(tmp_path: Path, bundle: CaBundle) -> None:
    store = BundleStore(tmp_path, STATION_PASSPHRASE)
    store.save("lot1", bundle)
    assert store.exists("lot1")
    store.delete("lot1")
    assert not store.exists("lot1")
    with pytest.raises(BundleError, match="has no CA bundle"):
        store.load("lot1")


def test_failed_save_leaves_nothing(
    tmp_path: Path, bundle: CaBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BundleStore(tmp_path, STATION_PASSPHRASE)

    def broken_rename(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(OSError, match="disk full"):
        store.save("lot1", bundle)
    assert list(tmp_path.iterdir()) == []


def test_passphrase_in_no_repr_or_log(
    tmp_path: Path, bundle: CaBundle, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = Secret(STATION_PASSPHRASE)
    with capture_logs() as logs:
        store = BundleStore(tmp_path, secret)
        store.save("lot1", bundle)
        loaded = store.load("lot1")
        try:
            BundleStore(tmp_path, b"wrong").load("lot1")
        except SignerError:
            error_text = traceback.format_exc()
    captured = capsys.readouterr()
    assert logs, "saving a bundle is logged"
    texts = [
        repr(store),
        str(store),
        repr(loaded),
        repr(loaded.signer()),
        repr(Issuer(loaded.signer(), loaded.chain, CertProfile())),
        repr(logs),
        caplog.text,
        captured.out,
        captured.err,
        error_text,
        repr(vars(store)),
    ]
    for text in texts:
        assert STATION_PASSPHRASE.decode() not in text
        assert UPLOAD_PASSPHRASE.decode() not in text
