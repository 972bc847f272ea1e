"""Failure reasons as sentences an operator at the fixture can act on: one table for every view.

The station page shows them on a slot, and the MQTT port-state and event payloads carry them as
``operator_text``, so a line display fed from MQTT says the same words as the page.
"""

from __future__ import annotations

# Reason codes (FactorydError.reason) as sentences an operator at the fixture can act on.
REASON_TEXT: dict[str, str] = {
    # Label printing (factoryd/labels/queue.py): the board is done; only its label waits.
    "label_offline": (
        "The label printer is not reachable (off, unplugged?). Labels wait and print when it is back."
    ),
    "label_no_status": (
        "The label printer does not answer (paper or ribbon out, head open?). Check it; labels wait."
    ),
    "label_paper_out": "The label printer is out of paper: load paper; the labels wait and print then.",
    "label_head_open": "The label printer's head is open: close it; the labels wait and print then.",
    "label_ribbon_out": "The label printer is out of ribbon: load one; the labels wait and print then.",
    "label_paused": "The label printer is paused: press its pause key; the labels wait and print then.",
    "label_buffer_full": "The label printer's buffer is full: clear it; the labels wait and print then.",
    "label_head_too_hot": "The label printer's head is too hot: let it cool; the labels wait and print then.",
    "label_head_too_cold": (
        "The label printer's head is too cold: let it warm; the labels wait and print then."
    ),
    "label_no_printer": "No label printer is configured for this port. Tell the supervisor; labels wait.",
    "label_render": (
        "This board's label cannot be made from the template. Tell the supervisor; reprint later."
    ),
    "csr_rejected": "The board's certificate request was wrong (name, key or signature). Put it aside.",
    "board_timeout": "The board stopped answering. Reseat it and retry.",
    "readback_mismatch": "The board did not store its certificate correctly. Retry once, then put it aside.",
    "board_flood": "The board sends garbage on its serial line. Put it aside.",
    "identity_mismatch": "The board claims another board's identity (a clone?). Put it aside.",
    "refused_board": "This board may not be provisioned in this lot (done before?). Tell the supervisor.",
    "hub_command": "The USB hub did not switch this port. Check the hub and its cable.",
    "enumeration_timeout": "The board did not show up on USB. Reseat it or check the cable.",
    "hub_disconnected": "The USB hub is disconnected: check its cable and power. The station waits and "
    "resumes by itself when the hub is back.",
    "station_clock": "The station clock is wrong, so no certificate can be issued. Tell the supervisor "
    "(check NTP); the station resumes by itself when the clock is right.",
    "challenge_failed": "The board could not prove it holds its new key. Put it aside.",
    "verification": "The board's answer failed a check. Put it aside.",
    "firmware_rejected": "The board refused the firmware image. Tell the supervisor.",
    "firmware_reverted": "The board did not keep the new firmware (refused, reverted). Tell the supervisor.",
    "board_locked": "The board's secure element is already locked. Put it aside.",
    "board_busy": "The board stayed busy. Reseat it and retry.",
    "board_status": "The board reported an error. Reseat it and retry.",
    "board_reset": "The board rebooted during provisioning. Reseat it and retry.",
    "protocol_violation": "The board answered nonsense. Reseat it and retry.",
    "link_closed": "The USB serial link dropped. Reseat the board and retry.",
    "link_open": "The board's serial port could not be opened. Reseat the board and retry.",
    "frame": "The serial link garbles data. Reseat the board and retry.",
    "crc": "The serial link garbles data. Reseat the board and retry.",
    "ids_exhausted": "The lot has no device IDs left. Tell the supervisor.",
    "reservation_conflict": "The ledger refused a device ID for this board. Tell the supervisor.",
    "lot_state": "The lot is paused or closed.",
    "ledger_unavailable": "The station's database cannot be reached. Tell the supervisor. Boards wait "
    "in their ports and the station resumes by itself when the database is back.",
    "ledger_storage_full": "The station's disk is full, so nothing can be recorded. Tell the supervisor. "
    "Boards wait in their ports and the station resumes by itself when space is freed.",
    "ledger_commit_unknown": "The station lost its database while recording a board. Tell the supervisor, "
    "then retry the board (it keeps its ID).",
    "issuance": "The station could not issue the certificate. Tell the supervisor.",
    "signer": "The lot's CA key cannot be used. Tell the supervisor.",
    # The line's signer (factoryd/signer/): signer_<code> is its refusal, as it audited it.
    "signer_unavailable": "The line's signing service cannot be reached. Boards wait in their ports and the "
    "station resumes by itself when it is back. Tell the supervisor.",
    "signer_quota_exhausted": "The customer's quota for this lot is used up: no more certificates. Put the "
    "board aside and tell the supervisor.",
    "signer_quota_expired": "The customer's quota for this lot has expired. Tell the supervisor.",
    "signer_quota_invalid": "The signer refuses the customer's quota for this lot. Tell the supervisor.",
    "signer_quota_missing": "The lot has no customer quota and the signer requires one. Tell the supervisor.",
    "signer_reissue_limit": "This board's ID was signed too often. Put it aside and tell the supervisor.",
    "job_aborted": "Stopped by the operator or a station shutdown.",
    # Key attestation (pki/attestation.py): the board is refused before it gets an ID.
    **dict.fromkeys(
        (
            "attestation_chain",
            "attestation_serial",
            "attestation_signature",
            "attestation_nonce",
            "attestation_key",
            "attestation_expired",
            "attestation_missing",
            "attestation_unregistered",
        ),
        "Not a genuine part: put it aside.",
    ),
}


def reason_text(reason: str | None) -> str:
    """A failure reason (code or message) as one operator sentence."""
    if not reason:
        return "Failed for an unknown reason. Retry, or put the board aside."
    sentence = REASON_TEXT.get(reason)
    if sentence is not None:
        return sentence
    if reason.replace("_", "").isalnum() and reason.islower():
        return f"Failed ({reason.replace('_', ' ')}). Retry, or put the board aside."
    return reason[:200]
