"""Shared fixtures: uvloop as the event loop, the tiny preset built once per session."""

from __future__ import annotations

import pytest
import torch
import uvloop

# The test models are tiny: one intra-op thread avoids OpenMP spin-waits that make small ops
# tens of times slower on a busy 2-core machine, and keeps the suite's run time predictable.
torch.set_num_threads(1)


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(autouse=True)
def _structlog_config_restored():
    """Each test leaves structlog and the root logger as it found them: the commands configure
    both for their run, which would otherwise hide or misroute the log lines later tests see."""
    import logging

    import structlog

    saved, configured = structlog.get_config(), structlog.is_configured()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    # Unconfigured stays unconfigured: configuring structlog with its defaults would make qllm's
    # library loggers print every event to stdout, where a later test reads a command's output.
    if configured:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()
    root.handlers[:], root.level = handlers, level
    logging.captureWarnings(False)


@pytest.fixture(scope="session")
def tiny():
    """The tiny preset executor (batch-invariant), shared read-only across tests."""
    from qllm.models import load_model

    return load_model("tiny")


CHAT_TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""A chat template for the tiny tokenizer: ``<|endoftext|>role: content`` per message."""


@pytest.fixture(scope="session")
def chat_model(tiny):
    """The tiny preset with a chat template (a copy: ``tiny`` itself has none)."""
    import copy

    model = copy.copy(tiny)
    model.tokenizer = copy.deepcopy(tiny.tokenizer)
    model.tokenizer.chat_template = CHAT_TEMPLATE
    return model
