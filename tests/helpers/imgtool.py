"""imgtool (MCUboot's own tool) for the tests: keys, signed images and layout helpers (no tests here).

The session's keys and images are made once (``imgtool keygen`` / ``imgtool sign`` in parallel) and
shared by every test module that asks for them through :func:`make_tools`.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from factoryd.mcuboot import SigningPublicKey

SLOT_BYTES = 0x10000
HEADER_BYTES = 0x200
VERSION = "1.2.3+4"
COUNTER_1_2_3 = 0x01020003  # `-s auto`: major<<24 | minor<<16 | revision
IMGTOOL_TIMEOUT_S = 60
KEY_TYPES = {
    "lot": "ecdsa-p256",
    "foreign": "ecdsa-p256",
    "enc": "ecdsa-p256",
    "rsa": "rsa-2048",
    "p384": "ecdsa-p384",
    "ed25519": "ed25519",
}
PAYLOAD = random.Random(16).randbytes(6000)  # noqa: S311 - test data; incompressible: lzma falls back
COMPRESSIBLE_PAYLOAD = bytes(range(256)) * 40


def _imgtool() -> list[str]:
    """The imgtool console script of this venv (the package has no __main__)."""
    script = Path(sys.executable).with_name("imgtool")
    if script.exists():
        return [str(script)]
    found = shutil.which("imgtool")
    if found is None:
        pytest.skip("the imgtool console script is not installed")
    return [found]


def run_imgtool(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    """Run imgtool, never raising on its exit status."""
    return subprocess.run(  # noqa: S603 - our own argument list
        [*_imgtool(), *map(str, args)], capture_output=True, check=False, timeout=IMGTOOL_TIMEOUT_S
    )


def parallel(jobs: list[tuple[str | Path, ...]]) -> list[subprocess.CompletedProcess[bytes]]:
    """Run imgtool jobs a few at a time (each is ~0.2 s of interpreter start-up)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda job: run_imgtool(*job), jobs))


@dataclass(frozen=True)
class Tools:
    """Keys (private PEM paths for imgtool, public keys for factoryd) and signed images."""

    workdir: Path
    pems: dict[str, Path]
    public: dict[str, SigningPublicKey]
    images: dict[str, bytes]

    def lot_private_key(self) -> ec.EllipticCurvePrivateKey:
        """The lot's signing key, for hostile images imgtool cannot make."""
        key = serialization.load_pem_private_key(self.pems["lot"].read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def public_pem(self, name: str) -> Path:
        """The public half of a key as a PEM file: what a customer gives the station."""
        path = self.workdir / f"{name}.pub.pem"
        if not path.exists():
            path.write_bytes(
                self.public[name].public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        return path


SIGNED: dict[str, tuple[str | None, tuple[str, ...], bytes]] = {
    # name: (key, extra `imgtool sign` args, payload)
    "good": ("lot", (), PAYLOAD),
    "foreign": ("foreign", (), PAYLOAD),
    "unsigned": (None, (), PAYLOAD),
    "rsa": ("rsa", (), PAYLOAD),
    "p384": ("p384", (), PAYLOAD),
    "ed25519": ("ed25519", (), PAYLOAD),
    "pubkey": ("lot", ("--public-key-format", "full"), PAYLOAD),
    "pubkey_foreign": ("foreign", ("--public-key-format", "full"), PAYLOAD),
    "padded": ("lot", ("--pad",), PAYLOAD),
    "pad_sig": ("lot", ("--pad-sig",), PAYLOAD),
    "encrypted": ("lot", ("-E", "@enc"), PAYLOAD),
    "clear": ("lot", ("-E", "@enc", "--clear"), PAYLOAD),
    "non_bootable": ("lot", ("--non-bootable",), PAYLOAD),
    "compressed": ("lot", ("--compression", "lzma2"), COMPRESSIBLE_PAYLOAD),
    "extras": ("lot", ("-d", "(1,1.0.0)", "--boot-record", "CoFM"), PAYLOAD),
    "old_version": ("lot", ("-v", "1.1.0+0"), PAYLOAD),
    "no_counter": ("lot", ("--no-counter",), PAYLOAD),
    "pure": ("ed25519", ("--pure",), PAYLOAD),
    "newer": ("lot", ("-v", "1.3.0+0"), PAYLOAD),
}


def sign_args(tools_dir: Path, pems: dict[str, Path], name: str) -> tuple[str | Path, ...]:
    """The `imgtool sign` command line for one entry of SIGNED."""
    key, extra, _ = SIGNED[name]
    version = VERSION
    counter: tuple[str, ...] = ("-s", "auto")
    args: list[str | Path] = []
    rest = list(extra)
    while rest:
        arg = rest.pop(0)
        if arg == "-v":
            version = rest.pop(0)
        elif arg == "--no-counter":
            counter = ()
        elif arg.startswith("@"):
            args.append(pems[arg[1:]])
        else:
            args.append(arg)
    key_args: tuple[str | Path, ...] = ("-k", pems[key]) if key else ()
    return (
        "sign",
        *key_args,
        "-H",
        hex(HEADER_BYTES),
        "--pad-header",
        "-S",
        hex(SLOT_BYTES),
        "-v",
        version,
        *counter,
        *args,
        tools_dir / f"{name}.in",
        tools_dir / f"{name}.bin",
    )


_made: list[Tools] = []  # one set per session, whichever test module asks first


def make_tools(tmp_path_factory: pytest.TempPathFactory) -> Tools:
    """Keys from `imgtool keygen` and every SIGNED image from `imgtool sign`, made once per session."""
    if _made:
        return _made[0]
    workdir = tmp_path_factory.mktemp("mcuboot")
    pems = {name: workdir / f"{name}.pem" for name in KEY_TYPES}
    for done in parallel([("keygen", "-k", pems[n], "-t", t) for n, t in KEY_TYPES.items()]):
        assert done.returncode == 0, done.stderr
    for name, (_, _, payload) in SIGNED.items():
        (workdir / f"{name}.in").write_bytes(payload)
    for name, done in zip(SIGNED, parallel([sign_args(workdir, pems, n) for n in SIGNED]), strict=True):
        assert done.returncode == 0, (name, done.stderr)
    public: dict[str, SigningPublicKey] = {}
    for name, pem in pems.items():
        key = serialization.load_pem_private_key(pem.read_bytes(), password=None).public_key()
        assert isinstance(key, SigningPublicKey)
        public[name] = key
    images = {name: (workdir / f"{name}.bin").read_bytes() for name in SIGNED}
    _made.append(Tools(workdir, pems, public, images))
    return _made[0]


# --- layout helpers for mutations (independent of factoryd.mcuboot's parser) -------------------


@dataclass(frozen=True)
class Layout:
    """Offsets in a well-formed imgtool image."""

    tlv_off: int  # the protected TLV area's info
    unprot_off: int  # the unprotected area's info
    end: int
    tlvs: dict[int, tuple[int, int]]  # type -> (offset of its TLV header, length)


def layout(data: bytes) -> Layout:
    """Walk an imgtool image's TLV areas."""
    hdr_size, prot_size, img_size = struct.unpack_from("<HHI", data, 8)
    tlv_off = hdr_size + img_size
    unprot_off = tlv_off + prot_size
    tlvs: dict[int, tuple[int, int]] = {}
    for area in (tlv_off, unprot_off) if prot_size else (unprot_off,):
        _, total = struct.unpack_from("<HH", data, area)
        pos = area + 4
        while pos < area + total:
            tlv_type, length = struct.unpack_from("<HH", data, pos)
            tlvs[tlv_type] = (pos, length)
            pos += 4 + length
    (unprot_total,) = struct.unpack_from("<H", data, unprot_off + 2)
    return Layout(tlv_off, unprot_off, unprot_off + unprot_total, tlvs)


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    """One byte changed."""
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


def put(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    """Overwrite a little-endian field."""
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)
