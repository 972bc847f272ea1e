"""The audit trail's hash chains: canonical JSON, link hashes, verification (no I/O).

The trail is a set of hash chains, one per actor (a station, ``cli``, an API token…), so stations
appending at the same time never wait for each other's head lock. Each chain starts from its own
genesis hash (derived from its name, so a link cannot be moved to another chain unnoticed), numbers
its links 1, 2, 3… and has a head row naming its last link. A lot's signed manifest carries every
chain's head when it was made (``ChainHead``): truncating a chain's tail and rewinding its head
row together, which the chain alone cannot show, is caught against those anchors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from factoryd.errors import AuditChainError, LedgerError
from factoryd.ledger.tables import GENESIS_HASH, LEGACY_CHAIN

# Domain separation of the per-chain genesis hashes.
CHAIN_GENESIS_PREFIX = b"factoryd-audit-chain-v1\x00"


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


def chain_genesis(chain: str) -> str:
    """The ``prev_hash`` of a chain's first link: all zeros for the pre-0004 chain, else from its name."""
    if chain == LEGACY_CHAIN:
        return GENESIS_HASH
    return hashlib.sha256(CHAIN_GENESIS_PREFIX + chain.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainHead:
    """A chain's last link (``seq`` 0 and the genesis hash for an empty chain)."""

    chain: str
    seq: int
    hash: str

    def as_json(self) -> dict[str, object]:
        """The manifest's form of the anchor."""
        return {"chain": self.chain, "seq": self.seq, "hash": self.hash}


@dataclass(frozen=True, slots=True)
class AuditLink:
    """One audit entry as it is hashed (``seq`` is its position in its chain)."""

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


def link_hash_prefix(
    *, seq: int, at: datetime, actor: str, action: str, details_json: str, prev_hash: str
) -> str:
    """The canonical JSON that :func:`link_hash` hashes, cut before the subject's value.

    ``subject`` sorts last of the entry's keys, so the hashed text is this prefix, the subject as a
    JSON string, and ``}``: a database that learns the subject only as it writes the link (the ID a
    claim picks) completes the hash itself (PostgreSQL: ``sha256(prefix || to_json(subject) || '}')``,
    whose string escaping is JSON's, as Python's with ``ensure_ascii=False``).
    """
    entry = {
        "seq": seq,
        "at": as_utc(at).isoformat(timespec="microseconds"),
        "actor": actor,
        "action": action,
        "subject": "",
        "details": json.loads(details_json),
        "prev_hash": prev_hash,
    }
    text = canonical_json(entry)
    if not text.endswith(_EMPTY_SUBJECT_TAIL):
        raise LedgerError("the audit entry's subject is not its last key")  # a changed entry format
    return text[: -len('""}')]


# How an entry's canonical JSON ends when its subject is empty ("subject" sorts after every other key).
_EMPTY_SUBJECT_TAIL = '"subject":""}'


@dataclass(frozen=True, slots=True)
class VerifiedChain:
    """A chain that verified: its length, and the hashes at the positions asked for (anchors)."""

    count: int
    hashes: dict[int, str]


def verify_chain(
    links: Iterable[AuditLink],
    *,
    head_seq: int,
    head_hash: str,
    chain: str = LEGACY_CHAIN,
    keep: Collection[int] = (),
) -> VerifiedChain:
    """Check one chain's links in order against their predecessors and its head.

    ``keep`` names positions whose hashes are returned (to check anchors against).
    AuditChainError names the chain and the first position that is wrong: altered (hash mismatch),
    inserted or reordered (prev_hash does not link), removed (a gap, or a trail shorter than its
    head), or added behind the ledger's back (a trail longer than its head).
    """
    where = f"audit chain {chain!r} broken at"
    expected_seq = 1
    prev_hash = chain_genesis(chain)
    kept: dict[int, str] = {}
    count = 0
    for link in links:
        if link.seq != expected_seq:
            raise AuditChainError(f"{where} seq {expected_seq}: entry missing (next entry is seq {link.seq})")
        if link.prev_hash != prev_hash:
            raise AuditChainError(f"{where} seq {link.seq}: prev_hash does not match seq {link.seq - 1}")
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
            raise AuditChainError(f"{where} seq {link.seq}: details are not JSON") from exc
        if recomputed != link.hash:
            raise AuditChainError(f"{where} seq {link.seq}: entry was altered (hash mismatch)")
        prev_hash = link.hash
        if link.seq in keep:
            kept[link.seq] = link.hash
        expected_seq += 1
        count += 1
    if count < head_seq:
        raise AuditChainError(
            f"{where} seq {count + 1}: the chain head records seq {head_seq} "
            f"but the trail ends at seq {count} (entries removed)"
        )
    if count > head_seq:
        raise AuditChainError(
            f"{where} seq {head_seq + 1}: entries beyond the chain head (seq {head_seq}) "
            "were added outside the ledger"
        )
    if prev_hash != head_hash:
        raise AuditChainError(f"{where} seq {count}: last entry does not match the chain head")
    return VerifiedChain(count, kept)


def verify_anchors(chains: Mapping[str, VerifiedChain], anchors: Iterable[ChainHead], *, source: str) -> int:
    """Check that every anchored head (from a signed manifest) is still a link of its verified chain.

    ``chains`` maps each chain to its verification (kept: the anchored positions). A chain shorter
    than its anchor lost its tail (the head row rewound with it); a different hash at the anchored
    position means the chain was rewritten from there. Returns how many anchors were checked.
    """
    checked = 0
    for anchor in anchors:
        verified = chains.get(anchor.chain, VerifiedChain(0, {}))
        where = f"audit chain {anchor.chain!r} broken at seq"
        if anchor.seq > verified.count:
            raise AuditChainError(
                f"{where} {verified.count + 1}: {source} anchors seq {anchor.seq} but the trail ends at "
                f"seq {verified.count} (entries removed from the tail)"
            )
        expected = chain_genesis(anchor.chain) if anchor.seq == 0 else verified.hashes.get(anchor.seq)
        if expected != anchor.hash:
            raise AuditChainError(
                f"{where} {anchor.seq}: the entry differs from the one {source} anchors (chain rewritten)"
            )
        checked += 1
    return checked


def anchors_from_manifest(document: Mapping[str, object]) -> list[ChainHead]:
    """The audit chain heads a (verified) manifest document anchors; AuditChainError if malformed."""
    raw = document.get("audit_chains", [])
    if not isinstance(raw, list):
        raise AuditChainError("the manifest's audit_chains is not a list")
    anchors = []
    for item in raw:
        chain = item.get("chain") if isinstance(item, dict) else None
        seq = item.get("seq") if isinstance(item, dict) else None
        digest = item.get("hash") if isinstance(item, dict) else None
        if not isinstance(chain, str) or not isinstance(seq, int) or seq < 0 or not isinstance(digest, str):
            raise AuditChainError(f"the manifest's audit_chains holds a malformed entry: {item!r}")
        anchors.append(ChainHead(chain, seq, digest))
    return anchors
