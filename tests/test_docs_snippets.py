"""The runnable snippets of the README and docs/ run as written, against `tiny`.

A fenced block right after a ``<!-- runnable -->`` line is one snippet. ``sh`` snippets run in
bash (stopping at the first failing command) with ``.venv/bin/`` and a leading ``qllm`` meaning
this interpreter's ``qllm``; ``python`` snippets run in a fresh interpreter, where top-level
``await`` and ``async with`` work as in ``python -m asyncio``. Every snippet talks to one
``qllm serve --model tiny`` started by the test: the socket paths the docs use mean its sockets,
and a line that starts a server itself (``qllm serve ... &``) is left out, since that server
stands in for it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from serving import serve_process

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NATIVE = ("/tmp/qllm.sock", "/tmp/q/qllm.sock", "/run/qllm/qllm.sock")
HTTP = ("/tmp/qllm-http.sock", "/tmp/q/qllm-http.sock")
RUN_PYTHON = """
import ast, asyncio, sys
code = compile(sys.stdin.read(), "<snippet>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
result = eval(code, {"__name__": "__main__"})
if asyncio.iscoroutine(result):
    asyncio.run(result)
"""


def snippets() -> list:
    found = []
    for page in PAGES:
        text = page.read_text()
        for n, match in enumerate(re.finditer(r"<!-- runnable -->\n```(\w+)\n(.*?)\n```", text, re.S)):
            lang, code = match.groups()
            found.append(pytest.param(lang, code, id=f"{page.relative_to(ROOT)}-{n}"))
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve_process(tmp_path_factory.mktemp("docs")) as running:
        yield running


def localize(code: str, native: Path, http: Path) -> str:
    for path in NATIVE:
        code = code.replace(path, str(native))
    for path in HTTP:
        code = code.replace(path, str(http))
    return code


def test_the_docs_have_runnable_snippets():
    langs = [p.values[0] for p in snippets()]
    assert langs.count("sh") >= 3 and langs.count("python") >= 4


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("lang", "code"), snippets())
def test_snippet_runs(lang, code, server, tmp_path):
    code = localize(code, server.path, server.path.parent / "qllm-http.sock")
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "QLLM_SOCKET": str(server.path),
    }
    if lang == "sh":
        lines = [
            line.replace(".venv/bin/", f"{bin_dir}/")
            for line in code.splitlines()
            if not re.match(r"\s*(\.venv/bin/)?qllm serve\b", line)
        ]
        argv, stdin = ["bash", "-e", "-o", "pipefail", "-c", "\n".join(lines)], None
    elif lang == "python":
        argv, stdin = [sys.executable, "-c", RUN_PYTHON], code
    else:
        pytest.fail(f"no runner for {lang} snippets")

    done = subprocess.run(
        argv, input=stdin, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500
    )

    assert done.returncode == 0, (
        f"{lang} snippet failed:\n{code}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )


def documented_metrics() -> set[str]:
    text = (ROOT / "docs" / "metrics.md").read_text()
    names = set()
    for line in text.splitlines():
        if line.startswith("| `qllm_"):
            names.update(re.findall(r"`(qllm_[a-z_]+)`", line.split("|")[1]))
    return names


def test_every_metric_the_server_exposes_is_in_the_metrics_reference(server):
    from prometheus_client.parser import text_string_to_metric_families

    from qllm.client import Client

    with Client(server.path) as client:
        client.generate("Hello", max_tokens=2, priority="ls")
        client.generate("Hello", max_tokens=2)
    exposed = subprocess.run(
        [sys.executable, "-m", "qllm", "stats", "--socket", str(server.path), "--prometheus"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(exposed)
    }

    assert names and names <= documented_metrics(), names - documented_metrics()
