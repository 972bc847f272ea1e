"""The station passphrase that protects CA keys at rest, and a wrapper that never prints it."""

from __future__ import annotations

import os
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


def load_passphrase(name: str = DEFAULT_CREDENTIAL_NAME, env: str = DEFAULT_PASSPHRASE_ENV) -> Secret:
    """Read the CA passphrase from ``$CREDENTIALS_DIRECTORY/<name>``, else from env var ``env``."""
    return load_secret(name, env, what="CA passphrase")
