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

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from qllm.kernel.config import EngineConfig
from qllm.protocol import MAX_FRAME_BYTES

SYSTEM_CONFIG = Path("/etc/qllm/qllm.toml")
MAX_TIMEOUT = 86400.0  # one day: the bound on every server timeout
MAX_HTTP_TIMEOUT = 3600.0  # the bound on the HTTP timeouts: an hour
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class ConfigError(ValueError):
    """Invalid settings; the message names the source and the offending field."""


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The socket, who may use it, limits, and shutdown."""

    socket: str | None = None  # None: see qllm.paths.default_socket_path()
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
    max_http_requests: Annotated[int, Meta(ge=1, le=1 << 20)] = 1024  # live HTTP requests before 429
    # The last ls_reserved_requests of max_http_requests take only LS requests (at most half of it).
    ls_reserved_requests: Annotated[int, Meta(ge=0, le=1 << 20)] = 64
    # TCP peers have no credentials: they are counted by address, apart from the Unix-socket caps.
    # The last ls_reserved_connections slots of each cap carry only LS requests (at most half of
    # it), and at a cap the connection idle longest is closed to make room.
    max_tcp_connections: Annotated[int, Meta(ge=1, le=65536)] = 512
    max_tcp_connections_per_address: Annotated[int, Meta(ge=1, le=65536)] = 256
    ls_reserved_connections: Annotated[int, Meta(ge=0, le=65536)] = 16
    # Every HTTP connection (TCP or Unix): the time to send a request's headers, then its body, and
    # how long a connection may wait with no request before it is closed.
    http_header_timeout: Annotated[float, Meta(gt=0, le=MAX_HTTP_TIMEOUT)] = 10.0
    http_body_timeout: Annotated[float, Meta(gt=0, le=MAX_HTTP_TIMEOUT)] = 30.0
    http_idle_timeout: Annotated[float, Meta(gt=0, le=MAX_HTTP_TIMEOUT)] = 15.0
    max_http_url_bytes: Annotated[int, Meta(ge=256, le=1 << 16)] = 8192  # request target, then 414
    max_http_header_bytes: Annotated[int, Meta(ge=1024, le=1 << 20)] = 16384  # all headers, then 431
    max_http_headers: Annotated[int, Meta(ge=8, le=1024)] = 64  # header lines, then 431
    # On TCP the Host header must name one of these (or http_listen's host; "*": any host), so
    # that a web page cannot reach the port through DNS rebinding.
    http_allowed_hosts: list[Annotated[str, Meta(min_length=1, max_length=255)]] = msgspec.field(
        default_factory=lambda: list(LOOPBACK_HOSTS)
    )
    # Origins (scheme://host[:port]) whose browser requests are served, with CORS headers; a
    # request with any other Origin header gets 403 ("*": any origin).
    http_allowed_origins: list[Annotated[str, Meta(min_length=1, max_length=255)]] = []

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
                raise msgspec.ValidationError(
                    f"server.socket_mode must be within 0000..0777, got {self.socket_mode!r}"
                )
        elif not 0 <= mode <= 0o777:
            # A TOML integer is decimal (660 is 0o1224): say so with the number as it was written.
            octal = set(str(mode)) <= set("01234567")
            write = f'"0{mode}" (a string) or 0o{mode}' if octal else '"0660" (a string) or 0o660'
            raise msgspec.ValidationError(
                f"server.socket_mode = {mode} is not a file mode (0 to 0o777): a TOML integer is "
                f"decimal, a mode octal; write it as {write}"
            )
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


def load_config(
    path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    options: Mapping[str, Mapping[str, str]] | None = None,
) -> Config:
    """Settings from ``path`` (or ``/etc/qllm/qllm.toml`` when present), then ``overrides``.

    ``overrides`` is nested like the file (``{"server": {"socket": "/tmp/q.sock"}}``); a value of
    None leaves the file's value in place. ``options`` names the command-line option that gave
    each override (``{"engine": {"max_batch": "--max-batch"}}``), for error messages. Raises
    :class:`ConfigError` for a missing or malformed file and for any unknown key or bad value.
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
    check_keys(data, source)
    check_keys(pruned, "the overrides")
    try:
        return msgspec.convert(_merge(data, pruned), Config)
    except msgspec.ValidationError as exc:
        raise _value_error(str(exc), source, pruned, options or {}) from None


def check_keys(data: Mapping[str, Any], source: str) -> None:
    """ConfigError for a key no section has: it lists the section's keys, and names the section
    where a key of another one belongs."""
    keys = {"engine": EngineConfig, "server": ServerConfig, "log": LogConfig}
    fields = {name: kind.__struct_fields__ for name, kind in keys.items()}
    for section, values in data.items():
        home = [name for name, names in fields.items() if section in names]
        if section not in fields:
            where = f"`{section}` belongs in [{home[0]}]" if home else f"there is no [{section}] section"
            raise ConfigError(
                f"unknown setting `{section}` in {source}: {where}; the sections are "
                + ", ".join(f"[{name}]" for name in fields)
            )
        if not isinstance(values, Mapping):
            continue  # not a table: the conversion says so
        for key in values:
            if key in fields[section]:
                continue
            home = [name for name, names in fields.items() if key in names]
            if home:
                hint = f"`{key}` belongs in [{home[0]}]"
            else:
                close = difflib.get_close_matches(key, fields[section], n=1)
                hint = f"did you mean `{close[0]}`?" if close else "no section has it"
            raise ConfigError(
                f"unknown key `{key}` in [{section}] of {source} ({hint}); the keys of [{section}] "
                "are " + ", ".join(fields[section])
            )


_AT = re.compile(r"^(?P<detail>.*?)(?: - at `\$\.(?P<section>\w+)\.(?P<key>\w+)(?P<rest>[^`]*)`)?$", re.S)


def _value_error(
    message: str, source: str, overrides: Mapping[str, Any], options: Mapping[str, Mapping[str, str]]
) -> ConfigError:
    """A bad value: by the command-line option that gave it, else by the file that holds it."""
    found = _AT.match(message)
    detail, section, key = found["detail"], found["section"], found["key"]
    if section is None and (named := re.match(r"(\w+)\.(\w+)", message)):  # a check of our own
        section, key = named.groups()
    if section is not None and key in overrides.get(section, {}):
        value = overrides[section][key]
        option = options.get(section, {}).get(key)
        if option is not None:
            shown = "" if isinstance(value, list | dict) else f" {value}"
            return ConfigError(f"invalid {option}{shown}: {detail}")
        return ConfigError(f"invalid setting {section}.{key} = {value!r}: {detail}")
    return ConfigError(f"invalid setting in {source}: {message}")
