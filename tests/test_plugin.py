"""Policy plugins through real entry points: the EDF example loads and orders by deadline; a plugin
that fails to load is a PolicyError naming it, and the kernel never sees it.

Each test installs a throwaway distribution (a ``*.dist-info`` folder with METADATA and
entry_points.txt) on ``sys.path``, which is how ``pip install`` makes a plugin visible.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from kernel_helpers import isolated

import qllm
from qllm.cli import main as cli
from qllm.errors import PolicyError
from qllm.policies import GROUP, available_policies, load_policy
from qllm.spec import SamplingParams

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def install(
    tmp_path: Path, monkeypatch, entry_points: dict[str, str], modules: dict[str, str] | None = None
) -> None:
    """Make a distribution declaring ``entry_points`` in group qllm.policies importable."""
    dist = tmp_path / "qllm_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: qllm-test-plugin\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}")
    for name, source in (modules or {}).items():
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.fixture
def edf(tmp_path, monkeypatch):
    shutil.copy(EXAMPLES / "edf_policy.py", tmp_path / "edf_policy.py")
    monkeypatch.delitem(sys.modules, "edf_policy", raising=False)
    install(tmp_path, monkeypatch, {"edf": "edf_policy:EDFPolicy"})
    yield
    sys.modules.pop("edf_policy", None)


def test_example_is_short():
    assert len((EXAMPLES / "edf_policy.py").read_text().splitlines()) < 50


def test_edf_plugin_loads_through_its_entry_point(edf, capsys):
    assert available_policies()["edf"].value == "edf_policy:EDFPolicy"
    policy = load_policy("edf")
    assert type(policy).__name__ == "EDFPolicy" and policy.name == "edf"
    assert type(policy).__module__ == "edf_policy"
    assert cli(["policies", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["policies"]}
    assert rows["edf"]["status"] == "ok" and rows["edf"]["target"] == "edf_policy:EDFPolicy"


async def first_token_order(model, policy: str, deadlines) -> list:
    """Deadlines in the order their requests got their first token (one op at a time)."""
    prompts = [[50 + i, 60 + i, 70 + i] for i in range(len(deadlines))]
    async with qllm.Engine(model=model, policy=policy, max_batch=1) as engine:
        assert engine.stats()["policy"] == policy
        handles = [
            engine.submit(p, max_tokens=2, priority="ls", ttft_deadline=d, ignore_eos=True)
            for p, d in zip(prompts, deadlines)
        ]
        results = [await h.result() for h in handles]
    for prompt, result in zip(prompts, results):
        ref = isolated(model, prompt, SamplingParams(max_tokens=2, ignore_eos=True), 128)
        assert result.token_ids == ref.token_ids
    return [d for d, _ in sorted(zip(deadlines, results), key=lambda p: p[1].first_token)]


async def test_edf_orders_first_tokens_by_deadline(edf, tiny):
    deadlines = (3.0, None, 1.0, 2.0, 0.5)
    assert await first_token_order(tiny, "edf", deadlines) == [0.5, 1.0, 2.0, 3.0, None]
    # The default policy ignores deadlines: arrival order.
    assert await first_token_order(tiny, "cohort", deadlines) == list(deadlines)


def test_plugin_that_fails_to_import_is_a_policy_error_naming_it(tmp_path, monkeypatch):
    install(
        tmp_path,
        monkeypatch,
        {
            "missing": "qllm_plugin_module_that_does_not_exist:Policy",
            "exploding": "exploding_policy:Policy",
            "not-a-policy": "json:dumps",
        },
        {"exploding_policy": "raise RuntimeError('exploded at import')\n"},
    )
    with pytest.raises(PolicyError, match="policy plugin 'missing' failed to load: No module named"):
        load_policy("missing")
    with pytest.raises(PolicyError, match="policy plugin 'exploding' failed to load: exploded at import"):
        load_policy("exploding")
    with pytest.raises(PolicyError, match=r"'not-a-policy' is not a qllm\.policies\.Policy"):
        load_policy("not-a-policy")
    with pytest.raises(PolicyError, match="'exploding'"):
        qllm.Engine(model="tiny", policy="exploding")
    # The built-ins are unaffected by a broken neighbour.
    assert load_policy("qllm").name == "qllm"


@pytest.fixture
def cwd_only(tmp_path, monkeypatch):
    """``tmp_path`` as the current directory and not on ``sys.path``, as for a ``qllm`` console
    script run there (its ``sys.path[0]`` is the script's directory, not the current one)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield tmp_path
    for name in ("edf_policy", "exploding_policy"):
        sys.modules.pop(name, None)


def test_module_class_plugin_is_found_in_the_current_directory(cwd_only):
    shutil.copy(EXAMPLES / "edf_policy.py", cwd_only / "edf_policy.py")
    sys.modules.pop("edf_policy", None)
    policy = load_policy("edf_policy:EDFPolicy")
    assert type(policy).__name__ == "EDFPolicy"
    assert Path(sys.modules["edf_policy"].__file__).parent == cwd_only


def test_module_class_plugin_not_found_says_how_to_make_it_importable(cwd_only):
    with pytest.raises(PolicyError) as err:
        load_policy("qllm_no_such_plugin:Policy")
    message = str(err.value)
    assert "'qllm_no_such_plugin:Policy'" in message and str(cwd_only) in message
    assert "PYTHONPATH" in message and "entry-point group 'qllm.policies'" in message
    (cwd_only / "edf_policy.py").write_text((EXAMPLES / "edf_policy.py").read_text())
    with pytest.raises(PolicyError, match=r"module 'edf_policy' .* has no attribute 'EDF'"):
        load_policy("edf_policy:EDF")


def test_module_class_plugin_that_raises_on_import_is_one_line_from_the_cli(cwd_only, capsys):
    (cwd_only / "exploding_policy.py").write_text("raise RuntimeError('exploded at import')\n")
    with pytest.raises(PolicyError, match="'exploding_policy:Policy' failed to load: exploded at import"):
        load_policy("exploding_policy:Policy")
    argv = ["serve", "--socket", str(cwd_only / "q.sock"), "--http-socket", "", "--log-level", "warning"]
    assert cli([*argv, "--policy", "exploding_policy:Policy"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "qllm serve: error: policy 'exploding_policy:Policy' failed to load: exploded at import"
    ]
