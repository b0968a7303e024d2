"""Supply-chain rules, checked on the source tree: no remote code, safetensors only, pinned models, bounded deps."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "components").rglob("*.py")) + sorted((REPO / "pipelines").rglob("*.py"))
HUB_LOADERS = {"AutoModelForCausalLM", "AutoTokenizer", "AutoConfig", "AutoModel"}


def _calls(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def test_sources_are_scanned():
    assert len(SOURCES) > 20 and any(p.name == "finetune.py" for p in SOURCES)
    loads = [c.func.value.id for p in SOURCES for c in _calls(p)
             if c.func.attr == "from_pretrained" and isinstance(c.func.value, ast.Name)]
    assert loads.count("AutoModelForCausalLM") >= 1 and loads.count("AutoTokenizer") >= 2  # the rule has work to do


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_hub_loads_never_run_remote_code_and_weights_are_safetensors(path):
    for call in _calls(path):
        if call.func.attr != "from_pretrained" or not isinstance(call.func.value, ast.Name):
            continue
        owner = call.func.value.id
        if owner not in HUB_LOADERS:
            continue
        where = f"{path.relative_to(REPO)}:{call.lineno}"
        remote = _keyword(call, "trust_remote_code")
        assert isinstance(remote, ast.Constant) and remote.value is False, f"{where}: pass trust_remote_code=False"
        if owner.startswith("AutoModel"):
            safe = _keyword(call, "use_safetensors")
            assert isinstance(safe, ast.Constant) and safe.value is True, f"{where}: pass use_safetensors=True"


def test_no_source_enables_remote_code():
    offenders = [str(p) for p in SOURCES if re.search(r"trust_remote_code\s*=\s*True", p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_every_dependency_has_an_upper_bound():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    unbounded = [r for r in requirements if not re.search(r"(<|==|~=)", r)]
    assert unbounded == []


def test_the_cpu_constraint_pins_torch():
    assert re.search(r"^torch==\d+\.\d+\.\d+$", (REPO / "constraints" / "cpu.txt").read_text(), re.M)


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_pin_hub_models(config):
    from ftloop.components.config import load_config

    model = load_config(config).model
    if not model.name_or_path.startswith(("builtin:", "/")):
        assert re.fullmatch(r"[0-9a-f]{40}", model.revision or ""), f"{config.name}: pin model.revision to a commit"
