"""What answers for a policy whose method raised."""

from __future__ import annotations

from collections.abc import Sequence

from qllm.policies.api import KernelView, Policy, RequestView


class Fallback(Policy):
    """Answers for a failing policy: the decisions of ``default`` (the registered built-in, since a
    subclass that kept its name may be what fails), and the base answers of the hooks that only
    save work: :meth:`steady` False and :meth:`interrupts` True. Those two promise what the policy
    itself would choose next, which nobody else can promise for it; so a policy whose hook fails
    is asked at every op and sees every arrival."""

    def __init__(self, default: Policy):
        self.default = default
        self.name = default.name

    def order(self, ready: Sequence[RequestView], kernel: KernelView) -> list[RequestView]:
        return self.default.order(ready, kernel)

    def select(self, kernel: KernelView) -> Sequence[RequestView]:
        return self.default.select(kernel)

    def precedence(self, request: RequestView) -> tuple:
        return self.default.precedence(request)

    def admit(self, request: RequestView, kernel: KernelView) -> bool:
        return self.default.admit(request, kernel)

    def on_arrival(self, request: RequestView, kernel: KernelView) -> None:
        self.default.on_arrival(request, kernel)

    def on_finish(self, request: RequestView, kernel: KernelView) -> None:
        self.default.on_finish(request, kernel)
