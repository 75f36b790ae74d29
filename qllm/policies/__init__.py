"""Scheduling policies: the plugin interface and the loader.

Policies are found through the entry-point group ``qllm.policies`` (built-in ones included), or
given as ``"module:Class"``, a :class:`Policy` subclass or an instance. A spec string may end in
options for the policy's constructor, each ``:key=value`` (``"cohort:stretch=2"``,
``"mypkg.sched:Edf:slack_s=0.2:strict=true"``): values are read as Python literals (numbers,
``true``/``false``, quoted or bare strings).
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import inspect
import os
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from qllm.errors import PolicyError
from qllm.policies.api import API_VERSION, Policy

GROUP = "qllm.policies"
DEFAULT_POLICY = "cohort"


def available_policies() -> dict[str, EntryPoint]:
    """Registered policies by name (entry-point group ``qllm.policies``)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _instantiate(obj: Any, origin: str, options: dict[str, Any] | None = None) -> Policy:
    if isinstance(obj, Policy) and not options:
        policy = obj
    elif isinstance(obj, type) and issubclass(obj, Policy):
        _check_options(obj, origin, options or {})
        try:
            policy = obj(**(options or {}))
        except Exception as exc:
            raise PolicyError(f"policy {origin} failed to initialise: {exc}") from exc
    elif isinstance(obj, Policy):
        raise PolicyError(f"policy {origin} is an instance: it takes no options")
    else:
        raise PolicyError(f"policy {origin} is not a qllm.policies.Policy subclass or instance")
    if getattr(policy, "api_version", None) != API_VERSION:
        raise PolicyError(
            f"policy {origin} targets policy API version {getattr(policy, 'api_version', None)}; "
            f"this qllm speaks version {API_VERSION}"
        )
    return policy


def _check_options(cls: type[Policy], origin: str, options: dict[str, Any]) -> None:
    """Options the constructor of ``cls`` does not take are named, with those it does."""
    if not options:
        return
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to check against: the call will tell
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    takes = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise PolicyError(
            f"policy {origin} has no option {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(takes) or 'none'}"
        )


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value:..."`` (or ``"module:Class:key=value:..."``) as the policy reference and
    its options."""
    parts = spec.split(":")
    ref = [p for p in parts if "=" not in p]
    opts = [p for p in parts if "=" in p]
    if not ref or not ref[0] or len(ref) > 2 or parts[: len(ref)] != ref:
        raise PolicyError(f"bad policy spec {spec!r}: use NAME or module:Class, then :key=value options")
    options: dict[str, Any] = {}
    for item in opts:
        key, _, text = item.partition("=")
        key = key.strip()
        if not key.isidentifier() or key in options:
            raise PolicyError(f"bad policy option {item!r} in {spec!r}")
        options[key] = _literal(text.strip())
    return ":".join(ref), options


def _literal(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string


def _import_object(ref: str) -> Any:
    """The object ``"module:attr"`` names. A module that is not on ``sys.path`` is looked for in
    the current directory, as ``python -m`` would find it (a ``qllm`` console script would not)."""
    module_name, _, attr = ref.partition(":")
    top = module_name.partition(".")[0]
    try:
        module = _import_from_path_or_cwd(module_name, top)
    except ModuleNotFoundError as exc:
        if exc.name is None or top != exc.name.partition(".")[0]:
            raise PolicyError(f"policy {ref!r} failed to load: {exc}") from exc
        raise PolicyError(
            f"cannot import policy {ref!r}: no module {top!r} on the Python path or in the "
            f"current directory ({os.getcwd()}); run qllm from the directory that holds "
            f"{top}.py, add that directory to PYTHONPATH, or install the plugin as a package "
            f"that declares it under the entry-point group {GROUP!r}"
        ) from exc
    except Exception as exc:  # a plugin that raises on import: the same clean error as by name
        raise PolicyError(f"policy {ref!r} failed to load: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise PolicyError(
            f"cannot import policy {ref!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
            f"has no attribute {attr!r}"
        ) from None


def _import_from_path_or_cwd(module_name: str, top: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        missing_top = exc.name == top
        if not missing_top or importlib.machinery.PathFinder.find_spec(top, [cwd]) is None:
            raise
    sys.path.append(cwd)  # after everything installed: a local file never shadows a package
    return importlib.import_module(module_name)


def load_policy(spec: str | type[Policy] | Policy | None = None) -> Policy:
    """A policy instance from a registered name, ``"module:Class"`` (either with ``:key=value``
    options for its constructor), a class or an instance."""
    spec = DEFAULT_POLICY if spec is None else spec
    if not isinstance(spec, str):
        return _instantiate(spec, repr(spec))
    ref, options = parse_spec(spec)
    if ":" in ref:
        return _instantiate(_import_object(ref), repr(spec), options)
    registered = available_policies()
    if ref not in registered:
        raise PolicyError(
            f"unknown policy {ref!r}; available: {', '.join(sorted(registered))} or module:Class"
        )
    try:
        obj = registered[ref].load()
    except Exception as exc:  # a broken plugin must not take the server down with an odd error
        raise PolicyError(f"policy plugin {ref!r} failed to load: {exc}") from exc
    return _instantiate(obj, repr(spec), options)


__all__ = [
    "API_VERSION",
    "DEFAULT_POLICY",
    "GROUP",
    "Policy",
    "available_policies",
    "load_policy",
    "parse_spec",
]
