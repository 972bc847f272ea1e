"""The audit trail's hash chain: canonical JSON, link hashes, verification (no I/O)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from factoryd.errors import AuditChainError, LedgerError
from factoryd.ledger.tables import GENESIS_HASH


def canonical_json(value: object) -> str:
    """Serialise ``value`` deterministically (sorted keys, no spaces, no NaN)."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"audit details are not plain JSON: {exc}") from exc


def as_utc(moment: datetime) -> datetime:
    """Return ``moment`` in UTC; naive values (SQLite drops the zone) are taken as UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class AuditLink:
    """One audit entry as it is hashed."""

    seq: int
    at: datetime
    actor: str
    action: str
    subject: str
    details_json: str
    prev_hash: str
    hash: str


def link_hash(
    *, seq: int, at: datetime, actor: str, action: str, subject: str, details_json: str, prev_hash: str
) -> str:
    """SHA-256 (hex) over the canonical JSON of an entry including its predecessor's hash."""
    entry = {
        "seq": seq,
        "at": as_utc(at).isoformat(timespec="microseconds"),
        "actor": actor,
        "action": action,
        "subject": subject,
        "details": json.loads(details_json),
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical_json(entry).encode()).hexdigest()


def verify_chain(links: Iterable[AuditLink], *, head_seq: int, head_hash: str) -> int:
    """Check every link in seq order against its predecessor and the head; return the count."""
    expected_seq = 1
    prev_hash = GENESIS_HASH
    count = 0
    for link in links:
        if link.seq != expected_seq:
            raise AuditChainError(
                f"audit chain broken at seq {expected_seq}: entry missing (next entry is seq {link.seq})"
            )
        if link.prev_hash != prev_hash:
            raise AuditChainError(
                f"audit chain broken at seq {link.seq}: prev_hash does not match seq {link.seq - 1}"
            )
        try:
            recomputed = link_hash(
                seq=link.seq,
                at=link.at,
                actor=link.actor,
                action=link.action,
                subject=link.subject,
                details_json=link.details_json,
                prev_hash=link.prev_hash,
            )
        except (ValueError, LedgerError) as exc:
            raise AuditChainError(f"audit chain broken at seq {link.seq}: details are not JSON") from exc
        if recomputed != link.hash:
            raise AuditChainError(f"audit chain broken at seq {link.seq}: entry was altered (hash mismatch)")
        prev_hash = link.hash
        expected_seq += 1
        count += 1
    if count < head_seq:
        raise AuditChainError(
            f"audit chain broken at seq {count + 1}: the chain head records seq {head_seq} "
            f"but the trail ends at seq {count} (entries removed)"
        )
    if count > head_seq:
        raise AuditChainError(
            f"audit chain broken at seq {head_seq + 1}: entries beyond the chain head (seq {head_seq}) "
            "were added outside the ledger"
        )
    if prev_hash != head_hash:
        raise AuditChainError(f"audit chain broken at seq {count}: last entry does not match the chain head")
    return count
