"""Cloud exports: each format parsed back by an independent reader, the nRF split, the ID refusals."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from factoryd.cloud import exports
from factoryd.cloud.errors import ExportError
from factoryd.cloud.exports import (
    AWS_BULK_TEMPLATE,
    CSV_COLUMNS,
    NRFCLOUD_MAX_ROWS,
    ExportFormat,
    build_export,
    dps_id_problem,
    write_export,
)
from factoryd.ledger import Ledger, ProvisionedDevice
from factoryd.pki.bundle import load_pkcs12_bundle
from factoryd.pki.testca import TestPki, make_test_pki
from factoryd.service import store_bundle
from tests.helpers.api import STATION_PASSPHRASE, running_api
from tests.helpers.provisioned import provision_lot

DOCS_TEMPLATE = Path(__file__).parent.parent / "docs" / "examples" / "aws-bulk-template.json"


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return make_test_pki(passphrase=b"exports-test")


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    with Ledger.open("sqlite:///:memory:") as opened:
        yield opened


@pytest.fixture
def devices(ledger: Ledger, pki: TestPki) -> list[ProvisionedDevice]:
    return provision_lot(ledger, "LOT-1", [f"dev-{n:03d}" for n in range(5)], pki)


def _pem_der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


def test_csv_round_trips_through_the_csv_module(devices: list[ProvisionedDevice]) -> None:
    export = build_export(ExportFormat.CSV, "LOT-1", devices)
    assert export.directory is None
    assert export.files[0].name == "LOT-1.devices.csv"
    rows = list(csv.reader(io.StringIO(export.files[0].data.decode(), newline="")))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 1 + len(devices)
    by_id = {row[0]: dict(zip(CSV_COLUMNS, row, strict=True)) for row in rows[1:]}
    for device in devices:
        row = by_id[device.device_id]
        assert row["hw_serial"] == device.hw_serial
        assert row["cert_serial"] == device.cert_serial
        assert row["fingerprint_sha256"] == device.fingerprint_sha256
        assert row["station"] == device.station
        assert row["port"] == device.port
        assert row["provisioned_at"].endswith("Z")
        assert _pem_der(row["cert_pem"]) == device.cert_der


def test_aws_bulk_lines_are_json_objects_keyed_by_the_template_parameters(
    devices: list[ProvisionedDevice],
) -> None:
    export = build_export(ExportFormat.AWS_BULK, "LOT-1", devices)
    lines = export.files[0].data.decode().splitlines()
    assert len(lines) == len(devices)
    parameters = AWS_BULK_TEMPLATE["Parameters"]
    required = {name for name, spec in parameters.items() if "Default" not in spec}
    for line, device in zip(lines, devices, strict=True):
        record = json.loads(line)
        assert set(record) <= set(parameters)
        assert required <= set(record)
        assert record["ThingName"] == device.device_id
        assert record["SerialNumber"] == device.hw_serial
        assert _pem_der(record["CertificatePem"]) == device.cert_der


def test_the_documented_template_is_the_one_the_lines_fit() -> None:
    assert json.loads(DOCS_TEMPLATE.read_text()) == AWS_BULK_TEMPLATE


def test_aws_bulk_refuses_ids_that_are_no_thing_names(ledger: Ledger, pki: TestPki) -> None:
    devices = provision_lot(ledger, "LOT-2", ["good-1", "bad#1", "also@bad"], pki)
    with pytest.raises(ExportError, match=r"2 devices cannot be exported as AWS things.*'bad#1'.*'also@bad'"):
        build_export(ExportFormat.AWS_BULK, "LOT-2", devices)


def _nrf_rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode(), newline="")))


def test_nrfcloud_rows_match_the_onboarding_format(devices: list[ProvisionedDevice]) -> None:
    export = build_export(ExportFormat.NRFCLOUD, "LOT-1", devices)
    assert export.directory == "LOT-1-nrfcloud"
    assert [f.name for f in export.files] == ["onboard-001.csv"]
    data = export.files[0].data
    text = data.decode()
    # No header; the only quoted field is the multi-line PEM (minimal quoting), rows end in LF.
    assert text.startswith('dev-000,,,APP|MODEM,"-----BEGIN CERTIFICATE-----\n')
    assert "\r" not in text
    rows = _nrf_rows(data)
    assert len(rows) == len(devices)
    for row, device in zip(rows, devices, strict=True):
        device_id, sub_type, tags, fw_types, pem = row
        assert (device_id, sub_type, tags, fw_types) == (device.device_id, "", "", "APP|MODEM")
        assert _pem_der(pem) == device.cert_der


@pytest.mark.parametrize(("count", "files"), [(NRFCLOUD_MAX_ROWS, 1), (NRFCLOUD_MAX_ROWS + 1, 2)])
def test_nrfcloud_splits_at_the_service_row_limit(
    ledger: Ledger, pki: TestPki, count: int, files: int
) -> None:
    devices = provision_lot(ledger, "BIG", [f"n-{n:05d}" for n in range(count)], pki)
    export = build_export(ExportFormat.NRFCLOUD, "BIG", devices)
    assert [f.name for f in export.files] == [f"onboard-{n:03d}.csv" for n in range(1, files + 1)]
    parts = [_nrf_rows(f.data) for f in export.files]
    assert len(parts[0]) == NRFCLOUD_MAX_ROWS
    if files == 2:
        assert len(parts[1]) == 1
    ids = [row[0] for part in parts for row in part]
    assert ids == [d.device_id for d in devices]  # every device once, in order


def test_nrfcloud_refuses_fields_that_break_its_csv(devices: list[ProvisionedDevice]) -> None:
    with pytest.raises(ExportError, match="must not contain"):
        exports.nrfcloud_export(devices, tags=("line-1,batch-2",))
    with pytest.raises(ExportError, match="must not contain"):
        exports.nrfcloud_export(devices, fw_types=("APP|MODEM",))  # one type per item; '|' joins them


def test_nrfcloud_tags_and_fw_types_are_pipe_separated(devices: list[ProvisionedDevice]) -> None:
    files = exports.nrfcloud_export(devices[:1], sub_type="tracker", tags=("line-1", "eu"), fw_types=("APP",))
    assert _nrf_rows(files[0].data)[0][:4] == [devices[0].device_id, "tracker", "line-1|eu", "APP"]


def test_azure_dps_group_body_chain_and_registration_ids(
    devices: list[ProvisionedDevice], pki: TestPki
) -> None:
    chain = (pki.issuing_cert, pki.root_cert)
    export = build_export(ExportFormat.AZURE_DPS, "LOT-1", devices, chain=chain)
    files = {f.name: f.data for f in export.files}
    assert set(files) == {"ca-chain.pem", "enrollment-group.json", "registration-ids.txt"}
    assert x509.load_pem_x509_certificates(files["ca-chain.pem"]) == list(chain)
    group = json.loads(files["enrollment-group.json"])
    assert group["enrollmentGroupId"] == "LOT-1"
    assert group["provisioningStatus"] == "enabled"
    assert group["attestation"]["type"] == "x509"
    primary = group["attestation"]["x509"]["signingCertificates"]["primary"]["certificate"]
    assert x509.load_pem_x509_certificate(primary.encode()) == pki.issuing_cert
    ids = files["registration-ids.txt"].decode().splitlines()
    cns = [
        x509.load_der_x509_certificate(d.cert_der)
        .subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0]
        .value
        for d in devices
    ]
    assert ids == cns == [d.device_id for d in devices]


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("dev-001", True),
        ("Dev.001:a_b-", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        ("ends-with.", False),
        ("ends_with_", False),
        ("has space", False),
        ("at@sign", False),
    ],
)
def test_dps_registration_id_rules(value: str, ok: bool) -> None:
    assert (dps_id_problem(value) is None) is ok


def test_azure_dps_refuses_invalid_and_case_colliding_registration_ids(ledger: Ledger, pki: TestPki) -> None:
    devices = provision_lot(ledger, "LOT-4", ["Dev-1", "dev-1", "trailing.", "fine"], pki)
    with pytest.raises(ExportError) as caught:
        build_export(ExportFormat.AZURE_DPS, "LOT-4", devices, chain=(pki.issuing_cert,))
    message = str(caught.value)
    assert "2 devices cannot be exported to Azure DPS" in message
    assert "'trailing.'" in message
    assert "same registration ID 'dev-1'" in message


def test_a_certificate_that_does_not_parse_is_refused(devices: list[ProvisionedDevice]) -> None:
    broken = [*devices[:1], replace(devices[1], cert_der=b"\x30\x03junk")]
    with pytest.raises(ExportError, match="does not parse"):
        build_export(ExportFormat.CSV, "LOT-1", broken)


def test_write_export_single_file_is_public_and_atomic(
    devices: list[ProvisionedDevice], tmp_path: Path
) -> None:
    export = build_export(ExportFormat.CSV, "LOT-1", devices)
    path = write_export(export, tmp_path / "out")
    assert path.read_bytes() == export.files[0].data
    assert stat.S_IMODE(path.stat().st_mode) == exports.EXPORT_FILE_MODE
    assert sorted(os.listdir(tmp_path / "out")) == ["LOT-1.devices.csv"]  # no temp file left


def test_a_shorter_export_replaces_the_whole_directory(ledger: Ledger, pki: TestPki, tmp_path: Path) -> None:
    devices = provision_lot(ledger, "SPLIT", [f"s-{n:04d}" for n in range(NRFCLOUD_MAX_ROWS + 1)], pki)
    first = write_export(build_export(ExportFormat.NRFCLOUD, "SPLIT", devices), tmp_path)
    assert sorted(os.listdir(first)) == ["onboard-001.csv", "onboard-002.csv"]
    second = write_export(build_export(ExportFormat.NRFCLOUD, "SPLIT", devices[:3]), tmp_path)
    assert second == first
    assert sorted(os.listdir(second)) == ["onboard-001.csv"]  # no stale onboard-002.csv
    assert len(_nrf_rows((second / "onboard-001.csv").read_bytes())) == 3
    assert sorted(os.listdir(tmp_path)) == ["SPLIT-nrfcloud"]  # no staging or old directory left


def test_a_failure_half_way_leaves_the_previous_export(
    devices: list[ProvisionedDevice], pki: TestPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = (pki.issuing_cert,)
    before = write_export(build_export(ExportFormat.AZURE_DPS, "LOT-1", devices, chain=chain), tmp_path)
    snapshot = {p.name: p.read_bytes() for p in before.iterdir()}
    written: list[Path] = []
    real_write_new = exports.write_new

    def fail_on_second(path: Path, data: bytes, *, mode: int) -> None:
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        real_write_new(path, data, mode=mode)

    monkeypatch.setattr(exports, "write_new", fail_on_second)
    with pytest.raises(OSError, match="No space"):
        write_export(build_export(ExportFormat.AZURE_DPS, "LOT-1", devices[:2], chain=chain), tmp_path)
    assert {p.name: p.read_bytes() for p in before.iterdir()} == snapshot
    assert sorted(os.listdir(tmp_path)) == ["LOT-1-azure-dps"]


def test_zip_payload_holds_the_directory(devices: list[ProvisionedDevice]) -> None:
    export = build_export(ExportFormat.NRFCLOUD, "LOT-1", devices)
    assert export.media_type == "application/zip"
    with zipfile.ZipFile(io.BytesIO(export.payload())) as archive:
        assert archive.namelist() == ["LOT-1-nrfcloud/onboard-001.csv"]
        assert archive.read("LOT-1-nrfcloud/onboard-001.csv") == export.files[0].data


async def test_the_customer_api_serves_each_format_to_the_lots_customer_only(
    tmp_path: Path, pki: TestPki
) -> None:
    async with running_api(tmp_path) as api:
        devices = await asyncio.to_thread(
            provision_lot, api.ledger.sync, "acme-7", [f"a-{n}" for n in range(3)], pki, customer="acme"
        )
        bundle = load_pkcs12_bundle(pki.pkcs12, bytes(pki.passphrase))
        store_bundle(api.ctx.paths, STATION_PASSPHRASE, "acme-7", bundle)
        async with api.client("acme") as acme, api.client("globex") as globex:
            csv_reply = await acme.get("/lots/acme-7/export", params={"format": "csv"})
            assert csv_reply.status_code == 200
            assert csv_reply.headers["content-type"].startswith("text/csv")
            rows = list(csv.reader(io.StringIO(csv_reply.text, newline="")))
            assert [r[0] for r in rows[1:]] == [d.device_id for d in devices]
            bulk = await acme.get("/lots/acme-7/export", params={"format": "aws-bulk"})
            assert [json.loads(line)["ThingName"] for line in bulk.text.splitlines()] == [
                d.device_id for d in devices
            ]
            dps = await acme.get("/lots/acme-7/export", params={"format": "azure-dps"})
            assert dps.headers["content-type"] == "application/zip"
            assert 'filename="acme-7-azure-dps.zip"' in dps.headers["content-disposition"]
            with zipfile.ZipFile(io.BytesIO(dps.content)) as archive:
                ids = archive.read("acme-7-azure-dps/registration-ids.txt").decode().splitlines()
            assert ids == [d.device_id for d in devices]
            manifest = await acme.get("/lots/acme-7/export")  # json, the default: the signed manifest
            assert json.loads(manifest.content)["count"] == len(devices)
            assert (await acme.get("/lots/acme-7/export", params={"format": "xml"})).status_code == 422
            assert (await globex.get("/lots/acme-7/export", params={"format": "csv"})).status_code == 404


def test_the_cli_writes_each_format_and_refuses_an_unknown_one(tmp_path: Path, pki: TestPki) -> None:
    from typer.testing import CliRunner

    from factoryd.cli.main import app
    from factoryd.config import load_settings

    config = tmp_path / "factoryd.toml"
    config.write_text(f'[station]\nname = "export-station"\nstate_dir = "{tmp_path}"\n')
    with Ledger.open(load_settings(config).ledger_url) as ledger:
        devices = provision_lot(ledger, "LOT-9", ["c-1", "c-2"], pki)
    out = tmp_path / "exports"
    result = CliRunner().invoke(
        app, ["manifest", "export", "LOT-9", "--format", "nrfcloud", "--out", str(out), "-c", str(config)]
    )
    assert result.exit_code == 0, result.output
    assert "nrfcloud export of 2 devices" in result.output
    rows = _nrf_rows((out / "LOT-9-nrfcloud" / "onboard-001.csv").read_bytes())
    assert [r[0] for r in rows] == [d.device_id for d in devices]
    result = CliRunner().invoke(app, ["manifest", "export", "LOT-9", "--format", "csv", "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "manifests" / "LOT-9.devices.csv").is_file()
    refused = CliRunner().invoke(app, ["manifest", "export", "LOT-9", "--format", "xml", "-c", str(config)])
    assert refused.exit_code == 2
    assert "unknown export format 'xml'" in refused.output
    no_ca = CliRunner().invoke(
        app, ["manifest", "export", "LOT-9", "--format", "azure-dps", "-c", str(config)]
    )
    assert no_ca.exit_code == 2
    assert "has no CA bundle" in no_ca.output
