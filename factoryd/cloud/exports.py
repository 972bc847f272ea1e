"""The lot's provisioned devices in the formats the customer's cloud ingests.

Each writer takes the ledger's :class:`~factoryd.ledger.model.ProvisionedDevice` records and
returns the files' bytes; every check (cloud ID rules, row limits) runs before anything is
written, and :func:`write_export` puts the files in place atomically, so a refusal or a crash
half-way leaves nothing (or the previous export) behind. Formats (``docs/clouds.md``):

- ``csv``: one header row, then one row per device (IDs, serials, fingerprint, station, PEM);
- ``aws-bulk``: JSON lines for AWS IoT bulk thing registration, keys = the parameters of
  :data:`AWS_BULK_TEMPLATE` (``docs/examples/aws-bulk-template.json``);
- ``nrfcloud``: nRF Cloud's ``onboard.csv`` without header, split into ``onboard-001.csv`` … at
  the service's 1,000-row limit;
- ``azure-dps``: the lot CA chain, an enrollment-group body for DPS ``PUT /enrollmentGroups/{id}``
  (api 2021-10-01) and the devices' registration IDs (their certificate CNs), each checked.

Export files hold certificates and IDs only (public by design: they are uploaded to a cloud),
never a key, so they are written 0644 (directories 0755) for whoever uploads them.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import re
import secrets
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from factoryd.cloud.errors import ExportError
from factoryd.cloud.formats import ExportFormat
from factoryd.files import fsync_dir, private_staging_dir, write_new, write_private
from factoryd.ledger.model import ProvisionedDevice
from factoryd.pki.bundle import pem_of
from factoryd.pki.store import CHAIN_FILE, LOT_NAME_RE

EXPORT_FILE_MODE = 0o644
EXPORT_DIR_MODE = 0o755
# nRF Cloud's onboarding endpoint and both of Nordic's tools refuse a CSV of more rows
# (nRFCloud/utils nrf_cloud_onboard.py MAX_CSV_ROWS).
NRFCLOUD_MAX_ROWS = 1000
# nRF Cloud device IDs: the tools cap them at 64 characters.
NRFCLOUD_ID_MAX_CHARS = 64
NRFCLOUD_DEFAULT_FW_TYPES = ("APP", "MODEM")
# AWS IoT thing names: 1..128 of [a-zA-Z0-9:_-] (CreateThing).
AWS_THING_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
# DPS registration IDs (and enrollment group IDs): case-insensitive, alphanumerics and - . _ :,
# the last character alphanumeric or '-', at most 128 characters.
DPS_ID = re.compile(r"[a-z0-9._:-]{0,127}[a-z0-9-]", re.IGNORECASE)
DPS_API_VERSION = "2021-10-01"
CSV_COLUMNS = (
    "device_id",
    "hw_serial",
    "cert_serial",
    "fingerprint_sha256",
    "provisioned_at",
    "station",
    "port",
    "cert_pem",
)
# A provisioning template for StartThingRegistrationTask that takes exactly the keys of the
# aws-bulk lines: the device certificate is registered ACTIVE (its CA must be registered in the
# account), a thing named by the device ID gets it, and the policy (edit its default) is attached.
AWS_BULK_TEMPLATE: dict[str, Any] = {
    "Parameters": {
        "ThingName": {"Type": "String"},
        "SerialNumber": {"Type": "String"},
        "CertificatePem": {"Type": "String"},
        "PolicyName": {"Type": "String", "Default": "factoryd-device-policy"},
    },
    "Resources": {
        "thing": {
            "Type": "AWS::IoT::Thing",
            "Properties": {
                "ThingName": {"Ref": "ThingName"},
                "AttributePayload": {"serialNumber": {"Ref": "SerialNumber"}},
            },
        },
        "certificate": {
            "Type": "AWS::IoT::Certificate",
            "Properties": {"CertificatePem": {"Ref": "CertificatePem"}, "Status": "ACTIVE"},
        },
        "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": {"Ref": "PolicyName"}}},
    },
}


@dataclass(frozen=True, slots=True)
class ExportFile:
    """One file of an export: its name (no directory) and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Export:
    """A lot's export in one format: one file, or several that belong in one directory."""

    lot: str
    format: ExportFormat
    files: tuple[ExportFile, ...]
    directory: str | None  # the directory name for several files; None for one file
    count: int  # devices in it

    @property
    def media_type(self) -> str:
        """The HTTP media type of :meth:`payload`."""
        if self.directory is not None:
            return "application/zip"
        return "application/x-ndjson" if self.format is ExportFormat.AWS_BULK else "text/csv"

    @property
    def filename(self) -> str:
        """The download's file name (a zip of the directory for several files)."""
        return f"{self.directory}.zip" if self.directory is not None else self.files[0].name

    def payload(self) -> bytes:
        """One download: the file itself, or a zip archive of the directory."""
        if self.directory is None:
            return self.files[0].data
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for item in self.files:
                archive.writestr(f"{self.directory}/{item.name}", item.data)
        return buffer.getvalue()


def _pem(device: ProvisionedDevice) -> str:
    return _certificate(device).public_bytes(serialization.Encoding.PEM).decode("ascii")


def _certificate(device: ProvisionedDevice) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(device.cert_der)
    except ValueError:
        raise ExportError(f"device {device.device_id!r}: its recorded certificate does not parse") from None


def common_name(device: ProvisionedDevice) -> str:
    """The single subject CN of the device's certificate (what DPS and nRF Cloud take as its ID)."""
    names = _certificate(device).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ExportError(
            f"device {device.device_id!r}: its certificate has {len(names)} subject CNs, not one"
        )
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _refuse(problems: list[str], what: str) -> None:
    if problems:
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ExportError(f"{len(problems)} devices cannot be exported {what}: {shown}{more}")


def csv_export(devices: Sequence[ProvisionedDevice]) -> bytes:
    """One header row (:data:`CSV_COLUMNS`), then one row per provisioned device."""
    out = io.StringIO(newline="")
    writer = csv.writer(out)  # RFC 4180: CRLF rows, quotes only where needed (the PEM)
    writer.writerow(CSV_COLUMNS)
    for device in devices:
        writer.writerow(
            (
                device.device_id,
                device.hw_serial,
                device.cert_serial,
                device.fingerprint_sha256,
                _iso(device.provisioned_at),
                device.station,
                device.port,
                _pem(device),
            )
        )
    return out.getvalue().encode()


def aws_bulk_export(devices: Sequence[ProvisionedDevice]) -> bytes:
    """JSON lines for AWS bulk thing registration: ThingName, SerialNumber, CertificatePem per device."""
    _refuse(
        [
            f"{d.device_id!r} is not an AWS thing name"
            for d in devices
            if not AWS_THING_NAME.fullmatch(d.device_id)
        ],
        "as AWS things (1..128 of a-z A-Z 0-9 : _ -)",
    )
    lines = [
        json.dumps({"ThingName": d.device_id, "SerialNumber": d.hw_serial, "CertificatePem": _pem(d)})
        for d in devices
    ]
    return "".join(f"{line}\n" for line in lines).encode()


def nrfcloud_export(
    devices: Sequence[ProvisionedDevice],
    *,
    sub_type: str = "",
    tags: Sequence[str] = (),
    fw_types: Sequence[str] = NRFCLOUD_DEFAULT_FW_TYPES,
    max_rows: int = NRFCLOUD_MAX_ROWS,
) -> list[ExportFile]:
    """nRF Cloud onboarding CSVs (no header, ``deviceId,subType,tags,fwTypes,"<PEM>"``), ≤ max_rows each."""
    if max_rows < 1:
        raise ExportError(f"max_rows must be positive, got {max_rows}")
    for field in (sub_type, *tags, *fw_types):
        if any(ch in field for ch in ',|"\r\n'):
            raise ExportError(f'nRF Cloud fields must not contain , | " or line breaks: {field!r}')
    ids = [(device, common_name(device)) for device in devices]
    _refuse(
        [f"{d.device_id!r}: CN {cn!r}" for d, cn in ids if not cn or len(cn) > NRFCLOUD_ID_MAX_CHARS],
        f"to nRF Cloud (a device ID is its certificate's CN, 1..{NRFCLOUD_ID_MAX_CHARS} characters)",
    )
    rows = [(cn, sub_type, "|".join(tags), "|".join(fw_types), _pem(device)) for device, cn in ids]
    files = []
    for number, start in enumerate(range(0, len(rows), max_rows), 1):
        out = io.StringIO(newline="")
        # Minimal quoting wraps only the multi-line PEM, as nRF Cloud's own tools write it.
        csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_MINIMAL).writerows(
            rows[start : start + max_rows]
        )
        files.append(ExportFile(f"onboard-{number:03d}.csv", out.getvalue().encode()))
    return files


def dps_id_problem(value: str) -> str | None:
    """Why ``value`` is not a valid DPS registration (or enrollment group) ID, or None."""
    if not value:
        return "empty"
    if len(value) > 128:
        return f"{len(value)} characters (at most 128)"
    if not DPS_ID.fullmatch(value):
        return "only letters, digits and - . _ : are allowed, and the last must be a letter, digit or -"
    return None


def azure_dps_export(
    lot: str, devices: Sequence[ProvisionedDevice], chain: Sequence[x509.Certificate]
) -> list[ExportFile]:
    """The lot CA chain, a DPS enrollment-group body signed by the lot's CA, and the registration IDs.

    The group's signing certificate is the lot's issuing CA (``chain[0]``, which signed every
    device certificate); DPS wants it, or a CA above it, verified (proof of possession) first.
    """
    if not chain:
        raise ExportError(f"lot {lot!r} has no CA chain")
    group_problem = dps_id_problem(lot)
    if group_problem is not None:
        raise ExportError(f"lot name {lot!r} cannot be a DPS enrollment group ID: {group_problem}")
    ids = [(device, common_name(device)) for device in devices]
    problems = [
        f"{d.device_id!r}: CN {cn!r} is {p}" for d, cn in ids if (p := dps_id_problem(cn)) is not None
    ]
    seen: dict[str, str] = {}
    for device, cn in ids:
        # DPS compares registration IDs case-insensitively: two such CNs are one enrollment.
        other = seen.setdefault(cn.lower(), device.device_id)
        if other != device.device_id:
            problems.append(
                f"{device.device_id!r} and {other!r} have the same registration ID {cn.lower()!r}"
            )
    _refuse(problems, "to Azure DPS (a registration ID is the certificate's CN)")
    issuing_pem = chain[0].public_bytes(serialization.Encoding.PEM).decode("ascii")
    group = {
        "enrollmentGroupId": lot,
        "attestation": {
            "type": "x509",
            "x509": {"signingCertificates": {"primary": {"certificate": issuing_pem}}},
        },
        "provisioningStatus": "enabled",
    }
    return [
        ExportFile("ca-chain.pem", pem_of(chain)),
        ExportFile("enrollment-group.json", (json.dumps(group, indent=2) + "\n").encode()),
        ExportFile("registration-ids.txt", "".join(f"{cn}\n" for _d, cn in ids).encode()),
    ]


def lot_ca_chain(bundles_dir: Path, lot: str) -> tuple[x509.Certificate, ...]:
    """The lot's CA chain (issuing CA first) from its bundle directory; no passphrase or token needed."""
    if not LOT_NAME_RE.fullmatch(lot):
        raise ExportError(f"invalid lot name {lot!r}")
    path = bundles_dir / lot / CHAIN_FILE
    try:
        chain = tuple(x509.load_pem_x509_certificates(path.read_bytes()))
    except FileNotFoundError:
        raise ExportError(f"lot {lot!r} has no CA bundle yet; store one before exporting") from None
    except ValueError as exc:
        # The station's own paths stay out of what an API client is told.
        raise ExportError(f"the stored CA chain of lot {lot!r} is corrupt: {exc}") from None
    return chain


def build_export(
    fmt: ExportFormat,
    lot: str,
    devices: Sequence[ProvisionedDevice],
    *,
    chain: Sequence[x509.Certificate] = (),
) -> Export:
    """The lot's export in ``fmt`` (any format but ``json``, the signed manifest); ExportError if refused."""
    fmt = ExportFormat(fmt)
    count = len(devices)
    if fmt is ExportFormat.CSV:
        return Export(lot, fmt, (ExportFile(f"{lot}.devices.csv", csv_export(devices)),), None, count)
    if fmt is ExportFormat.AWS_BULK:
        return Export(lot, fmt, (ExportFile(f"{lot}.aws-bulk.jsonl", aws_bulk_export(devices)),), None, count)
    if fmt is ExportFormat.NRFCLOUD:
        return Export(lot, fmt, tuple(nrfcloud_export(devices)), f"{lot}-nrfcloud", count)
    if fmt is ExportFormat.AZURE_DPS:
        return Export(lot, fmt, tuple(azure_dps_export(lot, devices, chain)), f"{lot}-azure-dps", count)
    raise ExportError(
        "the json export is the signed manifest; build it with factoryd.service.export_manifest"
    )


def write_export(export: Export, directory: Path) -> Path:
    """Write an export under ``directory`` atomically; return the file or directory written.

    One file replaces the previous one in one rename. Several files are filled into a new
    directory that then replaces the previous export's directory whole, so no file of an older,
    longer export (``onboard-004.csv``) survives next to a newer one.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if export.directory is None:
        target = directory / export.files[0].name
        write_private(target, export.files[0].data, mode=EXPORT_FILE_MODE)
        return target
    target = directory / export.directory
    fresh = directory / f".{export.directory}.{secrets.token_hex(6)}.new"
    with private_staging_dir(fresh, mode=EXPORT_DIR_MODE) as staging:
        for item in export.files:
            write_new(staging / item.name, item.data, mode=EXPORT_FILE_MODE)
    old = directory / f".{export.directory}.{secrets.token_hex(6)}.old"
    if target.is_symlink() or target.is_file():
        shutil.rmtree(fresh, ignore_errors=True)
        raise ExportError(f"{target} exists and is not a directory; move it away first")
    had_old = target.is_dir()
    if had_old:
        os.rename(target, old)
    try:
        os.rename(fresh, target)
    except BaseException:
        if had_old:
            os.rename(old, target)
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    fsync_dir(directory)
    if had_old:
        shutil.rmtree(old, ignore_errors=True)
    return target
