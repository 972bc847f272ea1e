"""A live terminal view of the demo line (rich): one row per port, lot counts, throughput."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from factoryd.jobs.scheduler import Station
from factoryd.telemetry.figures import JobCounts
from factoryd.telemetry.live import LiveState

REFRESH_S = 0.25
STATE_STYLES = {
    "done": "bold green",
    "provisioning": "cyan",
    "powering": "yellow",
    "enumerating": "yellow",
    "attention": "bold red",
    "failed": "red",
    "empty": "dim",
    "idle": "dim",
    "disabled": "dim",
}


def render(live: LiveState, station: Station, total: int) -> Group:
    """One frame of the view."""
    table = Table(title="factoryd demo line", expand=False)
    for column in ("port", "state", "step", "device id", "attempt", "note"):
        table.add_column(column)
    for port, update in sorted(live.ports.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
        style = STATE_STYLES.get(update.state.value, "")
        table.add_row(
            port,
            Text(update.state.value, style=style),
            update.step or "",
            (update.device_id or "")[:13],
            str(update.attempt or ""),
            (update.reason or "")[:48],
        )
    # The same figures as the summary, `factoryd status` and /metrics (factoryd.telemetry.figures).
    jobs = JobCounts.from_outcomes(station.outcomes)
    now = datetime.now(UTC)
    rate = live.rate(now, station.started_at)
    footer = Text(
        f"{jobs.jobs}/{total} boards  ·  provisioned {jobs.provisioned}, failed {jobs.failed}  ·  "
        f"{rate.describe()}  ·  {now:%H:%M:%S} UTC"
    )
    return Group(table, footer)


async def show(live: LiveState, station: Station, total: int) -> None:
    """Refresh the view until the station stops, or until the terminal is gone."""
    try:
        with Live(render(live, station, total), refresh_per_second=1 / REFRESH_S, transient=False) as view:
            while not station.stopping:
                view.update(render(live, station, total))
                await asyncio.sleep(REFRESH_S)
            view.update(render(live, station, total))
    except OSError:
        # The terminal hung up (EIO): nothing to draw on. The run itself ends on the SIGHUP.
        return
