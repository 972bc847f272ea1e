"""factoryd.files: mode, atomic replace, partial writes, nothing left behind on error, no symlinks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from factoryd.files import fsync_dir, private_staging_dir, wipe, write_new, write_private, write_together


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def one_byte_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """os.write writes at most one byte per call (as a pipe, a signal or a full disk may make it)."""
    calls: list[int] = []
    real_write = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        calls.append(len(data))
        return real_write(fd, bytes(data[:1]))

    monkeypatch.setattr(os, "write", write)
    return calls


def test_write_private_creates_a_0600_file_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o777)  # obeyed, this umask would leave the file unreadable even to its owner
    try:
        write_private(tmp_path / "key", b"secret")
    finally:
        os.umask(old)
    assert (tmp_path / "key").read_bytes() == b"secret"
    assert _mode(tmp_path / "key") == 0o600


def test_write_private_takes_another_mode(tmp_path: Path) -> None:
    write_private(tmp_path / "public.pem", b"pem", mode=0o640)
    assert _mode(tmp_path / "public.pem") == 0o640


def test_write_private_replaces_atomically_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.write_bytes(b"old")
    inode = target.stat().st_ino
    write_private(target, b"new content")
    assert target.read_bytes() == b"new content"
    # A new inode renamed over the old one, not the old file truncated and rewritten in place.
    assert target.stat().st_ino != inode
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def test_write_private_without_replace_keeps_the_first_file(tmp_path: Path) -> None:
    target = tmp_path / "page.key"
    write_private(target, b"first", replace=False)
    with pytest.raises(FileExistsError):
        write_private(target, b"second", replace=False)
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["page.key"]


def test_partial_writes_are_continued_to_the_end(tmp_path: Path, one_byte_writes: list[int]) -> None:
    data = bytes(range(256)) * 4
    write_private(tmp_path / "key", data)
    assert (tmp_path / "key").read_bytes() == data
    assert len(one_byte_writes) == len(data)
    write_new(tmp_path / "new", b"abc")
    assert (tmp_path / "new").read_bytes() == b"abc"


def test_a_failed_write_leaves_neither_temp_nor_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "key").write_bytes(b"old")

    def full_disk(fd: int, data: bytes | memoryview) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_private(tmp_path / "key", b"new")
    with pytest.raises(OSError, match="No space left"):
        write_new(tmp_path / "other", b"new")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["key"]
    assert (tmp_path / "key").read_bytes() == b"old"


def test_a_failed_rename_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "key").write_bytes(b"old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("I/O error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="I/O error"):
        write_private(tmp_path / "key", b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["key"]
    assert (tmp_path / "key").read_bytes() == b"old"


@pytest.mark.parametrize("replace", [True, False])
def test_write_private_refuses_a_symlink(tmp_path: Path, replace: bool) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    link = tmp_path / "key"
    link.symlink_to(victim)
    with pytest.raises(OSError, match="symlink"):
        write_private(link, b"attacker wants this written", replace=replace)
    assert victim.read_bytes() == b"untouched"
    assert link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", "victim"]


def test_write_new_refuses_an_existing_file_or_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "link").symlink_to(victim)
    for name in ("victim", "link", "dangling"):
        with pytest.raises(FileExistsError):
            write_new(tmp_path / name, b"x")
    assert victim.read_bytes() == b"untouched"
    assert not (tmp_path / "nowhere").exists()


def test_staging_dir_appears_whole_on_success(tmp_path: Path) -> None:
    target = tmp_path / "lot1"
    with private_staging_dir(target) as staging:
        assert staging.parent == tmp_path
        assert _mode(staging) == 0o700
        write_new(staging / "a", b"1")
        write_new(staging / "b", b"2")
        assert not target.exists()
    assert sorted(p.name for p in target.iterdir()) == ["a", "b"]
    assert _mode(target) == 0o700
    assert [p.name for p in tmp_path.iterdir()] == ["lot1"]


def test_staging_dir_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "lot1"

    def fill_then_fail() -> None:
        with private_staging_dir(target) as staging:
            write_new(staging / "a", b"1")
            raise RuntimeError("halfway")

    with pytest.raises(RuntimeError, match="halfway"):
        fill_then_fail()
    assert list(tmp_path.iterdir()) == []


def test_staging_dir_never_replaces_an_existing_directory(tmp_path: Path) -> None:
    target = tmp_path / "lot1"
    target.mkdir()  # empty: os.rename alone would silently replace it
    with pytest.raises(FileExistsError), private_staging_dir(target) as staging:
        write_new(staging / "a", b"1")
    assert list(target.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["lot1"]


def test_wipe_zeroes_then_removes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "ca-key.pem"
    target.write_bytes(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    seen: list[bytes] = []
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        seen.append(self.read_bytes())
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    wipe(target)
    assert not target.exists()
    assert seen == [bytes(len(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"))]


def test_wipe_refuses_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / "key").symlink_to(victim)
    with pytest.raises(OSError, match="symlink"):
        wipe(tmp_path / "key")
    assert victim.read_bytes() == b"untouched"


def test_fsync_dir_works_through_a_symlinked_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "state").symlink_to(real)
    fsync_dir(tmp_path / "state")
    write_private(tmp_path / "state" / "key", b"k")
    assert (real / "key").read_bytes() == b"k"


def test_files_written_together_replace_both_or_neither(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, signature = tmp_path / "lot.manifest.json", tmp_path / "lot.manifest.p7s"
    manifest.write_bytes(b"old manifest")
    signature.write_bytes(b"old signature")
    real_write = os.write
    writes: list[int] = []

    def disk_fills_on_the_second_file(fd: int, data: bytes | memoryview) -> int:
        writes.append(fd)  # each small file is written in one call
        if len(writes) > 1:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", disk_fills_on_the_second_file)
    with pytest.raises(OSError, match="No space left"):
        write_together({manifest: b"new manifest", signature: b"new signature"}, mode=0o644)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lot.manifest.json", "lot.manifest.p7s"]
    assert (manifest.read_bytes(), signature.read_bytes()) == (b"old manifest", b"old signature")

    write_together({manifest: b"new manifest", signature: b"new signature"}, mode=0o644)
    assert (manifest.read_bytes(), signature.read_bytes()) == (b"new manifest", b"new signature")
    assert stat.S_IMODE(manifest.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lot.manifest.json", "lot.manifest.p7s"]
