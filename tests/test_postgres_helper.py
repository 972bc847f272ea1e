"""The suite's own PostgreSQL: a throwaway cluster per session, never the server on 5432."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

from factoryd.ledger.testing import throwaway_postgres_database
from tests.helpers.postgres import PG_ADMIN_URL_ENV, PostgresCluster, PostgresServer, find_postgres_bindir
from tests.helpers.processes import pid_alive

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PG_PORT = 5432


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_cluster_starts_serves_and_is_gone_after_stop() -> None:
    cluster = PostgresCluster()
    cluster.start()
    try:
        assert cluster.port != SYSTEM_PG_PORT
        with psycopg.connect(cluster.admin_url) as connection:
            row = connection.execute("SELECT current_setting('fsync'), inet_server_port()").fetchone()
        assert row == ("off", cluster.port)
        pid = cluster.pid
        assert pid is not None
        with throwaway_postgres_database(cluster.admin_url) as url:
            assert f":{cluster.port}/" in url
    finally:
        cluster.stop()
    assert not pid_alive(pid)
    assert not _port_open(cluster.port)
    assert not cluster.workdir.exists()


def test_missing_binaries_fail_with_the_debian_package_to_install(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install -y postgresql"):
        find_postgres_bindir(str(tmp_path / "nothing" / "*" / "bin"), path=str(tmp_path))


def test_throwaway_database_without_a_server_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PG_ADMIN_URL_ENV, raising=False)
    with pytest.raises(Exception, match=PG_ADMIN_URL_ENV), throwaway_postgres_database():
        pass


@pytest.mark.postgres
def test_postgres_tests_get_the_sessions_server(postgres_server: PostgresServer) -> None:
    assert os.environ[PG_ADMIN_URL_ENV] == postgres_server.admin_url
    with throwaway_postgres_database() as url, psycopg.connect(url.replace("+psycopg", "")) as connection:
        row = connection.execute("SELECT inet_server_port()").fetchone()
    if postgres_server.cluster is not None:
        assert row == (postgres_server.cluster.port,)
        assert postgres_server.cluster.port != SYSTEM_PG_PORT


def test_a_session_starts_its_own_cluster_and_stops_it_at_the_end(tmp_path: Path) -> None:
    record = tmp_path / "server.json"
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent(
            f"""
            import json, os
            from pathlib import Path
            import pytest

            @pytest.mark.postgres
            def test_record(postgres_server):
                cluster = postgres_server.cluster
                Path({str(record)!r}).write_text(json.dumps({{
                    "env": os.environ.get({PG_ADMIN_URL_ENV!r}), "url": postgres_server.admin_url,
                    "port": cluster.port, "pid": cluster.pid, "workdir": str(cluster.workdir)}}))
            """
        )
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    postgres: needs PostgreSQL\n")
    env = {k: v for k, v in os.environ.items() if k != PG_ADMIN_URL_ENV}
    env["PYTHONPATH"] = str(REPO)
    plugin = ["-p", "no:cacheprovider", "-p", "tests.helpers.postgres", "--strict-markers"]
    inner = ["-c", str(tmp_path / "pytest.ini"), str(tmp_path / "test_inner.py")]
    result = subprocess.run(  # noqa: S603 - our own argument list
        [sys.executable, "-m", "pytest", "-q", *plugin, *inner],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    seen = json.loads(record.read_text())
    assert seen["env"] == seen["url"]
    assert seen["port"] != SYSTEM_PG_PORT
    assert f":{seen['port']}/" in seen["url"]
    assert not pid_alive(seen["pid"])
    assert not _port_open(seen["port"])
    assert not Path(seen["workdir"]).exists()
