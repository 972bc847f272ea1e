"""Private files written so that a crash leaves the old content or the new, never a part of it.

Keys, token references, firmware and session secrets all go through here: the file is created
with O_EXCL|O_NOFOLLOW (never through a planted symlink, never over a file someone else opened),
set to its mode whatever the umask, written in full (``os.write`` may write less than asked),
fsynced, then renamed into place, and the directory is fsynced so the rename itself is durable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700
# A symlink planted at a file's own name is never followed (its directory may be a symlink).
# os.open descriptors are not inherited by child processes anyway (PEP 446).
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW


def write_new(path: Path, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Create ``path`` (it must not exist, not even as a symlink), write all of ``data`` and fsync it.

    Not atomic on its own: use it inside a private staging directory or for a temp file.
    On error the partly written file is removed.
    """
    fd = os.open(path, _CREATE_FLAGS, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits off
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def write_private(path: Path, data: bytes, *, mode: int = FILE_MODE, replace: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, rename, fsync dir).

    With ``replace=False`` an existing ``path`` is kept and FileExistsError raised (first writer wins).
    A symlink at ``path`` is refused either way (and never followed).
    """
    _refuse_symlink(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        write_new(tmp, data, mode=mode)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with FileExistsError when path exists, atomically
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_together(files: Mapping[Path, bytes], *, mode: int = FILE_MODE) -> None:
    """Write several files that belong together (a manifest and its signature) into one directory.

    Every temp file is written and fsynced before any is renamed into place, so a full disk or a
    write error leaves all the old files (or none) and never a new one beside an old partner.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            _refuse_symlink(path)
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
            write_new(tmp, data, mode=mode)
            temps.append((tmp, path))
        for tmp, path in temps:
            os.replace(tmp, path)  # renames take no space
    finally:
        for tmp, _path in temps:
            tmp.unlink(missing_ok=True)
    for parent in {path.parent for path in files}:
        fsync_dir(parent)


@contextlib.contextmanager
def private_staging_dir(target: Path, *, mode: int = DIR_MODE) -> Iterator[Path]:
    """A new private directory to fill; it becomes ``target`` in one rename when the block succeeds.

    Readers see the whole directory or none of it. On error (or if ``target`` appeared meanwhile)
    the staging directory is removed and ``target`` is untouched.
    """
    staging = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    os.mkdir(staging, mode)
    try:
        os.chmod(staging, mode)  # mkdir honours the umask
        yield staging
        fsync_dir(staging)
        _rename_to_new(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(target.parent)


def wipe(path: Path) -> None:
    """Overwrite a file with zeros, fsync, then unlink it (best effort on journaling/COW filesystems)."""
    _refuse_symlink(path)
    fd = os.open(path, os.O_WRONLY | _NOFOLLOW)
    try:
        zeros = memoryview(bytes(os.fstat(fd).st_size))
        while zeros:
            zeros = zeros[os.write(fd, zeros) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()


def fsync_dir(path: Path) -> None:
    """Make renames and unlinks in a directory durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename_to_new(source: Path, target: Path) -> None:
    # os.rename silently replaces an empty directory at target: refuse anything there instead.
    if target.exists() or target.is_symlink():
        raise FileExistsError(errno.EEXIST, "already exists", str(target))
    os.rename(source, target)


def _refuse_symlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise OSError(errno.ELOOP, "refusing to write a private file through a symlink", str(path))
