"""Importing customer ID lists: formats, refusals with line and reason, nothing half-imported."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factoryd.errors import IdListError, LotStateError
from factoryd.ledger import Ledger, LotProfile, LotState
from factoryd.ledger.idlist import parse_id_list

ACTOR = "test"
DATA = Path(__file__).parent / "data"
GOOD_DIR = DATA / "idlists"
BAD_DIR = DATA / "bad" / "idlists"
GOOD = json.loads((GOOD_DIR / "expected.json").read_text())
BAD = json.loads((BAD_DIR / "expected.json").read_text())


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """A fresh SQLite ledger (the sample lists reuse fixed IDs)."""
    with Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}") as opened:
        yield opened


def fresh_lot(ledger: Ledger, profile: LotProfile | None = None) -> str:
    """A new draft lot."""
    name = f"lot-{uuid.uuid4().hex[:10]}"
    ledger.create_lot(
        name, customer="ACME", profile=profile or LotProfile(), target_quantity=None, actor=ACTOR
    )
    return name


def test_every_data_file_is_listed_in_its_expected_json() -> None:
    assert sorted(GOOD) == sorted(p.name for p in GOOD_DIR.iterdir() if p.name != "expected.json")
    assert sorted(BAD) == sorted(p.name for p in BAD_DIR.iterdir() if p.name != "expected.json")


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_lists_import_whole(ledger: Ledger, name: str) -> None:
    lot = fresh_lot(ledger)
    data = (GOOD_DIR / name).read_bytes()
    assert ledger.import_ids(lot, data, filename=name, actor=ACTOR) == GOOD[name]["count"]
    assert parse_id_list(data, id_format="uuid", filename=name).fmt == GOOD[name]["format"]
    # Sniffing without a file name finds the same format.
    assert parse_id_list(data, id_format="uuid").fmt == GOOD[name]["format"]
    assert ledger.progress(lot).available == GOOD[name]["count"]


def test_csv_and_json_extra_fields_become_metadata(ledger: Ledger) -> None:
    lot = fresh_lot(ledger)
    ledger.import_ids(lot, (GOOD_DIR / "basic.csv").read_bytes(), filename="basic.csv", actor=ACTOR)
    record = ledger.find_device("00000008-1111-4222-8333-000000000008")
    assert record is not None
    assert record.metadata == {"batch": "B2", "color": "blue"}
    lot2 = fresh_lot(ledger)
    ledger.import_ids(lot2, (GOOD_DIR / "objects.json").read_bytes(), actor=ACTOR)
    ledger.set_lot_state(lot2, LotState.ACTIVE, actor=ACTOR)
    reservation = ledger.reserve(lot2, "se-1", station="s", port="1", job_id=None, actor=ACTOR)
    assert reservation.metadata == {"batch": "B1", "qty": "2", "ok": "true"}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_lists_are_refused_whole_with_line_and_reason(ledger: Ledger, name: str) -> None:
    lot = fresh_lot(ledger)
    audit_before = ledger.verify_audit()
    with pytest.raises(IdListError) as caught:
        ledger.import_ids(lot, (BAD_DIR / name).read_bytes(), filename=name, actor=ACTOR)
    assert BAD[name] in str(caught.value)
    assert name in str(caught.value)
    assert ledger.progress(lot).total == 0
    assert ledger.verify_audit() == audit_before


def test_ids_known_in_another_lot_are_refused_naming_the_lot(ledger: Ledger) -> None:
    ids = [str(uuid.uuid4()) for _ in range(3)]
    first = fresh_lot(ledger)
    ledger.import_ids(first, ids[1].encode(), actor=ACTOR)
    second = fresh_lot(ledger)
    with pytest.raises(IdListError, match=rf"line 3: ID '{ids[1]}' already exists in lot '{first}'"):
        ledger.import_ids(second, f"# list\n{ids[0]}\n{ids[1]}\n{ids[2]}\n".encode(), actor=ACTOR)
    assert ledger.progress(second).total == 0
    # Importing the same list twice into one lot is refused the same way.
    with pytest.raises(IdListError, match=f"already exists in lot '{first}'"):
        ledger.import_ids(first, ids[1].encode(), actor=ACTOR)
    assert ledger.progress(first).total == 1


def test_size_limit(ledger: Ledger) -> None:
    lot = fresh_lot(ledger)
    data = "\n".join(str(uuid.uuid4()) for _ in range(10)).encode()
    with pytest.raises(IdListError, match=f"{len(data)} bytes is over the size limit of 100 bytes"):
        ledger.import_ids(lot, data, actor=ACTOR, max_bytes=100)
    assert ledger.import_ids(lot, data, actor=ACTOR, max_bytes=len(data)) == 10


def test_explicit_format_wins_and_unknown_formats_are_named(ledger: Ledger) -> None:
    lot = fresh_lot(ledger)
    one = str(uuid.uuid4())
    with pytest.raises(IdListError, match="has no 'id' column"):
        ledger.import_ids(lot, one.encode(), filename="ids.txt", fmt="csv", actor=ACTOR)
    with pytest.raises(IdListError, match="unknown ID list format 'xml'"):
        ledger.import_ids(lot, one.encode(), fmt="xml", actor=ACTOR)
    assert ledger.import_ids(lot, f"id\n{one}\n".encode(), filename="ids.dat", actor=ACTOR) == 1


def test_regex_id_format(ledger: Ledger) -> None:
    lot = fresh_lot(ledger, LotProfile(id_format="regex:ACME-[0-9]{6}"))
    tag = uuid.uuid4().int % 10**5
    with pytest.raises(IdListError, match=r"line 2: ID 'ACME-12' does not match the lot's id_format"):
        ledger.import_ids(lot, f"ACME-{tag:06d}\nACME-12\n".encode(), actor=ACTOR)
    assert ledger.import_ids(lot, f"ACME-{tag:06d}\n".encode(), actor=ACTOR) == 1


def test_ids_the_subject_template_cannot_hold_are_refused_at_import(ledger: Ledger) -> None:
    """Found when the list comes in, not when an ID is already reserved to a board."""
    lot = fresh_lot(ledger, LotProfile(subject="serialNumber={meta.sn}, CN={id}"))
    good, other = str(uuid.uuid4()), str(uuid.uuid4())
    empty_column = r"line 3: .*serialNumber '' is empty .*subject template\); nothing was imported"
    with pytest.raises(IdListError, match=empty_column):
        ledger.import_ids(lot, f"id,sn\n{good},SN-1\n{other},\n".encode(), filename="a.csv", actor=ACTOR)
    with pytest.raises(IdListError, match=r"line 2: .*subject template"):
        ledger.import_ids(lot, f'id,sn\n{good},"SN,1"\n'.encode(), filename="b.csv", actor=ACTOR)
    with pytest.raises(IdListError, match=r"line 2: .*subject template"):
        ledger.import_ids(lot, f"id\n{good}\n".encode(), filename="c.csv", actor=ACTOR)
    assert ledger.progress(lot).total == 0
    assert ledger.import_ids(lot, f"id,sn\n{good},SN-1\n".encode(), filename="d.csv", actor=ACTOR) == 1
    # An ID longer than a CN may be (RFC 5280: 64) cannot be CN={id}.
    long_lot = fresh_lot(ledger, LotProfile(id_format="regex:D-[0-9]+"))
    with pytest.raises(IdListError, match=r"line 1: .*64"):
        ledger.import_ids(long_lot, ("D-" + "7" * 70 + "\n").encode(), actor=ACTOR)
    assert ledger.progress(long_lot).total == 0


def test_closed_lot_takes_no_ids(ledger: Ledger) -> None:
    lot = fresh_lot(ledger)
    ledger.set_lot_state(lot, LotState.CLOSED, actor=ACTOR)
    with pytest.raises(LotStateError, match="closed"):
        ledger.import_ids(lot, str(uuid.uuid4()).encode(), actor=ACTOR)


def test_signed_lists(ledger: Ledger) -> None:
    customer_key = ec.generate_private_key(ec.SECP256R1())
    public_pem = customer_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    data = "\n".join(str(uuid.uuid4()) for _ in range(3)).encode()
    signature = customer_key.sign(data, ec.ECDSA(hashes.SHA256()))
    lot = fresh_lot(ledger)
    with pytest.raises(IdListError, match="signature does not verify"):
        ledger.import_ids(
            lot, data + b"\n", actor=ACTOR, signature=signature, signer_public_key_pem=public_pem
        )
    with pytest.raises(IdListError, match="needs both"):
        ledger.import_ids(lot, data, actor=ACTOR, signature=signature)
    p384_pem = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(IdListError, match="must be an EC P-256"):
        ledger.import_ids(lot, data, actor=ACTOR, signature=signature, signer_public_key_pem=p384_pem)
    assert ledger.progress(lot).total == 0
    assert (
        ledger.import_ids(lot, data, actor=ACTOR, signature=signature, signer_public_key_pem=public_pem) == 3
    )


# -- property tests of the parser ---------------------------------------------------------------

_uuids = st.lists(st.uuids().map(str), min_size=1, max_size=30, unique=True)
_meta_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12
)


@given(ids=_uuids, blank_every=st.integers(min_value=2, max_value=5), crlf=st.booleans(), bom=st.booleans())
def test_txt_round_trip(ids: list[str], blank_every: int, crlf: bool, bom: bool) -> None:
    lines: list[str] = ["# generated"]
    for index, device_id in enumerate(ids):
        if index % blank_every == 0:
            lines.append("")
        lines.append(device_id)
    newline = "\r\n" if crlf else "\n"
    data = (b"\xef\xbb\xbf" if bom else b"") + newline.join(lines).encode()
    parsed = parse_id_list(data, id_format="uuid")
    assert [item.device_id for item in parsed.ids] == ids
    assert [lines[item.line - 1] for item in parsed.ids] == ids


@given(
    rows=st.lists(
        st.tuples(st.uuids().map(str), _meta_text), min_size=1, max_size=20, unique_by=lambda r: r[0]
    )
)
def test_csv_round_trip_keeps_metadata_and_lines(rows: list[tuple[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # \r\n line ends: fields holding \r or \n get quoted
    writer.writerow(["id", "note"])
    writer.writerows(rows)
    parsed = parse_id_list(buffer.getvalue().encode(), id_format="uuid", fmt="csv")
    assert [(item.device_id, item.metadata["note"]) for item in parsed.ids] == [
        (device_id, note.replace("\r\n", "\n").replace("\r", "\n").strip()) for device_id, note in rows
    ]
    lines = buffer.getvalue().replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for item in parsed.ids:
        assert lines[item.line - 1].startswith(item.device_id)


@given(ids=_uuids, indent=st.sampled_from([None, 0, 2]), as_objects=st.booleans())
def test_json_round_trip_and_element_lines(ids: list[str], indent: int | None, as_objects: bool) -> None:
    elements: list[object] = [{"id": i, "n": k} for k, i in enumerate(ids)] if as_objects else list(ids)
    text = json.dumps(elements, indent=indent)
    parsed = parse_id_list(text.encode(), id_format="uuid")
    assert [item.device_id for item in parsed.ids] == ids
    lines = text.split("\n")
    # An indented object starts on the "{" line, one above its "id" key.
    offset = 1 if as_objects and indent is not None else 0
    for item in parsed.ids:
        assert item.device_id in lines[item.line - 1 + offset]
        assert lines[item.line - 1].strip().startswith(("{", '"', "["))


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(data=st.binary(max_size=400), fmt=st.sampled_from([None, "csv", "json", "txt"]))
def test_arbitrary_bytes_parse_or_are_refused_cleanly(data: bytes, fmt: str | None) -> None:
    try:
        parsed = parse_id_list(data, id_format="uuid", fmt=fmt)
    except IdListError as exc:
        refusal = str(exc)
        parsed = None
    if parsed is None:
        assert "nothing was imported" in refusal
    else:
        assert parsed.ids
        assert len({item.device_id for item in parsed.ids}) == len(parsed.ids)


@given(ids=_uuids, dup_at=st.integers(min_value=0, max_value=29))
def test_duplicates_name_both_lines(ids: list[str], dup_at: int) -> None:
    original = ids[dup_at % len(ids)]
    lines = [*ids, original]
    with pytest.raises(IdListError) as caught:
        parse_id_list("\n".join(lines).encode(), id_format="uuid")
    assert f"line {len(lines)}: duplicate ID '{original}' (first on line {ids.index(original) + 1})" in str(
        caught.value
    )
