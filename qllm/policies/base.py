"""The policy base class under the import path of API version 1 plugins
(``from qllm.policies.base import Policy, batch_for``); :mod:`qllm.policies.api` defines them."""

from qllm.policies.api import API_VERSION, Policy, batch_for

__all__ = ["API_VERSION", "Policy", "batch_for"]
