"""Lots: creation, the draft → active ⇄ paused → closed life cycle, and lookups by name."""

from __future__ import annotations

import re

from pydantic import ValidationError
from sqlmodel import Session, col, select

from factoryd.errors import InputError, LotNotFoundError, LotStateError
from factoryd.ledger.audit import as_utc
from factoryd.ledger.engine import LedgerBase, require_label, utc_now
from factoryd.ledger.errors import LotExistsError
from factoryd.ledger.hot import Tx
from factoryd.ledger.model import LOT_TRANSITIONS, LotInfo, LotState
from factoryd.ledger.profile import LotProfile
from factoryd.ledger.tables import LotRow

_LOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _lot_info(row: LotRow) -> LotInfo:
    return LotInfo(
        name=row.name,
        customer=row.customer,
        state=LotState(row.state),
        profile=LotProfile.model_validate(row.profile),
        target_quantity=row.target_quantity,
        created_at=as_utc(row.created_at),
    )


class LotBook(LedgerBase):
    """The ledger's lots (the other parts find their lot through these lookups)."""

    def _lot_row(self, session: Session, name: str, *, for_update: bool = False) -> LotRow:
        """The lot's row in the session (locked for the transaction with ``for_update``)."""
        statement = select(LotRow).where(LotRow.name == name)
        if for_update:
            statement = statement.with_for_update()
        row = session.exec(statement).first()
        if row is None:
            raise LotNotFoundError(f"no lot named {name!r}")
        return row

    def _lot_shared(self, tx: Tx, lot: str) -> tuple[int, LotState]:
        """The lot's id and state, share-locked for the transaction (a state change waits for it)."""
        found = tx.first(self._sql.lot_shared, {"name": lot})
        if found is None:
            raise LotNotFoundError(f"no lot named {lot!r}")
        return found.id, LotState(found.state)

    def _lot_id(self, tx: Tx, lot: str) -> int:
        """The lot's id; cached, since a lot keeps its name and id for good (lots are never deleted)."""
        lot_id = self._lot_ids.get(lot)
        if lot_id is None:
            found = tx.first(self._sql.lot_id, {"name": lot})
            if found is None:
                raise LotNotFoundError(f"no lot named {lot!r}")
            lot_id = self._lot_ids[lot] = found.id
        return lot_id

    def create_lot(
        self, name: str, *, customer: str, profile: LotProfile, target_quantity: int | None, actor: str
    ) -> LotInfo:
        """Create a lot in state ``draft``; LotExistsError if the name is taken."""
        if not _LOT_NAME.fullmatch(name):
            raise InputError(
                f"lot name {name!r} must be 1..64 characters of letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        require_label(customer, "customer")
        if target_quantity is not None and target_quantity < 1:
            raise InputError(f"target_quantity must be positive or None, got {target_quantity}")

        taken = f"a lot named {name!r} already exists"
        now = utc_now()
        with self._transaction(write=True, on_integrity=lambda _exc: LotExistsError(taken)) as session:
            if session.exec(select(LotRow.id).where(LotRow.name == name)).first() is not None:
                raise LotExistsError(taken)
            row = LotRow(
                name=name,
                customer=customer,
                state=LotState.DRAFT.value,
                profile=profile.model_dump(mode="json"),
                target_quantity=target_quantity,
                created_at=now,
            )
            session.add(row)
            session.flush()
            self._audit_in_session(
                session,
                actor=actor,
                action="lot.created",
                subject=name,
                details={"customer": customer, "target_quantity": target_quantity, "profile": row.profile},
                at=now,
            )
            return _lot_info(row)

    def set_lot_state(self, lot: str, state: LotState, *, actor: str) -> LotInfo:
        """Move a lot along draft → active ⇄ paused → closed; LotStateError otherwise."""
        try:
            target = LotState(state)
        except ValueError as exc:
            raise InputError(f"unknown lot state {state!r} (use {', '.join(LotState)})") from exc
        now = utc_now()
        with self._transaction(write=True) as session:
            row = self._lot_row(session, lot, for_update=True)
            current = LotState(row.state)
            if target not in LOT_TRANSITIONS[current]:
                allowed = ", ".join(sorted(LOT_TRANSITIONS[current])) or "none, it is final"
                raise LotStateError(f"lot {lot!r} cannot go from {current} to {target} (allowed: {allowed})")
            row.state = target.value
            session.add(row)
            self._audit_in_session(
                session,
                actor=actor,
                action="lot.state_changed",
                subject=lot,
                details={"from": current.value, "to": target.value},
                at=now,
            )
            return _lot_info(row)

    def record_lot_firmware(
        self,
        lot: str,
        *,
        sha256: str,
        version: str,
        security_counter: int | None,
        key_hash: str,
        actor: str,
        replace_signing_key: bool = False,
    ) -> LotInfo:
        """Make a verified MCUboot image the lot's firmware: profile and audit entry in one transaction.

        Re-checks under the lot's row lock what the upload checked (another upload may have won):
        the signing key is the lot's unless ``replace_signing_key`` (an admin's decision), and the
        security counter is not lower than the current image's. A closed lot is refused.
        """
        now = utc_now()
        with self._transaction(write=True) as session:
            row = self._lot_row(session, lot, for_update=True)
            if LotState(row.state) is LotState.CLOSED:
                raise LotStateError(f"lot {lot!r} is closed; its firmware cannot change")
            current = LotProfile.model_validate(row.profile)
            replaced = current.firmware_key_hash is not None and current.firmware_key_hash != key_hash
            if replaced and not replace_signing_key:
                raise InputError(
                    f"image is signed by key {key_hash[:16]}…, not the lot's firmware-signing key "
                    f"{(current.firmware_key_hash or '')[:16]}…; an admin may replace the lot's key "
                    "(factoryd lots firmware --replace-signing-key)"
                )
            previous = current.firmware_security_counter
            if previous is not None and security_counter is None:
                raise InputError(
                    f"image has no security counter (SEC_CNT TLV); the lot's previous image had {previous}"
                )
            if previous is not None and security_counter is not None and security_counter < previous:
                raise InputError(
                    f"security counter {security_counter} is lower than the lot's previous image ({previous})"
                )
            try:
                profile = LotProfile.model_validate(
                    {
                        **current.model_dump(mode="json"),
                        "firmware_sha256": sha256,
                        "firmware_version": version,
                        "firmware_security_counter": security_counter,
                        "firmware_key_hash": key_hash,
                    }
                )
            except ValidationError as exc:
                raise InputError(f"lot {lot!r}: firmware record refused: {exc}") from None
            row.profile = profile.model_dump(mode="json")
            session.add(row)
            self._audit_in_session(
                session,
                actor=actor,
                action="lot.firmware",
                subject=lot,
                details={
                    "sha256": sha256,
                    "version": version,
                    "security_counter": security_counter,
                    "key_hash": key_hash,
                    "previous_sha256": current.firmware_sha256,
                    "signing_key_replaced": replaced,
                },
                at=now,
            )
            return _lot_info(row)

    def get_lot(self, lot: str) -> LotInfo:
        """The lot named ``lot``; LotNotFoundError if there is none."""
        with self._transaction(write=False) as session:
            return _lot_info(self._lot_row(session, lot))

    def list_lots(self) -> list[LotInfo]:
        """Every lot, oldest first."""
        with self._transaction(write=False) as session:
            rows = session.exec(select(LotRow).order_by(col(LotRow.created_at), col(LotRow.id))).all()
            return [_lot_info(row) for row in rows]
