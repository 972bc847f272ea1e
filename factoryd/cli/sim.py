"""`factoryd sim`: a simulated board behind a PTY, or a simulated hub behind a control socket."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from factoryd.cli.opts import command_group, fail, read_input
from factoryd.log import configure_logging

app = command_group("The board simulator.")


@app.command("board")
def sim_board(
    fault_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Per-opportunity fault chance.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Fault seed.")] = 0,
    timing: Annotated[str, typer.Option(help="zero or realistic.")] = "zero",
    profile: Annotated[
        str, typer.Option(help="Board profile: factoryd-v1, arduino-v1, mcumgr or nrf91-at.")
    ] = "factoryd-v1",
) -> None:
    """Run one simulated board behind a PTY and print its tty path (Ctrl-C to stop)."""
    from factoryd.sim.board import FaultPlan, Timing  # noqa: PLC0415 - keep `factoryd --help` fast
    from factoryd.sim.profiles import SIM_BOARDS  # noqa: PLC0415
    from factoryd.sim.pty import serve_pty  # noqa: PLC0415

    board_type = SIM_BOARDS.get(profile)
    if board_type is None:
        fail(f"--profile must be one of {', '.join(SIM_BOARDS)}, not {profile!r}")

    async def serve() -> None:
        realistic = Timing.realistic()
        if profile == "nrf91-at":
            from factoryd.sim.nrf91 import nrf91_timing  # noqa: PLC0415

            realistic = nrf91_timing()
        board = board_type(
            faults=FaultPlan.uniform(fault_rate, seed=seed),
            timing=realistic if timing == "realistic" else Timing(),
        )
        async with serve_pty(board) as pty:
            typer.echo(pty.path)
            imei = getattr(board, "imei", None)
            who = f"IMEI {imei}" if imei else f"secure-element serial {board.serial_hex}"
            typer.echo(f"{who}; Ctrl-C to stop", err=True)
            sys.stdout.flush()
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


@app.command("hub")
def sim_hub(
    socket: Annotated[
        Path, typer.Option(help="Control socket path for the daemon (hub.sim.control_socket).")
    ],
    ports: Annotated[int, typer.Option(min=1, max=1024, help="Ports.")] = 8,
    boards: Annotated[
        int | None, typer.Option(help="Boards the simulated operator feeds in (default endless).")
    ] = None,
    fault_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Chance per fault kind per board.")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Fault seed.")] = 1,
    timing: Annotated[str, typer.Option(help="zero or realistic.")] = "zero",
    timing_scale: Annotated[float, typer.Option(min=0.0, help="Multiply every simulated delay.")] = 1.0,
    firmware_key: Annotated[Path | None, typer.Option(help="PEM public key the bootloaders trust.")] = None,
    profile: Annotated[
        str, typer.Option(help="Board profile: factoryd-v1, mcumgr or nrf91-at.")
    ] = "factoryd-v1",
) -> None:
    """Run a simulated hub with boards in this process, controlled over a Unix socket."""
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.hazmat.primitives.serialization import load_pem_public_key  # noqa: PLC0415

    from factoryd.backends import sim_board_factory  # noqa: PLC0415
    from factoryd.config import SimHubSettings  # noqa: PLC0415
    from factoryd.sim.hub import SimHub  # noqa: PLC0415
    from factoryd.sim.remote import SimHubServer  # noqa: PLC0415

    key = load_pem_public_key(read_input(firmware_key)) if firmware_key else None
    if key is not None and not isinstance(key, ec.EllipticCurvePublicKey):
        fail(f"{firmware_key}: the firmware-signing key must be an EC key")
    if timing not in ("zero", "realistic"):
        fail(f"--timing must be zero or realistic, not {timing!r}")
    # The same boards the daemon's own "sim" backend makes from these settings.
    make_board = sim_board_factory(
        SimHubSettings(
            ports=ports,
            fault_rate=fault_rate,
            fault_seed=seed,
            timing="realistic" if timing == "realistic" else "zero",
            timing_scale=timing_scale,
        ),
        firmware_key=key,
    )
    if profile == "mcumgr":
        from factoryd.sim.mcumgr import SimMcumgrBoard  # noqa: PLC0415

        native_board = make_board

        def make_board() -> SimMcumgrBoard:
            # The same seeds, faults and timing, on a Zephyr/MCUboot board speaking SMP.
            board = native_board()
            return SimMcumgrBoard(se=board.se, faults=board.faults, timing=board.timing, firmware_key=key)

    elif profile == "nrf91-at":
        from factoryd.sim.nrf91 import SimNrf91Modem, nrf91_timing  # noqa: PLC0415

        seeded_board = make_board
        modem_timing = nrf91_timing().scaled(timing_scale)

        def make_board() -> SimNrf91Modem:
            # The same seeds and faults, on an nRF91 modem answering AT commands.
            board = seeded_board()
            return SimNrf91Modem(
                se=board.se,
                faults=board.faults,
                timing=modem_timing if timing == "realistic" else board.timing,
            )

    elif profile != "factoryd-v1":
        fail(f"--profile must be factoryd-v1, mcumgr or nrf91-at, not {profile!r}")

    async def serve() -> None:
        async with SimHub(ports, make_board, supply=boards) as hub:
            ready = asyncio.Event()
            server = SimHubServer(hub, socket)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(server.serve(ready))
                await ready.wait()
                typer.echo(f"sim hub with {ports} ports listening on {socket}")
                sys.stdout.flush()

    configure_logging("warning", "console")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
