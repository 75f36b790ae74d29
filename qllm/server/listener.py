"""The server's listening socket (bound here or passed by systemd) and who may connect to it."""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import socket
import stat
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from qllm.paths import HTTP_SOCKET_NAME, default_socket_path, socket_dir_problem, socket_path_problem
from qllm.server import systemd
from qllm.server.config import ServerConfig

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Credentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Credentials:
    """The connecting process's pid/uid/gid, as the kernel saw them at connect (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return Credentials(*_UCRED.unpack(raw))


def allowed(creds: Credentials, uids: Collection[int], gids: Collection[int]) -> bool:
    """Whether a peer may talk to the server: anyone when both lists are empty, else a listed uid
    or primary gid."""
    if not uids and not gids:
        return True
    return creds.uid in uids or creds.gid in gids


@dataclass
class Listener:
    sock: socket.socket
    path: Path | None  # the socket file we created (and remove at exit); None when inherited
    activated: bool  # passed by systemd socket activation
    inode: int | None = None  # of the socket file we bound, to never remove another server's
    lock: int | None = None  # fd holding the path's lock file while we serve

    @property
    def address(self) -> str:
        name = self.sock.getsockname()
        return name if isinstance(name, str) and name else str(self.path or "?")

    def close(self) -> None:
        """Close the socket and remove its file if we created it and it is still ours."""
        self.sock.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                if self.path.lstat().st_ino == self.inode:
                    self.path.unlink()
        if self.lock is not None:
            os.close(self.lock)  # the lock file stays: removing it would race with a new server
            self.lock = None


def _uid(owner: str | int) -> int:
    if isinstance(owner, int):
        return owner
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise ValueError(f"server.socket_owner: no user named {owner!r}") from None


def _gid(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"server.socket_group: no group named {group!r}") from None


def _lock(path: Path) -> int:
    """Hold ``PATH.lock`` while serving on ``PATH``, so that two servers starting at once cannot
    remove each other's socket file; ValueError if another server holds it."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ValueError(f"cannot open the lock file {lock_path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"another server is already serving (or starting) on {path}") from None
    return fd


def _remove_stale(path: Path) -> None:
    """Remove a socket file left by a server that is gone; refuse if one still answers."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"{path} exists and is not a socket; remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listening: a leftover of a crashed server
    else:
        raise ValueError(f"another server is already listening on {path}")
    finally:
        probe.close()


def _own_directory(directory: Path) -> None:
    """Create a default socket directory (0700; 0755 for root's /run/qllm, so that the socket's
    own mode and group decide who connects), or check that an existing one is safely ours."""
    uid = os.getuid()
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o755 if uid == 0 else 0o700)
    problem = socket_dir_problem(directory, uid)
    if problem is not None:
        raise ValueError(problem)


HTTP_FD_NAME = "http"
TCP_BACKLOG = 512  # connections the kernel queues before the server accepts them  # FileDescriptorName= of the HTTP socket under socket activation


@dataclass
class Listeners:
    """Every socket ``qllm serve`` listens on: the native one and the HTTP ones (Unix, TCP)."""

    native: Listener
    http: list[Listener]

    def close(self) -> None:
        for listener in (self.native, *self.http):
            listener.close()


def open_listener(config: ServerConfig, env: dict[str, str] | None = None) -> Listener:
    """The native socket: the first one systemd passed, else ``config.socket`` (or the default
    path) bound with ``config.socket_mode`` and the configured owner and group."""
    return open_listeners(config, env, http=False).native


def open_listeners(
    config: ServerConfig, env: dict[str, str] | None = None, *, http: bool = True
) -> Listeners:
    """The native socket and, with ``http``, the HTTP ones: under socket activation the socket
    named ``http`` (FileDescriptorName=http) is the HTTP one and the first other is the native
    one; otherwise both Unix sockets are bound here (``http_socket``, by default ``qllm-http.sock``
    beside the native one, unless ``http_socket = ""``), and TCP only with ``http_listen``."""
    for given in (config.socket, config.http_socket if http else None):
        if given and (problem := socket_path_problem(given)) is not None:
            raise ValueError(problem)  # before any directory is made
    inherited = systemd.listen_fds_named(env)
    native_sock = next((sock for name, sock in inherited if name != HTTP_FD_NAME), None)
    http_sock = next((sock for name, sock in inherited if name == HTTP_FD_NAME), None)
    for _, extra in inherited:
        if extra is not native_sock and (extra is not http_sock or not http):
            extra.close()
    if inherited and native_sock is None:
        raise ValueError("systemd passed only an HTTP socket; the native one needs its own ListenStream=")
    opened: list[Listener] = []
    try:
        if native_sock is not None:
            native = _activated(native_sock)
        else:
            native = _bind_unix(_native_path(config, env), config)
        opened.append(native)
        if http:
            if http_sock is not None:
                opened.append(_activated(http_sock))
            elif config.http_socket:
                opened.append(_bind_unix(Path(config.http_socket), config, make_parent=True))
            elif config.http_socket is None and native.path is not None:
                opened.append(_bind_unix(native.path.with_name(HTTP_SOCKET_NAME), config))
            if config.http_listen:
                opened.append(_bind_tcp(config.http_listen))
    except BaseException:
        for listener in opened:
            listener.close()
        raise
    return Listeners(opened[0], opened[1:])


def _activated(sock: socket.socket) -> Listener:
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.close()
        raise ValueError("a socket passed by systemd must be a Unix stream socket (ListenStream=PATH)")
    sock.setblocking(False)
    return Listener(sock, None, activated=True)


def _native_path(config: ServerConfig, env: dict[str, str] | None) -> Path:
    if config.socket:
        path = Path(config.socket)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        return path
    path = default_socket_path(env)
    _own_directory(path.parent)
    return path


def parse_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` (loopback when no host)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "", value
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"http_listen must be HOST:PORT, got {value!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"http_listen: port {number} is out of range")
    return host, number


def _bind_tcp(value: str) -> Listener:
    host, port = parse_host_port(value)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=TCP_BACKLOG)
    except OSError as exc:
        raise ValueError(f"cannot listen on {value}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return Listener(sock, None, activated=False)


def _bind_unix(path: Path, config: ServerConfig, make_parent: bool = False) -> Listener:
    if (problem := socket_path_problem(path)) is not None:
        raise ValueError(problem)
    if make_parent:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    lock = _lock(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    inode = None
    try:
        _remove_stale(path)
        # Bind under a tight umask so the socket is never reachable with looser permissions.
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        inode = path.lstat().st_ino
        if config.socket_owner is not None or config.socket_group is not None:
            uid = -1 if config.socket_owner is None else _uid(config.socket_owner)
            gid = -1 if config.socket_group is None else _gid(config.socket_group)
            os.chown(path, uid, gid)
        os.chmod(path, config.socket_mode)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            if inode is not None and path.lstat().st_ino == inode:  # only a file we bound
                path.unlink()
        os.close(lock)
        raise
    return Listener(sock, path, activated=False, inode=inode, lock=lock)
