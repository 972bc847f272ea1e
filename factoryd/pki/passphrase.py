"""The station passphrase that protects CA keys at rest, and a wrapper that never prints it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from factoryd.errors import ConfigError

DEFAULT_CREDENTIAL_NAME = "factoryd-ca-passphrase"
DEFAULT_PASSPHRASE_ENV = "FACTORYD_CA_PASSPHRASE"  # noqa: S105 - the variable name, not a secret
# A credential file is a few dozen bytes; anything bigger is a misconfiguration.
MAX_CREDENTIAL_BYTES = 4096


class Secret(bytes):
    """Bytes that hide themselves from repr/str/format (and so from logs and tracebacks)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "Secret('***')"

    def __format__(self, format_spec: str) -> str:
        return "Secret('***')"


def load_secret(name: str, env: str, *, what: str) -> Secret:
    """Read a secret from ``$CREDENTIALS_DIRECTORY/<name>`` (systemd), else from env var ``env``."""
    if not name or "/" in name or name in {".", ".."}:
        raise ConfigError(f"invalid credential name {name!r}")
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        path = Path(cred_dir) / name
        if path.is_file():
            if path.stat().st_size > MAX_CREDENTIAL_BYTES:
                raise ConfigError(f"credential file {path} is larger than {MAX_CREDENTIAL_BYTES} bytes")
            # `echo secret > file` adds a newline the user did not mean as part of the secret.
            value = path.read_bytes().rstrip(b"\r\n")
            if not value:
                raise ConfigError(f"credential file {path} is empty")
            return Secret(value)
    from_env = os.environ.get(env)
    if from_env is not None:
        if not from_env:
            raise ConfigError(f"environment variable {env} is empty")
        return Secret(from_env.encode())
    raise ConfigError(
        f"{what} not configured: provide systemd credential {name!r} "
        f"(LoadCredential=/SetCredentialEncrypted=) or environment variable {env}"
    )


def load_passphrase(
    name: str = DEFAULT_CREDENTIAL_NAME, env: str = DEFAULT_PASSPHRASE_ENV, *, file: Path | None = None
) -> Secret:
    """The CA passphrase: systemd credential ``name``, else the private ``file``, else env var ``env``."""
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if file is not None and not (cred_dir and (Path(cred_dir) / name).is_file()):
        return read_secret_file(file, what="CA passphrase file")
    return load_secret(name, env, what="CA passphrase")


def read_secret_file(path: Path, *, what: str) -> Secret:
    """A secret from a regular file of this user that nobody else can read (newline stripped)."""
    try:
        info = path.lstat()
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{what} {path} is not a regular file (symlinks are refused)")
    if info.st_mode & 0o077:
        raise ConfigError(
            f"{what} {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it"
        )
    if info.st_uid != os.geteuid():
        raise ConfigError(f"{what} {path} belongs to another user (uid {info.st_uid})")
    if info.st_size > MAX_CREDENTIAL_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_CREDENTIAL_BYTES} bytes")
    value = path.read_bytes().rstrip(b"\r\n")
    if not value:
        raise ConfigError(f"{what} {path} is empty")
    return Secret(value)
