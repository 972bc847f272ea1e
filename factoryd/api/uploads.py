"""Multipart uploads: parsed from the size-capped stream, fields checked, files held in memory.

File names are only ever used to guess a format (``.csv``, ``.json``); they are never paths.
A name with a directory part, ``..``, a NUL or another control character is refused whole.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from factoryd.errors import InputError

# Longer names than a filesystem takes are not names but payloads.
FILENAME_MAX_CHARS = 255
# Text fields (passphrase, format) are short; a larger one is a mistake or an attack.
TEXT_FIELD_MAX_BYTES = 4096


@dataclass(frozen=True)
class UploadedFile:
    """One file part: its bytes and its (checked, display-only) file name."""

    data: bytes
    filename: str | None


@dataclass(frozen=True)
class Upload:
    """The parsed form: file parts and text fields by name."""

    files: dict[str, UploadedFile]
    fields: dict[str, str]


def check_filename(name: str | None, field: str) -> str | None:
    """Return a plain file name, or raise InputError naming the trick."""
    if name is None or name == "":
        return None
    if len(name) > FILENAME_MAX_CHARS:
        raise InputError(f"field {field!r}: file name is longer than {FILENAME_MAX_CHARS} characters")
    if "\x00" in name:
        raise InputError(f"field {field!r}: file name contains a NUL byte")
    if not name.isprintable():
        raise InputError(f"field {field!r}: file name contains control characters")
    if "/" in name or "\\" in name:
        raise InputError(f"field {field!r}: file name {name!r} has a directory part; send a plain name")
    if name in (".", ".."):
        raise InputError(f"field {field!r}: file name {name!r} is not a file name")
    return name


async def _stream(request: Request) -> AsyncGenerator[bytes, None]:
    async for chunk in request.stream():
        yield chunk


async def read_upload(
    request: Request,
    *,
    files: dict[str, int],
    fields: frozenset[str],
    required: frozenset[str],
) -> Upload:
    """Parse a multipart body with at most one part per known name; ``files`` maps name to byte limit."""
    try:
        parser = MultiPartParser(
            request.headers,
            _stream(request),
            max_files=len(files),
            max_fields=len(fields) + len(files),
            max_part_size=max([TEXT_FIELD_MAX_BYTES, *files.values()]),
        )
        form = await parser.parse()
    except MultiPartException as exc:
        raise HTTPException(400, f"malformed multipart body: {exc.message}") from None
    try:
        got_files: dict[str, UploadedFile] = {}
        got_fields: dict[str, str] = {}
        for name, value in form.multi_items():
            if name in got_files or name in got_fields:
                raise InputError(f"form field {name!r} appears more than once")
            if name in files:
                got_files[name] = await _file_part(name, value, files[name])
            elif name in fields:
                if isinstance(value, UploadFile):
                    raise InputError(f"form field {name!r} must be a text field, not a file")
                got_fields[name] = value
            else:
                known = ", ".join(sorted([*files, *fields]))
                raise InputError(f"unknown form field {name!r} (this endpoint takes {known})")
        missing = sorted(required - set(got_files) - set(got_fields))
        if missing:
            raise InputError(f"missing form field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        return Upload(got_files, got_fields)
    finally:
        await form.close()


async def _file_part(name: str, value: UploadFile | str, limit: int) -> UploadedFile:
    if isinstance(value, str):
        # curl -F 'ids=<file' sends a text part without a file name: accept it as the file.
        data, filename = value.encode("utf-8"), None
    else:
        filename = check_filename(value.filename, name)
        data = await value.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"file {name!r} is over the limit of {limit} bytes; nothing was stored")
    return UploadedFile(data, filename)
