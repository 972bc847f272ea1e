"""Registration in AWS IoT: real boto3 against moto's own server on 127.0.0.1, fake credentials.

moto ignores the verification certificate and the CA's signature (CLOUDS.md), so the tests
check the verification certificate themselves, from the request boto3 sent.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factoryd.cloud.aws import (
    AwsRegistrar,
    Backoff,
    Outcome,
    aws_target,
    iot_clients,
)
from factoryd.cloud.errors import CloudError
from factoryd.ledger import Ledger, ProvisionedDevice
from factoryd.ledger.registrations import RegistrationStep
from factoryd.pki import SoftwareSigner
from factoryd.pki.testca import TestPki, make_test_pki
from factoryd.pki.verification import verification_certificate
from tests.helpers.mqtt_broker import free_port
from tests.helpers.provisioned import issuer_for, provision_lot

if TYPE_CHECKING:
    from mypy_boto3_iot import IoTClient

pytest.importorskip("boto3")
pytest.importorskip("moto")

REGION = "us-east-1"
POLICY = "factoryd-test-policy"
DEVICES = 20
MOTO_START_TIMEOUT_S = 60.0
FAST = Backoff(attempts=5, initial_s=0.01, max_s=0.05)


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """moto's own server as a separate process on a free port of 127.0.0.1."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(  # noqa: S603 - fixed argv
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + MOTO_START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):  # noqa: S310 - local test server
                    break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def aws_env(moto_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Fake credentials (never a real profile) and a fresh moto state."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    request = urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")  # noqa: S310
    with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - local test server
        pass
    return moto_url


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return make_test_pki(passphrase=b"aws-test")


@dataclass
class Setup:
    ledger: Ledger
    devices: list[ProvisionedDevice]
    iot: IoTClient
    target: str
    pki: TestPki
    proofs: int = 0

    def registrar(self, **kwargs: Any) -> AwsRegistrar:
        def prove_possession(code: str) -> str:
            self.proofs += 1
            return verification_certificate(
                SoftwareSigner(self.pki.issuing_key, self.pki.issuing_cert), code
            ).pem

        options: dict[str, Any] = {"policy": POLICY, "create_policy": True, "backoff": FAST, "workers": 4}
        options.update(kwargs)
        return AwsRegistrar(
            self.ledger,
            "LOT-A",
            self.iot,
            target=self.target,
            chain=(self.pki.issuing_cert, self.pki.root_cert),
            prove_possession=prove_possession,
            **options,
        )


@pytest.fixture
def setup(aws_env: str, pki: TestPki, tmp_path: Path) -> Iterator[Setup]:
    with Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        devices = provision_lot(ledger, "LOT-A", [f"thing-{n:03d}" for n in range(DEVICES)], pki)
        iot, sts = iot_clients(region=REGION, endpoint_url=aws_env)
        yield Setup(ledger, devices, iot, aws_target(sts, REGION), pki)


class Calls:
    """Counts each IoT operation boto3 sends (every attempt, retries included)."""

    def __init__(self, iot: IoTClient) -> None:
        self._lock = threading.Lock()  # the registrar's workers send at once
        self.sent: dict[str, int] = {}
        self.params: dict[str, list[dict[str, Any]]] = {}
        iot.meta.events.register("before-send.iot.*", self._sent)
        iot.meta.events.register("provide-client-params.iot.*", self._params)

    def _sent(self, request: Any, **kwargs: Any) -> None:
        name = kwargs["event_name"].rsplit(".", 1)[-1]
        with self._lock:
            self.sent[name] = self.sent.get(name, 0) + 1

    def _params(self, params: dict[str, Any], **kwargs: Any) -> None:
        name = kwargs["event_name"].rsplit(".", 1)[-1]
        with self._lock:
            self.params.setdefault(name, []).append(dict(params))


def _certificates(iot: IoTClient) -> list[dict[str, Any]]:
    return list(iot.list_certificates(pageSize=250)["certificates"])


def _things(iot: IoTClient) -> list[str]:
    return [t["thingName"] for t in iot.list_things(maxResults=250)["things"]]


def _check_account(setup: Setup) -> None:
    """One ACTIVE certificate and one thing per device, the thing holds that cert, the policy on it."""
    iot = setup.iot
    certificates = _certificates(iot)
    assert len(certificates) == DEVICES
    assert {c["status"] for c in certificates} == {"ACTIVE"}
    assert sorted(_things(iot)) == sorted(d.device_id for d in setup.devices)
    records = {
        r.device_id: r
        for r in setup.ledger.cloud_registrations("LOT-A", cloud="aws", target=setup.target)
        if r.device_id is not None
    }
    for device in setup.devices:
        record = records[device.device_id]
        assert record.step is RegistrationStep.POLICY_ATTACHED
        principals = iot.list_thing_principals(thingName=device.device_id)["principals"]
        assert principals == [record.cloud_cert_arn]
        policies = iot.list_attached_policies(target=principals[0])["policies"]
        assert [p["policyName"] for p in policies] == [POLICY]
        described = iot.describe_certificate(certificateId=record.cloud_cert_id or "")[
            "certificateDescription"
        ]
        assert x509.load_pem_x509_certificate(
            described["certificatePem"].encode()
        ) == x509.load_der_x509_certificate(device.cert_der)


def test_registers_the_ca_with_proof_of_possession_and_every_device(setup: Setup) -> None:
    calls = Calls(setup.iot)
    summary = setup.registrar().run()
    assert (summary.registered, summary.already, summary.revoked, summary.failed) == (DEVICES, 0, 0, ())
    assert summary.ca_registered_now
    _check_account(setup)
    # The CA: registered ACTIVE, once, with a verification certificate CN=<the code> signed by its key.
    ca = setup.iot.describe_ca_certificate(certificateId=summary.ca_certificate_id)["certificateDescription"]
    assert ca["status"] == "ACTIVE"
    (request,) = calls.params["RegisterCACertificate"]
    assert request["setAsActive"] is True
    proof = x509.load_pem_x509_certificate(request["verificationCertificate"].encode())
    code = proof.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert calls.sent["GetRegistrationCode"] == 1
    assert len(code) > 0
    proof.verify_directly_issued_by(setup.pki.issuing_cert)
    assert x509.load_pem_x509_certificate(request["caCertificate"].encode()) == setup.pki.issuing_cert
    # Every device certificate went with the CA's PEM, ACTIVE.
    registered = calls.params["RegisterCertificate"]
    assert len(registered) == DEVICES
    assert {r["status"] for r in registered} == {"ACTIVE"}
    assert {r["caCertificatePem"] for r in registered} == {request["caCertificate"]}
    assert setup.proofs == 1


def test_a_rerun_does_nothing_and_needs_no_ca_key(setup: Setup) -> None:
    setup.registrar().run()
    calls = Calls(setup.iot)
    summary = setup.registrar().run()
    assert (summary.registered, summary.already, summary.ca_registered_now) == (0, DEVICES, False)
    assert set(calls.sent) == {"GetPolicy", "DescribeCACertificate"}
    assert setup.proofs == 1  # only the first run needed the CA key
    _check_account(setup)


class CrashError(Exception):
    """The station dies mid-run (power cut, kill -9 stand-in)."""


@pytest.mark.parametrize(
    "operation", ["RegisterCertificate", "CreateThing", "AttachThingPrincipal", "AttachPolicy"]
)
def test_a_crash_halfway_then_a_resumed_run_registers_each_device_exactly_once(
    setup: Setup, operation: str
) -> None:
    calls = Calls(setup.iot)
    done = DEVICES // 2
    seen = 0

    def crash_after_aws_did_it(**_kwargs: Any) -> None:
        # after-call: AWS has done the work, the ledger has not recorded it yet.
        nonlocal seen
        seen += 1
        if seen == done + 1:
            raise CrashError(operation)

    setup.iot.meta.events.register(f"after-call.iot.{operation}", crash_after_aws_did_it)
    with pytest.raises(CrashError):
        setup.registrar(workers=1).run()
    setup.iot.meta.events.unregister(f"after-call.iot.{operation}", crash_after_aws_did_it)
    steps = [r.step for r in setup.ledger.cloud_registrations("LOT-A", cloud="aws", target=setup.target)]
    assert steps.count(RegistrationStep.POLICY_ATTACHED) == done

    summary = setup.registrar().run()
    assert (summary.registered, summary.already, summary.failed) == (DEVICES - done, done, ())
    _check_account(setup)
    # One registration per device; only a certificate whose reply was lost is sent twice (and
    # AWS answers the second with ResourceAlreadyExists, naming it).
    lost = 1 if operation == "RegisterCertificate" else 0
    assert calls.sent["RegisterCertificate"] == DEVICES + lost
    assert calls.sent["CreateThing"] == DEVICES + (1 if operation == "CreateThing" else 0)


def _throttled(remaining: dict[str, int]) -> Any:
    """A before-send hook answering ThrottlingException (HTTP 400) while an operation has some left."""
    from botocore.awsrequest import AWSResponse

    class _Raw:
        def __init__(self, body: bytes) -> None:
            self._body = body

        def stream(self, **_kwargs: Any) -> Iterator[bytes]:
            yield self._body

    lock = threading.Lock()

    def hook(request: Any, **kwargs: Any) -> AWSResponse | None:
        name = kwargs["event_name"].rsplit(".", 1)[-1]
        with lock:
            if remaining.get(name, 0) <= 0:
                return None
            remaining[name] -= 1
        headers = {"x-amzn-ErrorType": "ThrottlingException", "Content-Type": "application/json"}
        return AWSResponse(request.url, 400, headers, _Raw(b'{"message": "Rate exceeded"}'))

    return hook


def test_throttling_is_backed_off_and_the_run_completes(setup: Setup) -> None:
    remaining = {"RegisterCertificate": 3, "CreateThing": 2, "AttachPolicy": 1}
    setup.iot.meta.events.register_first("before-send.iot.*", _throttled(remaining))
    summary = setup.registrar().run()
    assert summary.backoffs == 6  # one backoff per throttled answer, no more
    assert remaining == {"RegisterCertificate": 0, "CreateThing": 0, "AttachPolicy": 0}
    assert (summary.registered, summary.failed) == (DEVICES, ())
    _check_account(setup)


def test_throttling_past_the_budget_stops_the_run_and_a_rerun_finishes(setup: Setup) -> None:
    calls = Calls(setup.iot)
    remaining = {"CreateThing": 1000}
    hook = _throttled(remaining)
    setup.iot.meta.events.register_first("before-send.iot.*", hook)
    with pytest.raises(
        CloudError, match="kept answering ThrottlingException to CreateThing after 5 attempts"
    ):
        setup.registrar(workers=1).run()
    assert remaining["CreateThing"] == 1000 - FAST.attempts  # bounded: the budget, then stop
    setup.iot.meta.events.unregister("before-send.iot.*", hook)
    summary = setup.registrar().run()
    assert (summary.registered, summary.failed) == (DEVICES, ())
    assert calls.sent["RegisterCertificate"] == DEVICES
    _check_account(setup)


def test_a_missing_policy_is_refused_before_anything_is_registered(setup: Setup) -> None:
    calls = Calls(setup.iot)
    with pytest.raises(CloudError, match=f"policy {POLICY!r} does not exist.*--create-policy"):
        setup.registrar(create_policy=False).run()
    assert set(calls.sent) == {"GetPolicy"}
    assert _certificates(setup.iot) == []


def test_the_created_policy_is_factoryds_least_privilege_default(setup: Setup) -> None:
    setup.registrar().run()
    document = setup.iot.get_policy(policyName=POLICY)["policyDocument"]
    assert "${iot:Connection.Thing.ThingName}" in document
    assert "iot:Connection.Thing.IsAttached" in document


def test_a_ca_registered_by_hand_is_found_and_not_registered_again(setup: Setup) -> None:
    pem = setup.pki.issuing_pem.decode()
    other = make_test_pki(passphrase=b"other").issuing_pem.decode()
    setup.iot.register_ca_certificate(caCertificate=other, setAsActive=True)
    by_hand = setup.iot.register_ca_certificate(caCertificate=pem, setAsActive=True)["certificateId"]
    calls = Calls(setup.iot)
    summary = setup.registrar().run()
    assert (summary.ca_certificate_id, summary.ca_registered_now) == (by_hand, False)
    assert "GetRegistrationCode" not in calls.sent
    assert setup.proofs == 0
    assert summary.registered == DEVICES


def test_an_inactive_ca_is_left_alone_and_refused(setup: Setup) -> None:
    setup.iot.register_ca_certificate(caCertificate=setup.pki.issuing_pem.decode(), setAsActive=False)
    with pytest.raises(CloudError, match="registered in AWS IoT as INACTIVE"):
        setup.registrar().run()
    assert _certificates(setup.iot) == []


@dataclass(frozen=True)
class _Revoked:
    """What ``Ledger.revoked_certificates`` hands out, as far as AWS needs it."""

    device_id: str
    fingerprint_sha256: str


def test_certificates_that_do_not_stand_are_marked_revoked(setup: Setup) -> None:
    setup.registrar().run()
    # thing-000 was reworked after an earlier run registered its first certificate.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "thing-000")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    issuer = issuer_for(setup.pki)
    old = issuer.issue(issuer.verify_csr(csr, "thing-000"), "thing-000")
    old_pem = x509.load_der_x509_certificate(old.der).public_bytes(serialization.Encoding.PEM).decode()
    earlier = setup.iot.register_certificate(certificatePem=old_pem, status="ACTIVE")
    setup.ledger.record_cloud_step(
        "LOT-A",
        cloud="aws",
        target=setup.target,
        cert_sha256=old.fingerprint_sha256,
        device_id="thing-000",
        step=RegistrationStep.POLICY_ATTACHED,
        cloud_cert_id=earlier["certificateId"],
        cloud_cert_arn=earlier["certificateArn"],
        actor="test",
    )
    setup.iot.attach_thing_principal(thingName="thing-000", principal=earlier["certificateArn"])
    reworked = _Revoked("thing-000", old.fingerprint_sha256)
    # A certificate whose board failed before anyone registered it: AWS does not know it.
    never_registered = _Revoked("thing-001", hashlib.sha256(b"a certificate that never left").hexdigest())
    calls = Calls(setup.iot)
    summary = setup.registrar().run([reworked, never_registered])
    assert (summary.already, summary.revoked, summary.absent, summary.failed) == (DEVICES, 1, 1, ())
    revoked = setup.iot.describe_certificate(certificateId=earlier["certificateId"])["certificateDescription"]
    assert revoked["status"] == "REVOKED"
    (update,) = calls.params["UpdateCertificate"]
    assert (update["certificateId"], update["newStatus"]) == (earlier["certificateId"], "REVOKED")
    standing = next(
        r
        for r in setup.ledger.cloud_registrations("LOT-A", cloud="aws", target=setup.target)
        if r.cert_sha256 == setup.devices[0].fingerprint_sha256
    )
    # thing-000 holds its standing certificate only, again.
    assert setup.iot.list_thing_principals(thingName="thing-000")["principals"] == [standing.cloud_cert_arn]
    again = setup.registrar().run([reworked, never_registered])
    assert (again.revoked, again.absent, again.already) == (0, 1, DEVICES + 1)


def test_device_ids_that_are_no_thing_names_fail_with_a_reason_and_the_rest_register(
    aws_env: str, pki: TestPki, tmp_path: Path
) -> None:
    with Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        devices = provision_lot(ledger, "LOT-A", ["ok-1", "not@thing", "ok-2"], pki)
        iot, sts = iot_clients(region=REGION, endpoint_url=aws_env)
        setup = Setup(ledger, devices, iot, aws_target(sts, REGION), pki)
        summary = setup.registrar().run()
    assert summary.registered == 2
    assert [(f.device_id, f.outcome) for f in summary.failed] == [("not@thing", Outcome.FAILED)]
    assert "not an AWS thing name" in (summary.failed[0].reason or "")
    assert sorted(_things(iot)) == ["ok-1", "ok-2"]


def test_registration_throughput_against_moto(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    summary = setup.registrar().run()
    assert summary.registered == DEVICES
    assert summary.devices_per_s > 0
    with capsys.disabled():
        print(f"\nAWS registration against moto: {summary.devices_per_s:.1f} devices/s ({DEVICES} devices)")


def test_the_cli_registers_resumes_and_prints_a_summary(
    aws_env: str, pki: TestPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from factoryd.cli.main import app
    from factoryd.config import load_settings
    from factoryd.pki.bundle import load_pkcs12_bundle
    from factoryd.service import StationPaths, store_bundle

    passphrase = "station-passphrase-for-aws"
    monkeypatch.setenv("FACTORYD_CA_PASSPHRASE", passphrase)
    config = tmp_path / "factoryd.toml"
    config.write_text(f'[station]\nname = "aws-station"\nstate_dir = "{tmp_path}"\n')
    settings = load_settings(config)
    with Ledger.open(settings.ledger_url) as ledger:
        provision_lot(ledger, "LOT-C", [f"cli-{n}" for n in range(5)], pki)
    bundle = load_pkcs12_bundle(pki.pkcs12, bytes(pki.passphrase))
    store_bundle(StationPaths(tmp_path), passphrase.encode(), "LOT-C", bundle)
    argv = [
        "cloud",
        "aws",
        "register",
        "LOT-C",
        "--region",
        REGION,
        "--endpoint-url",
        aws_env,
        "-c",
        str(config),
    ]

    missing = CliRunner().invoke(app, argv)
    assert missing.exit_code == 2
    assert "policy 'factoryd-LOT-C' does not exist" in missing.output

    first = CliRunner().invoke(app, [*argv, "--create-policy"])
    assert first.exit_code == 0, first.output
    assert "in AWS IoT 123456789012/us-east-1: CA " in first.output
    assert first.output.splitlines()[0].endswith("registered now")
    assert "devices: 5 registered now, 0 already registered, 0 revoked, 0 failed" in first.output
    again = CliRunner().invoke(app, [*argv, "--json"])
    assert again.exit_code == 0, again.output
    summary = json.loads(again.output)
    assert (summary["registered"], summary["already_registered"], summary["ca_registered_now"]) == (
        0,
        5,
        False,
    )
