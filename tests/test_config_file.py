"""The example config documents every setting and loads; hostile configs are refused with a clear error."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from factoryd.config import Settings, load_settings
from factoryd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "factoryd.toml"
BAD_DIR = Path(__file__).parent / "data" / "bad" / "configs"
BAD: dict[str, str] = json.loads((BAD_DIR / "expected.json").read_text())
# Keys the example sets to a production value instead of the built-in default (the hub of the
# udev template deploy/udev/90-factoryd.rules); every other key shows its default.
NOT_DEFAULT = {"hub.backend", "hub.sysfs.hub", "hub.sysfs.ports", "hub.sysfs.tty"}
_HEADER = re.compile(r"^\[([A-Za-z0-9_.]+)\]\s*$")
_KEY = re.compile(r"^#?\s*\"?([a-z0-9_]+)\"?\s*=")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's FACTORYD_* variables must not leak into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("FACTORYD_"):
            monkeypatch.delenv(name)


def _leaves(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    """Every leaf setting as dotted path -> default value."""
    leaves: dict[str, object] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            leaves.update(_leaves(annotation, f"{prefix}{name}."))
        else:
            leaves[f"{prefix}{name}"] = field.get_default(call_default_factory=True)
    return leaves


def _documented(text: str) -> set[str]:
    """Dotted keys the file sets or shows commented out, plus its table headers."""
    found: set[str] = set()
    section = ""
    for line in text.splitlines():
        if header := _HEADER.match(line):
            section = header.group(1)
            found.add(section)
            continue
        if key := _KEY.match(line):
            found.add(f"{section}.{key.group(1)}" if section else key.group(1))
    return found


def _lookup(data: dict[str, object], dotted: str) -> object:
    node: object = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return KeyError
        node = node[part]
    return node


def test_example_config_loads() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.station.state_dir == Path("/var/lib/factoryd")
    assert settings.hub.backend == "sysfs"
    assert settings.hub.sysfs.ports == [1, 2, 3, 4]
    assert settings.hub.sysfs.tty["3"] == "/dev/factoryd/slot-3"
    assert settings.ledger_url == "sqlite:////var/lib/factoryd/ledger.db"


def test_example_config_documents_every_setting() -> None:
    documented = _documented(EXAMPLE.read_text())
    missing = sorted(set(_leaves(Settings)) - documented)
    assert not missing, f"config/factoryd.toml does not mention: {missing}"


def test_example_config_mentions_no_unknown_key() -> None:
    known = set(_leaves(Settings))
    sections = {k.rsplit(".", 1)[0] for k in known if "." in k} | {"hub.sysfs.tty", "hub.uhubctl.tty"}
    documented = _documented(EXAMPLE.read_text())
    # Port numbers under the tty tables are dictionary keys, not settings.
    stray = sorted(
        d for d in documented - known - sections if not d.startswith(("hub.sysfs.tty.", "hub.uhubctl.tty."))
    )
    assert not stray, f"config/factoryd.toml mentions settings factoryd does not have: {stray}"


def test_example_config_values_are_the_defaults() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    differ = {}
    for dotted, default in _leaves(Settings).items():
        value = _lookup(data, dotted)
        if value is KeyError or dotted in NOT_DEFAULT:
            continue
        if isinstance(default, Path):
            value = Path(str(value))
        if value != default:
            differ[dotted] = (value, default)
    assert not differ, f"example value != default (update the comment or NOT_DEFAULT): {differ}"


def test_environment_beats_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACTORYD_JOBS__SHUTDOWN_GRACE_S", "42")
    assert load_settings(EXAMPLE).jobs.shutdown_grace_s == 42.0


def test_every_bad_config_is_listed_in_expected_json() -> None:
    on_disk = sorted(p.name for p in BAD_DIR.iterdir() if p.name != "expected.json")
    assert on_disk == sorted(BAD)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_is_refused(name: str) -> None:
    path = BAD_DIR / name
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert BAD[name] in message
    assert str(path) in message, "the error names the file"
    assert "\n" not in message, "one line for the journal"


def test_secret_value_is_never_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(BAD_DIR / "secret_in_config.toml")
    assert "hunter2" not in str(info.value)


def test_missing_and_directory_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path)
