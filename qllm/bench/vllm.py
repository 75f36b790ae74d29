"""vLLM as a peer of the workload bench: ``vllm serve`` on the same model, driven over its OpenAI API.

vLLM pins its own torch and transformers, so it runs from its own interpreter (``make peers`` builds
``.venv-peers``; ``--vllm-python PATH`` or ``QLLM_VLLM_PYTHON`` names another). The model is
written to a directory with ``save_pretrained`` (a preset lives only in memory), and
``vllm serve DIR`` listens on a free loopback port until :meth:`VllmSystem.close` stops it
(SIGTERM, then SIGKILL to its process group after a grace period); a finalizer does the same if
the bench fails before it closes its systems.

Settings, so that both systems do comparable work on identical inputs:

- ``--scheduling-policy priority``; LS requests have priority 0 and BE 1 (lower runs first).
- ``--max-num-seqs`` is the bench's max batch; ``--max-num-batched-tokens`` is max batch plus the
  prefill chunk, qllm's token budget per step (chunked prefill, as qllm prefills).
- ``--dtype`` is the model's (float32 for the presets), not vLLM's half-precision default.
- ``--no-enable-prefix-caching``: qllm has no prefix cache, and the yardsticks replay the same LS
  request several times, which a prefix cache would answer from memory.
- ``--kv-cache-memory-bytes`` holds max batch requests of the longest length with 25% to spare,
  so vLLM never preempts for want of KV cache (``VLLM_CPU_KVCACHE_SPACE`` is the older, GiB-only
  form of the same setting).
- ``--max-model-len`` is the bench's longest request (prompt cap plus output cap).
- ``--generation-config vllm``: no sampling defaults from the model's generation config; each
  request asks for greedy decoding (``temperature`` 0) and ``ignore_eos``, so it produces exactly
  its output length, as qllm's requests do.
- Prompts go as token ids, the ids qllm gets; ``return_token_ids`` streams each output token's id,
  so every token is timed even where it decodes to no text (the random presets' ids past the
  tokenizer's 512).
- vLLM compiles its model (``torch.compile``), its default and its faster path; ``eager=True``
  (``--enforce-eager``) skips the minutes of compilation when only correctness matters.
- On CPU, the worker's OpenMP threads are bound to every CPU this process may use
  (``VLLM_CPU_OMP_THREADS_BIND``; vLLM's own default keeps one core for its scheduler process,
  half of a 2-core machine) unless the environment sets it. The server inherits the rest of the
  environment, so both systems run under the same OpenMP wait policy.

Times are taken on this side of the socket, wire included, as for :class:`qllm.bench.systems.HttpSystem`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qllm.bench.peer_process import PeerFailed, PeerProcess, PeerUnavailable
from qllm.bench.stats import Record
from qllm.bench.systems import OnDone, completion_record, replay
from qllm.bench.trace import Item
from qllm.paths import free_port

if TYPE_CHECKING:
    import httpx

    from qllm.models import MoEModel

PRIORITY = {"ls": 0, "be": 1}
"""vLLM priority of each class: lower is served first."""
STARTUP_TIMEOUT_S = 1800.0
"""How long ``vllm serve`` may take to answer /health: loading and compiling a model on 2 cores
takes minutes (about 5 for small-random, the first time; compiled graphs are cached after)."""
KV_SPARE = 1.25
"""KV cache room over max batch requests of the longest length."""
KV_BLOCK = 128
"""Tokens per KV block on vLLM's CPU backend: each request holds whole blocks."""
SERVED_NAME = "qllm-bench"
VLLM_PYTHON_ENV = "QLLM_VLLM_PYTHON"
PEERS_PYTHON = Path(".venv-peers", "bin", "python")
"""The interpreter ``make peers`` builds, in the working directory or in qllm's checkout."""
MISSING_METADATA = "No package metadata was found for vllm"


class VllmSystem:
    """``vllm serve`` with the priority scheduler, as a bench system (see the module doc)."""

    kind = "peer"
    policy = "priority"
    name = "vllm"

    def __init__(self, process: PeerProcess, client: httpx.AsyncClient, settings: dict[str, Any]):
        self.process = process
        self.client = client
        self.settings = settings

    @classmethod
    async def start(
        cls,
        model: MoEModel,
        *,
        max_batch: int,
        prefill_chunk: int,
        max_len: int,
        python: str | None = None,
        eager: bool = False,
        model_dir: str | Path | None = None,
    ) -> VllmSystem:
        """Save ``model`` (unless ``model_dir`` already holds it), start ``vllm serve`` on it and
        wait until it answers. Raises :class:`PeerFailed` with the server's last log lines when it
        does not come up; nothing is left running then."""
        import httpx

        interpreter = vllm_python(python)
        args = serve_args(
            model, max_batch=max_batch, prefill_chunk=prefill_chunk, max_len=max_len, eager=eager
        )
        work = Path(tempfile.mkdtemp(prefix="qllm-vllm-"))
        process: PeerProcess | None = None
        client: httpx.AsyncClient | None = None
        try:
            if model_dir is None:
                model_dir = work / "model"
                await asyncio.to_thread(save_model, model, model_dir)
            port = free_port()
            argv = [str(interpreter), "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir), *args]
            argv += ["--host", "127.0.0.1", "--port", str(port)]
            process = PeerProcess.start(argv, env=server_env(), log=work / "server.log", workdir=work)
            client = httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                timeout=None,  # a request waits for its whole output
                limits=httpx.Limits(
                    max_connections=None, max_keepalive_connections=None
                ),  # no client-side queue
            )
            await _ready(process, client)
            version = (await client.get("/version")).json().get("version")
        except BaseException:
            if client is not None:
                await client.aclose()
            if process is not None:
                await process.stop()  # removes ``work`` too
            else:
                shutil.rmtree(work, ignore_errors=True)
            raise
        settings = {"vllm": version, "python": str(interpreter), "args": args, "env": _bind_env()}
        return cls(process, client, settings)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "policy": self.policy, **self.settings}

    async def run(
        self,
        items: Sequence[Item],
        *,
        slo_s: float | None = None,
        timeout: float | None = None,
        on_done: OnDone = None,
    ) -> list[Record]:
        """Replay ``items``; ``slo_s`` is not passed on (vLLM takes no deadline)."""

        async def submit(item: Item, t0: float):
            box: dict[str, Any] = {}  # holds the response once it streams, for a cancel
            return box, self._one(item, time.monotonic(), t0, box)

        async def cancel(box: dict[str, Any]) -> None:
            box["cancelled"] = True
            if "response" in box:
                await box["response"].aclose()  # vLLM aborts a request whose client left

        try:
            _, records = await replay(items, time.monotonic, submit, cancel, timeout, on_done)
        except* PeerFailed as group:
            raise group.exceptions[0] from None  # the server's failure, not the task group's wrapper
        return records

    async def quiesce(self) -> float:
        """Wait until the server's processes stop spinning after its last request (at most
        seconds: qllm/bench/peer_process.py), so that the next system measured has the machine;
        returns the seconds waited."""
        return await self.process.quiesce()

    async def _one(self, item: Item, arrival: float, t0: float, box: dict[str, Any]) -> Record:
        import httpx

        body = {
            "model": SERVED_NAME,
            "prompt": item.prompt if isinstance(item.prompt, str) else list(item.prompt or ()),
            "max_tokens": item.output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "priority": PRIORITY[item.cls],
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        token_times: list[float] = []  # one entry per output token
        usage = None
        finish = None
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as response:
                box["response"] = response
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")
                    raise PeerFailed(f"vllm refused a request ({response.status_code}): {detail}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    usage = event.get("usage") or usage
                    now = time.monotonic()
                    for choice in event.get("choices", ()):
                        token_times += [now] * len(choice.get("token_ids") or ())
                        finish = choice.get("finish_reason") or finish
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if not box.get("cancelled"):
                raise PeerFailed(f"vllm stopped answering ({exc!r}){self.process.log_tail()}") from exc
        return completion_record(item, arrival, t0, token_times, usage, finish)

    async def close(self) -> None:
        try:
            await self.client.aclose()
        finally:
            await self.process.stop()


connect = VllmSystem.start
"""The bench's factory (``python`` is ``--vllm-python``)."""


async def _ready(process: PeerProcess, client: httpx.AsyncClient) -> None:
    try:
        await process.wait_ready(client, "/health", STARTUP_TIMEOUT_S)
    except PeerFailed as exc:
        if MISSING_METADATA not in process.log_text():
            raise
        raise PeerFailed(
            f"{exc}\nvllm-cpu installs no `vllm` distribution, which vllm's CLI asks for: "
            "`make peers` adds a metadata alias of that name (see the Makefile)"
        ) from None


def vllm_python(explicit: str | None = None) -> Path:
    """The interpreter that runs vLLM: ``explicit`` (``--vllm-python``), else ``$QLLM_VLLM_PYTHON``,
    else ``.venv-peers/bin/python`` of the working directory or of qllm's checkout. Raises
    :class:`PeerUnavailable`, saying what to do, when it is missing or cannot import vllm."""
    if explicit:
        given, source = explicit, "--vllm-python"
    elif os.environ.get(VLLM_PYTHON_ENV):
        given, source = os.environ[VLLM_PYTHON_ENV], VLLM_PYTHON_ENV
    else:
        checkout = Path(__file__).resolve().parents[2]
        found = next((p for p in (Path.cwd() / PEERS_PYTHON, checkout / PEERS_PYTHON) if p.is_file()), None)
        if found is None:
            raise PeerUnavailable(
                "no interpreter for vLLM: build .venv-peers with `make peers` (in qllm's checkout), or "
                f"name the python of a venv that has vllm with --vllm-python PATH or {VLLM_PYTHON_ENV}"
            )
        given, source = str(found), str(PEERS_PYTHON)
    path = Path(given).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise PeerUnavailable(
            f"{source} {given!r} is not an executable file: build .venv-peers with `make peers`, "
            "or point it at the python of a venv that has vllm"
        )
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        found_vllm = (
            subprocess.run([str(path), "-c", probe], capture_output=True, timeout=120).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerUnavailable(f"{source} {given!r} does not run ({exc})") from None
    if not found_vllm:
        raise PeerUnavailable(
            f"{source} {given!r} cannot import vllm: install it there (`make peers` builds .venv-peers with it)"
        )
    return path


def save_model(model: MoEModel, path: Path) -> None:
    """``model``'s Hugging Face module and tokenizer as a directory ``vllm serve`` loads."""
    model.hf.save_pretrained(path)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(path)


def serve_args(
    model: MoEModel, *, max_batch: int, prefill_chunk: int, max_len: int, eager: bool
) -> list[str]:
    """The ``vllm serve`` options of the module doc, for ``model``'s shapes and dtype."""
    if max_batch < 1 or prefill_chunk < 1 or max_len < 1:
        raise ValueError("max_batch, prefill_chunk and max_len must be >= 1")
    dtype = str(model.dtype).removeprefix("torch.")
    args = [
        "--served-model-name", SERVED_NAME,
        "--dtype", dtype,
        "--max-model-len", str(max_len),
        "--max-num-seqs", str(max_batch),
        "--max-num-batched-tokens", str(max_batch + prefill_chunk),
        "--scheduling-policy", "priority",
        "--no-enable-prefix-caching",
        "--kv-cache-memory-bytes", str(kv_cache_bytes(model, max_batch=max_batch, max_len=max_len)),
        "--generation-config", "vllm",
        "--disable-uvicorn-access-log",
        "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    if model.tokenizer is None:
        args.append("--skip-tokenizer-init")
    if eager:
        args.append("--enforce-eager")
    return args


def kv_cache_bytes(model: MoEModel, *, max_batch: int, max_len: int) -> int:
    """Bytes of K and V for ``max_batch`` requests of ``max_len`` tokens in whole blocks, with
    :data:`KV_SPARE` room (standard attention: every layer keeps K and V of its KV heads)."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize
    blocks = math.ceil(KV_SPARE * max_batch * math.ceil(max_len / KV_BLOCK))
    return (blocks + 1) * KV_BLOCK * per_token


def server_env() -> dict[str, str]:
    """This process's environment for the server, without what points Python at qllm's venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update({"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
    env.update(_bind_env())
    return env


def _bind_env() -> dict[str, str]:
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {"VLLM_CPU_OMP_THREADS_BIND": os.environ["VLLM_CPU_OMP_THREADS_BIND"]}
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus))}


__all__ = [
    "PRIORITY",
    "PeerFailed",
    "PeerUnavailable",
    "VllmSystem",
    "connect",
    "kv_cache_bytes",
    "save_model",
    "serve_args",
    "vllm_python",
]
