"""The shipped Mosquitto ACL: a station can write only its own topics; a supervisor reads all."""

from __future__ import annotations

import asyncio
import getpass
import shutil
from pathlib import Path

import aiomqtt
import pytest

from tests.helpers.mqtt_broker import free_port

ACL = Path(__file__).parent.parent / "deploy" / "mosquitto" / "factoryd.acl"
USERS = {"station-1": "pw-one", "station-2": "pw-two", "supervisor": "pw-sup"}


async def _start_broker(tmp_path: Path) -> tuple[asyncio.subprocess.Process, int]:
    passwd_tool = shutil.which("mosquitto_passwd")
    assert passwd_tool, "mosquitto_passwd is missing: apt-get install mosquitto"
    passwd = tmp_path / "passwd"
    for user, password in USERS.items():
        create = ["-c"] if not passwd.exists() else []
        tool = await asyncio.create_subprocess_exec(passwd_tool, "-b", *create, str(passwd), user, password)
        assert await tool.wait() == 0
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    # Started as root, mosquitto would drop to user "mosquitto", which cannot read pytest's tmp dir.
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\nacl_file {ACL}\n"
        f"persistence false\nuser {getpass.getuser()}\n"
    )
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    broker = await asyncio.create_subprocess_exec(
        mosquitto, "-c", str(conf), stderr=asyncio.subprocess.DEVNULL
    )
    for _ in range(100):  # until it listens
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return broker, port
    broker.terminate()
    await broker.wait()
    pytest.fail("mosquitto did not start with the shipped ACL")


@pytest.mark.mqtt
async def test_stations_write_only_their_own_topics(tmp_path: Path) -> None:
    broker, port = await _start_broker(tmp_path)
    received: list[tuple[str, bytes]] = []
    try:
        async with (
            aiomqtt.Client("127.0.0.1", port, username="supervisor", password=USERS["supervisor"]) as watcher,
            aiomqtt.Client("127.0.0.1", port, username="station-1", password=USERS["station-1"]) as station,
        ):
            await watcher.subscribe("factory/#", qos=1)

            async def collect() -> None:
                async for message in watcher.messages:
                    received.append((message.topic.value, bytes(message.payload)))  # type: ignore[arg-type]

            reader = asyncio.ensure_future(collect())
            await station.publish("factory/line-1/station-1/status", b"own", qos=1)
            await station.publish("factory/line-1/station-2/status", b"forged", qos=1)
            await station.publish("factory/line-9/station-1/events", b"own-other-line", qos=1)
            await watcher.publish("factory/line-1/station-1/status", b"supervisor-write", qos=1)
            await asyncio.sleep(0.5)
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
    finally:
        broker.terminate()
        await broker.wait()
    payloads = dict(received)
    assert payloads.get("factory/line-1/station-1/status") == b"own"
    assert payloads.get("factory/line-9/station-1/events") == b"own-other-line"
    assert "factory/line-1/station-2/status" not in payloads  # the ACL dropped the forgery
    assert b"supervisor-write" not in [p for _, p in received]
