"""atheris (libFuzzer) target: the frame decoder and every message parser against arbitrary bytes.

Run by tests/test_fuzz.py for a bounded number of inputs; by hand for longer:
    python tests/fuzz/fuzz_board_replies.py -max_total_time=600
The only acceptable outcomes are decoded frames/messages or the documented errors.
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from factoryd.errors import ProtocolViolationError
    from factoryd.protocol.messages import (
        REQUEST_TYPES,
        AttestedKeyReply,
        BoardInfo,
        CsrReply,
        DataReply,
        DigestReply,
        PublicKeyReply,
        SignatureReply,
    )
    from factoryd.transport.framing import MAX_ENCODED_FRAME, FrameDecoder

PARSERS = [
    *REQUEST_TYPES.values(),
    AttestedKeyReply,
    BoardInfo,
    CsrReply,
    DataReply,
    DigestReply,
    PublicKeyReply,
    SignatureReply,
]


def test_one_input(data: bytes) -> None:
    """Feed the bytes to a decoder in chunks and to every parser whole."""
    fdp = atheris.FuzzedDataProvider(data)
    chunk = fdp.ConsumeIntInRange(1, 64)
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    decoder = FrameDecoder()
    for i in range(0, len(stream), chunk):
        for frame in decoder.feed(stream[i : i + chunk]):
            # A decoded frame re-encodes to something that decodes to itself.
            if FrameDecoder().feed(frame.encode()) != [frame]:
                raise AssertionError(f"frame does not round-trip: {frame!r}")
        if decoder.buffered > MAX_ENCODED_FRAME:
            raise AssertionError("decoder buffer exceeded its cap")
    for parser in PARSERS:
        with contextlib.suppress(ProtocolViolationError):
            parser.decode(stream)  # type: ignore[attr-defined]


def main() -> None:
    """libFuzzer entry point."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
