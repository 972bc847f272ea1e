"""Options and helpers shared by the command groups: config, errors, input files, JSON output."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import typer
from typer.core import TyperGroup

from factoryd.config import Settings, load_settings
from factoryd.errors import ConfigError, FactorydError
from factoryd.limits import helper_executor

if TYPE_CHECKING:
    from factoryd.api.client import ApiClient
    from factoryd.ledger import Ledger

T = TypeVar("T")

# Longer than any help line: a command's summary is wrapped, never cut to the terminal width.
SHORT_HELP_LIMIT_CHARS = 1000
# Connecting to a local daemon's API takes microseconds; this only bounds a remote API address.
PROBE_TIMEOUT_S = 2.0

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file.", envvar="FACTORYD_CONFIG", exists=False),
]
TokenFileOption = Annotated[
    Path | None,
    typer.Option("--token-file", help="File holding the API token (default: $FACTORYD_TOKEN)."),
]


class HelpGroup(TyperGroup):
    """A command group whose listing shows each command's whole first help sentence, wrapped."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """Write the Commands section (click cuts summaries to the width left over; this wraps them)."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(SHORT_HELP_LIMIT_CHARS)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def command_group(help_text: str, **kwargs: Any) -> typer.Typer:
    """A `typer.Typer` with the station's help style: plain text that reads whole in an 80-column pipe.

    Rich help (typer's default) draws panels whose option column is cut at 80 columns
    (``--fault-rate,--fa…``) and gives every flag a ``<bool>`` type; plain click help does neither.
    """
    return typer.Typer(no_args_is_help=True, rich_markup_mode=None, cls=HelpGroup, help=help_text, **kwargs)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def get_settings(config: Path | None) -> Settings:
    """Load the station settings; a bad config is a one-line error."""
    try:
        return load_settings(config)
    except FactorydError as exc:
        fail(str(exc))


def state_dir_settings(config: Path | None) -> Settings:
    """Settings of a command that writes into the state directory, which is created if missing."""
    settings = get_settings(config)
    prepare_state(settings)
    return settings


def prepare_state(settings: Settings) -> None:
    """Create the state directory if missing; a one-line error naming the fix if it is unusable."""
    from factoryd.service import StationPaths, prepare_state_dir  # noqa: PLC0415

    guard(lambda: prepare_state_dir(StationPaths(settings.station.state_dir)))


def guard(fn: Callable[[], T]) -> T:
    """Run a command body; FactorydError becomes a one-line error and exit code 2."""
    try:
        return fn()
    except FactorydError as exc:
        fail(str(exc))


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion under `guard`."""
    return guard(lambda: asyncio.run(coro))


def read_input(path: Path) -> bytes:
    """Read an input file; a missing or unreadable file is a one-line error."""
    try:
        return path.read_bytes()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")


def echo_json(data: object) -> None:
    """Print ``data`` as indented, key-sorted JSON."""
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def format_table(columns: Sequence[str], rows: Sequence[Mapping[str, object]]) -> list[str]:
    """Rows as aligned text lines under a header; numbers are right-aligned."""
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row[c], int) for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return [line([c.upper() for c in columns]), *(line(r) for r in cells)]


def open_ledger(config: Path | None) -> Ledger:
    """Open the configured ledger (a context manager)."""
    from factoryd.ledger import Ledger  # noqa: PLC0415 - keep `factoryd --help` fast

    settings = get_settings(config)
    if settings.ledger.url is None:
        # The default ledger is a SQLite file in the state directory.
        prepare_state(settings)
    return guard(lambda: Ledger.open(settings.ledger_url))


def api_client(config: Path | None, token_file: Path | None) -> ApiClient:
    """A client for the running daemon's HTTP API, with the API token."""
    from factoryd.api.client import ApiClient, local_api_url, read_token  # noqa: PLC0415

    settings = get_settings(config)
    url = local_api_url(settings)
    if not _listening(url):
        # Before the token: without a daemon no token helps, and "no API token" misleads.
        start = f"factoryd run -c {config}" if config else "factoryd run"
        fail(
            f"no daemon is running at {url}; start it with `{start}` "
            "(or `sudo systemctl start factoryd` on an installed station)"
        )
    return ApiClient.for_settings(settings, guard(lambda: read_token(token_file)))


def _listening(url: str) -> bool:
    """False when nothing accepts connections on the URL's host and port (connection refused)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=PROBE_TIMEOUT_S):
            return True
    except ConnectionRefusedError:
        return False
    except OSError:
        return True  # unreachable or slow, not absent: the API call itself reports it


# Certificates, CRLs and manifests are public documents: readable by everyone, written whole.
PUBLIC_FILE_MODE = 0o644


def write_public(path: Path, data: bytes) -> None:
    """Write a public document atomically; a one-line error when the path cannot be written."""
    from factoryd.files import write_private  # noqa: PLC0415

    try:
        write_private(path, data, mode=PUBLIC_FILE_MODE)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")


def event_loop_for(choice: str) -> str:
    """The loop ``[station] event_loop`` runs: "uvloop" or "asyncio" ("auto": uvloop where installed).

    ConfigError if the choice is "uvloop" and uvloop is not installed (it is a dependency, but not
    built for every platform).
    """
    if choice == "asyncio":
        return choice
    try:
        import uvloop  # noqa: F401, PLC0415 - only checking it is installed
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                '[station] event_loop = "uvloop" but uvloop is not installed: '
                'pip install uvloop, or set it to "auto" or "asyncio"'
            ) from None
        return "asyncio"
    return "uvloop"


def run_event_loop(main: Callable[[], Coroutine[Any, Any, T]], choice: str) -> T:
    """Run ``main()`` to completion on the chosen loop ("auto": uvloop if installed, else asyncio).

    The loop's default executor is made of the daemon's helper threads (``limits.helper_executor``:
    on the loop's CPU they yield to it when ``factoryd run`` enabled that).
    """

    async def with_helpers() -> T:
        asyncio.get_running_loop().set_default_executor(helper_executor())
        return await main()

    if event_loop_for(choice) == "uvloop":
        import uvloop  # noqa: PLC0415 - a dependency, but not built for every platform

        return uvloop.run(with_helpers())
    return asyncio.run(with_helpers())
