"""Parsing and validation of customer ID lists (CSV, JSON, plain text); pure, no I/O.

Every problem names the line as the user sees it in an editor (1-based, after
``\\r\\n``/``\\r`` are read as line breaks). A list is accepted whole or refused whole.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePath

from factoryd.errors import IdListError
from factoryd.ledger.profile import ID_FORMAT_REGEX_PREFIX, ID_FORMAT_UUID
from factoryd.ledger.tables import ID_MAX_CHARS

# 16 MiB holds ~400 000 UUIDs with a little metadata: a large order, still one transaction.
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
_FORMAT_ALIASES = {"csv": "csv", "json": "json", "txt": "txt", "text": "txt", "plain": "txt"}
_EXTENSIONS = {".csv": "csv", ".json": "json", ".txt": "txt", ".lst": "txt", ".list": "txt", ".ids": "txt"}
_UTF8_BOM = b"\xef\xbb\xbf"
_UUID_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID_ANY_CASE = re.compile(_UUID_CANONICAL.pattern, re.IGNORECASE)
_UUID_EXAMPLE = "123e4567-e89b-12d3-a456-426614174000"
_CSV_DELIMITERS = (",", ";", "\t")
_WHITESPACE = re.compile(r"\s")
# Only the first problems are spelled out; the rest are counted.
_MAX_PROBLEMS_SHOWN = 1


@dataclass(frozen=True, slots=True)
class ParsedId:
    """One ID of a list with the line it came from and its extra fields."""

    line: int
    device_id: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ParsedList:
    """A list that passed every check."""

    fmt: str
    ids: tuple[ParsedId, ...]


class LineProblems:
    """Collects per-line problems so the error can name the first and count the rest."""

    def __init__(self, source: str) -> None:
        self._source = source
        self._items: list[tuple[int, str]] = []

    def add(self, line: int, problem: str) -> None:
        self._items.append((line, problem))

    def __bool__(self) -> bool:
        return bool(self._items)

    def error(self) -> IdListError:
        items = sorted(self._items, key=lambda item: item[0])
        shown = "; ".join(f"line {line}: {problem}" for line, problem in items[:_MAX_PROBLEMS_SHOWN])
        rest = len(items) - _MAX_PROBLEMS_SHOWN
        more = f" (and {rest} more problem{'s' if rest != 1 else ''})" if rest > 0 else ""
        return IdListError(f"{self._source}: {shown}{more}; nothing was imported")


def _show(value: str) -> str:
    """Quote a value for an error message, cut to a readable length."""
    cut = value if len(value) <= 60 else value[:57] + "..."
    return repr(cut)


def make_id_validator(id_format: str) -> Callable[[str], str | None]:
    """Return a function giving the problem with one ID, or None when it is valid."""
    pattern: re.Pattern[str] | None = None
    if id_format.startswith(ID_FORMAT_REGEX_PREFIX):
        pattern = re.compile(id_format.removeprefix(ID_FORMAT_REGEX_PREFIX))
    elif id_format != ID_FORMAT_UUID:
        raise IdListError(f"the lot's id_format {id_format!r} is neither 'uuid' nor 'regex:<pattern>'")

    def check(value: str) -> str | None:
        if not value:
            return "empty ID"
        if len(value) > ID_MAX_CHARS:
            return f"ID {_show(value)} is {len(value)} characters long, over the limit of {ID_MAX_CHARS}"
        if not value.isprintable() or _WHITESPACE.search(value):
            return f"ID {_show(value)} contains whitespace or control characters"
        if pattern is None:
            if _UUID_CANONICAL.fullmatch(value):
                return None
            if _UUID_ANY_CASE.fullmatch(value):
                return f"UUID {_show(value)} is not in canonical lowercase form"
            return f"{_show(value)} is not a UUID in canonical form (like {_UUID_EXAMPLE})"
        if pattern.fullmatch(value) is None:
            return f"ID {_show(value)} does not match the lot's id_format {id_format!r}"
        return None

    return check


def _decode(data: bytes, source: str) -> str:
    offset = 0
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
        offset = len(_UTF8_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        position = exc.start + offset
        line = data.count(b"\n", 0, exc.start) + 1
        raise IdListError(
            f"{source}: not UTF-8 at byte {position} (line {line}); save it as UTF-8; nothing was imported"
        ) from exc
    # Lines as an editor shows them: \r\n and a lone \r both end a line.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _resolve_format(text: str, filename: str | None, fmt: str | None, source: str) -> str:
    if fmt is not None:
        resolved = _FORMAT_ALIASES.get(fmt.lower())
        if resolved is None:
            raise IdListError(f"{source}: unknown ID list format {fmt!r} (use csv, json or txt)")
        return resolved
    if filename is not None:
        by_extension = _EXTENSIONS.get(PurePath(filename).suffix.lower())
        if by_extension is not None:
            return by_extension
    return _sniff(text)


def _sniff(text: str) -> str:
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        return "json"
    for raw in text.split("\n"):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if any(delimiter in line for delimiter in _CSV_DELIMITERS) or line.lower() == "id":
            return "csv"
        return "txt"
    return "txt"


def _parse_txt(text: str) -> Iterator[ParsedId]:
    # Plain text has no structure that can be wrong: each non-blank line that is no # comment is an ID.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield ParsedId(number, line)


def _csv_delimiter(header_line: str) -> str:
    if "," in header_line:
        return ","
    for delimiter in _CSV_DELIMITERS[1:]:
        if delimiter in header_line:
            return delimiter
    return ","


def _parse_csv(text: str, problems: LineProblems, source: str) -> Iterator[ParsedId]:
    first = next((line for line in text.split("\n") if line.strip()), "")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_csv_delimiter(first), strict=True)
    header: list[str] | None = None
    id_column = 0
    last_line = 0
    while True:
        start_line = last_line + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise IdListError(
                f"{source}: line {reader.line_num}: bad CSV ({exc}); nothing was imported"
            ) from exc
        last_line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            id_column = _check_header(header, start_line, source)
            continue
        if len(row) != len(header):
            problems.add(start_line, f"expected {len(header)} fields as in the header, found {len(row)}")
            continue
        cells = [cell.strip() for cell in row]
        metadata = {name: cells[index] for index, name in enumerate(header) if index != id_column}
        yield ParsedId(start_line, cells[id_column], metadata)


def _check_header(header: list[str], line: int, source: str) -> int:
    lowered = [name.lower() for name in header]
    for index, name in enumerate(lowered):
        if not name:
            raise IdListError(
                f"{source}: line {line}: column {index + 1} of the header has no name; nothing was imported"
            )
        if name in lowered[:index]:
            raise IdListError(
                f"{source}: line {line}: column {header[index]!r} appears twice in the header; "
                "nothing was imported"
            )
    if "id" not in lowered:
        raise IdListError(
            f"{source}: line {line}: the CSV header has no 'id' column (found {', '.join(header)}); "
            "the first line must name the columns; nothing was imported"
        )
    return lowered.index("id")


_JSON_KINDS: dict[type, str] = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _json_metadata_value(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    return None


def _parse_json(text: str, problems: LineProblems, source: str) -> Iterator[ParsedId]:
    try:
        document = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise IdListError(
            f"{source}: line {exc.lineno}: invalid JSON ({exc.msg}); nothing was imported"
        ) from exc
    except (ValueError, RecursionError) as exc:
        raise IdListError(f"{source}: invalid JSON ({exc}); nothing was imported") from exc
    if not isinstance(document, list):
        kind = _JSON_KINDS.get(type(document), type(document).__name__)
        raise IdListError(f"{source}: a JSON ID list must be an array, found {kind}; nothing was imported")
    for line, element in zip(_json_element_lines(text), document, strict=True):
        if isinstance(element, str):
            yield ParsedId(line, element)
        elif isinstance(element, dict):
            device_id = element.get("id")
            if not isinstance(device_id, str):
                problems.add(line, "object has no string 'id' field")
                continue
            metadata: dict[str, str] = {}
            for key, value in element.items():
                if key == "id":
                    continue
                text_value = _json_metadata_value(value)
                if text_value is None:
                    problems.add(line, f"field {key!r} must be a string, number or boolean")
                    break
                metadata[key] = text_value
            else:
                yield ParsedId(line, device_id, metadata)
        else:
            kind = _JSON_KINDS.get(type(element), type(element).__name__)
            problems.add(line, f"element must be a string or an object with an 'id', not {kind}")


def _skip_whitespace(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\n\r":
        index += 1
    return index


def _json_element_lines(text: str) -> Iterator[int]:
    """Yield the line each top-level array element starts on (the text is known-valid JSON)."""
    decoder = json.JSONDecoder()
    index = _skip_whitespace(text, 0) + 1  # past the opening bracket
    line = 1
    counted_to = 0
    while True:
        index = _skip_whitespace(text, index)
        if text[index] == "]":
            return
        if text[index] == ",":
            index = _skip_whitespace(text, index + 1)
        line += text.count("\n", counted_to, index)
        counted_to = index
        yield line
        _, index = decoder.raw_decode(text, index)


def list_source(filename: str | None) -> str:
    """How error messages name a list."""
    return f"ID list {filename!r}" if filename else "ID list"


def check_size(data: bytes, max_bytes: int, source: str) -> None:
    """Refuse a list larger than ``max_bytes``."""
    if len(data) > max_bytes:
        raise IdListError(
            f"{source}: {len(data)} bytes is over the size limit of {max_bytes} bytes; nothing was imported"
        )


def parse_id_list(
    data: bytes,
    *,
    id_format: str,
    filename: str | None = None,
    fmt: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ParsedList:
    """Parse and validate a whole ID list or raise :class:`IdListError` naming line and problem."""
    source = list_source(filename)
    check_size(data, max_bytes, source)
    text = _decode(data, source)
    resolved = _resolve_format(text, filename, fmt, source)
    validate = make_id_validator(id_format)
    problems = LineProblems(source)
    if resolved == "csv":
        parsed = list(_parse_csv(text, problems, source))
    elif resolved == "json":
        parsed = list(_parse_json(text, problems, source))
    else:
        parsed = list(_parse_txt(text))
    first_seen: dict[str, int] = {}
    for item in parsed:
        problem = validate(item.device_id)
        if problem is not None:
            problems.add(item.line, problem)
            continue
        earlier = first_seen.get(item.device_id)
        if earlier is None:
            first_seen[item.device_id] = item.line
        else:
            problems.add(item.line, f"duplicate ID {_show(item.device_id)} (first on line {earlier})")
    if problems:
        raise problems.error()
    if not parsed:
        raise IdListError(f"{source}: the list is empty (no IDs found); nothing was imported")
    return ParsedList(resolved, tuple(parsed))
