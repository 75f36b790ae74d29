"""The OpenAI-compatible request and reply shapes of ``qllm serve``'s HTTP front end.

A body is read twice: its OpenAI fields into typed msgspec Structs, and every field that names a
request-spec field (:mod:`qllm.spec`: ``top_p``, ``seed``, ``ignore_eos``, ``ttft_deadline``, ...)
by the spec itself, so each spec field is an HTTP body field with no edit here. An unknown field or
a bad value is a clear 400. :func:`to_spec` checks what qllm does not support, maps the OpenAI
fields whose meaning differs and builds the spec. Replies are plain dicts in the shapes the
``openai`` client reads. See docs/http.md.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from qllm.errors import InvalidRequest
from qllm.logging import cut
from qllm.spec import RequestSpec, build_spec, request_fields

if TYPE_CHECKING:
    from qllm.kernel.request import RequestResult

PRIORITY_HEADER = "x-qllm-priority"
TENANT_HEADER = "x-qllm-tenant"
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_MESSAGE_CHARS = 1024  # an error message, whatever input it quotes
QUOTE_CHARS = 64  # a piece of input an error message quotes
MAX_JSON_DEPTH = 32  # arrays and objects nested in a request body


class ApiError(Exception):
    """An error reply: HTTP status and the OpenAI error object (its message cut to
    ``MAX_MESSAGE_CHARS``). ``close``: the connection closes after it."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        type_: str = "invalid_request_error",
        *,
        close: bool = False,
    ):
        super().__init__(cut(message, MAX_MESSAGE_CHARS))
        self.status = status
        self.code = code
        self.type = type_
        self.close = close

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "code": self.code, "param": None}}


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code)


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class _Sampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """OpenAI fields both endpoints share: those that are no request-spec field, and those whose
    OpenAI meaning differs from the spec's (``max_tokens`` defaults to 16, ``temperature`` to 1
    and is at most 2, ``stop`` may be null, ``priority`` may be an integer rank); :func:`to_spec`
    maps them. Accepted only at their neutral values: ``n``, ``best_of``, penalties,
    ``logprobs``, ``logit_bias``, ``echo``, ``suffix`` (qllm does not implement them)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: Annotated[float, Meta(le=2)] = 1.0
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: Literal["ls", "be"] | int | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None  # a bool for chat, a count for completions


class CompletionRequest(_Sampling, kw_only=True, forbid_unknown_fields=True):
    prompt: str | list[str | int]
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of a chat message's content; only ``text`` parts are supported."""

    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    """A message of a conversation (fields of other message kinds, such as ``tool_calls``, are
    ignored)."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(_Sampling, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name of max_tokens
    top_logprobs: int | None = None


Api = TypeVar("Api", CompletionRequest, ChatRequest)


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_AS_SQUARE = bytes.maketrans(b"{}", b"[]")


def nested_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays and objects in the JSON ``body`` nest deeper than ``limit`` (or open more
    than ``limit`` that never close). Done by C string passes, at most ``limit`` of them, so that
    decoding never recurses deeper than ``limit``."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKET)
    if brackets.count(b"[") + brackets.count(b"{") <= limit:
        return False
    brackets = brackets.translate(_AS_SQUARE)
    for _ in range(limit):
        inner = brackets.replace(b"[]", b"")  # one level of every innermost pair
        if inner == brackets:
            break
        brackets = inner
    return b"[]" in brackets or brackets.count(b"[") > limit


def _invalid(exc: Exception) -> ApiError:
    return bad_request(f"invalid request: {cut(str(exc), 256)}")


def decode(body: bytes, kind: type[Api]) -> tuple[Api, dict[str, Any]]:
    """A request body as ``kind``, and its request-spec fields (flat; those ``kind`` declares
    apart); ApiError(400) naming what is wrong."""
    if nested_too_deep(body):
        raise bad_request(f"the body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels")
    try:
        fields = msgspec.json.decode(body, type=dict[str, Any])
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"the body is not valid JSON: {cut(str(exc), 256)}") from None
    except RecursionError:  # nested_too_deep bounds the depth far below this
        raise bad_request(f"the body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels") from None
    own = set(kind.__struct_fields__)
    spec_names = {f.name for f in request_fields()} - own
    spec_fields = {name: fields.pop(name) for name in list(fields) if name in spec_names}
    try:
        return msgspec.convert(fields, kind), spec_fields
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None


def priority_of(value: str | int | None, header: str | None) -> tuple[str, int | None]:
    """(class, rank or None) of a request: the header (set by a gateway) wins over the body's field.

    ``"ls"``/``"be"`` name the class; an integer is a rank within best-effort, lower first, like
    vLLM's ``priority``."""
    if header is not None:
        header = header.strip().lower()
        if header in ("ls", "be"):
            value = header
        else:
            try:
                value = int(header)
            except ValueError:
                raise bad_request(
                    f"header X-Qllm-Priority must be 'ls', 'be' or an integer rank, got {cut(header, QUOTE_CHARS)!r}"
                ) from None
    if value is None:
        return "be", None
    if isinstance(value, str):
        return value, None
    return "be", value


def _unsupported(req: _Sampling) -> str | None:
    if req.n != 1:
        return f"n={req.n} is not supported; qllm returns one choice per request (n=1)"
    if req.presence_penalty or req.frequency_penalty:
        return "presence_penalty and frequency_penalty are not supported (leave them at 0)"
    if req.logit_bias:
        return "logit_bias is not supported"
    if req.logprobs not in (None, False, 0):
        return "logprobs are not supported"
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, 1):
            return "best_of is not supported (leave it at 1)"
        if req.echo:
            return "echo is not supported"
        if req.suffix:
            return "suffix is not supported"
    if isinstance(req, ChatRequest) and req.top_logprobs:
        return "top_logprobs is not supported"
    return None


def to_spec(
    req: _Sampling,
    fields: dict[str, Any],
    header: str | None,
    max_tokens_limit: int,
    client: str,
    tenant_header: str | None = None,
    default_tenant: str = "",
) -> RequestSpec:
    """The request spec of a request: its spec ``fields`` and the mapped OpenAI ones, sent by
    ``client``; ApiError when unsupported or invalid. Its tenant is the first given of the
    ``X-Qllm-Tenant`` header (``tenant_header``), the body's ``tenant`` field, the OpenAI ``user``
    field, and ``default_tenant`` (the peer's uid on a Unix socket)."""
    problem = _unsupported(req)
    if problem is not None:
        raise bad_request(problem, "unsupported_parameter")
    max_tokens = req.max_tokens
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, max_tokens_limit)
    if max_tokens > max_tokens_limit:
        raise bad_request(
            f"max_tokens={max_tokens} exceeds the limit of {max_tokens_limit}", "max_tokens_too_large"
        )
    priority, rank = priority_of(req.priority, header)
    mapped: dict[str, Any] = {"max_tokens": max_tokens, "temperature": req.temperature, "priority": priority}
    if rank is not None:
        mapped["rank"] = rank
    if req.stop is not None:
        mapped["stop"] = req.stop
    mapped["tenant"] = tenant_header or fields.get("tenant") or req.user or default_tenant
    try:
        return build_spec({**fields, **mapped, "client": client})
    except InvalidRequest as exc:
        raise _invalid(exc) from None


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request: text, or token ids."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return prompt
    if prompt and all(type(t) is int for t in prompt):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    raise bad_request(
        "prompt must be one string or one list of token ids (batched prompts are not supported)"
    )


def chat_messages(req: ChatRequest) -> list[dict[str, str]]:
    """The conversation as the chat template reads it (text parts of a content list joined)."""
    out = []
    for m in req.messages:
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_request("only text content parts are supported")
                parts.append(part.text)
            content = "".join(parts)
        out.append({"role": m.role, "content": content or ""})
    return out


FINISH_REASONS = {"stopped": "stop", "length": "length"}


class Reply:
    """Builds the reply objects of one request (ids, timestamps, model name)."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(result: RequestResult) -> dict[str, Any]:
        completion = len(result.token_ids)
        return {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
        }

    def full(self, result: RequestResult) -> dict[str, Any]:
        """The non-streaming reply."""
        finish = FINISH_REASONS.get(result.status, "stop")
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": finish,
            }
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": self.usage(result)}

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        """One streamed event: a piece of text, or the finish reason."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, result: RequestResult) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(result)}
