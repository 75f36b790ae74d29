"""One ``generate`` of a server connection: checked, tokenized off the event loop, submitted to the
engine, and relayed back as frames.

Checks that cost nothing (ids, limits, prompt length) run as the frame is read; tokenizing runs on
the server's tokenizer thread, so a long prompt never holds up other clients' frames. From the
moment its frame is read until its last frame is queued, the request counts as live on its
connection (so its id is taken and a ``cancel`` reaches it even while it is being tokenized).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import msgspec

from qllm import protocol as p
from qllm.errors import QllmError

if TYPE_CHECKING:
    from qllm.engine import RequestHandle
    from qllm.kernel.request import RequestResult
    from qllm.server.native import Connection


def final_frame(rid: int, result: RequestResult, error: p.ErrorInfo | None) -> p.Final:
    """The wire form of an engine ``RequestResult``."""
    arrival = result.arrival
    return p.Final(
        id=rid,
        status=result.status,
        token_ids=list(result.token_ids),
        text=result.text,
        priority=result.priority,
        usage=p.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids)),
        timings=p.Timings(
            queue=None if result.first_scheduled is None else result.first_scheduled - arrival,
            ttft=None if result.first_token is None else result.first_token - arrival,
            turnaround=result.finished - arrival,
        ),
        preemptions=result.preemptions,
        error=error,
    )


def refusal(conn: Connection, msg: p.Generate) -> p.Error | None:
    """Why ``msg`` is refused before any work is spent on it, or None."""
    cfg = conn.config
    rid = msg.id
    if rid in conn.requests:
        return p.Error(
            id=rid, code=p.DUPLICATE_ID, message=f"request id {rid} is already live on this connection"
        )
    if len(conn.requests) >= cfg.max_requests_per_connection:
        return p.Error(
            id=rid,
            code=p.TOO_MANY_REQUESTS,
            message=f"at most {cfg.max_requests_per_connection} live requests per connection",
        )
    if conn.closing or conn.server.draining:
        return p.Error(id=rid, code="engine_closed", message="the server is shutting down")
    max_tokens = msg.spec.sampling.max_tokens
    if max_tokens > cfg.max_tokens:
        return p.Error(
            id=rid,
            code=p.MAX_TOKENS_TOO_LARGE,
            message=f"max_tokens={max_tokens} exceeds the limit of {cfg.max_tokens}",
        )
    prompt = msg.prompt
    if isinstance(prompt, str) and len(prompt) > cfg.max_prompt_chars:
        return p.Error(
            id=rid,
            code=p.PROMPT_TOO_LONG,
            message=f"prompt of {len(prompt)} characters exceeds the limit of {cfg.max_prompt_chars} characters",
        )
    if isinstance(prompt, list) and len(prompt) > cfg.max_prompt_tokens:
        return p.Error(
            id=rid,
            code=p.PROMPT_TOO_LONG,
            message=f"prompt of {len(prompt)} tokens exceeds the limit of {cfg.max_prompt_tokens}",
        )
    return None


def default_tenant(conn: Connection) -> str:
    """The tenant of a request that names none: the peer's uid ("" when unknown: the engine's
    default tenant)."""
    return "" if conn.creds is None else str(conn.creds.uid)


async def relay(conn: Connection, msg: p.Generate, slot: asyncio.Semaphore) -> None:
    """Tokenize (then release ``slot``), submit, and send the request's frames until its last."""
    rid = msg.id
    try:
        try:
            ids = await conn.server.encode(msg.prompt, chat=msg.chat)
        except ValueError as exc:
            return conn.send(p.Error(id=rid, code="invalid_request", message=str(exc)))
        finally:
            slot.release()
        cfg = conn.config
        if len(ids) > cfg.max_prompt_tokens:
            message = f"prompt of {len(ids)} tokens exceeds the limit of {cfg.max_prompt_tokens}"
            return conn.send(p.Error(id=rid, code=p.PROMPT_TOO_LONG, message=message))
        if conn.gone:
            return None
        if rid in conn.cancel_asked:  # cancelled while it was being tokenized
            cancelled = p.ErrorInfo(code="cancelled", message="cancelled by the client")
            return conn.send(p.Final(id=rid, status="aborted", priority=msg.spec.priority, error=cancelled))
        try:
            # The connection names the client, and the tenant unless the request names one: the
            # peer's uid (docs/tenants.md).
            tenant = msg.spec.tenant or default_tenant(conn)
            spec = msgspec.structs.replace(msg.spec, client=conn.name, tenant=tenant)
            handle = conn.engine.submit(ids, spec=spec, request_id=f"{conn.name}.{rid}")
        except QllmError as exc:
            return conn.send(p.Error(id=rid, code=exc.code, message=str(exc)))
        conn.requests[rid] = handle
        await _forward(conn, rid, handle, msg.stream)
    finally:
        conn.request_ended(rid)


async def _forward(conn: Connection, rid: int, handle: RequestHandle, stream: bool) -> None:
    """Relay one request's chunks (if streaming) and its final frame."""
    try:
        if stream:
            async for chunk in handle:
                conn.send(p.Chunk(id=rid, index=chunk.index, token_ids=[chunk.token_id], text=chunk.text))
        result = await handle.result()
        conn.send(final_frame(rid, result, _error_of(conn, rid, result)))
    except asyncio.CancelledError:
        handle.cancel()
        raise


def _error_of(conn: Connection, rid: int, result: RequestResult) -> p.ErrorInfo | None:
    if result.status == "error":
        return p.ErrorInfo(code="request_failed", message=result.error or "")
    if result.status != "aborted":
        return None
    if rid in conn.cancel_asked:
        return p.ErrorInfo(code="cancelled", message="cancelled by the client")
    if conn.server.draining:
        return p.ErrorInfo(code=p.SHUTDOWN, message=result.error or "the server is shutting down")
    return p.ErrorInfo(code="cancelled", message=result.error or "cancelled")
