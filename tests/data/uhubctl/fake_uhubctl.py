"""A stand-in for uhubctl: prints recorded or synthesised output, records its argv, can fail or hang.

The tests copy it into a temporary directory (with a shebang for this interpreter) and write
``fake.json`` next to it:

- ``stdout_files``: {"on"|"off"|"status": path} — print this recorded output instead of synthesising;
- ``stderr``, ``exit``: what to print on stderr and the exit status;
- ``sleep_s``: how long each call takes; ``hang``: never answer;
- ``hubs``: {location: description} the synthesised output knows (default: one 4-port hub 1-1.4);
- ``stuck_on``: ports whose power does not go off (the "power not really cut" hub).

Each call appends JSON lines to ``calls.jsonl``: argv, pid, start and end (CLOCK_MONOTONIC, shared
by all processes on Linux). Port states persist in ``state.json``.
"""

import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_HUBS = {"1-1.4": "2109:2822 VIA Labs, Inc. USB2.0 Hub, USB 2.10, 4 ports, ppps"}
BOARD = "2341:8057 Arduino LLC Arduino NANO 33 IoT 5C7C2F8B50533151"


def opt(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def record(entry: dict[str, object]) -> None:
    with (HERE / "calls.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")


def port_line(n: int, on: bool) -> str:
    return f"  Port {n}: 0503 power highspeed enable connect [{BOARD}]" if on else f"  Port {n}: 0000 off"


def main() -> int:
    cfg = json.loads((HERE / "fake.json").read_text())
    args = sys.argv[1:]
    record({"event": "start", "argv": args, "pid": os.getpid(), "t": time.monotonic()})
    time.sleep(float(cfg.get("sleep_s", 0)))
    if cfg.get("hang"):
        time.sleep(3600)
    action = {"0": "off", "1": "on"}.get(opt(args, "-a") or "", opt(args, "-a") or "status")
    sys.stderr.write(cfg.get("stderr", ""))
    recorded = cfg.get("stdout_files", {}).get(action)
    if recorded:
        sys.stdout.write(Path(recorded).read_text())
    elif "exit" not in cfg:
        hubs = cfg.get("hubs", DEFAULT_HUBS)
        location = opt(args, "-l")
        if location not in hubs:
            sys.stderr.write(
                f"No compatible devices detected at location {location}!\nRun with -h to get usage info.\n"
            )
            return 1
        desc = hubs[location]
        state_file = HERE / "state.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        ports_on = state.setdefault(location, {str(n): True for n in range(1, 5)})
        # Like uhubctl: ports the hub does not have are silently left out.
        ports = [int(p) for p in (opt(args, "-p") or "1,2,3,4").split(",") if p and int(p) <= 4]
        print(f"Current status for hub {location} [{desc}]")
        for n in ports:
            print(port_line(n, ports_on[str(n)]))
        if action in ("on", "off"):
            for n in ports:
                ports_on[str(n)] = action == "on" or n in cfg.get("stuck_on", [])
            state_file.write_text(json.dumps(state))
            print(f"Sent power {action} request")
            print(f"New status for hub {location} [{desc}]")
            for n in ports:
                print(port_line(n, ports_on[str(n)]))
    record({"event": "end", "argv": args, "pid": os.getpid(), "t": time.monotonic()})
    return int(cfg.get("exit", 0))


if __name__ == "__main__":
    sys.exit(main())
