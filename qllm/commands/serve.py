"""``qllm serve``: run the server on a Unix socket (settings: TOML file, then these options)."""

from __future__ import annotations

import argparse

from qllm.kernel.config import parse_slo, parse_tenant


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="serve a model on a Unix socket (native protocol and OpenAI-compatible HTTP)",
        description="Serve a model on a Unix socket. Settings come from --config FILE (else "
        "/etc/qllm/qllm.toml when present); options given here override the file.",
    )
    p.add_argument(
        "--config", metavar="FILE", help="TOML settings file (default /etc/qllm/qllm.toml if present)"
    )
    p.add_argument("--model", help="preset name or model directory (default tiny)")
    p.add_argument(
        "--policy",
        help="scheduling policy name or module:Class, options after it as :key=value "
        "(e.g. cohort:stretch=2; default cohort)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights dtype (default float32)")
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument(
        "--memory-budget", type=int, metavar="BYTES", help="resident request state before offloading"
    )
    p.add_argument("--max-batch", type=int, metavar="N", help="most requests in one batched op (default 32)")
    p.add_argument(
        "--moe-granularity",
        choices=["layer", "expert"],
        help="a MoE layer as one grouped op that stops between experts when a request arrives "
        "(layer, the default) or as one op per expert (expert)",
    )
    p.add_argument(
        "--kv-block-size",
        type=int,
        metavar="TOKENS",
        help="keep keys and values in blocks of this many tokens from one shared pool, counted, "
        "offloaded and restored block by block (default: a growable buffer per request and layer)",
    )
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_const",
        const=False,
        help="compute every prompt in full instead of sharing cached prefixes between requests "
        "(prefix caching is on with --kv-block-size, for models whose state is per-token KV)",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch intra-op threads (default: torch's, one per core); "
        "1 avoids OpenMP contention on a busy small machine",
    )
    p.add_argument(
        "--expert-parallel",
        type=int,
        metavar="N",
        help="split the routed experts across N ranks: N-1 worker processes on this machine, or "
        "the processes torchrun started (docs/scaling.md; default 1, one process)",
    )
    p.add_argument(
        "--expert-placement",
        choices=["contiguous", "round-robin"],
        help="experts to ranks in contiguous runs (default) or expert e on rank e %% N",
    )
    p.add_argument(
        "--expert-timeout",
        type=float,
        metavar="SECONDS",
        help="a rank that does not answer within this long fails its requests and makes the "
        "server unhealthy (default 30)",
    )
    p.add_argument(
        "--slo",
        metavar="CLASS:FIGURE=SECONDS,...",
        help="per-class SLOs, e.g. 'ls:ttft=0.5,tpot=0.1;be:tpot=1' (TTFT: arrival to first token; "
        "TPOT: time per output token after the first; default for LS: 10 and 2 single-request "
        "decode steps; a request's ttft_deadline and tpot_slo win)",
    )
    p.add_argument(
        "--tenant",
        dest="tenants",
        action="append",
        metavar="NAME=WEIGHT[:live=N][:kv=BYTES]",
        help="a tenant's weight and quotas (repeatable), e.g. 'team-a=2:live=8'; unnamed tenants get "
        "weight 1 (docs/tenants.md)",
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="socket path (default $XDG_RUNTIME_DIR/qllm.sock, /run/qllm under systemd or for root, else "
        "/tmp/qllm-$UID/qllm.sock; a default directory must be ours and not writable by others)",
    )
    p.add_argument(
        "--http-socket",
        metavar="PATH",
        help="Unix socket of the OpenAI-compatible HTTP API (default qllm-http.sock beside --socket; '' for none)",
    )
    p.add_argument(
        "--http-listen",
        metavar="HOST:PORT",
        help="also serve HTTP on TCP (':PORT' for loopback); off by default",
    )
    p.add_argument("--socket-mode", metavar="OCTAL", help="socket file permissions (default 0660)")
    p.add_argument("--socket-group", metavar="GROUP", help="group owning the socket file")
    p.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        metavar="UID",
        help="only these uids may connect (repeatable)",
    )
    p.add_argument(
        "--allow-gid",
        type=int,
        action="append",
        metavar="GID",
        help="only these gids may connect (repeatable)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM, wait this long for live requests (default 30)",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    p.add_argument(
        "--log-format", choices=["auto", "json", "console"], help="default auto: JSON unless on a TTY"
    )
    return p


# The command-line option of each setting it overrides, by section of the config file.
OPTIONS = {
    "engine": {
        key: "--" + key.replace("_", "-")
        for key in (
            "model", "policy", "dtype", "device", "memory_budget", "max_batch", "moe_granularity",
            "kv_block_size", "threads", "slo", "expert_parallel", "expert_placement", "expert_timeout",
        )
    } | {"tenants": "--tenant", "prefix_cache": "--no-prefix-cache"},
    "server": {
        "socket": "--socket",
        "http_socket": "--http-socket",
        "http_listen": "--http-listen",
        "socket_mode": "--socket-mode",
        "socket_group": "--socket-group",
        "allow_uids": "--allow-uid",
        "allow_gids": "--allow-gid",
        "drain_timeout": "--drain-timeout",
    },
    "log": {"level": "--log-level", "format": "--log-format"},
}  # fmt: skip


def overrides(args: argparse.Namespace) -> dict:
    """The options given on the command line, nested like the config file."""
    # An engine setting is its option's destination (--no-prefix-cache stores prefix_cache=False).
    given = {
        section: {
            key: getattr(args, key if section == "engine" else option[2:].replace("-", "_"))
            for key, option in keys.items()
        }
        for section, keys in OPTIONS.items()
    }
    if given["engine"]["slo"]:
        given["engine"]["slo"] = parse_slo(given["engine"]["slo"])
    if given["engine"]["tenants"]:
        given["engine"]["tenants"] = dict(map(parse_tenant, given["engine"]["tenants"]))
    return given


def run(args: argparse.Namespace) -> int:
    from qllm.logging import configure
    from qllm.server.app import run as run_server
    from qllm.server.config import load_config

    config = load_config(args.config, overrides(args), OPTIONS)
    configure(config.log.level, config.log.format)
    worker = worker_rank(config.engine)
    if worker is not None:  # a rank after the first under torchrun: serves rank 0's experts
        from qllm.parallel.ranks import rank_spec
        from qllm.parallel.worker import serve_rank

        rank, world = worker
        return serve_rank(
            rank_spec(config.engine, config.engine.model, config.engine.device or "cpu"), rank, world
        )
    return run_server(config)


def worker_rank(engine) -> tuple[int, int] | None:
    """``(rank, world size)`` when torchrun started this process as a rank other than 0 of an
    expert-parallel server (rank 0 serves); None otherwise. ValueError when the launch does not
    match ``expert_parallel``."""
    # qllm.parallel reads the environment without importing torch: a thread torch starts before
    # the server blocks its signals would take a SIGTERM meant for the load.
    from qllm.parallel import torchrun_env

    launched = torchrun_env()
    if launched is None or launched[0] == 0:
        return None
    _, world = launched
    if world != engine.expert_parallel:
        raise ValueError(
            f"torchrun started {world} processes but --expert-parallel is {engine.expert_parallel}: "
            "start one process per rank"
        )
    return launched
