"""Log output: JSON lines off a terminal (journald), readable text on one."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from qllm.logging import configure


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_structlog():
    yield
    structlog.reset_defaults()


def test_json_when_not_a_tty():
    out = io.StringIO()
    configure("info", "auto", stream=out)
    structlog.get_logger().info("request_finished", request_id="c1.1", tokens=3)
    structlog.get_logger().debug("too_chatty")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1  # debug is below the level
    record = json.loads(lines[0])
    assert record["event"] == "request_finished"
    assert (record["request_id"], record["tokens"], record["level"]) == ("c1.1", 3, "info")
    assert "timestamp" in record


def test_readable_on_a_tty():
    out = FakeTTY()
    configure("debug", "auto", stream=out)
    structlog.get_logger().debug("server_ready", address="/run/qllm/qllm.sock")
    text = out.getvalue()
    assert "server_ready" in text and "address" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_unknown_level():
    with pytest.raises(ValueError, match="log level"):
        configure("chatty")


def test_a_command_keeps_library_warnings_off_its_json_stdout(monkeypatch, capsys):
    """``qllm generate --json`` prints one JSON document on stdout even when a library warns
    while the model loads (transformers' load report does), whatever logging state the process
    had (here: library logs routed through structlog at its defaults, which print to stdout):
    the warning goes to stderr."""
    import logging

    import qllm.models
    from qllm.cli import main
    from qllm.logging import route_stdlib_logging

    structlog.reset_defaults()
    route_stdlib_logging()
    load = qllm.models.load_model

    def load_with_a_warning(*args, **kwargs):
        logging.getLogger("somelibrary.loader").warning("LOAD REPORT: unexpected keys")
        return load(*args, **kwargs)

    monkeypatch.setattr(qllm.models, "load_model", load_with_a_warning)

    assert main(["generate", "--model", "tiny", "--max-tokens", "3", "--json", "hello"]) == 0

    out, err = capsys.readouterr()
    assert len(json.loads(out)["token_ids"]) == 3
    assert "LOAD REPORT" in err and "LOAD REPORT" not in out


async def test_the_engine_as_a_library_logs_nothing_until_logging_is_configured(tiny, capfd):
    """structlog's defaults print to stdout, which belongs to the application: an Engine used in
    process writes nothing until the application configures logging, then its lines come."""
    import qllm

    structlog.reset_defaults()
    async with qllm.Engine(model=tiny) as engine:
        result = await engine.submit([50, 60, 70], max_tokens=2).result()
        assert len(result.token_ids) == 2
        assert capfd.readouterr() == ("", "")

        configure("info", "json")  # to stderr
        await engine.submit([50, 60, 70], max_tokens=2).result()
    out, err = capfd.readouterr()
    assert out == ""
    events = [json.loads(line)["event"] for line in err.splitlines()]
    assert "request_finished" in events
