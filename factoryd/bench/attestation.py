"""`factoryd bench attestation`: what key attestation costs per board (station CPU, bytes on the wire).

The station's side of an attested board is the verification of its evidence (two chain checks, the
statement signature, the possession signature) and the larger GENKEY_ATTESTED exchange plus the
possession challenge, against a plain GENKEY. Measured on a simulated secure element from a test
vendor CA, in this process; the board's own signing time is not the station's and is not counted.
"""

from __future__ import annotations

import platform
import secrets
import statistics
import time
from typing import Any

from factoryd.pki.attestation import AttestationEvidence, verify_attestation
from factoryd.protocol.messages import (
    AttestedKeyReply,
    Command,
    GenKey,
    GenKeyAttested,
    PublicKeyReply,
    Sign,
    SignatureReply,
)
from factoryd.sim.secure_element import SimSecureElement, SimVendorCa
from factoryd.transport.framing import Frame, FrameKind

# Bits per byte on an 8N1 line, and the baud rate the figures are given at.
BITS_PER_BYTE = 10
REFERENCE_BAUDRATE = 115200
SIGNATURE_BYTES = 64


def wire_bytes(kind: FrameKind, command: Command, payload: bytes) -> int:
    """Bytes a frame takes on the serial line (COBS-encoded, with its delimiter)."""
    return len(Frame(kind, 1, command, 0, payload).encode())


def run_attestation_bench(rounds: int = 200) -> dict[str, Any]:
    """Verify ``rounds`` attestations; report station CPU per board and the extra bytes on the wire."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    vendor = SimVendorCa.make()
    se = vendor.provision(SimSecureElement())
    timings_ms = []
    nonce = point = signature = challenge = b""
    for _ in range(rounds):
        nonce = secrets.token_bytes(32)
        point, signature = se.attest(0, nonce)
        challenge = secrets.token_bytes(32)
        evidence = AttestationEvidence(
            0, nonce, point, signature, se.attestation_chain, challenge, se.sign(0, challenge)
        )
        started = time.process_time()
        verify_attestation(evidence, nonce=nonce, serial=se.serial_text, roots=[vendor.root_cert])
        timings_ms.append((time.process_time() - started) * 1000)
    reply = AttestedKeyReply(nonce, point, signature, se.attestation_chain)
    attested = (
        wire_bytes(FrameKind.REQUEST, Command.GENKEY_ATTESTED, GenKeyAttested(0, nonce).encode())
        + wire_bytes(FrameKind.RESPONSE, Command.GENKEY_ATTESTED, reply.encode())
        + wire_bytes(FrameKind.REQUEST, Command.SIGN, Sign(0, challenge).encode())
        + wire_bytes(FrameKind.RESPONSE, Command.SIGN, SignatureReply(bytes(SIGNATURE_BYTES)).encode())
    )
    plain = wire_bytes(FrameKind.REQUEST, Command.GENKEY, GenKey(0).encode()) + wire_bytes(
        FrameKind.RESPONSE, Command.GENKEY, PublicKeyReply(point).encode()
    )
    extra = attested - plain
    return {
        "bench": "attestation",
        "python": platform.python_version(),
        "rounds": rounds,
        "station_cpu_ms_median": round(statistics.median(timings_ms), 3),
        "station_cpu_ms_p90": round(statistics.quantiles(timings_ms, n=10)[-1], 3) if rounds > 1 else None,
        "wire_bytes_attested": attested,
        "wire_bytes_plain_genkey": plain,
        "extra_wire_bytes": extra,
        "extra_ms_at_115200_baud": round(extra * BITS_PER_BYTE / REFERENCE_BAUDRATE * 1000, 1),
    }
