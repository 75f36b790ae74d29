"""The output processor: what a request's program produces becomes tokens, text, stream chunks and
finally its :class:`~qllm.kernel.request.RequestResult`.

Each request's program (:func:`~qllm.kernel.program.generation_passes`) is resumed here with the
logits of its last forward pass: it samples, yields its tokens, and asks for its next pass or ends.
Each token is recorded and streamed as the text it adds: the text stops where a stop string
starts, and a token that ends in an incomplete UTF-8 sequence adds its text with the next one.
The final text is the whole output's, cut at its first stop string.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qllm.kernel.program import generation_passes
from qllm.kernel.request import NEXT_PASS, Request, RequestResult, RequestStatus
from qllm.kernel.runtime.ops import Token
from qllm.text import TextStream

if TYPE_CHECKING:
    import torch

    from qllm.models.base import MoEModel


@dataclass(frozen=True)
class StreamChunk:
    """One generated token: its id, the text it added, and its index in the output."""

    token_id: int
    text: str
    index: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a request's program ended: its final status, and the exception of one that raised."""

    status: RequestStatus
    error: Exception | None = None


class OutputProcessor:
    """Advances request programs and turns their tokens into text, chunks and results."""

    def __init__(self, model: MoEModel, *, prefill_chunk: int):
        self.model = model
        self.prefill_chunk = prefill_chunk

    def start(self, request: Request) -> Outcome | None:
        """Start an admitted request's program: run it to its first forward pass."""
        request.steps = generation_passes(
            self.model,
            request.prompt_ids,
            request.params,
            prefill_chunk=self.prefill_chunk,
            cached=request.cached_tokens,
        )
        return self.advance(request, None)

    def advance(self, request: Request, logits: torch.Tensor | None) -> Outcome | None:
        """Resume the request's program with ``logits`` until it asks for its next forward pass
        (None: the request then waits at :data:`~qllm.kernel.request.NEXT_PASS`) or ends."""
        steps = request.steps
        reply: torch.Tensor | bool | None = logits
        try:
            while True:
                item = steps.send(reply)
                if isinstance(item, Token):
                    reply = self.emit(request, item.token_id)
                    continue
                request.forward = item
                request.position = NEXT_PASS
                return None
        except StopIteration as stop:
            length = stop.value == "length"
            return Outcome(RequestStatus.FINISHED_LENGTH if length else RequestStatus.FINISHED_STOPPED)
        except Exception as exc:
            return Outcome(RequestStatus.FINISHED_ERROR, exc)

    def emit(self, request: Request, token_id: int) -> bool:
        """Record ``token_id`` and stream the text it adds; True when a stop string ended the output."""
        now = time.monotonic()
        if request.first_token is None:
            request.first_token = now
        request.token_times.append(now)
        request.token_ids.append(token_id)
        text = request.text
        if text is None:
            text = request.text = TextStream(self.model, request.params.stop)
        delta = text.push(token_id)
        request.events.put_nowait(StreamChunk(token_id, delta, len(request.token_ids) - 1))
        return text.stopped

    def close(self, request: Request, status: RequestStatus, error: str | None) -> None:
        """The request ends with ``status`` (``error`` kept for aborted and failed ones): its
        program is closed and it waits on nothing."""
        request.status = status
        failed = status in (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)
        request.error = error if failed else None
        request.finish_time = time.monotonic()
        if request.steps is not None:
            request.steps.close()
        request.position = None
        request.forward = None

    def result(self, request: Request) -> RequestResult:
        return RequestResult(
            id=request.id,
            token_ids=list(request.token_ids),
            text="" if request.text is None else request.text.text,
            status=request.status.label,
            priority=str(request.priority_class),
            prompt_tokens=len(request.prompt_ids),
            arrival=request.arrival,
            first_scheduled=request.first_scheduled,
            first_token=request.first_token,
            finished=request.finish_time,
            token_times=list(request.token_times),
            preemptions=request.preemptions,
            error=request.error,
            ttft_slo=request.ttft_slo,
            tpot_slo=request.tpot_slo,
            tenant=request.tenant,
            cached_tokens=request.cached_tokens,
        )

    @staticmethod
    def deliver(request: Request, result: RequestResult) -> None:
        """End the request's stream and hand its waiter the result."""
        request.events.put_nowait(None)
        if not request.done.done():
            request.done.set_result(result)
