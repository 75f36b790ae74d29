"""A peer server run as a child process for the bench: started in its own process group, waited
for until it answers over HTTP, and always stopped (SIGTERM, then SIGKILL to what is left of the
group), by :meth:`PeerProcess.stop` or, if the bench never gets there, by a finalizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qllm.errors import QllmError

if TYPE_CHECKING:
    import httpx

STOP_GRACE_S = 30.0
"""How long a peer may take to shut down after SIGTERM before its process group is killed."""
GROUP_GRACE_S = 5.0
"""How long the rest of the group (engine and worker processes) may outlive its leader."""
READY_POLL_S = 1.0
LOG_TAIL_LINES = 25
QUIET_SHARE = 0.05
"""A peer is quiet when its processes use at most this share of one CPU (:meth:`PeerProcess.quiesce`)."""
QUIET_WINDOW_S = 0.2
QUIET_LIMIT_S = 10.0


class PeerUnavailable(QllmError, ValueError):
    """The peer's interpreter is missing or lacks the peer's package (the message says what to do)."""

    code = "peer_unavailable"


class PeerFailed(QllmError, RuntimeError):
    """The peer server did not start, refused a request or died (the message carries its log tail)."""

    code = "peer_failed"


class PeerProcess:
    """A running server process; its output goes to ``log``; ``workdir`` is removed when it stops."""

    def __init__(self, popen: subprocess.Popen, log: Path, workdir: Path | None, grace: float = STOP_GRACE_S):
        self.popen = popen
        self.log = log
        self.workdir = workdir
        self._stop = weakref.finalize(self, _terminate, popen, workdir, grace)

    @classmethod
    def start(
        cls,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        log: Path,
        workdir: Path | None = None,
        grace: float = STOP_GRACE_S,
    ) -> PeerProcess:
        """Run ``argv`` in a new session (``env`` None: this process's environment); ``grace``:
        how long :meth:`stop` waits after SIGTERM."""
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: its children are stopped with it
            )
        return cls(popen, log, workdir, grace)

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    async def wait_ready(self, client: httpx.AsyncClient, path: str, timeout: float) -> None:
        """Return once ``GET path`` answers 200; raise :class:`PeerFailed` if the process exits first
        or ``timeout`` s pass."""
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if (status := self.popen.poll()) is not None:
                raise PeerFailed(
                    f"the peer server exited with status {status} before it was ready{self.log_tail()}"
                )
            try:
                if (await client.get(path, timeout=10.0)).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise PeerFailed(f"the peer server was not ready after {timeout:.0f} s{self.log_tail()}")
            # Nothing to wait on but its port: the server opens it once its model is loaded.
            await asyncio.sleep(READY_POLL_S)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server's output, as a block to append to a message."""
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"\n--- last lines of {self.log} ---\n" + "\n".join(text)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    async def quiesce(self, limit: float = QUIET_LIMIT_S) -> float:
        """Wait until the server's processes are quiet: at most :data:`QUIET_SHARE` of one CPU over
        :data:`QUIET_WINDOW_S`, or ``limit`` s at most; returns the seconds waited.

        A server may keep its threads spinning for a while after its last request (vLLM's workers
        poll their queue for a second); the next system measured on a shared machine would pay
        for it. Where ``/proc`` is missing nothing is measured and it returns at once."""
        start = time.monotonic()
        group = self.popen.pid  # start_new_session: the leader's pid is the group id
        used = group_cpu_s(group)
        while used is not None and time.monotonic() - start < limit:
            await asyncio.sleep(QUIET_WINDOW_S)
            now = group_cpu_s(group)
            if now is None or now - used <= QUIET_SHARE * QUIET_WINDOW_S:
                break
            used = now
        return time.monotonic() - start

    async def stop(self) -> None:
        """SIGTERM, then after the grace period SIGKILL to its group; idempotent."""
        await asyncio.to_thread(self._stop)


def _terminate(popen: subprocess.Popen, workdir: Path | None, grace: float) -> None:
    try:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)  # the server stops its own engine processes
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(grace)
        group = popen.pid  # start_new_session: the leader's pid is the group id
        deadline = time.monotonic() + GROUP_GRACE_S
        while _group_alive(group) and popen.poll() is not None and time.monotonic() < deadline:
            time.sleep(0.1)  # a stopped leader's children finish their own shutdown
        with contextlib.suppress(ProcessLookupError, PermissionError):  # raised when the group is gone
            os.killpg(group, signal.SIGKILL)
        popen.wait()
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


async def quiet_peers(systems: Sequence[object]) -> None:
    """Let each peer server among ``systems`` (those with a ``quiesce`` method) go quiet before
    the next measurement: a server that keeps its threads spinning after its last request (vLLM)
    would slow whichever system runs next."""
    for system in systems:
        quiesce = getattr(system, "quiesce", None)
        if quiesce is not None:
            await quiesce()


def group_cpu_s(group: int) -> float | None:
    """CPU seconds (user and system) used so far by the live processes of process group ``group``
    (None without ``/proc``)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    ticks = os.sysconf("SC_CLK_TCK")  # /proc counts in clock ticks
    total = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Fields after the command name (which may hold spaces and parentheses): state, ppid,
            # pgrp, ..., utime and stime are the 3rd and the 12th and 13th.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[2]) == group:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
