"""A small blocking client of the station API for the CLI (`factoryd ports`, `factoryd status`).

Standard library only (urllib): the CLI talks to one local daemon with a handful of calls.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from factoryd.config import Settings
from factoryd.errors import ConfigError, FactorydError

TOKEN_ENV = "FACTORYD_TOKEN"  # noqa: S105 - the name of a variable, not a token
# A local daemon answers in milliseconds; 10 s covers a busy ledger.
REQUEST_TIMEOUT_S = 10.0
_WILDCARDS = {"", "0.0.0.0", "127.0.0.1", "localhost"}  # noqa: S104 - compared, not bound


class ApiCallError(FactorydError):
    """The daemon's API refused a call or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def read_token(token_file: Path | None) -> str:
    """The API token from ``--token-file`` or $FACTORYD_TOKEN; ConfigError if neither is set."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the token file {token_file}: {exc}") from None
        if not token:
            raise ConfigError(f"the token file {token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(f"no API token: set ${TOKEN_ENV} or pass --token-file")
    return token


def local_api_url(settings: Settings) -> str:
    """The base URL of this machine's daemon API (127.0.0.1 unless bound to a specific address)."""
    api = settings.api
    host = "127.0.0.1" if api.host in _WILDCARDS else api.host
    if host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if api.tls_cert else "http"
    return f"{scheme}://{host}:{api.port}"


class ApiClient:
    """JSON calls to the station API with a bearer token."""

    def __init__(self, base_url: str, token: str, *, ca_file: Path | None = None) -> None:
        """Talk to ``base_url``; for https, trust ``ca_file`` (the daemon's certificate)."""
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None

    @classmethod
    def for_settings(cls, settings: Settings, token: str) -> ApiClient:
        """A client of the daemon configured by ``settings``."""
        return cls(local_api_url(settings), token, ca_file=settings.api.tls_cert)

    def get(self, path: str) -> Any:
        """GET ``path``; the decoded JSON answer."""
        return self._call("GET", path)

    def post(self, path: str) -> Any:
        """POST ``path`` without a body; the decoded JSON answer."""
        return self._call("POST", path)

    def _call(self, method: str, path: str) -> Any:
        url = f"{self.base_url}{path}"
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"not an http(s) URL: {url}")
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked just above
            url,
            method=method,
            headers={"Authorization": f"Bearer {self._token}", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(  # noqa: S310
                request, timeout=REQUEST_TIMEOUT_S, context=self._context
            ) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise ApiCallError(f"{method} {path}: HTTP {exc.code}: {_detail(exc)}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiCallError(
                f"cannot reach the factoryd API at {self.base_url} ({reason}); is the daemon running?"
            ) from None


def _detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        return str(exc.reason)
    detail = body.get("detail") if isinstance(body, dict) else None
    return str(detail) if detail else str(exc.reason)
