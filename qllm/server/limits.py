"""Who may hold a connection to ``qllm serve``: the allow list and the connection caps."""

from __future__ import annotations

import collections
import time
from typing import Any, Protocol

from qllm import protocol as p
from qllm.logging import Throttled, get_logger
from qllm.server.config import ServerConfig
from qllm.server.listener import Credentials, allowed

log = get_logger()


class ConnectionLimits:
    """Admits connections under ``max_connections`` in all and ``max_connections_per_uid`` per
    peer uid (and the allow list); the first refusal at a cap is logged once, until the count is
    back under it."""

    def __init__(self, config: ServerConfig, errors: Throttled):
        self.config = config
        self.errors = errors
        self.refused = 0
        self._admitted: set[Any] = set()
        self._per_uid: collections.Counter[int | None] = collections.Counter()
        self._hit: set[tuple[str, int | None]] = set()

    def admit(self, conn: Any, creds: Credentials | None) -> p.Error | None:
        """Count ``conn`` in, or return the error that refuses it."""
        cfg = self.config
        uid = None if creds is None else creds.uid
        if (cfg.allow_uids or cfg.allow_gids) and (
            creds is None or not allowed(creds, cfg.allow_uids, cfg.allow_gids)
        ):
            self.refused += 1
            self.errors.warning("connection_refused", uid, uid=uid, gid=getattr(creds, "gid", None))
            return p.Error(code=p.FORBIDDEN, message="this user may not use the server")
        if len(self._admitted) >= cfg.max_connections:
            scope, limit = "server", cfg.max_connections
        elif self._per_uid[uid] >= cfg.max_connections_per_uid:
            scope, limit = "uid", cfg.max_connections_per_uid
        else:
            self._admitted.add(conn)
            self._per_uid[uid] += 1
            return None
        self.refused += 1
        key = (scope, None if scope == "server" else uid)
        if key not in self._hit:
            self._hit.add(key)
            log.warning("connection_limit_reached", scope=scope, limit=limit, uid=uid)
        where = "on this server" if scope == "server" else "for this user"
        return p.Error(
            code=p.TOO_MANY_CONNECTIONS, message=f"at most {limit} connections {where}; try again later"
        )

    def release(self, conn: Any, creds: Credentials | None) -> None:
        """``conn`` closed: it no longer counts against the caps."""
        if conn not in self._admitted:
            return
        self._admitted.discard(conn)
        uid = None if creds is None else creds.uid
        self._per_uid[uid] -= 1
        if self._per_uid[uid] <= 0:
            del self._per_uid[uid]
        if self._per_uid[uid] < self.config.max_connections_per_uid:
            self._hit.discard(("uid", uid))
        if len(self._admitted) < self.config.max_connections:
            self._hit.discard(("server", None))


class Peer(Protocol):
    """A TCP connection as :class:`TcpLimits` sees it."""

    def shed(self) -> None:
        """Close the connection (it was idle and its slot is needed)."""


def reserve(reserved: int, cap: int) -> int:
    """The slots of ``cap`` kept for LS: ``reserved``, at most half of ``cap``."""
    return min(reserved, cap // 2)


class TcpLimits:
    """Admits TCP connections under ``max_tcp_connections`` in all and
    ``max_tcp_connections_per_address`` per peer address (a TCP peer has no credentials).

    At a cap, the connection idle longest (no request in progress, for at least ``SHED_AFTER`` s:
    a burst of new clients does not close each other) is closed to make room, so idle connections
    never lock a new client out. Past ``cap - reserve`` of either cap (the reserve is
    ``ls_reserved_connections``, at most half the cap) a connection is admitted into the reserve:
    while the count stays past that mark it carries only LS requests (:meth:`ls_only`)."""

    SHED_AFTER = 1.0

    def __init__(self, config: ServerConfig):
        self.config = config
        self.refused = 0
        self.shed = 0
        self._address: dict[Peer, str] = {}
        self._reserved: set[Peer] = set()
        self._per_address: collections.Counter[str] = collections.Counter()
        self._idle: dict[Peer, float] = {}  # idle connections -> idle since, longest idle first
        self._hit: set[str | None] = set()

    def _soft(self, cap: int) -> int:
        return cap - reserve(self.config.ls_reserved_connections, cap)

    def _full(self, address: str, soft: bool) -> bool:
        cfg = self.config
        total, per = cfg.max_tcp_connections, cfg.max_tcp_connections_per_address
        if soft:
            total, per = self._soft(total), self._soft(per)
        return len(self._address) >= total or self._per_address[address] >= per

    def _shed_idle(self, address: str) -> bool:
        """Close the longest-idle connection that frees a slot for ``address``."""
        cfg = self.config
        any_peer = len(self._address) >= self._soft(cfg.max_tcp_connections)
        since = time.monotonic() - self.SHED_AFTER
        for conn, idle_since in self._idle.items():
            if idle_since > since:
                return False  # the rest became idle later still
            if any_peer or self._address[conn] == address:
                self.release(conn)
                self.shed += 1
                conn.shed()
                return True
        return False

    def admit(self, conn: Peer, address: str) -> p.Error | None:
        """Count ``conn`` (from ``address``) in, idle, or return the error that refuses it."""
        while self._full(address, soft=True) and self._shed_idle(address):
            pass
        if self._full(address, soft=False):
            self.refused += 1
            cfg = self.config
            per_address = len(self._address) < cfg.max_tcp_connections
            scope, limit = (
                ("address", cfg.max_tcp_connections_per_address)
                if per_address
                else ("tcp", cfg.max_tcp_connections)
            )
            key = address if per_address else None
            if key not in self._hit:
                self._hit.add(key)
                log.warning("connection_limit_reached", scope=scope, limit=limit, address=key)
            where = "from this address" if per_address else "over TCP"
            return p.Error(
                code=p.TOO_MANY_CONNECTIONS, message=f"at most {limit} connections {where}; try again later"
            )
        if self._full(address, soft=True):
            self._reserved.add(conn)
        self._address[conn] = address
        self._per_address[address] += 1
        self._idle[conn] = time.monotonic()
        return None

    def ls_only(self, conn: Peer) -> bool:
        """Whether ``conn`` was admitted into the LS reserve and the counts are still past its mark."""
        address = self._address.get(conn)
        if conn not in self._reserved or address is None:
            return False
        cfg = self.config
        over_total = len(self._address) > self._soft(cfg.max_tcp_connections)
        over_address = self._per_address[address] > self._soft(cfg.max_tcp_connections_per_address)
        return over_total or over_address

    def busy(self, conn: Peer) -> None:
        """``conn`` began a request: it is not idle."""
        self._idle.pop(conn, None)

    def idle(self, conn: Peer) -> None:
        """``conn`` has no request in progress (it goes last in the idle order)."""
        if conn in self._address:
            self._idle.pop(conn, None)
            self._idle[conn] = time.monotonic()

    def release(self, conn: Peer) -> None:
        """``conn`` closed: it no longer counts against the caps."""
        address = self._address.pop(conn, None)
        if address is None:
            return
        self._idle.pop(conn, None)
        self._reserved.discard(conn)
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]
        if not self._full(address, soft=False):
            self._hit.discard(address)
            self._hit.discard(None)

    def __len__(self) -> int:
        return len(self._address)
