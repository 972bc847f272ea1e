"""MCUboot image verifier, judged by imgtool (MCUboot's own tool) over a corpus of hostile images.

Every image is made by `imgtool sign` or mutated from one at test time; `imgtool verify` gives the
cryptographic verdict factoryd must match. imgtool does not check the counter, the slot size or
the key type policy: those refusals are tested on their own, with their exact messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from hypothesis import given, settings
from hypothesis import strategies as st

from factoryd.errors import InputError
from factoryd.mcuboot import (
    DEFAULT_TRAILER_BYTES,
    KeyFormat,
    McubootImage,
    McubootImageError,
    SignatureType,
    check_image_policy,
    signature_type_of,
    signing_key_hash,
    swap_trailer_bytes,
    verify_image,
    verify_lot_image,
)
from tests.helpers.imgtool import (
    COUNTER_1_2_3,
    HEADER_BYTES,
    PAYLOAD,
    SLOT_BYTES,
    VERSION,
    Tools,
    flip,
    layout,
    make_tools,
    parallel,
    put,
    run_imgtool,
    sign_args,
)

pytest.importorskip("imgtool.main")


@pytest.fixture(scope="session")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Tools:
    """The session's imgtool keys and signed images (tests/helpers/imgtool.py)."""
    return make_tools(tmp_path_factory)


def without_tlv(data: bytes, tlv_type: int) -> bytes:
    """Remove one unprotected TLV and fix the area's total (the hash does not cover it)."""
    lay = layout(data)
    pos, length = lay.tlvs[tlv_type]
    out = data[:pos] + data[pos + 4 + length :]
    (total,) = struct.unpack_from("<H", out, lay.unprot_off + 2)
    return put(out, lay.unprot_off + 2, "<H", total - 4 - length)


def with_unprotected_tlv(data: bytes, tlv_type: int, value: bytes) -> bytes:
    """Append an unprotected TLV and fix the area's total: imgtool's verify does not notice."""
    lay = layout(data)
    out = data[: lay.end] + struct.pack("<HH", tlv_type, len(value)) + value + data[lay.end :]
    (total,) = struct.unpack_from("<H", out, lay.unprot_off + 2)
    return put(out, lay.unprot_off + 2, "<H", total + 4 + len(value))


def resign(signed_part: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Append SHA256, KEYHASH and ECDSA_SIG TLVs over ``signed_part``, as a buggy or hostile signer.

    imgtool never writes these structures; the point is an image whose hash and signature are good
    but whose layout MCUboot refuses. imgtool still judges each one.
    """
    digest = hashlib.sha256(signed_part).digest()
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signature = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    tlvs = b"".join(
        struct.pack("<HH", tlv_type, len(value)) + value
        for tlv_type, value in ((0x10, digest), (0x01, hashlib.sha256(der).digest()), (0x22, signature))
    )
    return signed_part + struct.pack("<HH", 0x6907, 4 + len(tlvs)) + tlvs


def with_protected(good: bytes, tlvs: bytes, *, header_says: int | None = None) -> bytes:
    """The good image's header and body with another protected area (header field set to match)."""
    lay = layout(good)
    area = struct.pack("<HH", 0x6908, 4 + len(tlvs)) + tlvs
    header = put(good[: lay.tlv_off], 10, "<H", len(area) if header_says is None else header_says)
    return header + area


# --- the corpus ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One corpus image with factoryd's expected verdict; imgtool's is checked against it."""

    name: str
    data: bytes
    message: str | None  # factoryd's exact refusal; None = accepted
    key: str = "lot"  # the key both tools verify with
    # Set where MCUboot (and factoryd) refuses what `imgtool verify` accepts: imgtool checks neither
    # KEYHASH nor where a TLV sits. The reason is the value.
    stricter_than_imgtool: str | None = None


def corpus_cases(tools: Tools) -> list[Case]:
    """The good images and at least 12 malformed or hostile ones, with factoryd's expected verdict."""
    good = tools.images["good"]
    lay = layout(good)
    size = len(good)
    sig_pos, sig_len = lay.tlvs[0x22]
    keyhash_pos, _ = lay.tlvs[0x01]
    lot_hash = signing_key_hash(tools.public["lot"])
    foreign_hash = signing_key_hash(tools.public["foreign"])
    different_key = (
        f"signed by a different key (key hash {foreign_hash[:16]}…; the lot's key hash is {lot_hash[:16]}…)"
    )
    truncated_area = (
        "TLV area at offset 0x{off:x} ({total} bytes) runs past the end of the file ({size} bytes): "
        "the file is truncated"
    )
    (unprot_total,) = struct.unpack_from("<H", good, lay.unprot_off + 2)
    bad_hash = "image hash does not match the SHA256 TLV"
    bad_sig = "the ECDSA P-256 signature does not verify with the lot's key"
    lot_key = tools.lot_private_key()

    def tlv(tlv_type: int, value: bytes) -> bytes:
        return struct.pack("<HH", tlv_type, len(value)) + value

    sec_cnt = tlv(0x50, struct.pack("<I", COUNTER_1_2_3))
    return [
        Case("good", good, None),
        Case("flipped payload byte", flip(good, HEADER_BYTES + 100), bad_hash),
        Case("flipped header version byte", flip(good, 20), bad_hash),
        Case("flipped byte in the protected TLV area", flip(good, lay.tlv_off + 8), bad_hash),
        Case("flipped byte in the signature", flip(good, sig_pos + 4 + 20), bad_sig),
        Case("foreign key", tools.images["foreign"], different_key),
        Case("no signature TLV", tools.images["unsigned"], "image carries no signature TLV: it is unsigned"),
        Case(
            "bad header magic",
            flip(good, 0),
            "bad header magic 0x96F3B83C: not an MCUboot image (expected 0x96F3B83D)",
        ),
        Case(
            "bad protected TLV magic",
            flip(good, lay.tlv_off),
            f"bad TLV area magic 0x6909 at offset 0x{lay.tlv_off:x}: the header says protect_tlv_size 12, "
            "so a protected TLV area (0x6908) must start there",
        ),
        Case(
            "bad TLV magic",
            flip(good, lay.unprot_off),
            f"bad TLV area magic 0x6906 at offset 0x{lay.unprot_off:x} (expected 0x6907)",
        ),
        Case(
            "KEYHASH length running past the end",
            put(good, keyhash_pos + 2, "<H", 0xFFFF),
            f"TLV KEYHASH (0x01) at offset 0x{keyhash_pos:x} (length 65535) runs past the end of the file",
        ),
        Case(
            "signature length running past the end",
            put(good, sig_pos + 2, "<H", 0xFFFF),
            f"TLV ECDSA_SIG (0x22) at offset 0x{sig_pos:x} (length 65535) runs past the end of the file",
            stricter_than_imgtool="imgtool reads the signature to the end of the file and cuts it to its DER "
            "length; MCUboot refuses a signature TLV longer than its 128-byte buffer",
        ),
        Case(
            "signature length running past its TLV area",
            put(good, sig_pos + 2, "<H", sig_len + 1) + b"\x00",
            f"TLV ECDSA_SIG (0x22) at offset 0x{sig_pos:x} (length {sig_len + 1}) runs past the end of "
            f"the TLV area (0x{lay.end:x})",
            stricter_than_imgtool="deliberately stricter than imgtool and MCUboot, which both read past the "
            "area's declared end: a TLV must lie inside its area",
        ),
        Case(
            "TLV area size past the end",
            put(good, lay.unprot_off + 2, "<H", unprot_total + 4),
            truncated_area.format(off=lay.unprot_off, total=unprot_total + 4, size=size),
        ),
        Case(
            "hdr_size < 32", put(good, 8, "<H", 16), "header size 16 is smaller than the 32-byte image header"
        ),
        Case(
            "img_size past the end",
            put(good, 12, "<I", 0x7FFFFFFF),
            f"image body (img_size 2147483647) at offset 0x200 runs past the end of the file ({size} bytes)",
        ),
        Case("empty file", b"", "file is 0 bytes, shorter than the 32-byte MCUboot image header"),
        Case("truncated at 16", good[:16], "file is 16 bytes, shorter than the 32-byte MCUboot image header"),
        Case(
            "truncated in the header padding",
            good[:0x100],
            "header size 512 runs past the end of the file (256 bytes)",
        ),
        Case(
            "truncated in the body",
            good[:0x800],
            f"image body (img_size {len(PAYLOAD)}) at offset 0x200 runs past the end of the file "
            "(2048 bytes)",
        ),
        Case(
            "truncated in the protected TLV info",
            good[: lay.tlv_off + 2],
            f"TLV area info at offset 0x{lay.tlv_off:x} runs past the end of the file "
            f"({lay.tlv_off + 2} bytes)",
        ),
        Case(
            "truncated in the protected TLVs",
            good[: lay.tlv_off + 8],
            f"protected TLV area at offset 0x{lay.tlv_off:x} (12 bytes) runs past the end of the file "
            f"({lay.tlv_off + 8} bytes): the file is truncated",
        ),
        Case(
            "truncated in the signature",
            good[: size - 40],
            truncated_area.format(off=lay.unprot_off, total=unprot_total, size=size - 40),
        ),
        Case(
            "last byte cut",
            good[:-1],
            truncated_area.format(off=lay.unprot_off, total=unprot_total, size=size - 1),
        ),
        Case(
            "signature TLV relabelled RSA",
            put(good, sig_pos, "<H", 0x20),
            "image is signed with RSA-2048; the lot expects ECDSA P-256",
        ),
        Case(
            "RSA-2048 image",
            tools.images["rsa"],
            "image is signed with RSA-2048; the lot expects ECDSA P-256",
        ),
        Case(
            "Ed25519 image",
            tools.images["ed25519"],
            "image is signed with Ed25519; the lot expects ECDSA P-256",
        ),
        Case(
            "P-384 image",
            tools.images["p384"],
            "image is signed with ECDSA P-384; the lot expects ECDSA P-256",
        ),
        Case("RSA-2048 image, its own key", tools.images["rsa"], None, key="rsa"),
        Case("Ed25519 image, its own key", tools.images["ed25519"], None, key="ed25519"),
        Case("P-384 image, its own key", tools.images["p384"], None, key="p384"),
        Case("PUBKEY image, the lot's key", tools.images["pubkey"], None),
        Case("PUBKEY image, a foreign key", tools.images["pubkey_foreign"], different_key),
        Case("padded to the slot (--pad)", tools.images["padded"], None),
        Case("trailing bytes", good + bytes(range(100)), None),
        Case("padded signature (--pad-sig)", tools.images["pad_sig"], None),
        Case(
            "encrypted (-E)",
            tools.images["encrypted"],
            f"{bad_hash}: the image is encrypted, and the hash covers the plaintext "
            "(encrypted images are not supported)",
        ),
        Case("encryption-capable clear image (-E --clear)", tools.images["clear"], None),
        Case("non-bootable", tools.images["non_bootable"], None),
        Case("compressed (lzma2)", tools.images["compressed"], None),
        Case("dependency and boot record TLVs", tools.images["extras"], None),
        Case("lower security counter", tools.images["old_version"], None),
        Case(
            "protected TLV area size differs from the header",
            put(good, lay.tlv_off + 2, "<H", 16),
            "protected TLV area is 16 bytes but the header says protect_tlv_size 12",
        ),
        Case(
            "TLV area smaller than its info",
            put(good, lay.unprot_off + 2, "<H", 2),
            f"TLV area at offset 0x{lay.unprot_off:x} says it is 2 bytes, smaller than its 4-byte info",
        ),
        Case(
            "SHA256 TLV relabelled SHA512",
            put(good, lay.tlvs[0x10][0], "<H", 0x12),
            "image carries no SHA256 TLV: MCUboot needs the image hash",
        ),
        Case(
            "signature TLV relabelled ECDSA P-224",
            put(good, sig_pos, "<H", 0x21),
            "image is signed with ECDSA P-224, which current MCUboot no longer supports",
        ),
        Case(
            "SIG_PURE TLV appended",
            with_unprotected_tlv(good, 0x25, b"\x01"),
            "image has a pure signature (SIG_PURE TLV), which the station does not verify",
        ),
        Case(
            "second, matching SHA256 TLV appended",
            with_unprotected_tlv(good, 0x10, good[lay.tlvs[0x10][0] + 4 : lay.tlvs[0x10][0] + 36]),
            None,
        ),
        Case(
            "second SHA256 TLV appended, wrong",
            with_unprotected_tlv(good, 0x10, bytes(32)),
            bad_hash,
            stricter_than_imgtool="imgtool stops at the first valid signature; MCUboot checks every hash TLV",
        ),
        Case(
            "TLV header cut by its area's end",
            put(good, lay.unprot_off + 2, "<H", unprot_total + 2) + b"\x10\x00",
            f"TLV header at offset 0x{lay.end:x} runs past the end of the TLV area",  # imgtool: struct.error
        ),
        Case(
            "SHA256 TLV 31 bytes",
            with_unprotected_tlv(without_tlv(good, 0x10), 0x10, bytes(31)),
            "SHA256 TLV is 31 bytes, expected 32",
            stricter_than_imgtool="imgtool verify does not require a hash TLV; MCUboot refuses one of the "
            "wrong size",
        ),
        Case(
            "KEYHASH 31 bytes",
            with_unprotected_tlv(without_tlv(good, 0x01), 0x01, bytes.fromhex(lot_hash)[:31]),
            "KEYHASH TLV is 31 bytes, expected 32",
            stricter_than_imgtool="imgtool verify ignores KEYHASH; here it also comes after the signature, "
            "which MCUboot then skips",
        ),
        Case(
            "KEYHASH moved after the signature",
            with_unprotected_tlv(without_tlv(good, 0x01), 0x01, bytes.fromhex(lot_hash)),
            "no ECDSA P-256 signature TLV follows the TLV naming the lot's key",
            stricter_than_imgtool="imgtool verify ignores KEYHASH; MCUboot skips a signature no key TLV "
            "precedes",
        ),
        Case(
            "vendor TLV in the unprotected area",
            with_unprotected_tlv(good, 0x00A0, b"vendor"),
            f"TLV 0xa0 at offset 0x{lay.end:x} is in the unprotected TLV area, which the signature does not "
            "cover; MCUboot accepts it only in the protected area",
            stricter_than_imgtool="imgtool verify ignores where a TLV sits; MCUboot's TLV allow list "
            "refuses it",
        ),
        Case(
            "pure Ed25519 image, its own key",
            tools.images["pure"],
            "image has a pure signature (SIG_PURE TLV), which the station does not verify",
            key="ed25519",
            stricter_than_imgtool="factoryd does not verify pure signatures (only Ed25519 has them; lots "
            "are ECDSA P-256)",
        ),
        Case("re-signed by a hostile signer, well formed", resign(good[: lay.unprot_off], lot_key), None),
        Case(
            "protected area the header does not announce (re-signed)",
            resign(with_protected(good, sec_cnt, header_says=0), lot_key),
            "protected TLV area is 12 bytes but the header says protect_tlv_size 0",
            stricter_than_imgtool="imgtool hashes the protected area anyway; MCUboot requires the header to "
            "announce it (else the counter in it would not be covered)",
        ),
        Case(
            "two SEC_CNT TLVs (re-signed)",
            resign(with_protected(good, sec_cnt + tlv(0x50, struct.pack("<I", 0xFFFFFFFF))), lot_key),
            "image carries 2 SEC_CNT TLVs; the security counter to record is ambiguous",
            stricter_than_imgtool="imgtool does not read the counter; the station must know which it records",
        ),
        Case(
            "2-byte SEC_CNT (re-signed)",
            resign(with_protected(good, tlv(0x50, b"\x01\x00")), lot_key),
            "SEC_CNT TLV is 2 bytes, expected 4",
            stricter_than_imgtool="imgtool does not read the counter; MCUboot refuses a SEC_CNT that is not "
            "4 bytes",
        ),
        Case(
            "flipped byte in the KEYHASH",
            flip(good, keyhash_pos + 4),
            f"signed by a different key (key hash {flip(bytes.fromhex(lot_hash), 0).hex()[:16]}…; "
            f"the lot's key hash is {lot_hash[:16]}…)",
            stricter_than_imgtool="imgtool verify ignores KEYHASH; MCUboot skips a signature whose key "
            "it does not have",
        ),
        Case(
            "KEYHASH removed",
            without_tlv(good, 0x01),
            "image carries no KEYHASH or PUBKEY TLV naming its signing key",
            stricter_than_imgtool="imgtool verify ignores KEYHASH; MCUboot needs one before the signature",
        ),
        Case(
            "unprotected SEC_CNT appended",
            with_unprotected_tlv(good, 0x50, struct.pack("<I", 0xFFFFFFFF)),
            f"TLV SEC_CNT (0x50) at offset 0x{lay.end:x} is in the unprotected TLV area, which the signature "
            "does not cover; MCUboot accepts it only in the protected area",
            stricter_than_imgtool="imgtool verify ignores where a TLV sits; MCUboot's TLV allow list "
            "refuses it",
        ),
    ]


@dataclass(frozen=True)
class Judged:
    """A corpus case with imgtool's verdict on it."""

    case: Case
    imgtool_rc: int
    imgtool_out: str


@pytest.fixture(scope="session")
def judged(tools: Tools) -> list[Judged]:
    """Every corpus image run through `imgtool verify -k <key>`, in parallel, once per session."""
    cases = corpus_cases(tools)
    jobs: list[tuple[str | Path, ...]] = []
    for i, case in enumerate(cases):
        path = tools.workdir / f"case{i:02d}.img"
        path.write_bytes(case.data)
        jobs.append(("verify", "-k", tools.public_pem(case.key), path))
    return [
        Judged(
            case, done.returncode, done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
        )
        for case, done in zip(cases, parallel(jobs), strict=True)
    ]


def factoryd_verdict(tools: Tools, case: Case) -> tuple[McubootImage | None, str | None]:
    """factoryd's cryptographic verdict: the image, or the refusal message."""
    try:
        return verify_image(case.data, tools.public[case.key]), None
    except McubootImageError as exc:
        return None, str(exc)


def test_corpus_is_big_enough(judged: list[Judged]) -> None:
    refused = [j for j in judged if j.case.message is not None]
    assert len(refused) >= 12
    assert len({j.case.name for j in judged}) == len(judged)


def test_crypto_verdict_equals_imgtool_verify(tools: Tools, judged: list[Judged]) -> None:
    """Accept exactly what `imgtool verify` accepts, except where MCUboot itself is stricter."""
    for j in judged:
        image, message = factoryd_verdict(tools, j.case)
        imgtool_accepts = j.imgtool_rc == 0
        expected_imgtool = j.case.message is None or j.case.stricter_than_imgtool is not None
        assert message == j.case.message, j.case.name
        assert imgtool_accepts == expected_imgtool, (j.case.name, j.imgtool_out)
        if j.case.stricter_than_imgtool is None:
            assert (image is not None) == imgtool_accepts, (j.case.name, j.imgtool_out, message)


def test_hash_and_version_equal_imgtool(tools: Tools, judged: list[Judged]) -> None:
    """The recorded hash is imgtool's "Image digest", the version its "Image version"."""
    accepted = [j for j in judged if j.case.message is None]
    assert len(accepted) >= 10
    for j in accepted:
        image, _ = factoryd_verdict(tools, j.case)
        assert image is not None
        assert f"Image digest: {image.hash}" in j.imgtool_out, j.case.name
        assert f"Image version: {image.version}" in j.imgtool_out, j.case.name


def test_fields_equal_imgtool_dumpinfo(tools: Tools) -> None:
    """Header fields, version and security counter are what `imgtool dumpinfo` reports."""
    names = ["good", "old_version", "rsa", "extras", "non_bootable", "no_counter"]
    dumps = parallel([("dumpinfo", "-f", "json", tools.workdir / f"{n}.bin") for n in names])
    for name, done in zip(names, dumps, strict=True):
        assert done.returncode == 0, done.stderr
        info = json.loads(done.stdout)
        key = "rsa" if name == "rsa" else "lot"
        image = verify_image(tools.images[name], tools.public[key])
        header = info["header"]
        assert image.version == header["version"]
        assert (image.hdr_size, image.img_size, image.flags) == (
            header["hdr_size"],
            header["img_size"],
            header["flags"],
        )
        assert image.protect_tlv_size == header["protected_tlv_size"]
        assert image.load_addr == header["load_addr"]
        counters = [t for t in info["tlv_area"].get("tlvs_prot", []) if t["type_name"] == "SEC_CNT"]
        expected = int.from_bytes(bytes.fromhex(counters[0]["data"]), "little") if counters else None
        assert image.security_counter == expected
    good = verify_image(tools.images["good"], tools.public["lot"])
    assert good.security_counter == COUNTER_1_2_3
    assert (good.version_tuple, good.build) == ((1, 2, 3), 4)
    assert verify_image(tools.images["no_counter"], tools.public["lot"]).security_counter is None


def test_key_hash_equals_imgtool_getpubhash(tools: Tools) -> None:
    done = run_imgtool("getpubhash", "-k", tools.pems["lot"], "-e", "raw")
    assert done.returncode == 0, done.stderr
    assert signing_key_hash(tools.public["lot"]) == done.stdout.hex()
    assert verify_image(tools.images["good"], tools.public["lot"]).key_hash == done.stdout.hex()


def test_total_size_and_default_trailer_match_imgtool_slot_check(tools: Tools) -> None:
    """imgtool's own slot check (`sign -S`) agrees with check_image_policy at the exact boundary."""
    # --pad-sig makes every signature 72 bytes, so re-signing gives the same size.
    image = verify_image(tools.images["pad_sig"], tools.public["lot"])
    assert image.total_size == image.file_size == len(tools.images["pad_sig"])
    geometries = [
        (DEFAULT_TRAILER_BYTES, ()),
        (swap_trailer_bytes(align=32, max_align=32), ("--align", "32", "--max-align", "32")),
    ]
    assert DEFAULT_TRAILER_BYTES == 0x1B0
    jobs = []
    for trailer, extra in geometries:
        for slot in (image.total_size + trailer, image.total_size + trailer - 1):
            args = list(sign_args(tools.workdir, tools.pems, "pad_sig"))
            args[args.index(hex(SLOT_BYTES))] = hex(slot)
            args[-1] = tools.workdir / f"fit-{slot:x}.bin"
            jobs.append(tuple(args[:-2]) + extra + tuple(args[-2:]))
    results = parallel(jobs)
    for (trailer, _), fits, too_small in zip(geometries, results[0::2], results[1::2], strict=True):
        assert fits.returncode == 0, fits.stderr
        assert too_small.returncode != 0
        assert b"exceeds requested size" in too_small.stdout + too_small.stderr
        slot = image.total_size + trailer
        check_image_policy(image, slot_size=slot, trailer_bytes=trailer)
        with pytest.raises(McubootImageError) as refused:
            check_image_policy(image, slot_size=slot - 1, trailer_bytes=trailer)
        assert str(refused.value) == (
            f"image is {image.total_size} bytes (0x{image.total_size:x}); with the {trailer}-byte trailer "
            f"it does not fit the {slot - 1}-byte (0x{slot - 1:x}) slot"
        )


# --- the station's policy, on images the crypto check accepts --------------------------------


def policy_refusal(
    tools: Tools,
    name: str,
    key: str = "lot",
    *,
    slot_size: int = SLOT_BYTES,
    previous_security_counter: int | None = None,
) -> str:
    """The exact refusal check_image_policy gives a crypto-valid image."""
    image = verify_image(tools.images[name], tools.public[key])
    with pytest.raises(McubootImageError) as refused:
        check_image_policy(image, slot_size=slot_size, previous_security_counter=previous_security_counter)
    return str(refused.value)


def test_policy_accepts_the_good_image_and_returns_what_the_profile_records(tools: Tools) -> None:
    image = verify_lot_image(
        tools.images["good"],
        tools.public["lot"],
        slot_size=SLOT_BYTES,
        previous_security_counter=COUNTER_1_2_3,
    )
    assert (image.version, image.security_counter) == (VERSION, COUNTER_1_2_3)
    assert len(image.hash) == 64
    assert image.signature_type == SignatureType.ECDSA_P256


def test_policy_refuses_a_lower_security_counter(tools: Tools) -> None:
    assert policy_refusal(tools, "old_version", previous_security_counter=COUNTER_1_2_3) == (
        f"security counter {0x01010000} is lower than the lot's previous image ({COUNTER_1_2_3})"
    )
    with pytest.raises(
        McubootImageError, match=r"^security counter 3 is lower than the lot's previous image \(5\)$"
    ):
        check_image_policy(
            _with_counter(verify_image(tools.images["good"], tools.public["lot"]), 3),
            slot_size=SLOT_BYTES,
            previous_security_counter=5,
        )


def _with_counter(image: McubootImage, counter: int) -> McubootImage:
    return replace(image, security_counter=counter)


def test_policy_refuses_a_missing_counter_only_when_the_lot_has_one(tools: Tools) -> None:
    image = verify_image(tools.images["no_counter"], tools.public["lot"])
    check_image_policy(image, slot_size=SLOT_BYTES)
    assert policy_refusal(tools, "no_counter", previous_security_counter=5) == (
        "image has no security counter (SEC_CNT TLV); the lot's previous image had 5"
    )


def test_policy_refuses_an_oversize_image(tools: Tools) -> None:
    assert policy_refusal(tools, "good", slot_size=4096) == (
        f"image is {len(tools.images['good'])} bytes (0x{len(tools.images['good']):x}); with the 432-byte "
        "trailer it does not fit the 4096-byte (0x1000) slot"
    )


def test_policy_measures_a_padded_image_by_its_tlvs_and_its_file(tools: Tools) -> None:
    image = verify_image(tools.images["padded"], tools.public["lot"])
    assert image.file_size == SLOT_BYTES
    assert image.total_size == layout(tools.images["padded"]).end < SLOT_BYTES
    check_image_policy(image, slot_size=SLOT_BYTES)
    assert policy_refusal(tools, "padded", slot_size=SLOT_BYTES - 1) == (
        f"file is {SLOT_BYTES} bytes (0x{SLOT_BYTES:x}), larger than the {SLOT_BYTES - 1}-byte "
        f"(0x{SLOT_BYTES - 1:x}) slot"
    )


@pytest.mark.parametrize(
    ("name", "key", "expected"),
    [
        ("rsa", "rsa", "image is signed with RSA-2048; the lot expects ECDSA P-256"),
        ("ed25519", "ed25519", "image is signed with Ed25519; the lot expects ECDSA P-256"),
        ("p384", "p384", "image is signed with ECDSA P-384; the lot expects ECDSA P-256"),
        (
            "clear",
            "lot",
            "image is marked encrypted (AES-128 flag, ENC_EC256 TLV); the station does not support "
            "encrypted images: it cannot check an encrypted body, and MCUboot decrypts any image so marked "
            "when it installs it. Sign the image without -E/--encrypt",
        ),
        ("non_bootable", "lot", "image is marked non-bootable (flag 0x10); the lot needs a bootable image"),
        (
            "compressed",
            "lot",
            "image is compressed (LZMA flags); the station does not support compressed images",
        ),
    ],
)
def test_policy_refusals(tools: Tools, name: str, key: str, expected: str) -> None:
    assert policy_refusal(tools, name, key) == expected


def test_policy_requires_the_key_format_the_lot_s_bootloader_expects(tools: Tools) -> None:
    """Stock MCUboot finds its key by KEYHASH; MCUBOOT_HW_KEY builds need the full key (PUBKEY)."""
    full = verify_image(tools.images["pubkey"], tools.public["lot"])
    assert full.key_format == KeyFormat.FULL
    check_image_policy(full, slot_size=SLOT_BYTES, key_format=KeyFormat.FULL)
    assert policy_refusal(tools, "pubkey") == (
        "image names its signing key in full (PUBKEY TLV), but the lot's bootloader expects it by its "
        "hash (KEYHASH TLV): sign with --public-key-format hash"
    )
    hashed = verify_image(tools.images["good"], tools.public["lot"])
    assert hashed.key_format == KeyFormat.HASH
    with pytest.raises(McubootImageError) as refused:
        check_image_policy(hashed, slot_size=SLOT_BYTES, key_format=KeyFormat.FULL)
    assert str(refused.value) == (
        "image names its signing key by its hash (KEYHASH TLV), but the lot's bootloader expects it in "
        "full (PUBKEY TLV): sign with --public-key-format full"
    )


def test_policy_refuses_an_invalid_slot(tools: Tools) -> None:
    assert policy_refusal(tools, "good", slot_size=0) == "invalid slot geometry: slot size 0, trailer 432"


def test_trailer_geometry() -> None:
    assert swap_trailer_bytes() == 128 * 3 + 4 * 8 + 16
    assert swap_trailer_bytes(align=32, max_align=32) == 128 * 3 * 32 + 4 * 32 + 32
    with pytest.raises(McubootImageError, match="invalid trailer geometry: align 3"):
        swap_trailer_bytes(align=3)


def test_unusable_lot_keys_are_refused() -> None:
    with pytest.raises(McubootImageError, match="no signature type for an EC key on curve secp521r1"):
        signature_type_of(ec.generate_private_key(ec.SECP521R1()).public_key())
    with pytest.raises(McubootImageError, match="no signature type for an RSA-1024 key"):
        signature_type_of(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key())  # noqa: S505 - must be refused


def test_the_error_is_an_input_error(tools: Tools) -> None:
    with pytest.raises(InputError) as refused:
        verify_image(b"", tools.public["lot"])
    assert isinstance(refused.value, McubootImageError)
    assert refused.value.reason == "mcuboot_image"
    assert not refused.value.transient


# --- nothing but the typed error, whatever the bytes ---------------------------------------------


def _only_typed_error(check: Callable[[], object]) -> None:
    """Anything but success or McubootImageError fails the test."""
    with contextlib.suppress(McubootImageError):
        check()


HYPOTHESIS = settings(max_examples=300, deadline=None)


@HYPOTHESIS
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_the_typed_error(tools: Tools, data: bytes) -> None:
    _only_typed_error(lambda: verify_image(data, tools.public["lot"]))


@HYPOTHESIS
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_behind_a_valid_header_raise_only_the_typed_error(tools: Tools, data: bytes) -> None:
    header = bytearray(tools.images["good"][:32])
    struct.pack_into("<I", header, 12, len(data) // 2)  # body inside the data, TLVs from the rest
    _only_typed_error(
        lambda: verify_image(bytes(header) + bytes(HEADER_BYTES - 32) + data, tools.public["lot"])
    )


@HYPOTHESIS
@given(area=st.binary(max_size=300), declared=st.integers(min_value=0, max_value=0xFFFF))
def test_arbitrary_tlv_areas_raise_only_the_typed_error(tools: Tools, area: bytes, declared: int) -> None:
    """A good header, body and protected area, then an unprotected area of random entries and size."""
    good = tools.images["good"]
    head = good[: layout(good).unprot_off]
    for total in (4 + len(area), declared):
        with contextlib.suppress(McubootImageError):
            verify_image(head + struct.pack("<HH", 0x6907, total) + area, tools.public["lot"])


@HYPOTHESIS
@given(
    position=st.integers(min_value=0),
    value=st.integers(min_value=0, max_value=255),
    cut=st.integers(min_value=0),
)
def test_single_byte_mutations_raise_only_the_typed_error(
    tools: Tools, position: int, value: int, cut: int
) -> None:
    """A byte anywhere (biased to the header and TLVs, where the parser works) and an optional cut."""
    good = tools.images["good"]
    lay = layout(good)
    hot = list(range(32)) + list(range(lay.tlv_off, lay.end))
    offset = hot[position % len(hot)] if position % 3 else position % len(good)
    mutated = bytearray(good)
    mutated[offset] = value
    end = len(good) - cut % 64 if cut % 2 else len(good)
    data = bytes(mutated[:end])
    try:
        image = verify_image(data, tools.public["lot"])
    except McubootImageError:
        return
    # Only the lot's key signed the good image's hash: anything accepted must carry exactly that.
    assert image.hash == verify_image(good, tools.public["lot"]).hash
