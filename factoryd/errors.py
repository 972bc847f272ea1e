"""The one exception tree of factoryd.

Every layer raises only these, translating what it gets from below with
``raise ... from exc``. ``transient`` says whether retrying the same step can help;
the pipeline's retry policy reads that attribute and nothing else. Timeouts also
inherit :class:`TimeoutError` so ``except TimeoutError`` keeps working.

::

    FactorydError                         (transient = False)
    ├── ConfigError                       bad or missing configuration
    ├── InputError                        bad input from a user/customer; nothing was changed
    │   ├── IdListError                   an ID list refused whole (line and problem named)
    │   ├── BundleError                   a certificate bundle refused (reason named)
    │   │   └── PartsManifestError        pki/parts.py: a vendor parts manifest refused (entry named)
    │   ├── McubootImageError             mcuboot.py: an MCUboot image refused (the problem named)
    │   ├── ExportError                   cloud/errors.py: devices cannot be written in that format
    │   ├── LabelTemplateError            labels/errors.py: a label template refused (the problem named)
    │   ├── QuotaError                    signer/errors.py: a customer quota refused (signature, lot, expiry)
    │   ├── CdError                       matter/cd.py: a Certification Declaration refused (field named)
    │   ├── MatterLotError                matter/lot.py: a Matter lot set-up refused (PAI/PAA/CD/VID named)
    │   ├── TlvError                      matter/tlv.py: malformed Matter TLV
    │   ├── TokenExistsError              api/errors.py: an API token name is taken
    │   └── TokenNotFoundError            api/errors.py: no such API token
    ├── LinkError                         serial link layer            (transient = True)
    │   ├── LinkClosedError               the tty vanished or was closed
    │   ├── LinkOpenError                 the tty could not be opened
    │   └── FrameError                    a frame failed to decode (COBS, size, header)
    │       ├── CrcError                  the frame's CRC does not match
    │       └── SmpFramingError           transport/smp_framing.py: an SMP console frame or packet
    ├── BoardError                        the board protocol layer
    │   ├── BoardTimeoutError             no reply after every resend  (+ TimeoutError, transient)
    │   ├── ProtocolViolationError        a malformed or unexpected reply (transient)
    │   ├── BoardResetError               the board rebooted while a request was pending (transient)
    │   ├── BoardFloodError               the board sprays undecodable frames (broken or hostile)
    │   ├── BoardStatusError              the board answered with an error status
    │   │   ├── BoardBusyError            (transient)
    │   │   ├── BoardLockedError          the secure element is locked
    │   │   ├── AtCommandError            protocol/nrf91.py: ERROR / +CME ERROR from the modem
    │   │   ├── SmpNoKeyError             protocol/mcumgr.py: NO_KEY (e.g. no attestation key)
    │   │   ├── SmpNotSupportedError      protocol/mcumgr.py: the firmware lacks the SMP command
    │   │   └── FirmwareRejectedError     the bootloader refused the image
    │   │       └── FirmwareRevertedError jobs/mcumgr.py: the board reverted to its old image
    │   └── VerificationError             a reply that decodes but must not be trusted:
    │       ├── CsrRejectedError          bad CSR signature, wrong CN, not P-256, extensions
    │       ├── ReadbackMismatchError     an object read back differs from what was written
    │       ├── ChallengeFailedError      the board's signature does not verify with its cert
    │       ├── IdentityMismatchError     the board answered with another board's identity
    │       └── CertificateNotStoredError jobs/arduino.py: the sketch did not rebuild the cert
    ├── LedgerError                       the allocation ledger (refinements in ledger/errors.py)
    │   ├── LotNotFoundError
    │   ├── LotExistsError                a lot with that name exists
    │   ├── DeviceNotFoundError           no such device ID in the lot
    │   ├── DeviceStateError              the ID's state forbids it (e.g. voiding a void ID)
    │   ├── JobNotFoundError
    │   ├── LedgerUnavailableError        database unreachable or locked (transient)
    │   │   └── LedgerStorageFullError    the ledger's disk is full (SQLite; transient): intake pauses
    │   ├── LedgerCommitUnknownError      a commit's outcome stayed unknown (connection lost committing)
    │   ├── LotStateError                 e.g. a closed or paused lot
    │   ├── IdsExhaustedError             no available ID left in the lot
    │   ├── ReservationConflictError      the ID/serial binding would break exactly-once
    │   ├── SchemaVersionError            the database has a schema this build does not know
    │   ├── IssuanceRefusedError          ledger/issuance.py: the ledger forbids that certificate (code)
    │   ├── OnboardingSecretMissingError  ledger/matter.py: Matter codes sealed, but no passphrase given
    │   └── AuditChainError               the audit hash chain does not verify
    ├── PkiError                          issuing and signing
    │   ├── SignerError                   the CA key could not be used (passphrase, token)
    │   ├── IssuanceError                 a certificate could not be issued
    │   │   └── StationClockError         the station clock is obviously wrong (before the release
    │   │                                 date or outside the CA's validity): intake pauses
    │   ├── SigningRefusedError           signer/errors.py: the line's signer refused (reason signer_<code>)
    │   ├── SignerUnavailableError        signer/errors.py: the signer cannot be reached (transient)
    │   └── ManifestError                 pki/manifest.py: a manifest cannot be built or verified
    ├── HubError                          switching ports, finding ttys    (transient = True)
    │   ├── EnumerationTimeoutError       the tty did not appear in time (+ TimeoutError)
    │   ├── TtyStillPresentError          hub/ttymap.py: the tty stayed after power-off (+ TimeoutError)
    │   └── HubCommandError               the hub tool or driver failed
    │       └── HubDisconnectedError      the whole hub is gone (cable pulled, hub unpowered)
    ├── TokenRejectedError                api/errors.py: an API token is unknown, expired or revoked
    ├── ApiCallError                      api/client.py: the CLI's call to the local API failed
    ├── CloudError                        cloud/errors.py: a cloud refused or failed a call (resumable)
    │   └── ThrottledError                cloud/aws.py: AWS kept throttling past the backoff budget
    ├── LabelError                        labels/errors.py: a label could not be made or printed
    │   ├── LabelRenderError              no label for that device (missing codes, a code too big)
    │   └── PrinterError                  the printer cannot take a job now (transient: it queues)
    │       ├── PrinterOfflineError       no connection, or it broke or timed out
    │       └── PrinterNotReadyError      ~HS: paper out, paused, head open, or no status answer
    └── JobError                          a provisioning job ended without success
        ├── JobAbortedError               stopped by the operator or shutdown
        └── RefusedBoardError             the board may not be provisioned (already done, rework off)
            └── AttestationError          pki/attestation.py: not a genuine part (reason names the check)
"""

from __future__ import annotations


class FactorydError(Exception):
    """Base of every error factoryd raises on purpose."""

    transient: bool = False

    @property
    def reason(self) -> str:
        """A stable, label-safe reason code (used in metrics and events)."""
        name = type(self).__name__.removesuffix("Error")
        return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class ConfigError(FactorydError):
    """Configuration is invalid or missing."""


class InputError(FactorydError):
    """User-supplied input was refused; nothing was stored."""


class IdListError(InputError):
    """A customer ID list was refused whole."""


class BundleError(InputError):
    """A customer certificate bundle was refused."""


class LinkError(FactorydError):
    """Serial link failure."""

    transient = True


class LinkClosedError(LinkError):
    """The serial device vanished or was closed while requests were pending."""


class LinkOpenError(LinkError):
    """The serial device could not be opened."""


class FrameError(LinkError):
    """A frame could not be decoded."""


class CrcError(FrameError):
    """A frame's CRC does not match its contents."""


class BoardError(FactorydError):
    """Board protocol failure."""


class BoardTimeoutError(BoardError, TimeoutError):
    """The board did not answer after every resend."""

    transient = True


class ProtocolViolationError(BoardError):
    """The board sent a reply that does not follow the protocol."""

    transient = True


class BoardResetError(BoardError):
    """The board rebooted (sent BOOT) while a request was pending."""

    transient = True


class BoardFloodError(BoardError):
    """The board sent more undecodable frames than any healthy link produces."""


class BoardStatusError(BoardError):
    """The board answered with a non-OK status; ``transient`` depends on the status."""

    def __init__(self, message: str, status: int, *, transient: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient or type(self).transient


class BoardBusyError(BoardStatusError):
    """The board is busy; try again."""

    transient = True


class BoardLockedError(BoardStatusError):
    """The secure element is locked and refuses the change."""


class FirmwareRejectedError(BoardStatusError):
    """The bootloader refused a firmware image (bad signature or state)."""


class VerificationError(BoardError):
    """A reply decoded fine but failed verification; never retried blindly."""


class CsrRejectedError(VerificationError):
    """The CSR failed verification (signature, subject, key type, extensions)."""


class ReadbackMismatchError(VerificationError):
    """An object read back from the board differs from what was written."""

    # A flaky write can be redone: the ledger keeps the reservation.
    transient = True


class ChallengeFailedError(VerificationError):
    """The board's challenge signature does not verify with its issued certificate."""


class IdentityMismatchError(VerificationError):
    """The board reported another identity than the one this job started with."""


class LedgerError(FactorydError):
    """Allocation ledger failure."""


class LotNotFoundError(LedgerError):
    """No such lot."""


class LotStateError(LedgerError):
    """The lot is not in a state that allows the operation."""


class IdsExhaustedError(LedgerError):
    """The lot has no available IDs left."""


class ReservationConflictError(LedgerError):
    """The operation would bind an ID to two boards or a board to two IDs."""


class LedgerCommitUnknownError(LedgerError):
    """The connection died in COMMIT (or in a self-committing statement) and its outcome could not be read
    back in time; never retried blindly."""


class SchemaVersionError(LedgerError):
    """The database schema is unknown to this build."""


class AuditChainError(LedgerError):
    """The audit trail's hash chain does not verify."""


class PkiError(FactorydError):
    """Certificate issuing or signing failure."""


class SignerError(PkiError):
    """The CA key could not be used."""


class IssuanceError(PkiError):
    """A certificate could not be issued."""


class StationClockError(IssuanceError):
    """The station clock cannot be trusted for certificate validity (before the release date or the CA)."""


class HubError(FactorydError):
    """Hub switching or tty resolution failure."""

    transient = True


class EnumerationTimeoutError(HubError, TimeoutError):
    """The port's serial device did not appear in time."""


class HubCommandError(HubError):
    """A hub command or driver call failed."""


class HubDisconnectedError(HubCommandError):
    """The whole hub is gone (its cable pulled or its power lost): every port at once."""


class JobError(FactorydError):
    """A provisioning job ended without success."""


class JobAbortedError(JobError):
    """The job was stopped by the operator or by shutdown."""


class RefusedBoardError(JobError):
    """The board may not be provisioned in this lot."""
