"""Station configuration: TOML file (config/factoryd.toml), overridden by FACTORYD_* environment variables.

Unknown keys are errors (a typo must not silently fall back to a default). Secrets never live
here in clear: the CA passphrase and the MQTT password come from systemd credentials or env.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from factoryd.errors import ConfigError

_CONFIG_PATH: ContextVar[Path | None] = ContextVar("factoryd_config_path", default=None)


_Cpu = Annotated[int, Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StationSettings(_Section):
    """Who this station is and where it keeps state."""

    name: str = "station-1"
    line: str = "line-1"
    state_dir: Path = Path("/var/lib/factoryd")
    # The daemon's event loop: "auto" is uvloop (a dependency) where it is installed, else asyncio.
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    # CPUs the daemon's threads run on: "auto" = the one the event loop starts on, "all" = the
    # scheduler decides, or a list of CPU numbers (limits.py apply_cpu_affinity).
    cpu_affinity: Literal["auto", "all"] | Annotated[list[_Cpu], Field(min_length=1)] = "auto"


class LedgerSettings(_Section):
    """The allocation ledger's database."""

    # None: SQLite file ledger.db in the state directory.
    url: str | None = None
    # How long a board waits at its safe point for an unreachable ledger before its job fails
    # (its reservation kept; jobs/ledger_hold.py). Intake stays paused until the ledger is back.
    hold_s: float = Field(300.0, gt=0, le=86_400)


class SimHubSettings(_Section):
    """The simulated hub (the embedded default)."""

    ports: int = Field(8, ge=1, le=1024)
    # Boards the simulated operator feeds in over the run; None = endless.
    boards: int | None = Field(None, ge=0)
    fault_rate: float = Field(0.0, ge=0.0, le=1.0)
    fault_seed: int = 0
    timing: Literal["zero", "realistic"] = "zero"
    timing_scale: float = Field(1.0, ge=0.0)
    # backend "sim-remote": the control socket of a `factoryd sim hub` process (boards outlive the daemon).
    control_socket: Path | None = None


class _SwitchedHubSettings(_Section):
    """What every real hub backend is configured with: its ports and how their ttys are found."""

    ports: list[int] = Field(default_factory=list)
    # Port number -> tty: an absolute path (a /dev/serial/by-path/... link or a udev SYMLINK such as
    # /dev/factoryd/slot-3) or an ID_PATH name under by_path_dir. Never ttyACM numbers. A port
    # without an entry is found by its topology (usb-0:<location ports>.<port>) in by_path_dir.
    tty: dict[str, str] = Field(default_factory=dict)
    # After power-off, how long the tty may take to disappear (udev remove) before it is an error.
    remove_timeout_s: float = Field(5.0, gt=0)
    by_path_dir: Path = Path("/dev/serial/by-path")
    # Follow udev add/remove events (pyudev, extra "udev") when available; else poll by_path_dir.
    udev: bool = True

    @model_validator(mode="after")
    def _check_tty(self) -> Self:
        unknown = sorted(set(self.tty) - {str(p) for p in self.ports})
        if unknown:
            raise ValueError(f"tty entries for ports not in ports: {', '.join(unknown)}")
        return self


class UhubctlSettings(_SwitchedHubSettings):
    """A hub switched with uhubctl."""

    binary: str = "uhubctl"
    location: str = ""
    # HUBS.md: a USB 3 hub is two logical hubs; the other half's location (e.g. "2-1" for "1-1").
    # uhubctl >= 2.2 pairs the halves itself; set this when it does not (older uhubctl, odd hubs).
    dual_location: str = ""
    # uhubctl talks to the hub over a few control transfers; 10 s covers slow hubs and -r repeats.
    command_timeout_s: float = Field(10.0, gt=0)
    # uhubctl -r N: repeat the power-off N times, for kernels that switch the power back on by themselves.
    off_repeat: int = Field(0, ge=0, le=1000)


class SysfsHubSettings(_SwitchedHubSettings):
    """A hub switched through the kernel's per-port 'disable' attribute (Linux >= 6.0)."""

    # Hub location as uhubctl prints it: "1-1.4" (or "1" for a root hub).
    hub: str = ""
    # The USB 3 half of the same hub (HUBS.md: switch both).
    dual_hub: str = ""
    # The hub's bConfigurationValue; None = read it from sysfs.
    config: int | None = Field(None, ge=1)
    sysfs_root: Path = Path("/sys/bus/usb/devices")


class YkushHubSettings(_SwitchedHubSettings):
    """A Yepkit YKUSH hub switched over its HID control interface (extra "ykush").

    ``ports`` are the numbers printed on the YKUSH board (its command numbers, 1..3) and ``tty``
    is keyed by them.
    """

    # The YKUSH's USB serial (`ykushcmd -l` lists it); "" = the only YKUSH attached.
    serial: str = ""
    # The hub's USB location ("1-1.4", `factoryd hubs detect`), used to find the ports' ttys.
    location: str = ""
    # HUBS.md: printed port number -> the USB port number in the topology path, where they differ
    # (find it with a teach run: power one printed port, see which by-path link appears).
    usb_port: dict[str, int] = Field(default_factory=dict)
    # Time limit of one HID exchange with the hub (the library blocks).
    command_timeout_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _check_usb_port(self) -> YkushHubSettings:
        unknown = sorted(set(self.usb_port) - {str(p) for p in self.ports})
        if unknown:
            raise ValueError(f"usb_port entries for ports not in ports: {', '.join(unknown)}")
        bad = sorted(k for k, v in self.usb_port.items() if v < 1)
        if bad:
            raise ValueError(f"usb_port entries must be USB port numbers >= 1: {', '.join(bad)}")
        return self


class BrainstemHubSettings(_SwitchedHubSettings):
    """An Acroname USBHub3p switched with the BrainStem library (extra "brainstem").

    ``ports`` are BrainStem channel + 1 (HubTool numbers the channels 0..7, so port 1 is channel 0).
    The USBHub3p is chained hub chips: its devices sit deeper than <location>.<port>, so give every
    port its ``tty`` (a teach run finds them).
    """

    # The hub's BrainStem serial number, e.g. "0x40F5849A" (decimal accepted); "" = first hub found.
    serial: str = ""
    # The hub's USB location ("1-1.4"), used to find the ports' ttys.
    location: str = ""
    # Time limit of one BrainStem call (the library blocks).
    command_timeout_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _check_serial(self) -> BrainstemHubSettings:
        if self.serial:
            try:
                int(self.serial, 0)
            except ValueError:
                raise ValueError(f"serial {self.serial!r} is not a number (e.g. 0x40F5849A)") from None
        return self


class HubSettings(_Section):
    """Port switching."""

    backend: Literal["sim", "sim-remote", "uhubctl", "sysfs", "ykush", "brainstem"] = "sim"
    # Ports powered at once (power budget and enumeration storms).
    max_powered: int = Field(8, ge=1)
    # HUBS.md: tools elsewhere use ~10 s re-enumeration timeouts.
    enumerate_timeout_s: float = Field(10.0, gt=0)
    # HUBS.md: 2 s power-cycle gaps are common practice.
    power_cycle_off_s: float = Field(2.0, ge=0)
    # Minimum gap between two power-ons on the hub: spreads the boards' inrush current (HUBS.md).
    power_on_stagger_s: float = Field(0.01, ge=0)
    sim: SimHubSettings = SimHubSettings()
    uhubctl: UhubctlSettings = UhubctlSettings()
    sysfs: SysfsHubSettings = SysfsHubSettings()
    ykush: YkushHubSettings = YkushHubSettings()
    brainstem: BrainstemHubSettings = BrainstemHubSettings()


class JobSettings(_Section):
    """The provisioning pipeline."""

    # Lot to provision; None = the one active lot in the ledger.
    lot: str | None = None
    step_attempts: int = Field(3, ge=1)
    job_attempts: int = Field(3, ge=1)
    backoff_initial_s: float = Field(0.05, ge=0)
    backoff_max_s: float = Field(2.0, ge=0)
    # How often an empty or finished port is looked at again.
    rescan_s: float = Field(2.0, gt=0)
    # Boards failed in a row before a port stops in ATTENTION (a broken pogo pin fails every board).
    attention_after_failures: int = Field(3, ge=1)
    # Whether boards refused as not genuine (attestation) count towards attention_after_failures:
    # a stream of fakes is the parts' fault, not the fixture's, so by default they do not.
    impostors_need_attention: bool = False
    # On SIGTERM running jobs get this long to finish before they are cancelled (safe: rule 1).
    shutdown_grace_s: float = Field(30.0, ge=0)
    # External tool that flashes the lot's signed firmware onto a board that does not answer
    # HELLO yet, e.g. ["arduino-cli", "upload", "-p", "{tty}", "--fqbn", "…", "--input-file", "{image}"].
    flash_command: list[str] | None = None
    flash_timeout_s: float = Field(120.0, gt=0)
    baudrate: int = 115200
    resends: int = Field(3, ge=0)
    reply_timeout_scale: float = Field(1.0, gt=0)


class PkiSettings(_Section):
    """Where the CA passphrase comes from (never from this file)."""

    # Names of a credential and of an env variable, not secrets themselves.
    passphrase_credential: str = "factoryd-ca-passphrase"  # noqa: S105
    passphrase_env: str = "FACTORYD_CA_PASSPHRASE"  # noqa: S105
    # A 0600 file holding the passphrase (a demo's state dir keeps one); read after the systemd
    # credential and before the environment variable. The path is in the config, the secret is not.
    passphrase_file: Path | None = None
    # The line's signing service (docs/signer.md), "https://host:port": certificates are signed there
    # and this station holds no CA key. None: this station signs with its own lots' CA keys.
    signer: str | None = None
    # This station's client certificate and key, and the signer's CA (the line CA): systemd
    # credentials by name (LoadCredential=), unless the matching *_file is set.
    signer_cert_credential: str = "factoryd-signer-cert"
    signer_key_credential: str = "factoryd-signer-key"
    signer_ca_credential: str = "factoryd-signer-ca"
    signer_cert_file: Path | None = None
    signer_key_file: Path | None = None
    signer_ca_file: Path | None = None
    # One request's time limit (connect + sign + reply).
    signer_timeout_s: float = Field(10.0, gt=0)
    # How long a board waits at the issue step for an unreachable signer (key made, nothing
    # written, reservation kept) before its job restarts; the port shows the hold meanwhile.
    signer_hold_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _check_signer(self) -> PkiSettings:
        if self.signer is not None and not self.signer.startswith("https://"):
            raise ValueError(f"pki.signer must be an https:// URL, got {self.signer!r}")
        return self


class SignerSettings(_Section):
    """The line's signing service (`factoryd signer run`, docs/signer.md); only that process reads it."""

    host: str = "127.0.0.1"
    port: int = Field(8443, ge=0, le=65535)
    # Its TLS server certificate and key (`factoryd signer issue-signer-cert`), both required to run.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # The line CA (`factoryd signer init-line-ca`): its directory; client certificates must chain to
    # its line-ca.pem and not be on its line-ca.crl. None: <state_dir>/signer/line-ca.
    line_ca_dir: Path | None = None
    # Refuse every lot that has no customer quota installed (factoryd signer quota install).
    require_quota: bool = False
    # Certificates ever signed for one device ID (the first plus re-issues after a job restart).
    max_per_device: int = Field(3, ge=1, le=100)
    # Concurrent connections beyond this get 503 (a line has tens of stations, not thousands).
    max_connections: int = Field(256, ge=1)


class MqttConfig(_Section):
    """Telemetry to an MQTT broker."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    # Credential name (systemd LoadCredential=) or env variable holding the password.
    password_credential: str = "factoryd-mqtt-password"  # noqa: S105
    password_env: str = "FACTORYD_MQTT_PASSWORD"  # noqa: S105
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    queue_size: int = Field(1000, ge=10)


class MetricsConfig(_Section):
    """Prometheus exposition."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9464


class ApiConfig(_Section):
    """The HTTP API and station page."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    # HTTPS: PEM certificate (chain) and key, both or neither; use it whenever host is not loopback.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Beyond these a client gets 429 (with Retry-After) or 503 at once, never a slow answer
    # (docs/api.md): per credential, per address, and open station-page event streams.
    client_rate_per_s: float = Field(5.0, gt=0)
    client_burst: int = Field(60, ge=1)
    address_rate_per_s: float = Field(10.0, gt=0)
    address_burst: int = Field(120, ge=1)
    max_event_streams: int = Field(8, ge=1, le=1024)

    @model_validator(mode="after")
    def _check_tls(self) -> ApiConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("api.tls_cert and api.tls_key go together: set both or neither")
        return self


class PageConfig(_Section):
    """The operator's station page (GET /station): how its slot grid mirrors the fixture."""

    # Grid size; 0 = automatic (as square as the port count allows). A grid too small for the
    # hub's ports grows by rows, so no port is ever hidden.
    rows: int = Field(0, ge=0, le=64)
    columns: int = Field(0, ge=0, le=64)
    # Hub port -> label printed on the fixture ("A1"); ports listed here come first, in this
    # order, then the hub's other ports in hub order.
    slots: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_slots(self) -> PageConfig:
        for port, label in self.slots.items():
            if not port or len(port) > 64 or not port.isprintable():
                raise ValueError(f"page.slots: port {port!r} is not a port name")
            if not 1 <= len(label) <= 16 or not label.isprintable():
                raise ValueError(f"page.slots.{port}: label {label!r} must be 1..16 printable characters")
        return self


class LabelsConfig(_Section):
    """Device labels (docs/labels.md): one ZPL printer per port, raw TCP, a durable queue."""

    enabled: bool = False
    # A TOML label template for every lot without its own (`factoryd labels template LOT FILE`);
    # None: the built-in one (device ID as DataMatrix; QR code and manual code for Matter lots).
    template: Path | None = None
    # Hub port -> printer "host" or "host:port" (raw port 9100 by default); ports may share one.
    printers: dict[str, str] = Field(default_factory=dict)
    connect_timeout_s: float = Field(3.0, gt=0)
    # How long a printer may take to answer ~HS (no answer = paper/ribbon out or head open).
    status_timeout_s: float = Field(2.0, gt=0)
    write_timeout_s: float = Field(10.0, gt=0)
    # Capped exponential backoff while a printer is offline or not ready (labels stay queued).
    retry_initial_s: float = Field(1.0, gt=0)
    retry_max_s: float = Field(30.0, gt=0)
    # How often the queue is read again for reprints queued by the CLI.
    poll_s: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _check_printers(self) -> LabelsConfig:
        from factoryd.labels.printer import PrinterAddress  # noqa: PLC0415 - config stays import-light

        for port, address in self.printers.items():
            if not port or len(port) > 64 or not port.isprintable():
                raise ValueError(f"labels.printers: port {port!r} is not a port name")
            PrinterAddress.parse(address)
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("labels.retry_max_s must be >= labels.retry_initial_s")
        return self


class LogConfig(_Section):
    """Logging."""

    level: str = "info"
    format: Literal["json", "console"] = "json"


class Settings(BaseSettings):
    """All of factoryd's settings."""

    model_config = SettingsConfigDict(
        env_prefix="FACTORYD_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    station: StationSettings = StationSettings()
    ledger: LedgerSettings = LedgerSettings()
    hub: HubSettings = HubSettings()
    jobs: JobSettings = JobSettings()
    pki: PkiSettings = PkiSettings()
    signer: SignerSettings = SignerSettings()
    mqtt: MqttConfig = MqttConfig()
    metrics: MetricsConfig = MetricsConfig()
    api: ApiConfig = ApiConfig()
    page: PageConfig = PageConfig()
    labels: LabelsConfig = LabelsConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="after")
    def _check_hub(self) -> Settings:
        if self.hub.backend == "sim-remote" and self.hub.sim.control_socket is None:
            raise ValueError("hub.backend = 'sim-remote' needs hub.sim.control_socket")
        if self.hub.backend == "uhubctl" and (not self.hub.uhubctl.location or not self.hub.uhubctl.ports):
            raise ValueError("hub.backend = 'uhubctl' needs hub.uhubctl.location and hub.uhubctl.ports")
        return self

    @property
    def ledger_url(self) -> str:
        """The ledger URL, defaulting to SQLite in the state directory."""
        return self.ledger.url or f"sqlite:///{self.station.state_dir / 'ledger.db'}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments beat environment beats the TOML file."""
        path = _CONFIG_PATH.get()
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if path is not None:
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=path),)
        return sources


def load_settings(path: Path | None = None, **overrides: object) -> Settings:
    """Load settings from a TOML file (optional) and the environment; ConfigError names each problem."""
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    token = _CONFIG_PATH.set(path)
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration{f' in {path}' if path else ''}: {problems}") from None
    except ValueError as exc:  # TOML syntax errors
        raise ConfigError(f"cannot read configuration {path}: {exc}") from None
    finally:
        _CONFIG_PATH.reset(token)
