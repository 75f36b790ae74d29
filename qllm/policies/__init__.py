"""Scheduling policies: the plugin interface and the loader.

Policies are found through the entry-point group ``qllm.policies`` (built-in ones included), or
given as ``"module:Class"``, a :class:`Policy` subclass or an instance.
"""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from qllm.errors import PolicyError
from qllm.policies.base import API_VERSION, Policy

GROUP = "qllm.policies"
DEFAULT_POLICY = "cohort"


def available_policies() -> dict[str, EntryPoint]:
    """Registered policies by name (entry-point group ``qllm.policies``)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _instantiate(obj: Any, origin: str) -> Policy:
    if isinstance(obj, Policy):
        policy = obj
    elif isinstance(obj, type) and issubclass(obj, Policy):
        try:
            policy = obj()
        except Exception as exc:
            raise PolicyError(f"policy {origin} failed to initialise: {exc}") from exc
    else:
        raise PolicyError(f"policy {origin} is not a qllm.policies.Policy subclass or instance")
    if getattr(policy, "api_version", None) != API_VERSION:
        raise PolicyError(
            f"policy {origin} targets policy API version {getattr(policy, 'api_version', None)}; "
            f"this qllm speaks version {API_VERSION}"
        )
    return policy


def load_policy(spec: str | type[Policy] | Policy | None = None) -> Policy:
    """A policy instance from a registered name, ``"module:Class"``, a class or an instance."""
    spec = DEFAULT_POLICY if spec is None else spec
    if not isinstance(spec, str):
        return _instantiate(spec, repr(spec))
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise PolicyError(f"cannot import policy {spec!r}: {exc}") from exc
        return _instantiate(obj, repr(spec))
    registered = available_policies()
    if spec not in registered:
        raise PolicyError(
            f"unknown policy {spec!r}; available: {', '.join(sorted(registered))} or module:Class"
        )
    try:
        obj = registered[spec].load()
    except Exception as exc:  # a broken plugin must not take the server down with an odd error
        raise PolicyError(f"policy plugin {spec!r} failed to load: {exc}") from exc
    return _instantiate(obj, repr(spec))


__all__ = ["API_VERSION", "DEFAULT_POLICY", "GROUP", "Policy", "available_policies", "load_policy"]
