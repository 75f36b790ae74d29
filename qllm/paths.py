"""Where the server's sockets live by default: shared by the server (which listens there) and
the client (which looks there), so neither imports the other."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

SOCKET_NAME = "qllm.sock"
HTTP_SOCKET_NAME = "qllm-http.sock"  # beside the native socket unless http_socket says otherwise


def cache_dir() -> Path:
    """qllm's cache directory: ``$XDG_CACHE_HOME/qllm`` (an absolute path, as the XDG spec wants;
    a relative one is ignored), else ``~/.cache/qllm``."""
    root = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(root) if os.path.isabs(root) else Path.home() / ".cache") / "qllm"


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (for a child server or a
    rendezvous this process starts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_socket_path(env: dict[str, str] | None = None, uid: int | None = None) -> Path:
    """Where ``qllm serve`` listens unless told otherwise.

    Under systemd: ``$RUNTIME_DIRECTORY/qllm.sock`` (``RuntimeDirectory=qllm``), else
    ``/run/qllm/qllm.sock``; otherwise ``$XDG_RUNTIME_DIR/qllm.sock``; without that,
    ``/run/qllm/qllm.sock`` for root and ``/tmp/qllm-$UID/qllm.sock`` for anyone else.
    """
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    if env.get("RUNTIME_DIRECTORY"):
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / SOCKET_NAME
    if env.get("INVOCATION_ID"):  # started by systemd
        return Path("/run/qllm") / SOCKET_NAME
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / SOCKET_NAME
    return Path("/run/qllm") / SOCKET_NAME if uid == 0 else fallback_socket_dir(uid) / SOCKET_NAME


def fallback_socket_dir(uid: int) -> Path:
    """The directory of last resort for a non-root user's socket: in /tmp, where anyone may create
    it first, so servers and clients check who owns it (:func:`socket_dir_problem`)."""
    return Path(f"/tmp/qllm-{uid}")


def socket_dir_problem(directory: Path, uid: int) -> str | None:
    """Why a default socket directory is unsafe for ``uid`` (None if it is safe): it must be a real
    directory owned by ``uid`` and writable by nobody else, or another local user could replace
    the socket and read what clients send."""
    try:
        st = directory.lstat()
    except OSError as exc:
        return f"cannot use {directory}: {exc.strerror or exc}"
    hint = "remove it, or choose a path with --socket (or set XDG_RUNTIME_DIR)"
    if not stat.S_ISDIR(st.st_mode):
        return f"refusing {directory} for the socket: it is not a directory (a symlink?); {hint}"
    if st.st_uid != uid:
        return (
            f"refusing {directory} for the socket: it belongs to uid {st.st_uid}, not to uid {uid} "
            f"(another user may have created it to intercept clients); {hint}"
        )
    if st.st_mode & 0o022:
        mode = oct(stat.S_IMODE(st.st_mode))
        return f"refusing {directory} for the socket: others may write to it (mode {mode}); {hint}"
    return None


def client_socket_path(env: dict[str, str] | None = None, uid: int | None = None) -> Path:
    """The socket a client connects to by default: ``$QLLM_SOCKET``, else the first existing of
    ``$XDG_RUNTIME_DIR/qllm.sock``, ``/run/qllm/qllm.sock``, else the server's default."""
    env = os.environ if env is None else env
    if env.get("QLLM_SOCKET"):
        return Path(env["QLLM_SOCKET"])
    candidates = []
    if env.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(env["XDG_RUNTIME_DIR"]) / SOCKET_NAME)
    candidates.append(Path("/run/qllm") / SOCKET_NAME)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    server_env = {k: v for k, v in env.items() if k not in ("RUNTIME_DIRECTORY", "INVOCATION_ID")}
    return default_socket_path(server_env, uid)


# sun_path holds 108 bytes on Linux, the last one the terminating NUL (104 on macOS and BSDs).
MAX_SOCKET_PATH_BYTES = 107


def socket_path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot name a Unix socket (too long for ``sun_path``), or None."""
    size = len(os.fsencode(path))
    if size <= MAX_SOCKET_PATH_BYTES:
        return None
    return (
        f"socket path {os.fspath(path)!r} is {size} bytes long; a Unix socket path is at most "
        f"{MAX_SOCKET_PATH_BYTES} bytes on Linux: choose a shorter path (or a shorter directory)"
    )
