"""Process limits a station needs: open descriptors for every port's tty.

A station holds one descriptor per open tty plus a few per port for the hub backend, and a fixed
base (ledger connections, sockets, the event loop's own). Linux's usual soft limit is 1024, which
a 1,024-port hub exceeds; the hard limit (systemd's default: 524 288) is far above. So the daemon
raises its soft limit to what it needs, at most the hard limit, before opening anything. Under the
unit's system-call filter ``setrlimit`` is refused, which is why ``systemd/factoryd.service``
sets ``LimitNOFILE=`` itself; the check then only confirms it.
"""

from __future__ import annotations

import resource

import structlog

log = structlog.get_logger(__name__)

# Descriptors per port: the tty, and a margin for the hub backend (sysfs attribute files, udev).
FDS_PER_PORT = 3
# Ledger pool, API and metrics sockets, MQTT, the loop's self-pipe and epoll, log files.
FDS_BASE = 256


def fds_needed(ports: int) -> int:
    """Open descriptors a station with ``ports`` ports may hold at once."""
    return FDS_BASE + FDS_PER_PORT * ports


def raise_open_files_limit(ports: int) -> int:
    """Raise the soft RLIMIT_NOFILE to what ``ports`` need (at most the hard limit); the soft limit now.

    Never lowers it. Where the limit cannot be raised (a system-call filter, a low hard limit),
    logs a warning naming the fix and returns the limit as it is: ports beyond it fail to open
    with a clear LinkOpenError instead of the daemon refusing to start.
    """
    needed = fds_needed(ports)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning(
            "open-files limit too low for the hub",
            soft=soft,
            hard=hard,
            needed=needed,
            ports=ports,
            error=str(exc),
            fix="set LimitNOFILE= in the unit (systemd/factoryd.service) or ulimit -n",
        )
        return soft
    if target < needed:
        log.warning("open-files hard limit too low for the hub", hard=hard, needed=needed, ports=ports)
    return target
