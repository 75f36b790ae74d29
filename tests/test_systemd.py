"""systemd integration: sd_notify, socket activation, the watchdog, SIGTERM drain, unit files."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from qllm.client import AsyncClient, ServerShutdown
from qllm.errors import EngineClosed
from qllm.server import systemd
from qllm.server.app import Heartbeat, Server
from qllm.server.config import Config

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "examples" / "systemd"


# sd_notify ---------------------------------------------------------------------------------------


def test_notify_sends_a_datagram(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert listener.recv(4096) == b"READY=1"


def test_notify_abstract_namespace():
    name = f"qllm-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        assert systemd.notify("STATUS=hi", env={"NOTIFY_SOCKET": "@" + name})
        assert listener.recv(4096) == b"STATUS=hi"


def test_notify_is_a_quiet_no_op_outside_systemd(tmp_path):
    assert systemd.notify("READY=1", env={}) is False
    with structlog.testing.capture_logs() as logs:
        assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "absent")}) is False
    assert logs[0]["event"] == "sd_notify_failed"


# Socket activation and watchdog settings ---------------------------------------------------------


def test_listen_fds_ignores_another_process_and_unsets_the_variables():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "qllm"}
    assert systemd.listen_fds(env) == []
    assert env == {}
    assert systemd.listen_fds({}) == []
    assert systemd.listen_fds({"LISTEN_PID": "x", "LISTEN_FDS": "1"}) == []


def test_listen_fds_takes_the_passed_socket(tmp_path):
    # A child whose fd 3 is a listening socket, as systemd would start it.
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    code = (
        "import os; from qllm.server.systemd import listen_fds\n"
        "socks = listen_fds()\n"
        "assert 'LISTEN_FDS' not in os.environ\n"
        "print(len(socks), socks[0].fileno(), socks[0].getsockname())\n"
    )
    fd = listener.fileno()
    # The launcher moves the socket to fd 3 and execs in its own process, so its pid stays.
    launcher = (
        "import os, sys\n"
        "fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.executable, [sys.executable, '-c', sys.argv[2]])\n"
    )
    with listener:
        out = subprocess.run(
            [sys.executable, "-c", launcher, str(fd), code],
            pass_fds=(fd,),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "3", str(path)]


def test_watchdog_interval_is_half_of_watchdog_usec():
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({}) is None


class FakeEngine:
    """Engine stand-in for the watchdog: progress, busy and health set by the test; ticks counted."""

    def __init__(self):
        self.progress = 0
        self.healthy = True
        self._busy = False
        self.ticks = 0
        self.ticked = asyncio.Event()

    @property
    def busy(self) -> bool:  # read once per watchdog tick
        self.ticks += 1
        self.ticked.set()
        return self._busy

    async def ticks_pass(self, n: int) -> None:
        target = self.ticks + n
        while self.ticks < target:
            self.ticked.clear()
            await self.ticked.wait()


def test_heartbeat_is_alive_when_idle_or_progressing_not_when_stuck():
    engine = FakeEngine()
    beat = Heartbeat(engine)
    assert beat.alive()  # idle
    engine._busy = True
    engine.progress = 5
    assert beat.alive()  # busy and progressing
    assert not beat.alive()  # busy, no op completed since the last tick: hung
    engine.progress = 6
    assert beat.alive()
    engine.healthy, engine._busy = False, False  # an expert-parallel rank failed
    assert not beat.alive()  # idle, but it cannot compute: systemd should restart it


async def test_watchdog_pings_only_while_the_kernel_moves():
    engine = FakeEngine()
    pings: list[int] = []
    server = Server(engine, Config(), notify=lambda state: pings.append(engine.ticks) or True)
    with structlog.testing.capture_logs() as logs:
        task = asyncio.get_running_loop().create_task(server.watchdog(0.001))
        await engine.ticks_pass(3)
        assert len(pings) >= 2  # idle: every tick pings (the first tick may still be underway)
        engine._busy = True  # a compute hangs: requests live, no progress
        await engine.ticks_pass(2)
        hung_at = len(pings)
        await engine.ticks_pass(5)
        assert len(pings) == hung_at  # not one ping while stuck
        engine.progress += 1
        await engine.ticks_pass(2)
        assert len(pings) > hung_at  # progress resumed: pings resume
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    events = [entry["event"] for entry in logs]
    assert "watchdog_stalled" in events and "watchdog_recovered" in events


# The real process: sd_notify order, SIGTERM under load, socket activation ------------------------


async def _datagrams(sock: socket.socket, into: list[str], seen: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while True:
        into.append((await loop.sock_recv(sock, 4096)).decode())
        seen.set()


async def _wait_for(notes: list[str], seen: asyncio.Event, state: str, proc) -> None:
    while state not in notes:
        seen.clear()
        waiter = asyncio.ensure_future(seen.wait())
        exited = asyncio.ensure_future(proc.wait())
        await asyncio.wait([waiter, exited], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if exited.done() and state not in notes:
            raise AssertionError(f"server exited with {proc.returncode} before {state}")
        exited.cancel()


@pytest.mark.slow
async def test_sigterm_under_load_every_request_gets_a_final_frame(tmp_path):
    sock_path = tmp_path / "qllm.sock"
    (tmp_path / "qllm.toml").write_text("[server]\nmax_tokens = 1000000\n[log]\nformat = 'json'\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    stderr = open(tmp_path / "stderr", "wb")  # noqa: SIM115 - closed below
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "qllm",
        "serve",
        "--config",
        str(tmp_path / "qllm.toml"),
        "--socket",
        str(sock_path),
        "--drain-timeout",
        "4",
        "--threads",
        "1",
        env=env,
        stderr=stderr,
    )  # fmt: skip  (one thread: OpenMP's spinning threads make a busy 2-core machine miss the drain)
    notes: list[str] = []
    seen = asyncio.Event()
    reader = asyncio.get_running_loop().create_task(_datagrams(notify, notes, seen))
    try:
        await asyncio.wait_for(_wait_for(notes, seen, "READY=1", proc), 180)
        async with AsyncClient(sock_path, timeout=120) as client:
            # Short LS requests finish within the drain (LS runs first); endless BE ones are
            # cancelled when it ends.
            kw = {"ignore_eos": True, "stream": True}
            short = [await client.submit(f"short {i}", max_tokens=6, priority="ls", **kw) for i in range(4)]
            endless = [await client.submit(f"endless {i}", max_tokens=10**6, **kw) for i in range(3)]
            for request in short + endless:  # every one is accepted and running
                await request.__anext__()
            await _wait_for(notes, seen, "WATCHDOG=1", proc)
            proc.send_signal(signal.SIGTERM)
            await _wait_for(notes, seen, "STOPPING=1", proc)
            with pytest.raises(EngineClosed):
                await client.generate("too late", max_tokens=2)
            finished = [await request.final() for request in short]
            cancelled = []
            for request in endless:
                with pytest.raises(ServerShutdown) as info:
                    await request.final()
                cancelled.append(info.value.result)
        code = await asyncio.wait_for(proc.wait(), 120)
    finally:
        reader.cancel()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        stderr.close()
        notify.close()
    log = (tmp_path / "stderr").read_text()
    assert code == 0, log
    assert [r.status for r in finished] == ["length"] * 4
    assert all(len(r.token_ids) == 6 for r in finished)
    assert [r.status for r in cancelled] == ["aborted"] * 3
    assert all(r.error.code == "shutdown" and r.token_ids for r in cancelled)
    assert not sock_path.exists()  # removed at exit

    # sd_notify order: loading, READY only then, watchdog pings, STOPPING, stopped.
    states = [n.split("=", 1)[0] if not n.startswith("STATUS=") else n for n in notes]
    assert states[0].startswith("STATUS=loading model")
    ready, stopping = states.index("READY"), states.index("STOPPING")
    assert ready < states.index("WATCHDOG") < stopping
    assert states[-1] == "STATUS=stopped"
    assert any(s.startswith("STATUS=serving") for s in states[:ready])
    assert any(s.startswith("STATUS=draining") for s in states[stopping:])

    # JSON logs (stderr is not a TTY): one request_finished line per request.
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    finished_lines = [e for e in events if e["event"] == "request_finished"]
    assert sorted(e["status"] for e in finished_lines) == ["aborted"] * 3 + ["length"] * 4
    assert {"request_id", "priority", "ttft_s", "tokens", "preemptions", "turnaround_s"} <= finished_lines[
        0
    ].keys()


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed"
)
async def test_socket_activation_and_a_second_signal_forces_exit(tmp_path):
    sock_path = tmp_path / "activated.sock"
    proc = await asyncio.create_subprocess_exec(
        "systemd-socket-activate", "--listen", str(sock_path),
        sys.executable, "-m", "qllm", "serve", "--drain-timeout", "600",
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(600):  # systemd-socket-activate binds before it starts anything
            if sock_path.exists():
                break
            await asyncio.sleep(0.05)
        # The first connection starts the server on the inherited socket.
        async with AsyncClient(sock_path, timeout=180, connect_timeout=180) as client:
            stats = await client.stats()
            assert stats["server"]["socket_activated"] is True
            assert stats["server"]["address"] == str(sock_path)
            request = await client.submit("forever", max_tokens=4096, ignore_eos=True, stream=True)
            await request.__anext__()
            proc.send_signal(signal.SIGINT)  # drains (for up to 600 s) ...
            while (await client.health()).status != "draining":  # (two signals at once merge into one)
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGINT)  # ... unless asked again: exit now
            code = await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    err = (await proc.stderr.read()).decode()
    assert code == 130, err
    assert "forced_exit" in err


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed"
)
async def test_socket_activation_passes_the_native_and_the_http_socket(tmp_path):
    import httpx

    native, http = tmp_path / "native.sock", tmp_path / "http.sock"
    proc = await asyncio.create_subprocess_exec(
        "systemd-socket-activate", "--listen", str(native), "--listen", str(http), "--fdname", "qllm.socket:http",
        sys.executable, "-m", "qllm", "serve", "--socket", str(tmp_path / "unused.sock"), stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(600):  # systemd-socket-activate binds before it starts anything
            if native.exists() and http.exists():
                break
            await asyncio.sleep(0.05)
        async with AsyncClient(native, timeout=180, connect_timeout=180) as client:
            stats = await client.stats()
        transport = httpx.AsyncHTTPTransport(uds=str(http))
        async with httpx.AsyncClient(transport=transport, base_url="http://q", timeout=60) as web:
            models = (await web.get("/v1/models")).json()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    err = (await proc.stderr.read()).decode()
    assert code == 0, err
    assert stats["server"]["socket_activated"] is True and stats["server"]["address"] == str(native)
    assert stats["server"]["http_addresses"] == [f"unix:{http}"]
    assert models["data"][0]["id"] == "tiny"
    assert not (tmp_path / "unused.sock").exists()  # activated: nothing bound by the server itself


# Unit files --------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_files_verify(tmp_path):
    qllm_bin = Path(sys.executable).parent / "qllm"
    if not qllm_bin.exists():
        pytest.skip("the qllm script is not installed beside this Python")
    for unit in ("qllm.socket", "qllm-http.socket", "qllm.service", "qllm@.service"):
        text = (UNITS / unit).read_text()
        # The shipped units name /usr/local/bin/qllm; verify checks that ExecStart= exists.
        (tmp_path / unit).write_text(text.replace("/usr/local/bin/qllm", str(qllm_bin)))
    (tmp_path / "qllm@tiny.service").symlink_to(tmp_path / "qllm@.service")
    out = subprocess.run(
        ["systemd-analyze", "verify", "qllm.socket", "qllm-http.socket", "qllm.service", "qllm@tiny.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == ""  # unknown keys and bad values are only warnings: none allowed


def test_unit_files_use_the_service_protocol():
    service = (UNITS / "qllm.service").read_text()
    template = (UNITS / "qllm@.service").read_text()
    socket_unit = (UNITS / "qllm.socket").read_text()
    for unit in (service, template):
        for line in (
            "Type=notify",
            "WatchdogSec=",
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "KillSignal=SIGTERM",
        ):
            assert line in unit
    assert "RuntimeDirectory=qllm/%i" in template
    assert "ListenStream=/run/qllm/qllm.sock" in socket_unit and "SocketMode=0660" in socket_unit


def test_the_example_config_is_valid_and_the_units_serve_it():
    """examples/qllm.toml loads through the server's own loader and names a model (not the random
    ``tiny``); qllm.service runs it explicitly, so a missing file stops the service instead of
    serving ``tiny``; each service says what PrivateNetwork= and DynamicUser= ask of the user."""
    from qllm.server.config import load_config

    config = load_config(ROOT / "examples" / "qllm.toml")
    assert config.engine.model not in ("tiny", "small-random") and config.engine.model.startswith("/")
    assert (config.server.socket_mode, config.server.socket_group) == (0o660, "qllm")
    assert config.server.socket is None  # under systemd: the activated socket or the instance's
    assert config.server.http_listen is None and config.log.level == "info"
    service = (UNITS / "qllm.service").read_text()
    assert "ExecStart=/usr/local/bin/qllm serve --config /etc/qllm/qllm.toml\n" in service
    for unit in (service, (UNITS / "qllm@.service").read_text()):
        assert "PrivateNetwork=yes" in unit and "--http-listen" in unit
        assert "DynamicUser=yes" in unit and "readable by others" in unit
