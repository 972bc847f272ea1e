"""`factoryd lots`: create lots, import IDs and CA bundles, activate, pause, close, show."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from factoryd.cli.opts import (
    ConfigOption,
    command_group,
    echo_json,
    fail,
    format_table,
    get_settings,
    guard,
    open_ledger,
    read_input,
    state_dir_settings,
    write_public,
)
from factoryd.errors import FactorydError, InputError

if TYPE_CHECKING:
    from factoryd.ledger.model import LotInfo

app = command_group("Customer lots: create, import IDs and bundles, activate.")

LIST_COLUMNS = ("lot", "customer", "state", "total", "available", "reserved", "provisioned", "void")


@app.command("list")
def lots_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """List lots with their state and counts."""
    with open_ledger(config) as ledger:
        rows = []
        for lot in ledger.list_lots():
            p = ledger.progress(lot.name)
            rows.append(
                {"lot": lot.name, "customer": lot.customer, "state": str(lot.state), **dataclasses.asdict(p)}
            )
    if as_json:
        echo_json(rows)
        return
    if not rows:
        typer.echo("no lots yet (create one: factoryd lots create NAME --customer CUSTOMER)")
        return
    for line in format_table(LIST_COLUMNS, rows):
        typer.echo(line)


@app.command("create")
def lots_create(
    name: str,
    customer: Annotated[str, typer.Option(help="Customer the lot belongs to.")],
    profile_file: Annotated[Path | None, typer.Option(help="Lot profile as JSON.")] = None,
    target: Annotated[int | None, typer.Option(help="Target quantity.")] = None,
    config: ConfigOption = None,
) -> None:
    """Create a lot (state draft)."""
    from pydantic import ValidationError  # noqa: PLC0415 - keep `factoryd --help` fast

    from factoryd.ledger import LotProfile  # noqa: PLC0415

    try:
        profile = LotProfile.model_validate_json(profile_file.read_bytes()) if profile_file else LotProfile()
    except (OSError, ValidationError) as exc:
        fail(f"lot profile {profile_file}: {exc}")
    with open_ledger(config) as ledger:
        info = guard(
            lambda: ledger.create_lot(
                name, customer=customer, profile=profile, target_quantity=target, actor="cli"
            )
        )
    typer.echo(f"created lot {info.name} ({info.state})")


@app.command("import")
def lots_import(name: str, id_file: Path, config: ConfigOption = None) -> None:
    """Import a customer ID list (CSV, JSON or text); refused whole on any problem."""
    data = read_input(id_file)
    with open_ledger(config) as ledger:
        count = guard(lambda: ledger.import_ids(name, data, filename=id_file.name, actor="cli"))
    typer.echo(f"imported {count} IDs into {name}")


@app.command("bundle")
def lots_bundle(
    name: str,
    bundle_file: Annotated[Path, typer.Argument(help="PKCS#12 file, or PEM chain (with --key).")],
    key: Annotated[Path | None, typer.Option(help="Encrypted PKCS#8 key (PEM bundles).")] = None,
    anchors: Annotated[Path | None, typer.Option(help="Trust anchors to install on devices (PEM).")] = None,
    passphrase_env: Annotated[str, typer.Option(help="Env variable holding the bundle's passphrase.")] = (
        "FACTORYD_BUNDLE_PASSPHRASE"  # noqa: S107 - the name of a variable, not a passphrase
    ),
    config: ConfigOption = None,
) -> None:
    """Validate a customer CA bundle and store it encrypted for the lot."""
    from factoryd.service import StationPaths, parse_bundle, station_passphrase, store_bundle  # noqa: PLC0415

    settings = state_dir_settings(config)
    upload_pass = os.environ.get(passphrase_env)
    if upload_pass is None:
        upload_pass = typer.prompt("bundle passphrase", hide_input=True)
    data = read_input(bundle_file)
    key_pem = read_input(key) if key else None
    anchors_pem = read_input(anchors) if anchors else None
    with open_ledger(config) as ledger:
        lot = guard(lambda: ledger.get_lot(name))

        def store() -> Path:
            bundle = parse_bundle(data, upload_pass.encode(), lot, key_pem=key_pem, trust_anchors=anchors_pem)
            path = store_bundle(
                StationPaths(settings.station.state_dir), station_passphrase(settings), name, bundle
            )
            ledger.audit(actor="cli", action="lot.bundle_stored", subject=name, details={"path": str(path)})
            return path

        path = guard(store)
    typer.echo(f"stored CA bundle for {name} in {path}")


@app.command("attestation-roots")
def lots_attestation_roots(
    name: str,
    roots_file: Annotated[Path, typer.Argument(help="PEM file of the SE vendor's attestation CA(s).")],
    config: ConfigOption = None,
) -> None:
    """Trust these attestation roots for the lot's boards (CA flags, validity, key types; refused whole)."""
    from factoryd.service import StationPaths, store_attestation_roots  # noqa: PLC0415

    paths = StationPaths(state_dir_settings(config).station.state_dir)
    data = read_input(roots_file)
    with open_ledger(config) as ledger:
        try:
            count = store_attestation_roots(paths, ledger, name, data, actor="cli")
        except InputError as exc:
            fail(f"{roots_file}: refused, nothing stored: {exc}")
        except FactorydError as exc:
            fail(str(exc))
    typer.echo(f"lot {name} trusts {count} attestation root(s) from {roots_file}")


@app.command("matter")
def lots_matter(
    name: str,
    paa: Annotated[Path, typer.Option(help="The PAA the lot's PAI (its CA bundle) chains to (PEM or DER).")],
    cd: Annotated[Path, typer.Option(help="The Certification Declaration (DER, CMS SignedData).")],
    cd_signer: Annotated[
        Path | None, typer.Option(help="The CD signing certificate: verify the CD's signature with it.")
    ] = None,
    recipient: Annotated[
        Path | None, typer.Option(help="The customer's certificate the onboarding codes are encrypted to.")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Set up a Matter lot: PAI chains to the PAA, VID/PID agree between PAI, lot and CD; refused whole."""
    from factoryd.matter.admin import setup_matter_lot  # noqa: PLC0415
    from factoryd.service import StationPaths, station_passphrase  # noqa: PLC0415

    settings = state_dir_settings(config)
    paths = StationPaths(settings.station.state_dir)
    paa_data, cd_data = read_input(paa), read_input(cd)
    signer_data = read_input(cd_signer) if cd_signer is not None else None
    recipient_data = read_input(recipient) if recipient is not None else None
    with open_ledger(config) as ledger:
        try:
            setup_matter_lot(
                ledger,
                paths,
                station_passphrase(settings),
                name,
                paa=paa_data,
                cd=cd_data,
                cd_signer=signer_data,
                recipient=recipient_data,
                actor="cli",
            )
        except InputError as exc:
            fail(f"refused, nothing stored: {exc}")
        except FactorydError as exc:
            fail(str(exc))
    typer.echo(f"lot {name}: PAA and Certification Declaration stored; the PAI chains to the PAA")


@app.command("onboarding-codes")
def lots_onboarding_codes(
    name: str,
    out: Annotated[Path, typer.Option("-o", "--out", help="Where to write the encrypted file (.p7m, DER).")],
    recipient: Annotated[
        Path | None, typer.Option(help="The customer's certificate (default: the one stored with the lot).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Write the lot's onboarding codes (QR payloads, manual codes) encrypted to the customer (CMS)."""
    from factoryd.matter.admin import export_onboarding_codes  # noqa: PLC0415
    from factoryd.service import StationPaths, station_passphrase  # noqa: PLC0415

    settings = state_dir_settings(config)
    paths = StationPaths(settings.station.state_dir)
    recipient_data = read_input(recipient) if recipient is not None else None
    with open_ledger(config) as ledger:
        export = guard(
            lambda: export_onboarding_codes(
                ledger, paths, station_passphrase(settings), name, recipient=recipient_data, actor="cli"
            )
        )
    write_public(out, export.der)
    typer.echo(f"onboarding codes of {export.count} devices, encrypted to the customer: {out}")


@app.command("parts")
def lots_parts(
    name: str,
    manifest_file: Annotated[Path, typer.Argument(help="The chip vendor's parts manifest (JWS entries).")],
    signer: Annotated[
        list[Path], typer.Option("--signer", help="A pinned manifest-signer certificate (PEM); repeatable.")
    ],
    config: ConfigOption = None,
) -> None:
    """Verify a vendor's parts manifest (every entry's signature), store serial → key; refused whole."""
    from factoryd.service import StationPaths, store_parts_manifest  # noqa: PLC0415

    paths = StationPaths(state_dir_settings(config).station.state_dir)
    data = read_input(manifest_file)
    signers = [read_input(path) for path in signer]
    with open_ledger(config) as ledger:
        try:
            count = store_parts_manifest(paths, ledger, name, data, signers, actor="cli")
        except InputError as exc:
            fail(f"{manifest_file}: refused, nothing stored: {exc}")
        except FactorydError as exc:
            fail(str(exc))
    typer.echo(f"lot {name} has {count} pre-registered parts from {manifest_file}")


@app.command("firmware")
def lots_firmware(
    name: str,
    image: Annotated[Path, typer.Argument(help="The signed MCUboot image (imgtool sign output).")],
    signing_key: Annotated[
        Path, typer.Option("--signing-key", help="The firmware-signing public key (PEM).")
    ],
    replace_signing_key: Annotated[
        bool,
        typer.Option(
            "--replace-signing-key", help="Make this key the lot's firmware-signing key (admin only)."
        ),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Verify an MCUboot image completely and make it the lot's firmware; refused whole otherwise."""
    from factoryd.firmware import FIRMWARE_IMAGE_MAX_BYTES, store_lot_firmware  # noqa: PLC0415
    from factoryd.service import StationPaths, firmware_store  # noqa: PLC0415

    paths = StationPaths(state_dir_settings(config).station.state_dir)
    try:
        size = image.stat().st_size
    except OSError as exc:
        fail(f"cannot read {image}: {exc.strerror}")
    if size > FIRMWARE_IMAGE_MAX_BYTES:
        fail(f"{image}: refused, nothing stored: file is {size} bytes, over {FIRMWARE_IMAGE_MAX_BYTES}")
    data, key_pem = read_input(image), read_input(signing_key)
    with open_ledger(config) as ledger:
        try:
            upload = store_lot_firmware(
                ledger,
                firmware_store(paths),
                name,
                data,
                key_pem,
                actor="cli",
                replace_signing_key=replace_signing_key,
            )
        except InputError as exc:
            fail(f"{image}: refused, nothing stored: {exc}")
        except FactorydError as exc:
            fail(str(exc))
    shown = upload.firmware.image
    counter = "none" if shown.security_counter is None else f"0x{shown.security_counter:08x}"
    typer.echo(
        f"firmware {shown.version} (hash {shown.hash}, security counter {counter}) is lot {name}'s image"
        + (" (signing key replaced)" if upload.signing_key_replaced else "")
        + f"; stored in {upload.path}"
    )


def _set_state(name: str, state: str, config: Path | None) -> None:
    from factoryd.ledger import LotState  # noqa: PLC0415

    with open_ledger(config) as ledger:
        info = guard(lambda: ledger.set_lot_state(name, LotState(state), actor="cli"))
    typer.echo(f"lot {info.name} is {info.state}")


@app.command("activate")
def lots_activate(name: str, config: ConfigOption = None) -> None:
    """Start (or resume) provisioning a lot; refused, naming what it lacks (IDs, CA bundle, firmware)."""
    from factoryd.jobs.lots import check_activation  # noqa: PLC0415
    from factoryd.ledger import LotState  # noqa: PLC0415
    from factoryd.service import StationPaths  # noqa: PLC0415

    paths = StationPaths(get_settings(config).station.state_dir)
    with open_ledger(config) as ledger:

        def activate() -> LotInfo:
            lot = ledger.get_lot(name)
            check_activation(lot, ledger.progress(name), paths.bundles, paths.firmware)
            return ledger.set_lot_state(name, LotState.ACTIVE, actor="cli")

        info = guard(activate)
    typer.echo(f"lot {info.name} is {info.state}")


@app.command("pause")
def lots_pause(name: str, config: ConfigOption = None) -> None:
    """Pause a lot: ports finish their current board and wait."""
    _set_state(name, "paused", config)


@app.command("close")
def lots_close(name: str, config: ConfigOption = None) -> None:
    """Close a lot for good."""
    _set_state(name, "closed", config)


@app.command("key-to-token")
def lots_key_to_token(
    name: str,
    module: Annotated[str, typer.Option(help="PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so.")],
    token: Annotated[str, typer.Option(help="Token label.")],
    key_label: Annotated[str, typer.Option(help="Label for the key in the token.")],
    keep_software_key: Annotated[bool, typer.Option(help="Keep the encrypted key file too.")] = False,
    config: ConfigOption = None,
) -> None:
    """Move a lot's CA key into a PKCS#11 token (PIN from credential factoryd-pkcs11-pin or env)."""
    from factoryd.pki.keyimport import import_key_to_token  # noqa: PLC0415
    from factoryd.pki.pkcs11 import load_pkcs11_pin  # noqa: PLC0415
    from factoryd.pki.store import BundleStore  # noqa: PLC0415
    from factoryd.service import StationPaths, station_passphrase  # noqa: PLC0415

    settings = state_dir_settings(config)

    def move() -> str:
        store = BundleStore(StationPaths(settings.station.state_dir).bundles, station_passphrase(settings))
        bundle = store.load(name)
        import_key_to_token(
            bundle,
            module,
            token,
            load_pkcs11_pin(),
            key_label,
            lot_dir=store.path(name),
            remove_software_key=not keep_software_key,
        )
        return str(store.path(name))

    where = guard(move)
    with open_ledger(config) as ledger:
        ledger.audit(
            actor="cli", action="lot.key_to_token", subject=name, details={"token": token, "key": key_label}
        )
    typer.echo(f"CA key of {name} is now in token {token!r} as {key_label!r} (reference in {where})")


@app.command("ca-verification")
def lots_ca_verification(
    name: str,
    code: Annotated[
        str, typer.Option(help="The cloud's code (AWS registration code, Azure verification code).")
    ],
    out: Annotated[Path | None, typer.Option(help="File for the certificate (PEM); default: stdout.")] = None,
    config: ConfigOption = None,
) -> None:
    """Print a verification certificate (CN=CODE) signed by the lot's CA key: proof of possession."""
    from factoryd.service import StationPaths, ca_verification, station_passphrase  # noqa: PLC0415

    settings = state_dir_settings(config)
    paths = StationPaths(settings.station.state_dir)
    with open_ledger(config) as ledger:
        verification = guard(
            lambda: ca_verification(ledger, paths, station_passphrase(settings), name, code, actor="cli")
        )
    if out is None:
        typer.echo(verification.pem, nl=False)
        return
    write_public(out, verification.pem.encode("ascii"))
    typer.echo(f"verification certificate for {name} (CN={code}, serial {verification.serial_hex}) in {out}")


@app.command("progress")
def lots_progress(name: str, config: ConfigOption = None) -> None:
    """Counts of a lot's IDs by state."""
    with open_ledger(config) as ledger:
        progress = guard(lambda: ledger.progress(name))
    echo_json(dataclasses.asdict(progress))


@app.command("show")
def lots_show(name: str, config: ConfigOption = None) -> None:
    """A lot's profile, state and counts per ID state."""
    with open_ledger(config) as ledger:
        info = guard(lambda: ledger.get_lot(name))
        progress = ledger.progress(name)
    echo_json(
        {
            "lot": info.name,
            "customer": info.customer,
            "state": str(info.state),
            "target_quantity": info.target_quantity,
            "created_at": info.created_at.isoformat(),
            "profile": info.profile.model_dump(),
            "firmware": _firmware_view(info),
            "ids": dataclasses.asdict(progress),
        }
    )


def _firmware_view(info: LotInfo) -> dict[str, object] | None:
    """The lot's current MCUboot image as `lots show` prints it; None without one."""
    profile = info.profile
    if profile.firmware_sha256 is None:
        return None
    return {
        "sha256": profile.firmware_sha256,
        "version": profile.firmware_version,
        "security_counter": profile.firmware_security_counter,
        "signing_key_hash": profile.firmware_key_hash,
    }
