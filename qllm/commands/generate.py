"""``qllm generate``: generate text for one prompt, in process or through a running server."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import msgspec
import msgspec.inspect as mi

from qllm.spec import RequestSpec, build_spec, request_fields

DEFAULT_MODEL = "tiny"
DEFAULT_DTYPE = "float32"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate text for one prompt")
    p.add_argument("prompt", metavar="PROMPT", help="prompt text")
    p.add_argument(
        "--model", help=f"preset name or model directory (default: {DEFAULT_MODEL}; not with --socket)"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help=f"weights dtype (default {DEFAULT_DTYPE}; not with --socket)",
    )
    add_spec_options(p)
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template (instruct models)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    p.add_argument("--socket", metavar="PATH", help="generate through the `qllm serve` listening on PATH")
    return p


# One interactive request: latency-sensitive unless told otherwise (the class matters with --socket).
CLI_DEFAULTS = {"priority": "ls"}


def add_spec_options(parser: argparse.ArgumentParser) -> None:
    """One option per request-spec field (:func:`qllm.spec.request_fields`): ``--max-tokens`` for
    ``max_tokens``, its type, choices, default and help from the field. An option not given is
    left out of the namespace, so the spec's own default applies."""
    for field in request_fields():
        info, description = field.type, ""
        if isinstance(info, mi.Metadata):
            description = (info.extra_json_schema or {}).get("description", "")
            info = info.type
        if isinstance(info, mi.UnionType):  # X | None: the option gives an X
            info = next(t for t in info.types if not isinstance(t, mi.NoneType))
        default = CLI_DEFAULTS.get(field.name, field.default)
        options: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS}
        if isinstance(info, mi.BoolType):
            options["action"] = "store_true"
        elif isinstance(info, mi.VarTupleType | mi.ListType):
            options.update(action="append", type=_parse(info.item_type))
            description += " (repeatable)"
        elif isinstance(info, mi.EnumType | mi.LiteralType):
            values = [m.value for m in info.cls] if isinstance(info, mi.EnumType) else list(info.values)
            options["choices"] = values
        else:
            options["type"] = _parse(info)
        if not (default is None or default is False or default == ()):
            description += f" (default {default})"
        parser.add_argument("--" + field.name.replace("_", "-"), help=description.strip(), **options)


def _parse(info: mi.Type) -> Callable[[str], Any]:
    """How one command-line value of a field of type ``info`` is read: a scalar as itself, any
    other type as JSON (checked with the rest of the spec)."""
    scalars = {mi.IntType: int, mi.FloatType: float, mi.StrType: str}
    return scalars.get(type(info), msgspec.json.decode)


def spec_of(args: argparse.Namespace) -> RequestSpec:
    """The request spec the command line asks for (InvalidRequest, a ValueError, naming a bad field)."""
    given = {f.name: getattr(args, f.name) for f in request_fields() if hasattr(args, f.name)}
    return build_spec({**CLI_DEFAULTS, **given})


def run_remote(args: argparse.Namespace) -> int:
    """Generate through a running server, streaming the text as it comes (unless --json)."""
    from qllm.client import Client

    spec = spec_of(args)
    with Client(args.socket) as client:
        if args.json:
            result = client.generate(args.prompt, spec, chat=args.chat)
            print(
                json_result(
                    model=client.welcome.model,
                    token_ids=result.token_ids,
                    text=result.text,
                    status=result.status,
                    prompt_tokens=result.usage.prompt_tokens,
                    ttft_s=result.timings.ttft,
                    turnaround_s=result.timings.turnaround,
                    preemptions=result.preemptions,
                )
            )
            return 0
        with client.stream(args.prompt, spec, chat=args.chat) as stream:
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def json_result(
    *,
    model: str,
    token_ids: list[int],
    text: str,
    status: str,
    prompt_tokens: int,
    ttft_s: float | None,
    turnaround_s: float,
    preemptions: int,
) -> str:
    """What ``--json`` prints, in process and through a server alike: the model as named, the
    tokens and text, the final status (``stopped`` or ``length``), times in seconds and the
    decode rate after the first token."""
    return json.dumps(
        {
            "model": model,
            "token_ids": token_ids,
            "text": text,
            "status": status,
            "prompt_tokens": prompt_tokens,
            "ttft_s": None if ttft_s is None else round(ttft_s, 6),
            "turnaround_s": round(turnaround_s, 6),
            "tokens_per_s": _decode_rate(len(token_ids), ttft_s, turnaround_s),
            "preemptions": preemptions,
        }
    )


def _decode_rate(tokens: int, ttft: float | None, turnaround: float) -> float:
    """Tokens after the first per second of decode (0 when there is nothing to measure)."""
    if ttft is None or tokens < 2 or turnaround <= ttft:
        return 0.0
    return round((tokens - 1) / (turnaround - ttft), 3)


def run(args: argparse.Namespace) -> int:
    if args.socket:
        from qllm.errors import QllmError

        ignored = [flag for flag, value in (("--model", args.model), ("--dtype", args.dtype)) if value]
        if ignored:
            raise ValueError(
                f"{' and '.join(ignored)} cannot be used with --socket: the server at {args.socket} "
                f"answers with the model it serves; drop {' and '.join(ignored)}, or drop --socket "
                "to generate in process"
            )
        try:
            return run_remote(args)
        except QllmError as exc:
            print(f"qllm generate: error ({exc.code}): {exc}", file=sys.stderr)
            return 1
    from qllm.kernel.program import StopReason, generate
    from qllm.models import load_model

    params = spec_of(args).sampling  # checked before the model loads
    name = args.model or DEFAULT_MODEL
    model = load_model(name, dtype=args.dtype or DEFAULT_DTYPE, batch_invariant=False)
    result = generate(model, args.prompt, params, chat=args.chat)
    if args.json:
        print(
            json_result(
                model=str(name),
                token_ids=result.token_ids,
                text=result.text,
                status="stopped" if result.stop_reason == StopReason.STOP else "length",
                prompt_tokens=result.prompt_tokens,
                ttft_s=result.ttft_s,
                turnaround_s=result.total_s,
                preemptions=0,
            )
        )
    else:
        sys.stdout.write(result.text + "\n")
    return 0
