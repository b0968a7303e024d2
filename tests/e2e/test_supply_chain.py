"""Supply-chain rules, checked on the source tree: no remote code, safetensors only, pinned models, bounded deps."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = sorted((REPO / "components").rglob("*.py")) + sorted((REPO / "pipelines").rglob("*.py"))
BENCH = sorted((REPO / "bench").rglob("*.py"))
SOURCES = PACKAGE + BENCH
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
    assert any(p.name == "train_speed.py" for p in BENCH)
    loads = [c.func.value.id for p in SOURCES for c in _calls(p) if c.func.attr == "from_pretrained" and isinstance(c.func.value, ast.Name)]
    assert loads.count("AutoModelForCausalLM") >= 2 and loads.count("AutoTokenizer") >= 2  # the rule has work to do
    assert loads.count("PeftModel") >= 2  # evaluation and the merged export


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
        if path in PACKAGE:  # said explicitly in the package; the benchmarks may rely on the default (False)
            assert isinstance(remote, ast.Constant) and remote.value is False, f"{where}: pass trust_remote_code=False"
        else:
            assert remote is None or (isinstance(remote, ast.Constant) and remote.value is False), f"{where}: no remote code"
        if owner.startswith("AutoModel"):
            safe = _keyword(call, "use_safetensors")
            assert isinstance(safe, ast.Constant) and safe.value is True, f"{where}: pass use_safetensors=True"


def _functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_adapter_loads_check_for_safetensors_first(path):
    """PeftModel.from_pretrained has no use_safetensors switch: it falls back to a pickled
    adapter_model.bin. Every call must come after check_adapter_dir in the same function."""
    for function in _functions(path):
        calls = [n for n in ast.walk(function) if isinstance(n, ast.Call)]
        checks = [c.lineno for c in calls if _called_name(c) == "check_adapter_dir"]
        for call in calls:
            func = call.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "from_pretrained"
                and isinstance(func.value, ast.Name)
                and func.value.id == "PeftModel"
            ):
                where = f"{path.relative_to(REPO)}:{call.lineno}"
                assert any(line < call.lineno for line in checks), f"{where}: call check_adapter_dir(dir) before loading"


def _adapter_dir(tmp_path: Path, *weights: str) -> Path:
    import json

    adapter = tmp_path / "model"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "/nowhere"}))
    (adapter / "ftloop_model.json").write_text(
        json.dumps({"base_model": {"name_or_path": "/nowhere", "revision": None, "dtype": "float32", "quantization": "none"}})
    )
    for name in weights:
        (adapter / name).write_bytes(b"\x80\x02}q\x00.")  # a pickle
    return adapter


def test_an_adapter_with_only_pickled_weights_is_refused_before_anything_loads(tmp_path, monkeypatch):
    import peft

    import ftloop.components.modeling.loading as loading
    from ftloop.components.errors import FtloopError
    from ftloop.components.modeling.export import export_merged

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded a model before checking the adapter's weights")

    monkeypatch.setattr(loading, "load_base_model", must_not_load)
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", must_not_load)
    adapter = _adapter_dir(tmp_path, "adapter_model.bin")
    expected = (
        f"{adapter}: adapter weights are only in adapter_model.bin (pickle); ftloop loads safetensors only. "
        "Convert them with save_pretrained(safe_serialization=True)"
    )
    with pytest.raises(FtloopError) as err:
        loading.load_for_inference(adapter)
    assert str(err.value) == expected
    with pytest.raises(FtloopError) as err:
        export_merged(adapter, {"base_model": {"name_or_path": "/nowhere", "dtype": "float32"}}, print)
    assert str(err.value) == expected


def test_an_adapter_without_weights_is_refused(tmp_path):
    from ftloop.components.errors import FtloopError
    from ftloop.components.modeling.loading import check_adapter_dir

    adapter = _adapter_dir(tmp_path)
    with pytest.raises(FtloopError, match="no adapter weights: expected adapter_model.safetensors"):
        check_adapter_dir(adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    check_adapter_dir(adapter)  # safetensors present: accepted (peft then loads that file, never the .bin)


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
