"""Who may hold a connection to ``qllm serve``: the allow list and the connection caps."""

from __future__ import annotations

import collections
from typing import Any

import structlog

from qllm import protocol as p
from qllm.logging import Throttled
from qllm.server.config import ServerConfig
from qllm.server.listener import Credentials, allowed

log = structlog.get_logger()


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
