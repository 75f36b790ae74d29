"""``qllm serve``: the engine behind a Unix socket, managed like a systemd service.

Start-up: load the model, open the socket (or take the one systemd passed), then ``READY=1``.
While serving, ``WATCHDOG=1`` is sent only while the kernel makes progress or has nothing to do,
so a hung compute trips systemd's watchdog and an idle server does not. On the first SIGTERM or
SIGINT: ``STOPPING=1``, stop accepting, let live requests finish for ``drain_timeout`` seconds,
cancel the rest (each still gets its final frame), close every connection and exit 0. A second
signal exits at once.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import qllm
from qllm import protocol as p
from qllm.logging import Throttled, get_logger
from qllm.server import systemd
from qllm.server.config import Config
from qllm.server.limits import ConnectionLimits
from qllm.server.listener import Credentials, Listener, open_listeners, peer_credentials
from qllm.server.native import Connection

if TYPE_CHECKING:
    from qllm.engine import Engine
    from qllm.server.http import HttpFront

log = get_logger()
SIGNALS = (signal.SIGTERM, signal.SIGINT)

FORCED_EXIT_CODE = 130
CLOSE_TIMEOUT = 10.0  # seconds, after the drain, for clients to read their last frames


class Server:
    """Accepts connections on a listener and serves them from one engine."""

    def __init__(
        self,
        engine: Engine,
        config: Config,
        *,
        notify: Callable[[str], bool] = systemd.notify,
        credentials: Callable[[socket.socket], Credentials] = peer_credentials,
    ):
        self.engine = engine
        self.config = config.server
        self.model_name = config.engine.model
        self.notify = notify
        self.credentials = credentials
        self.draining = False
        self.started = time.monotonic()
        self.address = ""
        self.http_addresses: list[str] = []
        self.http_front: HttpFront | None = None
        self.activated = False
        self._connections: dict[Connection, asyncio.Task] = {}
        self._conn_ids = itertools.count(1)
        self._accepted = 0
        self._tasks: asyncio.TaskGroup | None = None
        self.errors = Throttled(log)  # events a client can trigger at will
        self.limits = ConnectionLimits(self.config, self.errors)
        # One thread tokenizes text prompts (with its own tokenizer copy: a fast tokenizer must not
        # be used from two threads at once, and the kernel decodes on the event loop's thread).
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qllm-tokenize")
        self._tokenizer: Any = None

    # ------------------------------------------------------------------ replies
    def welcome(self) -> p.Welcome:
        return p.Welcome(
            server=f"qllm {qllm.__version__}",
            model=self.model_name,
            policy=self.engine.policy.name,
            max_frame_bytes=self.config.max_frame_bytes,
            max_prompt_tokens=self.config.max_prompt_tokens,
            max_tokens=self.config.max_tokens,
        )

    def health(self, rid: int) -> p.HealthReply:
        return p.HealthReply(
            id=rid,
            status="draining" if self.draining else "ok" if self.engine.healthy else "unhealthy",
            model=self.model_name,
            policy=self.engine.policy.name,
            live=sum(c.live for c in self._connections) + (self.http_front.live if self.http_front else 0),
            progress=self.engine.progress,
            uptime=time.monotonic() - self.started,
        )

    def stats(self) -> dict[str, Any]:
        stats = {
            "address": self.address,
            "http_addresses": self.http_addresses,
            "connections": len(self._connections),
            "connections_accepted": self._accepted,
            "connections_refused": self.limits.refused,
            "uptime_s": time.monotonic() - self.started,
            "draining": self.draining,
            "socket_activated": self.activated,
        }
        if self.http_front is not None:
            tcp = self.http_front.tcp
            stats.update(
                tcp_connections=len(tcp), tcp_connections_refused=tcp.refused, tcp_connections_shed=tcp.shed
            )
        return stats

    def stats_reply(self) -> dict[str, Any]:
        """What a ``stats`` request gets: the engine's statistics (``model`` as the server names it,
        ``family`` the architecture, as in process) and the server's own fields."""
        stats = self.engine.stats()
        stats["model"] = self.model_name  # the configured name, also for an engine passed in
        stats["server"] = self.stats()
        return stats

    async def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Token ids of a prompt (ValueError if it is empty, has no tokenizer or ids out of range).

        Text is tokenized on the tokenizer thread, never on the event loop."""
        from qllm.text import encode

        if not isinstance(prompt, str):
            return encode(self.engine.model, prompt, chat=chat)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, self._encode_text, prompt, chat)

    async def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a conversation through the chat template, on the tokenizer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, self._encode_messages, messages)

    def _own_tokenizer(self) -> Any:
        model = self.engine.model
        if self._tokenizer is None and model.tokenizer is not None:
            self._tokenizer = copy.deepcopy(model.tokenizer)
        return self._tokenizer

    def _encode_messages(self, messages: Sequence[dict[str, str]]) -> list[int]:
        from qllm.text import encode_chat

        return encode_chat(self.engine.model, messages, tokenizer=self._own_tokenizer())

    def _encode_text(self, prompt: str, chat: bool) -> list[int]:
        from qllm.text import encode

        return encode(self.engine.model, prompt, chat=chat, tokenizer=self._own_tokenizer())

    # ------------------------------------------------------------------ connection limits
    def admit(self, conn: Connection) -> p.Error | None:
        """Take a new connection on, or the error that refuses it (allow list, connection caps)."""
        return self.limits.admit(conn, conn.creds)

    def release(self, conn: Connection) -> None:
        """A connection closed: it no longer counts against the caps."""
        self.limits.release(conn, conn.creds)

    # ------------------------------------------------------------------ serving
    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tasks is None or self.draining:
            writer.close()
            return
        self._accepted += 1
        conn = Connection(self, reader, writer, f"c{next(self._conn_ids)}", self.credentials)
        task = self._tasks.create_task(conn.run(), name=conn.name)
        self._connections[conn] = task
        task.add_done_callback(lambda _: self._connections.pop(conn, None))

    async def serve(self, listener: Listener, stop: asyncio.Event, http: Sequence[Listener] = ()) -> None:
        """Serve until ``stop`` is set, then drain and close every connection. ``http``: the
        sockets of the HTTP front end (docs/http.md)."""
        from qllm.server.http import HttpFront

        self.address = listener.address
        self.activated = listener.activated
        self.http_addresses = [_http_address(h) for h in http]
        front = self.http_front = HttpFront(self) if http else None
        async with asyncio.TaskGroup() as tg:
            self._tasks = tg
            server = await asyncio.start_unix_server(self._accept, sock=listener.sock, limit=1 << 16)
            watchdog = None
            try:
                if front is not None:
                    await front.start([h.sock for h in http])
                if not stop.is_set():  # a signal during the model load: never announce READY
                    self._set_status(
                        f"serving {self.model_name} ({self.engine.policy.name}) on {self.address}"
                    )
                    self.notify("READY=1")
                    log.info(
                        "server_ready",
                        address=self.address,
                        model=self.model_name,
                        policy=self.engine.policy.name,
                        http=self.http_addresses,
                    )
                    interval = systemd.watchdog_interval()
                    watchdog = tg.create_task(self.watchdog(interval)) if interval else None
                    await stop.wait()

                self.notify("STOPPING=1")
                self.draining = True
                server.close()
                if front is not None:
                    front.stop_accepting()
                live = sum(c.live for c in self._connections) + (front.live if front else 0)
                timeout = self.config.drain_timeout
                self._set_status(f"draining {live} requests (up to {timeout:g} s)")
                log.info("server_draining", live=live, timeout_s=timeout)
                await self.engine.drain(timeout)
                await self._close_connections()
                if front is not None:
                    await front.close()
                if watchdog is not None:
                    watchdog.cancel()
            finally:
                self.draining = True
                server.close()
                self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        log.info("server_stopped")

    async def _close_connections(self) -> None:
        """Close every connection once its last final frame is written; a client that does not
        read them within ``CLOSE_TIMEOUT`` s is cut off."""
        for conn in list(self._connections):
            conn.shutdown()
        tasks = list(self._connections.values())
        if not tasks:
            return
        _, stuck = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
        for task in stuck:
            log.warning("connection_cut_off", conn=task.get_name(), timeout_s=CLOSE_TIMEOUT)
            task.cancel()

    def _set_status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    async def watchdog(self, interval: float) -> None:
        """Ping systemd's watchdog every ``interval`` s while the kernel progresses or is idle."""
        heartbeat = Heartbeat(self.engine)
        stalled = False
        while True:
            await asyncio.sleep(interval)
            if heartbeat.alive():
                self.notify("WATCHDOG=1")
                if stalled:
                    log.info("watchdog_recovered", progress=heartbeat.last)
                stalled = False
            elif not stalled:
                stalled = True
                log.warning("watchdog_stalled", progress=heartbeat.last, interval_s=interval)


def _http_address(listener: Listener) -> str:
    name = listener.sock.getsockname()
    if isinstance(name, tuple):
        host = f"[{name[0]}]" if ":" in name[0] else name[0]
        return f"http://{host}:{name[1]}"
    return f"unix:{listener.address}"


class Heartbeat:
    """Whether the kernel is healthy at each watchdog tick: it completed an op since the previous
    tick, or it has nothing to do. A compute that hangs with requests live is neither, and an
    engine whose expert-parallel ranks failed is never healthy."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.last = engine.progress

    def alive(self) -> bool:
        progress = self.engine.progress
        advanced, self.last = progress != self.last, progress
        return self.engine.healthy and (advanced or not self.engine.busy)


def _forced_exit(signum: int, cleanup: Callable[[], None]) -> None:
    """A second signal: remove the socket file, exit at once with ``FORCED_EXIT_CODE``."""
    log.warning("forced_exit", signal=signal.Signals(signum).name, exit_code=FORCED_EXIT_CODE)
    try:
        cleanup()
    finally:
        sys.stderr.flush()
        os._exit(FORCED_EXIT_CODE)


def _install_signals(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, cleanup: Callable[[], None]
) -> None:
    def on_signal(signum: int) -> None:
        if stop.is_set():
            _forced_exit(signum, cleanup)
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        stop.set()

    for signum in SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)


def _load_engine(config: Config, notify: Callable[[str], bool], stop: asyncio.Event) -> Engine:
    """Build the engine with SIGTERM and SIGINT held back: one that arrives meanwhile stops the
    server right after the load, without announcing READY (the event loop cannot run handlers
    while the load blocks it). The caller unblocks them once the loop's handlers are installed."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    engine = _build_engine(config, notify)
    while (info := signal.sigtimedwait(SIGNALS, 0)) is not None:  # consume what came meanwhile
        log.info("shutdown_requested", signal=signal.Signals(info.si_signo).name, during="model_load")
        stop.set()
    return engine


def _raise_file_limit(connections: int) -> None:
    """Make room for ``connections`` open sockets (plus the server's own files) under RLIMIT_NOFILE."""
    needed = connections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < needed:
        log.warning("file_limit_low", limit=target, max_connections=connections)


async def serve(
    config: Config, *, notify: Callable[[str], bool] = systemd.notify, engine: Engine | None = None
) -> int:
    """Run the server until SIGTERM/SIGINT; returns the process exit code.

    ``engine`` replaces the one built from ``config.engine`` (tests pass a prepared one).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    listeners = open_listeners(config.server)  # first, so a taken socket fails before the model loads
    tcp = config.server.max_tcp_connections if config.server.http_listen else 0
    _raise_file_limit(config.server.max_connections + tcp)
    try:
        if engine is None:
            engine = _load_engine(config, notify, stop)
        _install_signals(loop, stop, listeners.close)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        async with engine:
            await Server(engine, config, notify=notify).serve(listeners.native, stop, listeners.http)
    finally:
        listeners.close()
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)
    notify("STATUS=stopped")
    return 0


def _build_engine(config: Config, notify: Callable[[str], bool]) -> Engine:
    e = config.engine
    notify(f"STATUS=loading model {e.model}")
    log.info("model_loading", model=e.model, policy=e.policy, dtype=e.dtype, device=e.device or "cpu")
    return qllm.Engine(config=e)


def run(config: Config) -> int:
    """Entry point of ``qllm serve``: uvloop when available, else the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))
