"""``qllm serve`` settings: TOML file, then command-line overrides, validated into msgspec Structs.

The file is ``--config FILE``, else ``/etc/qllm/qllm.toml`` when it exists, else none. Sections
mirror the Structs below::

    [engine]
    model = "tiny"
    policy = "cohort"

    [server]
    socket = "/run/qllm/qllm.sock"
    socket_mode = "0660"
    allow_uids = [1000]
    drain_timeout = 30

    [log]
    level = "info"

A bad key or value is one :class:`ConfigError` naming the file and the field.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from qllm.protocol import MAX_FRAME_BYTES

SYSTEM_CONFIG = Path("/etc/qllm/qllm.toml")
MAX_TIMEOUT = 86400.0  # one day: the bound on every server timeout
SOCKET_NAME = "qllm.sock"
HTTP_SOCKET_NAME = "qllm-http.sock"  # beside the native socket unless http_socket says otherwise


class ConfigError(ValueError):
    """Invalid settings; the message names the source and the offending field."""


class EngineConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Arguments of :class:`qllm.Engine` (docs/engine.md)."""

    model: str = "tiny"
    policy: str = "cohort"
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"
    memory_budget: Annotated[int, Meta(ge=0)] | None = None
    max_batch: Annotated[int, Meta(ge=1)] = 32
    prefill_chunk: Annotated[int, Meta(ge=1)] = 128
    # A MoE layer as one grouped op, stopped between experts when a request arrives ("layer"), or
    # one op per expert ("expert", the research system's granularity): docs/architecture.md.
    moe_granularity: Literal["layer", "expert"] = "layer"
    # Keys and values in blocks of this many tokens from a shared pool; None: growable buffers.
    kv_block_size: Annotated[int, Meta(ge=1)] | None = None
    threads: Annotated[int, Meta(ge=1)] | None = None  # torch intra-op threads; None: torch's default


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The socket, who may use it, limits, and shutdown."""

    socket: str | None = None  # None: see default_socket_path()
    socket_mode: int | str = 0o660  # an int (TOML 0o660) or an octal string ("0660")
    socket_owner: str | int | None = None  # user name or uid; None: the server's
    socket_group: str | int | None = None  # group name or gid; None: the server's
    allow_uids: list[Annotated[int, Meta(ge=0)]] = []  # with allow_gids: empty = no peer check
    allow_gids: list[Annotated[int, Meta(ge=0)]] = []
    drain_timeout: Annotated[float, Meta(ge=0)] = 30.0
    max_frame_bytes: Annotated[int, Meta(ge=1024, le=1 << 30)] = MAX_FRAME_BYTES
    max_prompt_tokens: Annotated[int, Meta(ge=1)] = 8192
    max_tokens: Annotated[int, Meta(ge=1)] = 4096
    max_requests_per_connection: Annotated[int, Meta(ge=1)] = 1024
    max_prompt_chars: Annotated[int, Meta(ge=1)] = 131072  # text prompts longer are refused untokenized
    # Timeouts are finite: a connection that never completes its hello or a frame is always closed.
    hello_timeout: Annotated[float, Meta(gt=0, le=MAX_TIMEOUT)] = 10.0
    idle_timeout: Annotated[float, Meta(gt=0, le=MAX_TIMEOUT)] = 300.0  # no request live, no frame
    frame_timeout: Annotated[float, Meta(gt=0, le=MAX_TIMEOUT)] = 30.0  # to finish a started frame
    max_outbox_bytes: Annotated[int, Meta(ge=1024)] = 1 << 20  # unread replies before reading pauses
    max_connections: Annotated[int, Meta(ge=1)] = 256
    max_connections_per_uid: Annotated[int, Meta(ge=1)] = 64
    # HTTP (OpenAI-compatible API, docs/http.md): a Unix socket with the same mode, owner and
    # allow list (None: qllm-http.sock beside the native socket; "": none), TCP only when given.
    http_socket: str | None = None
    http_listen: str | None = None  # HOST:PORT, or :PORT for loopback
    max_http_requests: Annotated[int, Meta(ge=1)] = 1024  # live HTTP requests before 429

    def __post_init__(self) -> None:
        # Normalise the mode once so that the rest of the server sees an int.
        mode = self.socket_mode
        if isinstance(mode, str):
            try:
                mode = int(mode, 8)
            except ValueError:
                raise msgspec.ValidationError(
                    f"server.socket_mode must be octal like '0660', got {self.socket_mode!r}"
                ) from None
        if not 0 <= mode <= 0o777:
            raise msgspec.ValidationError(f"server.socket_mode must be within 0o000..0o777, got {oct(mode)}")
        self.socket_mode = mode


class LogConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a TTY, JSON otherwise


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Settings from ``path`` (or ``/etc/qllm/qllm.toml`` when present), then ``overrides``.

    ``overrides`` is nested like the file (``{"server": {"socket": "/tmp/q.sock"}}``); a value of
    None leaves the file's value in place. Raises :class:`ConfigError` for a missing or malformed
    file and for any unknown key or bad value.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is None and SYSTEM_CONFIG.is_file():
        path = SYSTEM_CONFIG
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config {source}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {source} is not valid TOML: {exc}") from None
    pruned = {
        section: given
        for section, values in (overrides or {}).items()
        if (given := {k: v for k, v in values.items() if v is not None})
    }
    data = _merge(data, pruned)
    try:
        return msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        where = source if not pruned else f"{source} with command-line overrides"
        raise ConfigError(f"invalid setting in {where}: {exc}") from None


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
