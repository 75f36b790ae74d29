"""Chat prompts: a text prompt wrapped in the tokenizer's chat template, in process and on the wire."""

import msgspec
import pytest

from qllm import protocol
from qllm.engine import Engine
from qllm.errors import InvalidRequest
from qllm.text import encode


def test_chat_wraps_the_prompt_in_the_template(chat_model):
    wrapped = encode(chat_model, "hello", chat=True)
    assert wrapped == encode(chat_model, "<|endoftext|>user: hello\nassistant:")
    assert wrapped != encode(chat_model, "hello")


def test_chat_without_a_template_or_with_token_ids_is_a_clear_error(tiny, chat_model):
    with pytest.raises(ValueError, match="no chat template"):
        encode(tiny, "hello", chat=True)
    with pytest.raises(ValueError, match="text prompt"):
        encode(chat_model, [1, 2, 3], chat=True)


async def test_engine_chat_request_equals_the_wrapped_prompt(chat_model):
    async with Engine(model=chat_model) as engine:
        chat = await engine.generate("hello", chat=True, max_tokens=6, ignore_eos=True)
        plain = await engine.generate("<|endoftext|>user: hello\nassistant:", max_tokens=6, ignore_eos=True)
        assert chat.token_ids == plain.token_ids and chat.prompt_tokens == plain.prompt_tokens
        with pytest.raises(InvalidRequest):
            engine.submit([5, 6], chat=True)


def test_chat_field_travels_on_the_wire_and_defaults_to_false():
    msg = protocol.Generate(id=1, prompt="hi", chat=True)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(msg), type=protocol.ClientMessage)
    assert decoded.chat is True
    legacy = msgspec.msgpack.encode({"type": "generate", "id": 2, "prompt": "hi"})
    assert msgspec.msgpack.decode(legacy, type=protocol.ClientMessage).chat is False
