"""Settings: TOML file, command-line overrides, one clear error per bad key or value."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qllm.cli import build_parser
from qllm.commands.serve import overrides
from qllm.paths import client_socket_path, default_socket_path
from qllm.server.config import ConfigError, load_config
from qllm.server.listener import _lock, open_listener


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "qllm.toml"
    path.write_text(text)
    return path


def test_file_values_and_defaults(tmp_path):
    config = load_config(
        write(
            tmp_path,
            '[engine]\nmodel = "small-random"\npolicy = "fcfs"\nmax_batch = 8\n'
            '[server]\nsocket = "/tmp/x.sock"\nsocket_mode = 0o600\nallow_uids = [1000, 1001]\n'
            'drain_timeout = 5\n[log]\nlevel = "debug"\n',
        )
    )
    assert (config.engine.model, config.engine.policy, config.engine.max_batch) == ("small-random", "fcfs", 8)
    assert config.engine.prefill_chunk == 128  # untouched: default
    assert (config.server.socket, config.server.socket_mode) == ("/tmp/x.sock", 0o600)
    assert config.server.allow_uids == [1000, 1001]
    assert config.server.drain_timeout == 5.0
    assert config.log.level == "debug"


def test_socket_mode_as_an_octal_string(tmp_path):
    assert load_config(write(tmp_path, '[server]\nsocket_mode = "0640"\n')).server.socket_mode == 0o640


def test_command_line_overrides_the_file(tmp_path):
    path = write(tmp_path, '[engine]\nmodel = "small-random"\n[server]\ndrain_timeout = 5\n')
    args = build_parser().parse_args(["serve", "--config", str(path), "--model", "tiny", "--allow-uid", "7"])
    config = load_config(args.config, overrides(args))
    assert config.engine.model == "tiny"
    assert config.engine.threads is None  # torch's default unless asked
    assert config.server.drain_timeout == 5.0  # not given on the command line: the file's
    args = build_parser().parse_args(["serve", "--config", str(path), "--threads", "1"])
    assert load_config(args.config, overrides(args)).engine.threads == 1
    assert config.server.allow_uids == [7]
    assert config.engine.kv_block_size is None  # growable buffers unless asked
    args = build_parser().parse_args(["serve", "--config", str(path), "--kv-block-size", "16"])
    assert load_config(args.config, overrides(args)).engine.kv_block_size == 16


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\nsockt = "/x"\n', r"unknown key `sockt` in \[server\] .*did you mean `socket`\?"),
        ("[engine]\nmax_batch = 0\n", r"Expected `int` >= 1 - at `\$.engine.max_batch`"),
        ("[engine]\nthreads = 0\n", r"Expected `int` >= 1 - at `\$.engine.threads`"),
        ("[engine]\nkv_block_size = 0\n", r"Expected `int` >= 1 - at `\$.engine.kv_block_size`"),
        ('[log]\nlevel = "loud"\n', r"level"),
        ('[server]\nsocket_mode = "rw-rw----"\n', r"server.socket_mode must be octal"),
        ("[server]\nsocket_mode = 0o7777\n", r"server.socket_mode = 4095 is not a file mode"),
        ('[server]\ndrain_timeout = "soon"\n', r"Expected `float`.*drain_timeout"),
        (
            "[telemetry]\n",
            r"unknown setting `telemetry` .*no \[telemetry\] section.*\[engine\], \[server\], \[log\]",
        ),
        ("[server\n", r"not valid TOML"),
    ],
)
def test_bad_settings_are_one_clear_error_naming_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.toml")


def test_bad_override_is_reported_as_such():
    with pytest.raises(ConfigError, match=r"invalid setting server.socket_mode = 'xyz': .*octal"):
        load_config(None, {"server": {"socket_mode": "xyz"}})


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--max-batch", "0"], "invalid --max-batch 0: Expected `int` >= 1"),
        (["--threads", "0"], "invalid --threads 0: Expected `int` >= 1"),
        (
            ["--socket-mode", "999"],
            "invalid --socket-mode 999: server.socket_mode must be octal like '0660', got '999'",
        ),
        (["--drain-timeout", "-1"], "invalid --drain-timeout -1.0: Expected `float` >= 0.0"),
    ],
)
def test_a_bad_option_is_named_as_typed(tmp_path, capsys, argv, line):
    from qllm.cli import main

    assert main(["serve", "--socket", str(tmp_path / "q.sock"), *argv]) == 2
    assert capsys.readouterr().err.splitlines() == [f"qllm serve: error: {line}"]
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_an_unknown_key_lists_the_sections_keys_and_the_section_it_belongs_in(tmp_path):
    path = write(tmp_path, '[server]\nmodel = "smollm2-moe"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"unknown key `model` in [server] of {path} (`model` belongs in [engine])")
    assert "the keys of [server] are socket, socket_mode, " in message and "drain_timeout" in message
    with pytest.raises(
        ConfigError, match=r"unknown setting `max_batch` in .*: `max_batch` belongs in \[engine\]"
    ):
        load_config(write(tmp_path, "max_batch = 4\n"))  # above any section
    with pytest.raises(
        ConfigError, match=r"unknown key `colour` in \[log\] .*no section has it.*are level, format$"
    ):
        load_config(write(tmp_path, '[log]\ncolour = "red"\n'))


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("660", 'write it as "0660" (a string) or 0o660'),
        ("640", 'write it as "0640" (a string) or 0o640'),
        ("999", 'write it as "0660" (a string) or 0o660'),
    ],
)
def test_a_decimal_socket_mode_is_reported_as_written(tmp_path, text, hint):
    path = write(tmp_path, f"[server]\nsocket_mode = {text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"server.socket_mode = {text} is not a file mode" in message and "decimal" in message
    assert hint in message and "0o1" not in message


def test_a_socket_path_too_long_names_the_path_and_the_limit(tmp_path, capsys):
    from qllm.cli import main

    path = tmp_path / ("d" * 120) / "q.sock"
    size = len(str(path).encode())
    for option in ("--socket", "--http-socket"):
        argv = ["serve", "--socket", str(tmp_path / "s" / "q.sock"), option, str(path)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"socket path '{path}' is {size} bytes long" in err and "at most 107 bytes" in err
        assert list(tmp_path.iterdir()) == []  # no directory made for either socket
    assert main(["generate", "--socket", str(path), "hi"]) == 1
    assert f"socket path '{path}' is {size} bytes long" in capsys.readouterr().err


def test_serve_reports_a_bad_config_in_one_line_before_loading_anything(tmp_path):
    path = write(tmp_path, "[server]\nbogus = 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "qllm", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith(f"qllm serve: error: unknown key `bogus` in [server] of {path}")


def test_default_socket_paths():
    assert default_socket_path({"RUNTIME_DIRECTORY": "/run/qllm/tiny"}) == Path("/run/qllm/tiny/qllm.sock")
    assert default_socket_path({"INVOCATION_ID": "abc"}) == Path("/run/qllm/qllm.sock")
    assert default_socket_path({"XDG_RUNTIME_DIR": "/run/user/1000"}, uid=1000) == Path(
        "/run/user/1000/qllm.sock"
    )
    assert default_socket_path({}, uid=0) == Path("/run/qllm/qllm.sock")
    assert default_socket_path({}, uid=1000) == Path("/tmp/qllm-1000/qllm.sock")
    assert client_socket_path({"QLLM_SOCKET": "/a/b.sock"}) == Path("/a/b.sock")


def test_socket_file_mode_and_stale_socket(tmp_path):
    config = load_config(None, {"server": {"socket": str(tmp_path / "q.sock"), "socket_mode": "0640"}})
    first = open_listener(config.server, env={})
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "q.sock").st_mode) == 0o640
        with pytest.raises(ValueError, match="another server is already serving"):
            open_listener(config.server, env={})
    finally:
        first.sock.close()  # dies without cleaning up: a stale socket file stays
        os.close(first.lock)  # (the kernel releases a dead process's lock)
    assert (tmp_path / "q.sock").exists()
    second = open_listener(config.server, env={})  # replaces the stale file
    second.close()
    assert not (tmp_path / "q.sock").exists()


def test_socket_path_that_is_not_a_socket(tmp_path):
    (tmp_path / "q.sock").write_text("important")
    config = load_config(None, {"server": {"socket": str(tmp_path / "q.sock")}})
    with pytest.raises(ValueError, match="not a socket"):
        open_listener(config.server, env={})
    assert (tmp_path / "q.sock").read_text() == "important"


def test_a_server_starting_at_the_same_moment_keeps_its_socket_file(tmp_path):
    path = tmp_path / "q.sock"
    config = load_config(None, {"server": {"socket": str(path)}})
    # The first server holds the path's lock and has bound its socket, but not listened yet: a
    # connect fails as it would for a stale file.
    lock = _lock(path)
    starting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    starting.bind(str(path))
    try:
        inode = path.lstat().st_ino
        with pytest.raises(ValueError, match="another server is already serving"):
            open_listener(config.server, env={})
        assert path.lstat().st_ino == inode  # its file was neither removed nor replaced
    finally:
        starting.close()
        os.close(lock)
    open_listener(config.server, env={}).close()  # the lock was released: a later start works


@pytest.mark.parametrize("key", ["hello_timeout", "idle_timeout", "frame_timeout"])
def test_timeouts_must_be_finite(tmp_path, key):
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, f"[server]\n{key} = inf\n"))
