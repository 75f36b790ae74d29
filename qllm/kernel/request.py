"""A request inside the kernel: status, class, priority, timestamps, and its op stream."""

from __future__ import annotations

import asyncio
import enum
import functools
import itertools
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qllm.kernel.program import Forward, StopReason
from qllm.kernel.runtime.cache import KVCache
from qllm.kernel.runtime.ops import Op, OpKind, Token
from qllm.kernel.runtime.passes import Pass, Segment
from qllm.spec import PriorityClass, RequestSpec, SamplingParams
from qllm.text import TextStream

if TYPE_CHECKING:
    import torch

    from qllm.kernel.tenants import Account


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request; finished states sort after the live ones."""

    WAITING = 0  # accepted, not yet admitted
    RUNNING = 1  # admitted, in the set the policy is currently computing
    SUSPENDED = 2  # admitted, preempted in the middle of its work by higher-priority work
    FINISHED_STOPPED = 3  # EOS or a stop string
    FINISHED_LENGTH = 4  # max_tokens reached
    FINISHED_ABORTED = 5  # cancelled
    FINISHED_ERROR = 6  # failed while computing

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def label(self) -> str:
        """Wire/API name: ``waiting``, ``running``, ``suspended``, ``stopped``, ``length``, ``aborted``, ``error``."""
        return self.name.removeprefix("FINISHED_").lower()


class Phase(enum.StrEnum):
    PREFILL = "prefill"  # before the first token
    DECODE = "decode"


_sequence = itertools.count()


@dataclass(frozen=True, slots=True)
class Position:
    """Where a request in no pass stands: the op it waits on (kind, layer, expert, as a policy reads
    it through ``RequestView.op_key``) and whether that op starts a forward pass."""

    kind: OpKind
    layer: int
    expert: int = -1
    at_start: bool = True

    @property
    def key(self) -> tuple[int, int, int]:
        return (int(self.kind), self.layer, self.expert)


NEXT_PASS = Position(OpKind.ATTENTION, 0)
"""A request between forward passes waits on the first op of its next pass (:attr:`Request.forward`):
the first layer's attention, where requests starting a pass batch together."""


@dataclass
class RequestResult:
    """What a finished request returns. Times are ``time.monotonic()`` seconds."""

    id: str
    token_ids: list[int]
    text: str
    status: str  # RequestStatus.label
    priority: str  # "ls" | "be"
    prompt_tokens: int
    arrival: float
    first_scheduled: float | None
    first_token: float | None
    finished: float
    token_times: list[float]
    preemptions: int
    error: str | None = None
    ttft_slo: float | None = None  # the SLOs it was served under (seconds; None: none)
    tpot_slo: float | None = None
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache, not computed
    tenant: str = "default"  # who it was served for (the ledger's name)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def turnaround(self) -> float:
        return self.finished - self.arrival


@dataclass(eq=False)
class Request:
    """Kernel-side state of one request. Policies see it through :class:`~qllm.kernel.view.RequestView`."""

    id: str
    prompt_ids: list[int]
    spec: RequestSpec = field(default_factory=RequestSpec)  # what it asks for; never changes
    arrival: float = field(default_factory=time.monotonic)
    seq: int = field(default_factory=lambda: next(_sequence))
    status: RequestStatus = RequestStatus.WAITING
    first_scheduled: float | None = None
    first_token: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    preemptions: int = 0
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache at admission
    prefilled: int = 0  # prompt tokens in its cache: cached, then each prefill chunk's as it completes
    # Its (ttft, tpot) SLOs in seconds: the spec's, else its class's (qllm.kernel.slo); set on submit.
    slo: tuple[float | None, float | None] = (None, None)
    text: TextStream | None = None  # its output as streamed text (the output processor's)
    # Execution state, owned by the dispatcher.
    steps: Generator[Forward | Token, torch.Tensor | bool | None, StopReason] | None = None  # its program
    cache: KVCache | None = None
    forward: Forward | None = None  # its current forward pass (waiting to start when group is None)
    group: Pass | None = None  # the pass it is in the middle of
    segment: Segment | None = None  # its rows in that pass
    position: Position | None = None  # where it stands in no pass (None: in a pass, or not live)
    ops_base: int = 0  # ops run before joining the current pass
    joined_at: int = 0  # the pass's op count when this request joined it
    account: Account | None = None  # its tenant's entry in the ledger (qllm.kernel.tenants), once accepted
    events: asyncio.Queue | None = None  # token ids, then None when finished
    done: asyncio.Future | None = None

    # The spec's fields under the names the kernel and its views read.
    @property
    def params(self) -> SamplingParams:
        return self.spec.sampling

    @property
    def priority_class(self) -> PriorityClass:
        return self.spec.priority

    @property
    def priority(self) -> int:
        """Rank within the class: lower runs first."""
        return self.spec.rank

    @property
    def ttft_deadline(self) -> float | None:
        """Seconds after arrival."""
        return self.spec.ttft_deadline

    @property
    def tpot_slo(self) -> float | None:
        """Seconds per output token after the first it is served under (its own or its class's)."""
        return self.slo[1]

    @property
    def ttft_slo(self) -> float | None:
        """Seconds from arrival to first token it is served under (its own or its class's)."""
        return self.slo[0]

    @property
    def last_token(self) -> float | None:
        """When its latest token came (None: none yet)."""
        return self.token_times[-1] if self.token_times else None

    @property
    def client(self) -> str:
        """Who sent it; requests of one class are shared fairly between clients."""
        return self.spec.client

    @property
    def tenant(self) -> str:
        """Who it is served for (the ledger's name: ``default`` for a spec that names none)."""
        account = self.account
        return account.name if account is not None else self.spec.tenant or "default"

    @property
    def tenant_counter(self) -> float:
        """Its tenant's weighted service so far (the ledger's virtual counter; 0 before it is accepted)."""
        account = self.account
        return 0.0 if account is None else account.counter

    @property
    def tenant_live(self) -> int:
        """Requests of its tenant accepted and not finished, this one included (0 before it is accepted)."""
        account = self.account
        return 0 if account is None else account.live

    @property
    def pending(self) -> Op | Position | None:
        """What this request waits on: its pass's pending op, or its :attr:`position` in no pass."""
        group = self.group
        return self.position if group is None else group.pending_of(self.segment)

    @property
    def at_boundary(self) -> bool:
        """Its pending op starts a new forward pass (an iteration boundary)."""
        group = self.group
        if group is not None:
            return group.at_start
        return self.position is None or self.position.at_start

    @property
    def ops_done(self) -> int:
        group = self.group
        return self.ops_base + (0 if group is None else group.ops_run - self.joined_at)

    @property
    def rows(self) -> int:
        """Rows of its pending op that are its own (the new tokens of its forward pass)."""
        return 0 if self.forward is None else int(self.forward.token_ids.shape[0])

    def join(self, group: Pass | None, segment: Segment | None = None) -> None:
        """Move to pass ``group`` as its ``segment`` (None: out of any pass), keeping the count of ops run."""
        if self.group is not None:
            self.ops_base += self.group.ops_run - self.joined_at
        if group is not None:
            self.position = None  # the pass says where it stands
        self.group = group
        self.segment = segment
        self.joined_at = 0 if group is None else group.ops_run

    @property
    def phase(self) -> Phase:
        return Phase.PREFILL if not self.token_ids else Phase.DECODE

    @functools.cached_property
    def is_ls(self) -> bool:  # read at every decision for every request: the spec never changes
        return self.priority_class is PriorityClass.LS

    def sort_key(self) -> tuple[int, int, float, int]:
        """LS before BE, then integer priority, then arrival, then sequence number."""
        return (0 if self.is_ls else 1, self.priority, self.arrival, self.seq)
