"""No code from the hub at run time: no model ftloop loads would kernelize, and one transformers version everywhere.

transformers 5 loads models with ``use_kernels=True`` by default: layers are kernelized with
kernels fetched from the hub (kernels-community/*) at load and again at ``model.train()``
(liger-kernels on CUDA). These tests make every hub-kernel entry point raise, switch the
process-wide USE_HUB_KERNELS lock back on (so the ``use_kernels=False`` each load passes is what
is tested), load the tiny model through every ftloop load path and train it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "components").rglob("*.py")) + sorted((REPO / "pipelines").rglob("*.py")) + sorted((REPO / "bench").rglob("*.py"))
MODEL_LOADERS = {"AutoModelForCausalLM", "AutoModel", "AutoModelForSequenceClassification"}


class HubKernelReached(AssertionError):
    pass


@pytest.fixture
def hub_kernels_forbidden(monkeypatch):
    """Every way transformers 5.25 reaches hub kernels raises; USE_HUB_KERNELS as transformers' default (on)."""
    import kernels
    import transformers.integrations.hub_kernels as hub_kernels
    import transformers.modeling_utils as modeling_utils

    import ftloop.components.modeling.loading  # noqa: F401 - its import sets USE_HUB_KERNELS=NO; undone below

    reached: list[str] = []

    def forbidden(name):
        def call(*args, **kwargs):
            reached.append(name)
            raise HubKernelReached(f"{name} called: a model would run code from the hub")

        return call

    monkeypatch.setattr(kernels, "kernelize", forbidden("kernels.kernelize"))
    monkeypatch.setattr(hub_kernels, "_kernels_kernelize", forbidden("kernels.kernelize (via transformers)"))
    monkeypatch.setattr(hub_kernels, "kernelize", forbidden("transformers kernelize"))
    monkeypatch.setattr(modeling_utils, "kernelize", forbidden("PreTrainedModel kernelize"))
    monkeypatch.setattr(hub_kernels, "get_kernel", forbidden("get_kernel"))
    monkeypatch.setattr(hub_kernels, "register_kernel_mapping_transformers", forbidden("register_kernel_mapping"))
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    return reached


def assert_never_kernelizes(model) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert base.use_kernels is False and base.kernels_mode is None
    model.train()  # transformers kernelizes here (Mode.TRAINING) when use_kernels is on, on any device
    model.eval()
    assert base.use_kernels is False and base.kernels_mode is None


def test_the_guard_sees_a_model_loaded_with_transformers_defaults(hub_kernels_forbidden, tiny_model_dir):
    """The test's own premise: transformers 5.25's default load does reach kernelize."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(HubKernelReached):
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), use_safetensors=True)
    assert hub_kernels_forbidden


def test_base_model_loads_never_kernelize(hub_kernels_forbidden, tiny_model_dir):
    from ftloop.components.modeling.loading import load_base_model

    assert_never_kernelizes(load_base_model(str(tiny_model_dir), None, "float32"))
    assert_never_kernelizes(load_base_model(str(tiny_model_dir), None, "auto", prefer_flash=True))
    assert not hub_kernels_forbidden


@pytest.fixture
def adapter_dir(tmp_path, tiny_model_dir):
    """An adapter directory as the finetune step writes it, with a merged export, without training."""
    from peft import LoraConfig, get_peft_model

    from ftloop.components.artifacts import MERGED_DIR, MODEL_META
    from ftloop.components.modeling.loading import load_base_model, load_tokenizer
    from ftloop.components.records import write_json

    out = tmp_path / "adapter"
    model = get_peft_model(
        load_base_model(str(tiny_model_dir), None, "float32"), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    model.merge_and_unload().save_pretrained(str(out / MERGED_DIR))
    tokenizer.save_pretrained(str(out / MERGED_DIR))
    write_json(
        out / MODEL_META,
        {
            "base_model": {"name_or_path": str(tiny_model_dir), "revision": None, "dtype": "float32", "quantization": "none"},
            "merged": {"dtype": "float32"},
        },
    )
    return out


@pytest.mark.parametrize("how", ["adapter", "adapter_unmerged", "merged"])
def test_inference_loads_never_kernelize(hub_kernels_forbidden, adapter_dir, how):
    from ftloop.components.modeling.loading import load_for_inference

    model, _ = load_for_inference(adapter_dir, merged=how == "merged", merge_adapter=how == "adapter")
    assert_never_kernelizes(model)
    assert not hub_kernels_forbidden


def test_merged_export_and_hf_generator_never_kernelize(hub_kernels_forbidden, adapter_dir, tmp_path, monkeypatch):
    import ftloop.components.modeling.loading as loading
    from ftloop.components.config import HFGeneratorConfig
    from ftloop.components.generators.hf import HFGenerator
    from ftloop.components.modeling.export import export_merged
    from ftloop.components.records import read_json

    loaded = []
    real = loading.load_base_model
    monkeypatch.setattr(loading, "load_base_model", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    (adapter_dir / "merged").rename(tmp_path / "old-merged")
    export_merged(adapter_dir, read_json(adapter_dir / "ftloop_model.json"), progress=lambda line: None)
    model, _ = HFGenerator(HFGeneratorConfig(name_or_path=str(adapter_dir / "merged"), dtype="float32"), seed=0)._load()
    assert len(loaded) == 2 and model is loaded[1]
    for model in loaded:
        assert_never_kernelizes(model)
    assert not hub_kernels_forbidden


def test_the_trainer_never_kernelizes(hub_kernels_forbidden, tiny_model_dir, formatted_dir, tmp_path):
    """build_trainer's model, wrapped by TRL and PEFT, trains a step without reaching a hub kernel."""
    from ftloop.components.modeling.trainer import build_trainer
    from tests.fixtures.ml import demo_config

    config = demo_config(tiny_model_dir, epochs=1, early_stopping_metric="none")
    trainer, _ = build_trainer(config, formatted_dir, tmp_path / "out", progress=lambda line: None)
    trainer.args.max_steps = 1
    trainer.args.save_strategy = "no"
    assert_never_kernelizes(trainer.model)
    trainer.train()
    assert_never_kernelizes(trainer.model)
    assert not hub_kernels_forbidden


def test_importing_the_loaders_switches_hub_kernels_off_for_the_process(monkeypatch, tiny_model_dir):
    """The second lock: a library that loads with transformers' defaults gets no kernels either."""
    from transformers import AutoModelForCausalLM

    from ftloop.components.modeling import loading

    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    loading.disable_hub_kernels()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), use_safetensors=True)  # no use_kernels
    assert model.use_kernels is False and model.kernels_mode is None


def test_a_model_with_kernels_on_is_refused(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from ftloop.components.errors import FtloopError
    from ftloop.components.modeling.loading import check_no_hub_kernels

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), use_safetensors=True, use_kernels=False)
    model._use_kernels = True  # what a load with transformers' default leaves
    with pytest.raises(FtloopError, match="hub kernels"):
        check_no_hub_kernels(model)


def test_flash_attention_without_a_usable_package_falls_back_to_sdpa_not_a_hub_kernel(monkeypatch):
    import transformers.utils

    from ftloop.components.errors import FtloopError
    from ftloop.components.modeling.loading import hub_free_attention

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert hub_free_attention("flash_attention_2") == "sdpa"
    assert hub_free_attention("sdpa") == "sdpa"
    with pytest.raises(FtloopError):
        hub_free_attention("kernels-community/flash-attn2")


def _model_loads(path: Path):
    """AutoModel*.from_pretrained calls (from_config builds a model without ever kernelizing it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "from_pretrained"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in MODEL_LOADERS
        ):
            yield node


def test_every_model_load_in_the_source_passes_use_kernels_false():
    loads = [(p, c) for p in SOURCES for c in _model_loads(p)]
    assert len(loads) >= 2  # loading.load_base_model and the benchmark's published recipe
    for path, call in loads:
        value = next((kw.value for kw in call.keywords if kw.arg == "use_kernels"), None)
        assert isinstance(value, ast.Constant) and value.value is False, (
            f"{path.relative_to(REPO)}:{call.lineno}: pass use_kernels=False (transformers 5 defaults it to True)"
        )


# ------------------------------------------------------------------ one transformers version


def _pin(text: str, dist: str) -> str | None:
    match = re.search(rf'^\s*"?{re.escape(dist)}==([^",\s]+)', text, re.MULTILINE | re.IGNORECASE)
    return match.group(1) if match else None


def test_dev_venv_ci_and_images_use_one_transformers_version():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    declared = [d for d in pyproject["project"]["dependencies"] if re.match(r"transformers\b", d)]
    assert len(declared) == 1
    pinned = _pin(declared[0], "transformers")
    assert pinned, f"pyproject.toml: pin transformers exactly (transformers==X), not {declared[0]!r}"
    image = _pin((REPO / "constraints" / "image.txt").read_text(encoding="utf-8"), "transformers")
    assert image == pinned, f"constraints/image.txt pins transformers {image}, pyproject.toml {pinned}"
    assert importlib.metadata.version("transformers") == pinned, "the venv's transformers differs from the pin"


def test_liger_kernel_is_pinned_for_the_gpu_image():
    """Fused kernels come from a pinned PyPI package in the GPU image, not from the hub."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    gpu = [d for d in pyproject["project"]["optional-dependencies"]["gpu"] if d.startswith("liger-kernel")]
    assert len(gpu) == 1
    # the GPU image installs with both constraint files; image.txt holds it for now, gpu.txt would do as well
    pins = [_pin((REPO / "constraints" / name).read_text(encoding="utf-8"), "liger-kernel") for name in ("image.txt", "gpu.txt")]
    [pinned] = [pin for pin in pins if pin]
    from packaging.requirements import Requirement

    assert Requirement(gpu[0]).specifier.contains(pinned)
