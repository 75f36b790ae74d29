"""The small part of systemd's service protocol qllm speaks: sd_notify, socket activation, watchdog.

Everything here is a no-op outside systemd: :func:`notify` returns False without
``NOTIFY_SOCKET`` and never raises, :func:`listen_fds` returns nothing unless ``LISTEN_PID`` is
this process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

from qllm.logging import get_logger

log = get_logger()

SD_LISTEN_FDS_START = 3


def notify(state: str, env: MutableMapping[str, str] | None = None) -> bool:
    """Send ``state`` (``"READY=1"``, ``"STATUS=..."``, ...) to systemd; True if it was sent."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify_failed", state=state.split("=", 1)[0], error=str(exc))
        return False
    return True


def listen_fds(env: MutableMapping[str, str] | None = None, unset: bool = True) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (``LISTEN_FDS``/``LISTEN_PID``), in order.

    Returns an empty list when the variables are absent or name another process. With ``unset``
    the variables are removed so child processes do not inherit them.
    """
    env = os.environ if env is None else env
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets


def listen_fds_named(
    env: MutableMapping[str, str] | None = None, unset: bool = True
) -> list[tuple[str, socket.socket]]:
    """:func:`listen_fds` with each socket's ``FileDescriptorName=`` (``LISTEN_FDNAMES``; ``""``
    when systemd gave none)."""
    env = os.environ if env is None else env
    names = env.get("LISTEN_FDNAMES", "").split(":")
    sockets = listen_fds(env, unset)
    return [(names[i] if i < len(names) else "", sock) for i, sock in enumerate(sockets)]


def watchdog_interval(env: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec=``), or None when not enabled."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6
