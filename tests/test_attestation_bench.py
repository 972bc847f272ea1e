"""The cost of attestation per board: station CPU for the checks, extra bytes on the wire.

Run ``python -m pytest -q -s tests/test_attestation_bench.py`` to see the figures (docs/security-model.md
quotes them). The bounds are loose on purpose: a shared CI machine must not flake.
"""

from __future__ import annotations

import secrets
import statistics
import time

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

ROUNDS = 50
# Generous: the checks take ~1-2 ms on a laptop core (two ECDSA chain verifies, two statement verifies).
MAX_MEDIAN_VERIFY_MS = 25.0


def _wire(kind: FrameKind, command: Command, payload: bytes) -> int:
    """Bytes a frame takes on the serial line (COBS-encoded, with its delimiter)."""
    return len(Frame(kind, 1, command, 0, payload).encode())


def test_station_cpu_and_wire_bytes_per_attested_board() -> None:
    vendor = SimVendorCa.make()
    se = vendor.provision(SimSecureElement())
    timings_ms = []
    for _ in range(ROUNDS):
        nonce = secrets.token_bytes(32)
        point, signature = se.attest(0, nonce)
        challenge = secrets.token_bytes(32)
        evidence = AttestationEvidence(
            0, nonce, point, signature, se.attestation_chain, challenge, se.sign(0, challenge)
        )
        started = time.process_time()
        verify_attestation(evidence, nonce=nonce, serial=se.serial_text, roots=[vendor.root_cert])
        timings_ms.append((time.process_time() - started) * 1000)
    median_ms = statistics.median(timings_ms)

    reply = AttestedKeyReply(nonce, point, signature, se.attestation_chain)
    attested = (
        _wire(FrameKind.REQUEST, Command.GENKEY_ATTESTED, GenKeyAttested(0, nonce).encode())
        + _wire(FrameKind.RESPONSE, Command.GENKEY_ATTESTED, reply.encode())
        + _wire(FrameKind.REQUEST, Command.SIGN, Sign(0, challenge).encode())
        + _wire(FrameKind.RESPONSE, Command.SIGN, SignatureReply(bytes(64)).encode())
    )
    plain = _wire(FrameKind.REQUEST, Command.GENKEY, GenKey(0).encode()) + _wire(
        FrameKind.RESPONSE, Command.GENKEY, PublicKeyReply(point).encode()
    )
    extra_bytes = attested - plain
    print(
        f"\nattestation per board: station CPU {median_ms:.2f} ms median "
        f"(p90 {statistics.quantiles(timings_ms, n=10)[-1]:.2f} ms), "
        f"{extra_bytes} extra bytes on the wire ({attested} vs {plain} for GENKEY), "
        f"{extra_bytes * 10 / 115200 * 1000:.0f} ms at 115200 baud"
    )
    assert median_ms < MAX_MEDIAN_VERIFY_MS
    # Two certificates of a few hundred bytes, a statement signature and the possession round trip.
    assert 600 < extra_bytes < 2500
