"""Built-in models (components/modeling/builtin.py): a GGUF inside a hash-pinned wheel, converted once and cached.

A tiny Llama GGUF (2 layers, hidden 16, a byte-level BPE vocabulary with merges and a ChatML
template) is written here with the ``gguf`` package and packed into a tiny wheel; real pip
downloads it from a local wheelhouse (``--no-index --find-links``), so the real hash check,
extraction, conversion, fingerprint and reuse paths run offline in seconds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ftloop.components.errors import FtloopError
from ftloop.components.modeling import builtin as bm

REF = "builtin:tiny-llama"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Classify the customer question into exactly one intent.",
    "How do I return an item? Where is my order? shipping returns payments",
    "system user assistant hello world the question answer",
] * 20
MESSAGES = [{"role": "system", "content": "Classify the question."}, {"role": "user", "content": "Where is my order?"}]


def _bpe_vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary (specials first) and its merges, trained on a few lines."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=360, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [t for t, _ in vocab], merges


def write_tiny_gguf(path: Path, seed: int = 0) -> None:
    import gguf

    tokens, merges = _bpe_vocab()
    hidden, ffn, heads, kv_heads, layers = 16, 32, 2, 1, 2
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)  # as SmolLM2 ships it: pad == eos, which the converter must fix
    writer.add_chat_template(CHATML)
    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))  # tied head: no output.weight
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_wheel(path: Path, gguf_path: Path, name: str = "tinyllm", version: str = "0.0.1") -> Path:
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"",
        f"{name}/tiny.gguf": gguf_path.read_bytes(),
        f"{dist}/LICENSE": b"Apache License 2.0 (test stand-in)\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
        archive.writestr(f"{dist}/RECORD", record)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wheelhouse")
    gguf_path = root / "src" / "tiny.gguf"
    gguf_path.parent.mkdir()
    write_tiny_gguf(gguf_path)
    house = root / "house"
    house.mkdir()
    wheel = write_wheel(house / "tinyllm-0.0.1-py3-none-any.whl", gguf_path)
    spec = bm.BuiltinModel(
        name="tiny-llama",
        requirement="tinyllm==0.0.1",
        wheel_sha256=sha256(wheel),
        gguf_member="tinyllm/tiny.gguf",
        gguf_sha256=sha256(gguf_path),
        license="Apache-2.0",
        license_member="tinyllm-0.0.1.dist-info/LICENSE",
    )
    return {"gguf": gguf_path, "house": house, "wheel": wheel, "registry": {REF: spec}, "spec": spec}


@pytest.fixture(autouse=True)
def _isolated_pip(monkeypatch):
    # Only the test wheelhouse: no configured indexes or find-links dirs of this machine.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    for name in bm.OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)


def ensure(wheelhouse, cache_root: Path, registry=None, **kwargs) -> Path:
    return bm.ensure_builtin_model(
        REF,
        cache_root,
        offline=kwargs.pop("offline", False),
        progress=lambda _: None,
        pip_args=["--no-index", "--find-links", str(wheelhouse["house"])],
        registry=registry or wheelhouse["registry"],
        **kwargs,
    )


@pytest.fixture(scope="module")
def built(wheelhouse, tmp_path_factory) -> Path:
    """One conversion, shared by the tests that only read it (they copy it before changing anything)."""
    return ensure(wheelhouse, tmp_path_factory.mktemp("cache"))


def count_downloads(monkeypatch) -> list:
    calls = []
    real = bm.download_wheel

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(bm, "download_wheel", counting)
    return calls


def test_conversion_loads_like_a_model_directory_with_the_gguf_logits(wheelhouse, built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftloop.components.modeling.loading import check_model_dir, load_base_model, load_tokenizer

    assert built.name == "tiny-llama"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "LICENSE", bm.FINGERPRINT_FILE} <= {
        p.name for p in built.iterdir()
    }
    assert not list(built.parent.glob(".tiny-llama.tmp-*")), "the temp dir is removed"
    check_model_dir(built)  # what the pipeline checks for a user's own directory
    ours = load_tokenizer(str(built))
    assert ours.pad_token == "<|endoftext|>" and ours.pad_token_id != ours.eos_token_id
    assert ours.eos_token == "<|im_end|>"

    model = load_base_model(str(built), None, "float32")  # as the pipeline loads a user's own directory
    tokenizer = AutoTokenizer.from_pretrained(built, trust_remote_code=False)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert getattr(model.config, "quantization_config", None) is None
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nClassify") and rendered.endswith("<|im_start|>assistant\n")

    gguf = wheelhouse["gguf"]
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False, use_kernels=False
    )
    reference_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert list(ids) == list(
        reference_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )
    with torch.no_grad():
        batch = torch.tensor([list(ids)])
        torch.testing.assert_close(model(batch).logits, reference(batch).logits, rtol=1e-5, atol=1e-5)

    fingerprint = json.loads((built / bm.FINGERPRINT_FILE).read_text())
    assert fingerprint["wheel_sha256"] == wheelhouse["spec"].wheel_sha256
    assert fingerprint["gguf_sha256"] == wheelhouse["spec"].gguf_sha256
    assert fingerprint["files"]["model.safetensors"] == (built / "model.safetensors").stat().st_size


def test_second_call_reuses_the_cache_without_pip(wheelhouse, built, monkeypatch):
    calls = count_downloads(monkeypatch)
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert ensure(wheelhouse, built.parent) == built
    assert ensure(wheelhouse, built.parent, offline=True) == built  # offline is fine once cached
    assert calls == []
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_wheel_with_another_hash_is_refused_by_pip(wheelhouse, tmp_path):
    spec = wheelhouse["spec"]
    wrong = {REF: bm.BuiltinModel(**{**spec.__dict__, "wheel_sha256": "0" * 64})}
    with pytest.raises(FtloopError, match="expected 0{64}; refusing it") as info:
        ensure(wheelhouse, tmp_path, registry=wrong)
    assert spec.wheel_sha256 in str(info.value)  # names what it got
    assert not (tmp_path / "tiny-llama").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp dir left behind


def test_the_wheel_hash_is_checked_again_after_pip(wheelhouse, tmp_path, monkeypatch):
    other = tmp_path / "other" / "tinyllm-0.0.1-py3-none-any.whl"
    other.parent.mkdir()
    write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    write_wheel(other, tmp_path / "other.gguf")

    def swapped(spec, dest, pip_args=()):
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(other, dest))

    monkeypatch.setattr(bm, "download_wheel", swapped)
    with pytest.raises(FtloopError, match=r"sha256 [0-9a-f]{64}, expected " + wheelhouse["spec"].wheel_sha256):
        ensure(wheelhouse, tmp_path / "cache")
    assert not (tmp_path / "cache" / "tiny-llama").exists()


@pytest.mark.parametrize("damage", ["truncated weights", "missing tokenizer", "old converter", "no fingerprint", "other gguf"])
def test_a_damaged_or_stale_cache_is_rebuilt(wheelhouse, built, tmp_path, monkeypatch, damage):
    cache = tmp_path / "cache"
    shutil.copytree(built, cache / "tiny-llama")
    target = cache / "tiny-llama"
    fingerprint_path = target / bm.FINGERPRINT_FILE
    fingerprint = json.loads(fingerprint_path.read_text())
    if damage == "truncated weights":
        with open(target / "model.safetensors", "r+b") as handle:
            handle.truncate(100)
    elif damage == "missing tokenizer":
        (target / "tokenizer.json").unlink()
    elif damage == "old converter":
        fingerprint_path.write_text(json.dumps({**fingerprint, "converter_version": bm.CONVERTER_VERSION - 1}))
    elif damage == "no fingerprint":
        fingerprint_path.unlink()
    elif damage == "other gguf":
        fingerprint_path.write_text(json.dumps({**fingerprint, "gguf_sha256": "1" * 64}))
    assert bm.cache_problem(target, REF, wheelhouse["spec"]) is not None

    calls = count_downloads(monkeypatch)
    assert ensure(wheelhouse, cache) == target
    assert len(calls) == 1
    assert bm.cache_problem(target, REF, wheelhouse["spec"]) is None
    assert sorted(p.name for p in cache.iterdir()) == ["tiny-llama"]  # old copy and temp dirs gone


def test_a_failed_conversion_leaves_no_directory_that_looks_valid(wheelhouse, tmp_path, monkeypatch):
    def half_written(gguf_path, out_dir, spec, progress=print):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(bm, "convert_gguf", half_written)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        ensure(wheelhouse, tmp_path)
    assert list(tmp_path.iterdir()) == []


def _assert_one_line_fetch_hint(message: str, target: Path) -> None:
    assert "\n" not in message
    assert REF in message and str(target) in message
    assert bm.FETCH_COMMAND.format(ref=REF) in message


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "FTLOOP_OFFLINE"])
def test_offline_without_cache_is_one_line_saying_how_to_fetch(wheelhouse, tmp_path, monkeypatch, variable):
    calls = count_downloads(monkeypatch)
    monkeypatch.setenv(variable, "1")
    with pytest.raises(FtloopError) as info:
        ensure(wheelhouse, tmp_path, offline=None)
    _assert_one_line_fetch_hint(str(info.value), tmp_path / "tiny-llama")
    assert variable in str(info.value)
    assert calls == []


def test_an_unreachable_index_is_the_same_one_line_error(wheelhouse, tmp_path):
    empty = tmp_path / "empty-house"
    empty.mkdir()
    with pytest.raises(FtloopError) as info:
        bm.ensure_builtin_model(
            REF,
            tmp_path / "cache",
            offline=False,
            progress=lambda _: None,
            pip_args=["--no-index", "--find-links", str(empty)],
            registry=wheelhouse["registry"],
        )
    _assert_one_line_fetch_hint(str(info.value), tmp_path / "cache" / "tiny-llama")
    assert "pip:" in str(info.value)


def test_default_cache_root_follows_ftloop_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FTLOOP_CACHE", str(tmp_path))
    assert bm.default_cache_root() == tmp_path / "models"
    monkeypatch.delenv("FTLOOP_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert bm.default_cache_root() == tmp_path / "home" / ".cache" / "ftloop" / "models"


def test_unknown_ref_names_the_known_ones():
    with pytest.raises(FtloopError, match="builtin:smollm2-135m-instruct"):
        bm.lookup("builtin:nope")


def test_the_registry_pins_exact_versions_and_hashes():
    for ref, spec in bm.BUILTIN_MODELS.items():
        assert ref == f"builtin:{spec.name}"
        assert "==" in spec.requirement
        assert len(spec.wheel_sha256) == 64 and int(spec.wheel_sha256, 16) >= 0
        assert spec.gguf_sha256 is not None and len(spec.gguf_sha256) == 64
        assert spec.gguf_member.endswith(".gguf") and spec.license


def test_the_registry_and_the_config_name_the_same_fetched_models():
    from ftloop.components.config import BUILTIN_MODEL_REFS, TINY_MODEL_REF

    assert set(bm.BUILTIN_MODELS) == set(BUILTIN_MODEL_REFS) - {TINY_MODEL_REF}


# ---------------------------------------------------------------- wiring: config, local runs, cluster, CLI


def _run_config(ref: str):
    from ftloop.components.config import RunConfig

    return RunConfig.model_validate({"data": {"questions": "q.jsonl"}, "model": {"name_or_path": ref}})


def test_the_config_accepts_the_builtin_refs_and_names_the_known_ones_for_another():
    from ftloop.components.config import SMOLLM2_MODEL_REF, TINY_MODEL_REF

    assert _run_config(SMOLLM2_MODEL_REF).model.name_or_path == SMOLLM2_MODEL_REF
    assert _run_config(TINY_MODEL_REF).model.name_or_path == TINY_MODEL_REF
    with pytest.raises(
        ValueError,
        match=r"unknown built-in model 'builtin:smollm2'; known: builtin:tiny-phi3, "
        r"builtin:smollm2-135m-instruct",
    ):
        _run_config("builtin:smollm2")


def test_load_config_reports_an_unknown_builtin_ref_with_its_line(tmp_path):
    from ftloop.components.config import load_config
    from ftloop.components.errors import ConfigError

    (tmp_path / "q.jsonl").write_text('{"text": "hi", "label": "a"}\n')
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  questions: q.jsonl\nmodel:\n  name_or_path: builtin:phi3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:3: model: name_or_path: unknown built-in model 'builtin:phi3'; known: " in str(info.value)


def test_loaders_refuse_an_unresolved_builtin_ref_saying_what_to_do():
    from ftloop.components.modeling.loading import check_model_ref

    with pytest.raises(FtloopError, match="is a placeholder: build the tiny model first"):
        check_model_ref("builtin:tiny-phi3")
    with pytest.raises(FtloopError) as info:
        check_model_ref("builtin:smollm2-135m-instruct")
    assert "ftloop fetch-model builtin:smollm2-135m-instruct" in str(info.value)
    with pytest.raises(FtloopError, match="unknown built-in model 'builtin:x'; known: builtin:tiny-phi3"):
        check_model_ref("builtin:x", key="generators.hf.name_or_path")


def test_a_cluster_compile_refuses_a_builtin_ref():
    from ftloop.components.config import SMOLLM2_MODEL_REF
    from ftloop.pipelines.compile import check_cluster_config

    with pytest.raises(FtloopError, match="'builtin:smollm2-135m-instruct' is built on the fly for local runs only"):
        check_cluster_config(_run_config(SMOLLM2_MODEL_REF))


@pytest.fixture
def smollm2_is_the_tiny_wheel(wheelhouse, monkeypatch, tmp_path):
    """The registry's SmolLM2 entry replaced by the tiny wheel, and pip pointed at the test wheelhouse by its
    environment (the run and the CLI pass no pip arguments); FTLOOP_CACHE in tmp_path."""
    from ftloop.components.config import SMOLLM2_MODEL_REF

    spec = bm.BuiltinModel(**{**wheelhouse["spec"].__dict__, "name": "smollm2-135m-instruct"})
    monkeypatch.setattr(bm, "BUILTIN_MODELS", {SMOLLM2_MODEL_REF: spec})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse["house"]))
    monkeypatch.setenv("FTLOOP_CACHE", str(tmp_path / "ftloop-cache"))
    return tmp_path / "ftloop-cache" / "models" / "smollm2-135m-instruct"


def test_a_local_run_resolves_the_ref_to_the_cached_directory_and_loads_it_as_a_model_dir(smollm2_is_the_tiny_wheel):
    from ftloop.components.config import SMOLLM2_MODEL_REF, TINY_MODEL_REF
    from ftloop.pipelines.local import check_base_model, resolve_builtin_model

    messages: list[str] = []
    config = resolve_builtin_model(_run_config(SMOLLM2_MODEL_REF), messages.append)
    assert config.model.name_or_path == str(smollm2_is_the_tiny_wheel)
    assert bm.cache_problem(smollm2_is_the_tiny_wheel, SMOLLM2_MODEL_REF, bm.BUILTIN_MODELS[SMOLLM2_MODEL_REF]) is None
    check_base_model(config)  # what `ftloop run --local` checks before any stage starts
    assert any("downloading" in m for m in messages)

    messages.clear()
    assert resolve_builtin_model(_run_config(SMOLLM2_MODEL_REF), messages.append) == config  # reused
    assert not any("downloading" in m for m in messages)
    tiny = _run_config(TINY_MODEL_REF)
    assert resolve_builtin_model(tiny, messages.append) is tiny  # left to ensure_tiny_model


def test_a_local_run_resolves_a_builtin_ref_for_the_hf_generator_too(smollm2_is_the_tiny_wheel):
    from ftloop.components.config import SMOLLM2_MODEL_REF, TINY_MODEL_REF, RunConfig
    from ftloop.pipelines.local import check_base_model, resolve_builtin_model

    config = RunConfig.model_validate(
        {
            "data": {"questions": "q.jsonl"},
            "model": {"name_or_path": TINY_MODEL_REF},
            "augment": {"backend": "hf"},
            "generators": {"hf": {"name_or_path": SMOLLM2_MODEL_REF}},
        }
    )
    resolved = resolve_builtin_model(config, lambda line: None)
    assert resolved.generators.hf.name_or_path == str(smollm2_is_the_tiny_wheel)
    assert resolved.model.name_or_path == TINY_MODEL_REF  # the fine-tune base is left to ensure_tiny_model
    check_base_model(resolved.with_model_path(str(smollm2_is_the_tiny_wheel)))  # the generator's directory loads


def test_fetch_model_prints_the_directory_under_cache_dir(smollm2_is_the_tiny_wheel, tmp_path, capsys):
    from ftloop.pipelines.cli import main

    assert main(["fetch-model", "builtin:smollm2-135m-instruct", "--cache-dir", str(tmp_path / "elsewhere")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == str(tmp_path / "elsewhere" / "models" / "smollm2-135m-instruct")
    assert not smollm2_is_the_tiny_wheel.exists()


@pytest.mark.parametrize(
    "ref,message",
    [
        ("builtin:nope", "ftloop: error: unknown built-in model 'builtin:nope'; known: builtin:smollm2-135m-instruct"),
        ("builtin:tiny-phi3", "ftloop: error: builtin:tiny-phi3 is built from a run's data, not fetched"),
    ],
)
def test_fetch_model_refuses_what_it_cannot_fetch(ref, message, tmp_path, capsys):
    from ftloop.pipelines.cli import main

    assert main(["fetch-model", ref, "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_fetch_model_without_an_index_is_one_line_naming_the_command(smollm2_is_the_tiny_wheel, tmp_path, monkeypatch, capsys):
    from ftloop.pipelines.cli import main

    empty = tmp_path / "empty-house"
    empty.mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    assert main(["fetch-model", "builtin:smollm2-135m-instruct"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`ftloop fetch-model builtin:smollm2-135m-instruct` on a machine with PyPI access" in err


# ---------------------------------------------------------------- the output head gets a contiguous input


def _head_inputs_contiguous(model) -> tuple[list[bool], object]:
    """Records, per head call, whether the input the head's forward received was contiguous (after pre-hooks)."""
    seen: list[bool] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    return seen, handle


@pytest.fixture(scope="module")
def frozen_builtin(built):
    from ftloop.components.modeling.loading import load_base_model, load_tokenizer

    model = load_base_model(str(built), None, "float32").eval()
    model.requires_grad_(False)  # frozen, as a merged or inference-loaded model
    return model, load_tokenizer(str(built))


PROMPTS = [
    [{"role": "system", "content": "Classify the question."}, {"role": "user", "content": text}]
    for text in ("Where is my order?", "How do I return an item I bought last week?", "hello", "shipping payments returns")
]


def test_label_scoring_and_generate_give_the_head_a_contiguous_input(frozen_builtin):
    """Frozen weights + the sliced (logits_to_keep) hidden states made matmul copy the whole head per row
    (12x slower scoring on SmolLM2); the sliced input must reach the head contiguous."""
    from ftloop.components.modeling.generate_mode import generate_predictions
    from ftloop.components.modeling.scoring import score_labels

    model, tokenizer = frozen_builtin
    head = model.get_output_embeddings()
    seen, handle = _head_inputs_contiguous(model)
    try:
        # Without the fix the head sees a non-contiguous slice (so this test would catch its removal).
        batch = tokenizer(["Where is my order? hello hello", "hi"], padding=True, return_tensors="pt")
        with torch.no_grad():
            model(**batch, logits_to_keep=2)
        assert seen == [False]
        seen.clear()

        for prefix_cache in (True, False):
            score_labels(model, tokenizer, PROMPTS, ["returns", "shipping", "payments"], batch_size=4, prefix_cache=prefix_cache)
        score_labels(model, tokenizer, PROMPTS, ["returns", "return label"], batch_size=4)  # multi-token path
        assert seen and all(seen), seen
        seen.clear()
        generate_predictions(model, tokenizer, PROMPTS, ["returns", "shipping"], batch_size=4, max_new_tokens=2)
        assert seen and all(seen), seen
    finally:
        handle.remove()
    assert not head._forward_pre_hooks  # the hook is removed again
