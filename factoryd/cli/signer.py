"""`factoryd signer`: the line's signing service, its line CA, station certificates and customer quotas."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Annotated

import typer

from factoryd.cli.opts import (
    ConfigOption,
    command_group,
    echo_json,
    fail,
    get_settings,
    guard,
    prepare_state,
    read_input,
    run_async,
)

app = command_group("The line's signing service: run it, its line CA, station certificates, quotas.")

OutOption = Annotated[Path | None, typer.Option("--out", help="Directory for the certificate and key.")]


def _passphrase(config: Path | None) -> bytes:
    from factoryd.service import station_passphrase  # noqa: PLC0415 - keep `factoryd --help` fast

    return bytes(guard(lambda: station_passphrase(get_settings(config))))


@app.command("run")
def signer_run(config: ConfigOption = None) -> None:
    """Run the signing service (what systemd/factoryd-signer.service starts)."""
    from factoryd.log import configure_logging  # noqa: PLC0415
    from factoryd.signer.server import SignerService  # noqa: PLC0415

    settings = get_settings(config)
    configure_logging(settings.log.level, settings.log.format)
    run_async(SignerService(settings).run_until_signalled())


@app.command("init-line-ca")
def signer_init_line_ca(
    name: Annotated[str, typer.Option(help="The line CA's common name.")] = "factoryd line CA",
    config: ConfigOption = None,
) -> None:
    """Create the line CA (its key encrypted under the signer's passphrase); never overwrites one."""
    from factoryd.signer.lineca import init_line_ca  # noqa: PLC0415
    from factoryd.signer.server import line_ca_dir  # noqa: PLC0415

    settings = get_settings(config)
    prepare_state(settings)
    passphrase = _passphrase(config)
    ca = guard(lambda: init_line_ca(line_ca_dir(settings), passphrase, name=name))
    typer.echo(f"line CA created: {ca.cert_path} (give it to every station as its signer CA)")


@app.command("issue-station-cert")
def signer_issue_station_cert(station: str, out: OutOption = None, config: ConfigOption = None) -> None:
    """Issue STATION's client certificate (CN = its [station] name) and key, 0600, for LoadCredential=."""
    from factoryd.signer.lineca import issue_station_cert, load_line_ca  # noqa: PLC0415
    from factoryd.signer.server import line_ca_dir, signer_dir  # noqa: PLC0415

    settings = get_settings(config)
    passphrase = _passphrase(config)
    ca = guard(lambda: load_line_ca(line_ca_dir(settings), passphrase))
    directory = out or signer_dir(settings) / "stations"
    cert, key = guard(lambda: issue_station_cert(ca, station, directory))
    typer.echo(f"station certificate {cert}\nstation key {key}")


@app.command("issue-signer-cert")
def signer_issue_signer_cert(
    names: Annotated[
        list[str],
        typer.Option("--name", help="A DNS name or IP address stations use for the signer (repeatable)."),
    ],
    out: OutOption = None,
    config: ConfigOption = None,
) -> None:
    """Issue the signer's TLS server certificate and key (set them as [signer] tls_cert / tls_key)."""
    from factoryd.signer.lineca import issue_signer_cert, load_line_ca  # noqa: PLC0415
    from factoryd.signer.server import line_ca_dir, signer_dir  # noqa: PLC0415

    settings = get_settings(config)
    passphrase = _passphrase(config)
    ca = guard(lambda: load_line_ca(line_ca_dir(settings), passphrase))
    directory = out or signer_dir(settings) / "tls"
    cert, key = guard(lambda: issue_signer_cert(ca, names, directory))
    typer.echo(f"signer certificate {cert}\nsigner key {key}")


@app.command("revoke-station")
def signer_revoke_station(cert_file: Path, config: ConfigOption = None) -> None:
    """Put a station's certificate on the line CA's CRL (the signer refuses it once reloaded)."""
    from factoryd.signer.lineca import load_line_ca, revoke_station_cert  # noqa: PLC0415
    from factoryd.signer.server import line_ca_dir  # noqa: PLC0415

    settings = get_settings(config)
    passphrase = _passphrase(config)
    ca = guard(lambda: load_line_ca(line_ca_dir(settings), passphrase))
    serial = guard(lambda: revoke_station_cert(ca, read_input(cert_file)))
    typer.echo(f"revoked serial {serial:x}; reload the signer (systemctl reload factoryd-signer)")


@app.command("make-quota")
def signer_make_quota(
    lot: Annotated[str, typer.Option(help="The lot the quota is for.")],
    max_certificates: Annotated[int, typer.Option("--max", min=1, help="Certificates the signer may sign.")],
    expires: Annotated[str, typer.Option(help="Until when (ISO 8601 with zone, e.g. 2027-06-30T00:00:00Z).")],
    key: Annotated[Path, typer.Option(help="The customer's private key (PEM; the root or an intermediate).")],
    cert: Annotated[Path, typer.Option(help="Its certificate (in the lot's chain above the issuing CA).")],
    out: Annotated[Path, typer.Option(help="Where to write the quota (a JWS).")],
    passphrase_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the key's passphrase, if encrypted.")
    ] = None,
) -> None:
    """Sign a quota with the customer's key (run by the customer; no station or signer config needed)."""
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: PLC0415

    from factoryd.files import write_private  # noqa: PLC0415
    from factoryd.signer.quota import make_quota  # noqa: PLC0415

    secret = os.environ.get(passphrase_env, "").encode() if passphrase_env else None
    try:
        private = serialization.load_pem_private_key(read_input(key), secret or None)
        certificate = x509.load_pem_x509_certificate(read_input(cert))
        not_after = dt.datetime.fromisoformat(expires.replace("Z", "+00:00"))
    except (ValueError, TypeError) as exc:
        fail(f"cannot use the key, certificate or expiry: {exc}")
    if not isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        fail("the key must be an EC or RSA private key")
    jws = guard(
        lambda: make_quota(
            lot=lot,
            max_certificates=max_certificates,
            not_after=not_after,
            key=private,
            certificate=certificate,
        )
    )
    write_private(out, jws + b"\n")
    typer.echo(f"quota for lot {lot}: at most {max_certificates} certificates until {expires}: {out}")


@app.command("quota-install")
def signer_quota_install(lot: str, quota_file: Path, config: ConfigOption = None) -> None:
    """Verify LOT's customer-signed quota against the lot's chain and install it on the signer."""
    from factoryd.ledger import Ledger  # noqa: PLC0415
    from factoryd.pki.store import BundleStore  # noqa: PLC0415
    from factoryd.service import StationPaths  # noqa: PLC0415
    from factoryd.signer.quota import quota_chain  # noqa: PLC0415
    from factoryd.signer.server import quota_store  # noqa: PLC0415

    settings = get_settings(config)
    data = read_input(quota_file)
    passphrase = _passphrase(config)

    def install() -> dict[str, object]:
        bundles = BundleStore(StationPaths(settings.station.state_dir).bundles, passphrase)
        chain = quota_chain(bundles, lot)
        quota = quota_store(settings).install(lot, data, chain, now=dt.datetime.now(dt.UTC))
        with Ledger.open(settings.ledger_url) as ledger:
            ledger.audit(
                actor="cli",
                action="signer.quota_installed",
                subject=lot,
                details={
                    "quota_id": quota.quota_id,
                    "max_certificates": quota.max_certificates,
                    "not_after": quota.not_after.isoformat(),
                    "signed_by": quota.signer_subject,
                },
            )
        return {
            "lot": lot,
            "quota_id": quota.quota_id,
            "max_certificates": quota.max_certificates,
            "not_after": quota.not_after.isoformat(),
            "signed_by": quota.signer_subject,
        }

    echo_json(guard(install))


@app.command("quota-show")
def signer_quota_show(lot: str, config: ConfigOption = None) -> None:
    """LOT's installed quota, verified now, and how many certificates it still allows."""
    from factoryd.ledger.issuance import open_issuance_ledger  # noqa: PLC0415
    from factoryd.pki.store import BundleStore  # noqa: PLC0415
    from factoryd.service import StationPaths  # noqa: PLC0415
    from factoryd.signer.quota import quota_chain  # noqa: PLC0415
    from factoryd.signer.server import quota_store  # noqa: PLC0415

    settings = get_settings(config)
    passphrase = _passphrase(config)

    def show() -> dict[str, object]:
        bundles = BundleStore(StationPaths(settings.station.state_dir).bundles, passphrase)
        chain = quota_chain(bundles, lot)
        quota = quota_store(settings).current(lot, chain, now=dt.datetime.now(dt.UTC))
        ledger = open_issuance_ledger(settings.ledger_url)
        try:
            signed = ledger.signed_count(lot)
        finally:
            ledger.close()
        if quota is None:
            return {"lot": lot, "quota": None, "signed": signed}
        return {
            "lot": lot,
            "quota_id": quota.quota_id,
            "max_certificates": quota.max_certificates,
            "not_after": quota.not_after.isoformat(),
            "signed_by": quota.signer_subject,
            "signed": signed,
            "remaining": max(0, quota.max_certificates - signed),
        }

    echo_json(guard(show))
