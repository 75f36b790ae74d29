"""``qllm serve``: the engine behind a native (msgpack) socket and an OpenAI-compatible HTTP API.

- :mod:`qllm.server.app`: the server, its lifecycle (ready, watchdog, drain) and ``serve()``
- :mod:`qllm.server.native`, :mod:`~qllm.server.relay`, :mod:`~qllm.server.outbox`: the native
  front end (docs/protocol.md)
- :mod:`qllm.server.http`, :mod:`~qllm.server.openai_api`: the HTTP front end (docs/http.md)
- :mod:`qllm.server.listener`, :mod:`~qllm.server.limits`: sockets and who may use them
- :mod:`qllm.server.config`, :mod:`~qllm.server.systemd`: settings and systemd glue

Importing the package loads nothing else.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Server", "run", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from qllm.server import app

        return getattr(app, name)
    raise AttributeError(f"module 'qllm.server' has no attribute {name!r}")
