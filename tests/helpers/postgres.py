"""A throwaway PostgreSQL cluster for the test session, as a pytest plugin.

Register it once in ``tests/conftest.py``::

    from tests.helpers.postgres import postgres_server, pytest_runtest_setup  # noqa: F401 - pytest plugin

The first test marked ``@pytest.mark.postgres`` starts one cluster for the whole session (``initdb`` into a
temp dir, a free loopback port, its unix socket in the temp dir, fsync off, trust auth) and exports its admin
URL in ``FACTORYD_TEST_PG_URL``, which ``factoryd.ledger.testing.throwaway_postgres_database`` reads; the
cluster is stopped and its directory removed when the session ends. If ``FACTORYD_TEST_PG_URL`` is already
set, that server is used and nothing is started. The start happens in ``pytest_runtest_setup`` rather than in
an autouse fixture because module-scoped fixtures (a module's database) are set up before any function-scoped
autouse fixture could run. The binaries are Debian's ``postgresql`` package; if they are missing, postgres
tests fail (not skip) with the package to install. Runs as root too (CI): PostgreSQL refuses to run as root,
so the cluster then runs as the ``postgres`` system user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from factoryd.ledger.testing import PG_ADMIN_URL_ENV

__all__ = [
    "PG_ADMIN_URL_ENV",
    "PostgresCluster",
    "PostgresServer",
    "find_postgres_bindir",
    "postgres_server",
    "pytest_runtest_setup",
]

LOOPBACK = "127.0.0.1"
DEBIAN_BINDIR_GLOB = "/usr/lib/postgresql/*/bin"
INSTALL_HINT = "apt-get install -y postgresql (Debian's server package: initdb and postgres)"
RUN_AS_WHEN_ROOT = "postgres"  # the Debian package's system user
INITDB_TIMEOUT_S = 60.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
PORT_PICK_ATTEMPTS = 5  # another process may take the free port between picking and binding it
# Durability buys nothing in a throwaway cluster and costs seconds per test module.
SPEED_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


def _version_key(bindir: str) -> tuple[int, ...]:
    version = Path(bindir).parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def find_postgres_bindir(search_glob: str = DEBIAN_BINDIR_GLOB, path: str | None = None) -> Path:
    """The newest directory with ``initdb`` and ``postgres``; fails the test naming the package to install."""
    candidates = sorted(glob.glob(search_glob), key=_version_key, reverse=True)
    for bindir in candidates:
        if (Path(bindir) / "initdb").is_file() and (Path(bindir) / "postgres").is_file():
            return Path(bindir)
    # Other distributions (and Homebrew) put the server binaries on PATH.
    initdb = shutil.which("initdb", path=path)
    if initdb is not None and (Path(initdb).parent / "postgres").is_file():
        return Path(initdb).parent
    pytest.fail(f"PostgreSQL server binaries not found (looked in {search_glob} and PATH): {INSTALL_HINT}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresCluster:
    """A throwaway cluster: ``start()`` runs initdb and the server, ``stop()`` ends it and removes its dir."""

    host = LOOPBACK

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir if bindir is not None else find_postgres_bindir()
        self.workdir = Path(tempfile.mkdtemp(prefix="factoryd-pg-"))
        self.datadir = self.workdir / "data"
        self.log_file = self.workdir / "postgres.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._user = self._run_as()
        if self._user is not None:
            # mkdtemp makes a 0700 root dir: the server's user must own it to create its data dir.
            os.chown(self.workdir, self._user.pw_uid, self._user.pw_gid)

    @staticmethod
    def _run_as() -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(RUN_AS_WHEN_ROOT)
        except KeyError:
            pytest.fail(
                f"running as root, and PostgreSQL refuses to run as root, but there is no "
                f"{RUN_AS_WHEN_ROOT!r} user to run it as: {INSTALL_HINT} creates it"
            )

    @property
    def admin_url(self) -> str:
        """A trust-auth URL of the ``postgres`` database, for CREATE/DROP DATABASE."""
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def log(self) -> str:
        """Everything initdb and the server logged so far."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def _popen(self, args: list[str]) -> subprocess.Popen[bytes]:
        with self.log_file.open("ab") as log:
            if self._user is None:
                return subprocess.Popen(args, stdout=log, stderr=log, cwd=self.workdir)  # noqa: S603
            return subprocess.Popen(  # noqa: S603 - our own argument list
                args,
                stdout=log,
                stderr=log,
                cwd=self.workdir,
                user=self._user.pw_uid,
                group=self._user.pw_gid,
                extra_groups=[],
                env={**os.environ, "HOME": str(self.workdir), "USER": self._user.pw_name},
            )

    def start(self) -> None:
        """Create the cluster and start the server; wait until it accepts connections."""
        initdb = self._popen(
            [
                str(self.bindir / "initdb"),
                "--pgdata",
                str(self.datadir),
                "--username",
                "postgres",
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ]
        )
        try:
            initdb.wait(timeout=INITDB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            initdb.kill()
            initdb.wait()
        if initdb.returncode != 0:
            self.remove()
            pytest.fail(f"initdb failed ({initdb.returncode}):\n{self.log()}")
        for _ in range(PORT_PICK_ATTEMPTS):
            self.port = _free_port()
            if self._start_server():
                return
        log = self.log()
        self.remove()
        pytest.fail(f"PostgreSQL did not start on {self.host}:{self.port}:\n{log}")

    def _start_server(self) -> bool:
        settings = [f"listen_addresses={self.host}", f"unix_socket_directories={self.workdir}"]
        args = [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port)]
        for setting in (*settings, *SPEED_SETTINGS):
            args += ["-c", setting]
        self._proc = self._popen(args)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            with contextlib.suppress(psycopg.OperationalError):
                psycopg.connect(self.admin_url, connect_timeout=2).close()
                return True
            time.sleep(0.05)
        self._signal(signal.SIGKILL)
        return False

    def _signal(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def stop(self) -> None:
        """Stop the server (fast shutdown: SIGINT) and remove the cluster's directory."""
        self._signal(signal.SIGINT)
        self.remove()

    def remove(self) -> None:
        """Remove the cluster's directory (the server must not be running)."""
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class PostgresServer:
    """The session's server: its admin URL, and the cluster if the suite started it (None: from the env)."""

    admin_url: str
    cluster: PostgresCluster | None


_SESSION_KEY = pytest.StashKey["PostgresServer | str"]()


def _session_server(config: pytest.Config) -> PostgresServer:
    state = config.stash.get(_SESSION_KEY, None)
    if state is None:
        state = _start_session_server(config)
        config.stash[_SESSION_KEY] = state
    if isinstance(state, str):
        # The start failed once: every postgres test fails with the same message, without retrying.
        pytest.fail(state)
    return state


def _start_session_server(config: pytest.Config) -> PostgresServer | str:
    given = os.environ.get(PG_ADMIN_URL_ENV)
    if given:
        return PostgresServer(admin_url=given, cluster=None)
    try:
        cluster = PostgresCluster()
        cluster.start()
    except pytest.fail.Exception as exc:
        return str(exc)

    def cleanup() -> None:
        os.environ.pop(PG_ADMIN_URL_ENV, None)
        cluster.stop()

    config.add_cleanup(cleanup)
    os.environ[PG_ADMIN_URL_ENV] = cluster.admin_url
    return PostgresServer(admin_url=cluster.admin_url, cluster=cluster)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Start the session's PostgreSQL before the first ``postgres`` test's fixtures are set up."""
    if item.get_closest_marker("postgres") is not None:
        _session_server(item.config)


@pytest.fixture(scope="session")
def postgres_server(pytestconfig: pytest.Config) -> PostgresServer:
    """The session's PostgreSQL (the suite's own cluster, or the one ``FACTORYD_TEST_PG_URL`` names)."""
    return _session_server(pytestconfig)
