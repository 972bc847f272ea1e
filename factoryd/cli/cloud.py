"""`factoryd cloud`: register a lot's CA and devices straight into a customer's cloud."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from factoryd.cli.opts import (
    ConfigOption,
    command_group,
    echo_json,
    fail,
    guard,
    open_ledger,
    state_dir_settings,
)

if TYPE_CHECKING:
    from factoryd.cloud.aws import DeviceOutcome, RegistrationSummary

T = TypeVar("T")

# Who the audit trail names for what these commands do.
ACTOR = "cli"

app = command_group("Register a lot's CA and devices in the customer's cloud.")
aws_app = command_group("AWS IoT Core: the lot's CA, a thing per device, its certificate and policy.")
app.add_typer(aws_app, name="aws")


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[DeviceOutcome], None] | None]:
    """A rich progress bar on stderr when it is a terminal; no output otherwise."""
    if not enabled:
        yield None
        return
    from rich.console import Console  # noqa: PLC0415 - keep `factoryd --help` fast
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn  # noqa: PLC0415

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("registering", total=total)
        yield lambda _outcome: bar.advance(task)


def _print_summary(summary: RegistrationSummary) -> None:
    ca = "registered now" if summary.ca_registered_now else "already registered"
    typer.echo(f"lot {summary.lot} in AWS IoT {summary.target}: CA {summary.ca_certificate_id} {ca}")
    typer.echo(
        f"devices: {summary.registered} registered now, {summary.already} already registered, "
        f"{summary.revoked} revoked, {len(summary.failed)} failed"
    )
    if summary.absent:
        typer.echo(
            f"  {summary.absent} certificates that do not stand are not in AWS IoT (nothing to revoke)"
        )
    for failure in summary.failed:
        typer.echo(f"  failed {failure.device_id}: {failure.reason}")
    rate = f", {summary.devices_per_s:.1f} devices/s" if summary.registered else ""
    typer.echo(f"{summary.elapsed_s:.1f} s, {summary.backoffs} throttling backoffs{rate}")


@aws_app.command("register")
def aws_register(
    lot: str,
    policy: Annotated[
        str | None, typer.Option(help="AWS IoT policy attached to every certificate (default: factoryd-LOT).")
    ] = None,
    create_policy: Annotated[
        bool,
        typer.Option("--create-policy", help="Create the policy with factoryd's default if it is missing."),
    ] = False,
    region: Annotated[
        str | None, typer.Option(help="AWS region (default: AWS_REGION or the profile's).")
    ] = None,
    endpoint_url: Annotated[
        str | None, typer.Option(help="AWS IoT control-plane endpoint (a VPC endpoint, or a test server).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Devices registered in parallel.", min=1, max=32)] = 4,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Register the lot's CA, then each provisioned device as a thing with its certificate and policy.

    Certificates the lot's CA issued that do not stand are marked REVOKED. Resumable: the ledger
    records each finished step, so a rerun does only what is missing. Exit code 1 when a device
    failed (the summary says why), 2 when the run could not go on.
    """
    from factoryd.cloud.aws import AwsRegistrar, aws_target, iot_clients  # noqa: PLC0415 - boto3 is optional
    from factoryd.cloud.exports import lot_ca_chain  # noqa: PLC0415
    from factoryd.service import StationPaths, ca_verification, station_passphrase  # noqa: PLC0415

    settings = state_dir_settings(config)
    paths = StationPaths(settings.station.state_dir)
    chain = guard(lambda: lot_ca_chain(paths.bundles, lot))
    iot, sts = guard(lambda: iot_clients(region=region, endpoint_url=endpoint_url))
    target = _aws(lambda: aws_target(sts, iot.meta.region_name))
    with open_ledger(config) as ledger:

        def prove_possession(code: str) -> str:
            # Only when the CA is not registered yet: the passphrase (or token PIN) is read then.
            return ca_verification(ledger, paths, station_passphrase(settings), lot, code, actor=ACTOR).pem

        count = len(guard(lambda: ledger.provisioned_devices(lot)))
        # Issued but not standing (failed after write, voided, superseded): REVOKED in AWS.
        revoked = guard(lambda: ledger.revoked_certificates(lot))
        with _progress(count + len(revoked), sys.stderr.isatty() and not json_output) as on_outcome:
            registrar = AwsRegistrar(
                ledger,
                lot,
                iot,
                target=target,
                chain=chain,
                prove_possession=prove_possession,
                policy=policy or f"factoryd-{lot}",
                create_policy=create_policy,
                workers=workers,
                actor=ACTOR,
                on_outcome=on_outcome,
            )
            summary = _aws(lambda: registrar.run(revoked))
    if json_output:
        echo_json(summary.as_dict())
    else:
        _print_summary(summary)
    if summary.failed:
        raise typer.Exit(1)


def _aws(fn: Callable[[], T]) -> T:
    """Run ``fn`` under `guard`; botocore's own errors (no credentials, endpoint down) become one line too."""
    from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415 - boto3 is optional

    try:
        return guard(fn)
    except (BotoCoreError, ClientError) as exc:
        fail(f"AWS IoT: {exc} (what was done is recorded; rerun to resume)")
