"""Register a lot's CA and its provisioned devices straight into AWS IoT Core (boto3).

What one run does, in this order:

1. the lot's policy must exist (or is created from :data:`DEFAULT_POLICY_DOCUMENT` when asked);
2. the lot's issuing CA is registered ACTIVE with proof of possession (GetRegistrationCode, a
   verification certificate ``CN=<code>`` signed by the lot's CA key, RegisterCACertificate), or
   found already registered (by the ledger's record, else by its certificate ID);
3. every provisioned device: RegisterCertificate ACTIVE (with the CA's PEM) → CreateThing named by
   the device ID → AttachThingPrincipal → AttachPolicy;
4. every certificate that was issued but does not stand and is in AWS is updated to REVOKED and
   detached from its thing (one that is not there cannot connect: the CA is registered without
   auto-registration).

Idempotent and resumable: each step a certificate completes is committed to the ledger
(:mod:`factoryd.ledger.registrations`) before the next one starts, so a rerun after a crash, a
Ctrl-C or a throttling error does only what is missing. A step whose reply was lost is safe to
redo: RegisterCertificate answers ResourceAlreadyExists with the certificate's ID, the other
calls are idempotent. AWS throttling (and 5xx) is retried with capped exponential backoff and
jitter, a bounded number of times; botocore's own retries are off so every backoff is counted.
Blocking calls, meant for the CLI's thread (never an event loop).
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from factoryd.cloud.errors import CloudError
from factoryd.cloud.exports import AWS_THING_NAME
from factoryd.ledger.core import Ledger
from factoryd.ledger.model import ProvisionedDevice
from factoryd.ledger.registrations import CloudRegistration, RegistrationStep

if TYPE_CHECKING:
    from mypy_boto3_iot import IoTClient
    from mypy_boto3_iot.type_defs import CACertificateDescriptionTypeDef
    from mypy_boto3_sts import STSClient

T = TypeVar("T")

AWS_CLOUD = "aws"
# Error codes AWS answers when a caller goes too fast (IoT's control plane says Throttling;
# some front ends TooManyRequests): retried with backoff.
THROTTLING_CODES = frozenset({"ThrottlingException", "TooManyRequestsException", "Throttling"})
# Server-side trouble that a retry may clear.
TRANSIENT_CODES = frozenset(
    {"ServiceUnavailableException", "InternalFailureException", "InternalServerException"}
)
# Four parallel devices stay well below IoT's control-plane limits (tens of calls per second per
# API) and still hide most of each call's round trip.
DEFAULT_WORKERS = 4
MAX_WORKERS = 32
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
# Least privilege for a device that is its thing: connect as its own name, publish and receive
# under things/<name>/, and only while its certificate is attached to that thing.
DEFAULT_POLICY_DOCUMENT: dict[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": "iot:Connect",
            "Resource": "arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}",
            "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": "true"}},
        },
        {
            "Effect": "Allow",
            "Action": ["iot:Publish", "iot:Receive"],
            "Resource": "arn:aws:iot:*:*:topic/things/${iot:Connection.Thing.ThingName}/*",
        },
        {
            "Effect": "Allow",
            "Action": "iot:Subscribe",
            "Resource": "arn:aws:iot:*:*:topicfilter/things/${iot:Connection.Thing.ThingName}/*",
        },
    ],
}
_ATTRIBUTE_VALUE_MAX_CHARS = 800
_ATTRIBUTE_VALUE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.,@/:#-")


@dataclass(frozen=True, slots=True)
class Backoff:
    """How often and how long to back off on throttling: capped exponential with jitter."""

    attempts: int = 8  # calls in all, the first included
    initial_s: float = 0.5
    max_s: float = 20.0


class RevokedCertificate(Protocol):
    """A certificate the lot's CA signed that does not stand (``Ledger.revoked_certificates``)."""

    @property
    def device_id(self) -> str:
        """The device ID it was issued for."""
        ...

    @property
    def fingerprint_sha256(self) -> str:
        """Hex SHA-256 of its DER: AWS IoT's certificate ID for it."""
        ...


class Outcome(StrEnum):
    """What a run did with one certificate."""

    REGISTERED = "registered"  # registered (or finished) by this run
    ALREADY = "already"  # the ledger says it was done before
    REVOKED = "revoked"
    ABSENT = "absent"  # a certificate that does not stand and is not in AWS: nothing to revoke
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class DeviceOutcome:
    """One certificate's outcome in a run."""

    device_id: str
    outcome: Outcome
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class RegistrationSummary:
    """What a run did, for the CLI's summary and the audit trail."""

    lot: str
    target: str
    ca_certificate_id: str
    ca_registered_now: bool
    registered: int
    already: int
    revoked: int
    absent: int
    failed: tuple[DeviceOutcome, ...]
    backoffs: int
    elapsed_s: float

    @property
    def devices_per_s(self) -> float:
        """Devices registered by this run per second of its wall time."""
        return self.registered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        """JSON-ready counts (and the failures with their reasons)."""
        return {
            "lot": self.lot,
            "target": self.target,
            "ca_certificate_id": self.ca_certificate_id,
            "ca_registered_now": self.ca_registered_now,
            "registered": self.registered,
            "already_registered": self.already,
            "revoked": self.revoked,
            "revoked_not_in_aws": self.absent,
            "failed": [{"device_id": f.device_id, "reason": f.reason} for f in self.failed],
            "backoffs": self.backoffs,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def iot_clients(*, region: str | None, endpoint_url: str | None) -> tuple[IoTClient, STSClient]:
    """An IoT and an STS client with botocore's retries off (this module backs off and counts)."""
    try:
        import boto3  # noqa: PLC0415 - optional dependency (the aws extra)
        from botocore.config import Config  # noqa: PLC0415
    except ImportError as exc:
        raise CloudError("AWS registration needs boto3: pip install 'factoryd[aws]'") from exc
    session = boto3.session.Session(region_name=region)
    if session.region_name is None:
        raise CloudError("no AWS region: pass --region or set AWS_REGION (or a profile's region)")
    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
    )
    iot = session.client("iot", endpoint_url=endpoint_url, config=config)
    sts = session.client("sts", endpoint_url=endpoint_url, config=config)
    return iot, sts


def aws_target(sts: STSClient, region: str) -> str:
    """``<account>/<region>``, the ledger's key of a registration (GetCallerIdentity needs no permission)."""
    return f"{sts.get_caller_identity()['Account']}/{region}"


def _pem(cert_der: bytes) -> str:
    return x509.load_der_x509_certificate(cert_der).public_bytes(serialization.Encoding.PEM).decode("ascii")


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    return code if isinstance(code, str) else None


def _is_retryable(exc: BaseException) -> bool:
    code = _error_code(exc)
    return code is not None and (code in THROTTLING_CODES or code in TRANSIENT_CODES)


def _client_error_types() -> tuple[type[Exception], ...]:
    from botocore.exceptions import ClientError  # noqa: PLC0415 - optional dependency

    return (ClientError,)


def _thing_attributes(lot: str, device: ProvisionedDevice) -> dict[str, str]:
    # Only values AWS takes as attributes; an odd serial is still in the manifest.
    wanted = {"lot": lot, "hwSerial": device.hw_serial}
    return {
        key: value
        for key, value in wanted.items()
        if len(value) <= _ATTRIBUTE_VALUE_MAX_CHARS and set(value) <= _ATTRIBUTE_VALUE_CHARS
    }


class _StoppedError(Exception):
    """A task not started because another one crashed the run."""


class ThrottledError(CloudError):
    """AWS kept throttling (or failing) one call past the backoff budget: stop the run, rerun later."""


@dataclass
class _Counters:
    backoffs: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def backed_off(self, _state: RetryCallState) -> None:
        with self.lock:
            self.backoffs += 1


class AwsRegistrar:
    """Registers one lot into one AWS account and region; see the module docstring."""

    def __init__(
        self,
        ledger: Ledger,
        lot: str,
        iot: IoTClient,
        *,
        target: str,
        chain: Sequence[x509.Certificate],
        prove_possession: Callable[[str], str],
        policy: str,
        create_policy: bool = False,
        backoff: Backoff = Backoff(),
        workers: int = DEFAULT_WORKERS,
        actor: str = "cli",
        on_outcome: Callable[[DeviceOutcome], None] | None = None,
    ) -> None:
        """Set up a run.

        ``prove_possession(code)`` returns the PEM of a verification certificate ``CN=<code>``
        signed by the lot's CA key (``factoryd.service.ca_verification``, audited); it is called
        only when the CA must be registered, so a rerun needs neither passphrase nor token.
        """
        if not chain:
            raise CloudError(f"lot {lot!r} has no CA chain")
        if not 1 <= workers <= MAX_WORKERS:
            raise CloudError(f"workers must be 1..{MAX_WORKERS}, got {workers}")
        self._ledger = ledger
        self._lot = lot
        self._iot = iot
        self._target = target
        self._ca = chain[0]
        self._ca_der = self._ca.public_bytes(serialization.Encoding.DER)
        self._ca_pem = self._ca.public_bytes(serialization.Encoding.PEM).decode("ascii")
        self._prove_possession = prove_possession
        self._policy = policy
        self._create_policy = create_policy
        self._backoff = backoff
        self._workers = workers
        self._actor = actor
        self._on_outcome = on_outcome
        self._counters = _Counters()
        self._client_errors = _client_error_types()

    # -- calls ---------------------------------------------------------------------------

    def _call(self, operation: str, fn: Callable[[], T]) -> T:
        """One AWS call, backing off on throttling and 5xx; ThrottledError once the budget is spent."""
        retrying = Retrying(
            stop=stop_after_attempt(self._backoff.attempts),
            wait=wait_exponential_jitter(
                multiplier=self._backoff.initial_s, max=self._backoff.max_s, jitter=self._backoff.initial_s
            ),
            retry=retry_if_exception(_is_retryable),
            before_sleep=self._counters.backed_off,
            reraise=True,
        )
        try:
            return retrying(fn)
        except self._client_errors as exc:
            if _is_retryable(exc):
                raise ThrottledError(
                    f"AWS IoT kept answering {_error_code(exc)} to {operation} after "
                    f"{self._backoff.attempts} attempts; what was done is recorded, rerun later"
                ) from exc
            raise

    def _record(
        self,
        device_id: str | None,
        cert_sha256: str,
        step: RegistrationStep,
        cert_id: str | None,
        arn: str | None,
    ) -> CloudRegistration:
        return self._ledger.record_cloud_step(
            self._lot,
            cloud=AWS_CLOUD,
            target=self._target,
            cert_sha256=cert_sha256,
            device_id=device_id,
            step=step,
            cloud_cert_id=cert_id,
            cloud_cert_arn=arn,
            actor=self._actor,
        )

    # -- the run ---------------------------------------------------------------------------

    def run(self, revoked: Sequence[RevokedCertificate] = ()) -> RegistrationSummary:
        """Register what is missing; raises CloudError (or the crash) with every finished step recorded."""
        started = time.monotonic()
        self._ensure_policy()
        records = {
            r.cert_sha256: r
            for r in self._ledger.cloud_registrations(self._lot, cloud=AWS_CLOUD, target=self._target)
        }
        ca_id, ca_now = self._ensure_ca(records.get(hashlib.sha256(self._ca_der).hexdigest()))
        devices = self._ledger.provisioned_devices(self._lot)
        outcomes = self._in_parallel(
            [functools.partial(self._register_device, d, records.get(d.fingerprint_sha256)) for d in devices]
            + [functools.partial(self._revoke, r, records) for r in revoked]
        )
        summary = RegistrationSummary(
            lot=self._lot,
            target=self._target,
            ca_certificate_id=ca_id,
            ca_registered_now=ca_now,
            registered=sum(o.outcome is Outcome.REGISTERED for o in outcomes),
            already=sum(o.outcome is Outcome.ALREADY for o in outcomes),
            revoked=sum(o.outcome is Outcome.REVOKED for o in outcomes),
            absent=sum(o.outcome is Outcome.ABSENT for o in outcomes),
            failed=tuple(o for o in outcomes if o.outcome is Outcome.FAILED),
            backoffs=self._counters.backoffs,
            elapsed_s=time.monotonic() - started,
        )
        self._ledger.audit(
            actor=self._actor, action="cloud.aws.run", subject=self._lot, details=summary.as_dict()
        )
        return summary

    def _in_parallel(self, tasks: Sequence[Callable[[], DeviceOutcome]]) -> list[DeviceOutcome]:
        """Run the per-certificate tasks on the workers; the first crash stops the run (in flight: finish)."""
        stopping = threading.Event()

        def guarded(task: Callable[[], DeviceOutcome]) -> DeviceOutcome:
            if stopping.is_set():
                raise _StoppedError
            try:
                return task()
            except BaseException:
                stopping.set()  # before this worker takes the next task
                raise

        with ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="factoryd-aws") as pool:
            futures = [pool.submit(guarded, task) for task in tasks]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # Ctrl-C: finish the calls in flight (and record them), start no more
                stopping.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            errors = [
                error
                for future in futures
                if not future.cancelled()
                and (error := future.exception()) is not None
                and not isinstance(error, _StoppedError)
            ]
            if errors:
                pool.shutdown(wait=True, cancel_futures=True)
                raise errors[0]
            return [future.result() for future in futures]

    def _report(self, outcome: DeviceOutcome) -> DeviceOutcome:
        if self._on_outcome is not None:
            self._on_outcome(outcome)
        return outcome

    def _ensure_policy(self) -> None:
        try:
            self._call("GetPolicy", lambda: self._iot.get_policy(policyName=self._policy))
        except self._client_errors as exc:
            if _error_code(exc) != "ResourceNotFoundException":
                raise CloudError(f"cannot read AWS IoT policy {self._policy!r}: {exc}") from exc
            if not self._create_policy:
                raise CloudError(
                    f"AWS IoT policy {self._policy!r} does not exist; create it, name another with --policy, "
                    "or pass --create-policy for factoryd's least-privilege default"
                ) from None
            document = json.dumps(DEFAULT_POLICY_DOCUMENT)
            self._call(
                "CreatePolicy",
                lambda: self._iot.create_policy(policyName=self._policy, policyDocument=document),
            )

    def _ensure_ca(self, record: CloudRegistration | None) -> tuple[str, bool]:
        """The lot CA's certificate ID in AWS, registering it if needed; (id, registered now)."""
        ca_sha256 = hashlib.sha256(self._ca_der).hexdigest()
        if record is not None and record.cloud_cert_id is not None:
            status = self._ca_status(record.cloud_cert_id)
            if status is not None:
                self._require_active(status, record.cloud_cert_id)
                return record.cloud_cert_id, False
        found = self._find_ca()
        if found is not None:
            cert_id, arn, status = found
            self._require_active(status, cert_id)
            self._record(None, ca_sha256, RegistrationStep.CA_REGISTERED, cert_id, arn)
            return cert_id, False
        code = self._call("GetRegistrationCode", self._iot.get_registration_code)["registrationCode"]
        proof_pem = self._prove_possession(code)
        reply = self._call(
            "RegisterCACertificate",
            lambda: self._iot.register_ca_certificate(
                caCertificate=self._ca_pem,
                verificationCertificate=proof_pem,
                setAsActive=True,
                allowAutoRegistration=False,
            ),
        )
        self._record(
            None, ca_sha256, RegistrationStep.CA_REGISTERED, reply["certificateId"], reply["certificateArn"]
        )
        return reply["certificateId"], True

    def _describe_ca(self, cert_id: str) -> CACertificateDescriptionTypeDef | None:
        try:
            reply = self._call(
                "DescribeCACertificate", lambda: self._iot.describe_ca_certificate(certificateId=cert_id)
            )
        except self._client_errors as exc:
            if _error_code(exc) == "ResourceNotFoundException":
                return None
            raise
        return reply["certificateDescription"]

    def _ca_status(self, cert_id: str) -> str | None:
        """The recorded CA registration's status, or None when it was deleted in AWS since."""
        described = self._describe_ca(cert_id)
        return None if described is None else described.get("status")

    def _find_ca(self) -> tuple[str, str, str | None] | None:
        """(id, arn, status) of this CA certificate's registration in the account, or None.

        AWS names a certificate by the SHA-256 of its DER; moto by that of the PEM text it got.
        """
        for cert_id in (
            hashlib.sha256(self._ca_der).hexdigest(),
            hashlib.sha256(self._ca_pem.encode()).hexdigest(),
        ):
            described = self._describe_ca(cert_id)
            if described is None:
                continue
            pem = described.get("certificatePem")
            if pem is not None and x509.load_pem_x509_certificate(pem.encode()) != self._ca:
                continue
            return cert_id, described.get("certificateArn", ""), described.get("status")
        return None

    def _require_active(self, status: str | None, cert_id: str) -> None:
        if status != "ACTIVE":
            # Someone made the CA inactive on purpose (a bad lot CA): never undo that from here.
            raise CloudError(
                f"the lot's CA is registered in AWS IoT as {status} (certificate {cert_id}); activate it "
                "there (UpdateCACertificate) if that is what you want, then rerun"
            )

    def _register_device(self, device: ProvisionedDevice, record: CloudRegistration | None) -> DeviceOutcome:
        if record is not None and record.step is RegistrationStep.POLICY_ATTACHED:
            return self._report(DeviceOutcome(device.device_id, Outcome.ALREADY))
        if not AWS_THING_NAME.fullmatch(device.device_id):
            return self._report(
                DeviceOutcome(
                    device.device_id, Outcome.FAILED, "not an AWS thing name (1..128 of a-z A-Z 0-9 : _ -)"
                )
            )
        try:
            self._device_steps(device, record)
        except ThrottledError:
            raise
        except CloudError as exc:
            return self._report(DeviceOutcome(device.device_id, Outcome.FAILED, str(exc)))
        except self._client_errors as exc:
            return self._report(DeviceOutcome(device.device_id, Outcome.FAILED, str(exc)))
        return self._report(DeviceOutcome(device.device_id, Outcome.REGISTERED))

    def _device_steps(self, device: ProvisionedDevice, record: CloudRegistration | None) -> None:
        step = record.step if record is not None else None
        cert_id = record.cloud_cert_id if record is not None else None
        arn = record.cloud_cert_arn if record is not None else None
        if step is RegistrationStep.REVOKED:
            raise CloudError(f"device {device.device_id!r}: its standing certificate is recorded as revoked")
        if step is None or cert_id is None or arn is None:
            cert_id, arn = self._register_certificate(device.cert_der, device.device_id)
            self._record(
                device.device_id,
                device.fingerprint_sha256,
                RegistrationStep.CERTIFICATE_REGISTERED,
                cert_id,
                arn,
            )
            step = RegistrationStep.CERTIFICATE_REGISTERED
        if step is RegistrationStep.CERTIFICATE_REGISTERED:
            attributes = _thing_attributes(self._lot, device)
            try:
                self._call(
                    "CreateThing",
                    lambda: self._iot.create_thing(
                        thingName=device.device_id, attributePayload={"attributes": attributes}
                    ),
                )
            except self._client_errors as exc:
                # The same name with other attributes (a thing made by hand, or an older run's):
                # it is this device's thing by its name; the certificate is what counts.
                if _error_code(exc) != "ResourceAlreadyExistsException":
                    raise
            self._record(
                device.device_id, device.fingerprint_sha256, RegistrationStep.THING_CREATED, cert_id, arn
            )
            step = RegistrationStep.THING_CREATED
        if step is RegistrationStep.THING_CREATED:
            self._call(
                "AttachThingPrincipal",
                lambda: self._iot.attach_thing_principal(thingName=device.device_id, principal=arn),
            )
            self._record(
                device.device_id, device.fingerprint_sha256, RegistrationStep.PRINCIPAL_ATTACHED, cert_id, arn
            )
            step = RegistrationStep.PRINCIPAL_ATTACHED
        if step is RegistrationStep.PRINCIPAL_ATTACHED:
            self._call("AttachPolicy", lambda: self._iot.attach_policy(policyName=self._policy, target=arn))
            self._record(
                device.device_id, device.fingerprint_sha256, RegistrationStep.POLICY_ATTACHED, cert_id, arn
            )

    def _register_certificate(self, cert_der: bytes, device_id: str) -> tuple[str, str]:
        """(certificateId, arn) of the device certificate registered ACTIVE now, or found ACTIVE."""
        pem = _pem(cert_der)
        try:
            reply = self._call(
                "RegisterCertificate",
                lambda: self._iot.register_certificate(
                    certificatePem=pem, caCertificatePem=self._ca_pem, status="ACTIVE"
                ),
            )
        except self._client_errors as exc:
            if _error_code(exc) != "ResourceAlreadyExistsException":
                raise
            # Registered before (a run whose record was lost with a crash): AWS names it.
            response: dict[str, Any] = getattr(exc, "response", {})
            cert_id = response.get("resourceId") or hashlib.sha256(cert_der).hexdigest()
            described = self._call(
                "DescribeCertificate", lambda: self._iot.describe_certificate(certificateId=cert_id)
            )["certificateDescription"]
            status = described.get("status")
            if status != "ACTIVE":
                # Revoked or deactivated by someone on purpose: never undone from here.
                raise CloudError(
                    f"device {device_id!r}: its certificate {cert_id} is registered as {status}; "
                    "left as it is (activate it in AWS IoT if that is what you want)"
                ) from exc
            return cert_id, response.get("resourceArn") or described.get("certificateArn", "")
        return reply["certificateId"], reply["certificateArn"]

    def _revoke(self, cert: RevokedCertificate, records: dict[str, CloudRegistration]) -> DeviceOutcome:
        """REVOKED in AWS, if it is there: AWS names it by its fingerprint, or a run recorded its ID.

        Not there: nothing to revoke (only the fingerprint is kept of a certificate that does not
        stand), and nothing can register it by connecting, since the CA is registered without
        auto-registration; a later run checks again.
        """
        fingerprint = cert.fingerprint_sha256.lower()
        record = records.get(fingerprint)
        if record is not None and record.step is RegistrationStep.REVOKED:
            return self._report(DeviceOutcome(cert.device_id, Outcome.ALREADY))
        cert_id = record.cloud_cert_id if record is not None and record.cloud_cert_id else fingerprint
        try:
            try:
                described = self._call(
                    "DescribeCertificate", lambda: self._iot.describe_certificate(certificateId=cert_id)
                )["certificateDescription"]
            except self._client_errors as exc:
                if _error_code(exc) != "ResourceNotFoundException":
                    raise
                return self._report(DeviceOutcome(cert.device_id, Outcome.ABSENT))
            if described.get("status") != "REVOKED":
                self._call(
                    "UpdateCertificate",
                    lambda: self._iot.update_certificate(certificateId=cert_id, newStatus="REVOKED"),
                )
            arn = described.get("certificateArn")
            if arn:
                self._detach_from_thing(cert.device_id, arn)
        except ThrottledError:
            raise
        except self._client_errors as exc:
            return self._report(DeviceOutcome(cert.device_id, Outcome.FAILED, f"revoking: {exc}"))
        self._record(
            cert.device_id, fingerprint, RegistrationStep.REVOKED, cert_id, described.get("certificateArn")
        )
        return self._report(DeviceOutcome(cert.device_id, Outcome.REVOKED))

    def _detach_from_thing(self, thing: str, arn: str) -> None:
        """Take a certificate that does not stand off the device's thing (a reworked board's old one)."""
        try:
            self._call(
                "DetachThingPrincipal",
                lambda: self._iot.detach_thing_principal(thingName=thing, principal=arn),
            )
        except self._client_errors as exc:
            if _error_code(exc) != "ResourceNotFoundException":  # no such thing, or not attached
                raise


__all__ = [
    "AWS_CLOUD",
    "DEFAULT_POLICY_DOCUMENT",
    "AwsRegistrar",
    "Backoff",
    "DeviceOutcome",
    "Outcome",
    "RegistrationSummary",
    "RevokedCertificate",
    "aws_target",
    "iot_clients",
]
