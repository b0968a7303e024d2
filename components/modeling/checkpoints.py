"""Training checkpoints that outlive the pod, and resuming from them.

KFP uploads a task's outputs only after the task succeeds, so a Spot preemption
loses everything written under the output path. Checkpoints are therefore
mirrored, as the trainer writes them, to their own location (a directory or a
gs:// prefix), under a fingerprint of everything that determines the training
run. A retry of the same task computes the same fingerprint and resumes from the
newest checkpoint that was completely mirrored; a completion marker is written
last, so a checkpoint cut off mid-upload is never used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ftloop.components.config import RunConfig
from ftloop.components.errors import FtloopError

COMPLETE_MARKER = "ftloop-checkpoint-complete"
CHECKPOINT_PREFIX = "checkpoint-"


def checkpoint_step(name: str) -> int:
    return int(name[len(CHECKPOINT_PREFIX) :])


def is_checkpoint_name(name: str) -> bool:
    return name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit()


def training_fingerprint(config: RunConfig, data_sha256: str) -> str:
    """What decides the trained weights; where checkpoints are mirrored or the merge export is written does not."""
    train = config.train.model_dump(exclude={"checkpoint_uri", "keep_checkpoints", "export_merged", "logging_steps"})
    identity = {
        "model": config.model.model_dump(),
        "lora": config.lora.model_dump(),
        "train": train,
        "format": config.format.model_dump(),
        "seed": config.seed,
        "data": data_sha256,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class CheckpointStore(Protocol):
    """Where complete checkpoints live between attempts; `uri` is for messages."""

    uri: str

    def complete(self) -> list[str]: ...

    def upload(self, local_dir: Path) -> None: ...

    def download(self, name: str, dest: Path) -> None: ...

    def delete(self, name: str) -> None: ...


def _sorted_by_step(names) -> list[str]:
    return sorted((n for n in names if is_checkpoint_name(n)), key=checkpoint_step)


class DirectoryStore:
    """A local or mounted directory (a PVC, or a gcsfuse mount)."""

    def __init__(self, root: Path):
        self.root = root
        self.uri = str(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FtloopError(f"train.checkpoint_uri: cannot create {root}: {exc.strerror or exc}") from None

    def complete(self) -> list[str]:
        return _sorted_by_step(p.name for p in self.root.iterdir() if (p / COMPLETE_MARKER).is_file())

    def upload(self, local_dir: Path) -> None:
        dest = self.root / local_dir.name
        partial = self.root / f".{local_dir.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(local_dir, partial)
        (partial / COMPLETE_MARKER).write_text("complete\n", encoding="utf-8")
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)

    def download(self, name: str, dest: Path) -> None:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(self.root / name, dest, ignore=shutil.ignore_patterns(COMPLETE_MARKER))

    def delete(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)


class GcsStore:
    """A gs:// prefix, through google-cloud-storage (honours STORAGE_EMULATOR_HOST).

    Uploads of whole files are idempotent here, so they are retried on transient
    errors like reads are (the library retries only conditional uploads by default).
    """

    def __init__(self, uri: str, client=None):
        from google.cloud import storage

        bucket, _, prefix = uri[len("gs://") :].partition("/")
        if not bucket:
            raise FtloopError(f"train.checkpoint_uri: {uri!r} names no bucket")
        self.uri = uri.rstrip("/")
        self._client = client or storage.Client()
        self._bucket = self._client.bucket(bucket)
        self._prefix = prefix.strip("/")

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self._prefix, *parts) if p)

    def _retry(self):
        from google.cloud.storage.retry import DEFAULT_RETRY

        return DEFAULT_RETRY

    def complete(self) -> list[str]:
        base = self._key() + "/" if self._prefix else ""
        names = set()
        for blob in self._client.list_blobs(self._bucket, prefix=base, retry=self._retry()):
            rest = blob.name[len(base) :]
            parts = rest.split("/")
            if len(parts) == 2 and parts[1] == COMPLETE_MARKER:
                names.add(parts[0])
        return _sorted_by_step(names)

    def upload(self, local_dir: Path) -> None:
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            self._bucket.blob(self._key(local_dir.name, rel)).upload_from_filename(str(path), retry=self._retry())
        self._bucket.blob(self._key(local_dir.name, COMPLETE_MARKER)).upload_from_string("complete\n", retry=self._retry())

    def download(self, name: str, dest: Path) -> None:
        shutil.rmtree(dest, ignore_errors=True)
        prefix = self._key(name) + "/"
        for blob in self._client.list_blobs(self._bucket, prefix=prefix, retry=self._retry()):
            rel = blob.name[len(prefix) :]
            if rel == COMPLETE_MARKER or not rel:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(target), retry=self._retry())

    def delete(self, name: str) -> None:
        marker = self._bucket.blob(self._key(name, COMPLETE_MARKER))
        if marker.exists(retry=self._retry()):
            marker.delete(retry=self._retry())  # first, so a half-deleted checkpoint is never "complete"
        for blob in self._client.list_blobs(self._bucket, prefix=self._key(name) + "/", retry=self._retry()):
            blob.delete(retry=self._retry())


def open_store(uri: str, fingerprint: str) -> CheckpointStore:
    """The store for one training run: <uri>/<fingerprint>/checkpoint-N/..."""
    if uri.startswith("gs://"):
        return GcsStore(f"{uri.rstrip('/')}/{fingerprint}")
    if "://" in uri:
        raise FtloopError(f"train.checkpoint_uri: {uri!r}: only gs:// URIs and directories are supported")
    return DirectoryStore(Path(uri) / fingerprint)


def restore_latest(store: CheckpointStore, staging: Path, progress: Callable[[str], None]) -> Path | None:
    """Copy every complete checkpoint into the trainer's output dir; return the newest, or None.

    All of them (not just the newest) so the best one by the dev metric, which the
    trainer state points to, can still be loaded at the end.
    """
    names = store.complete()
    if not names:
        return None
    for name in names:
        store.download(name, staging / name)
    _repoint_best_checkpoint(staging / names[-1], staging)
    progress(f"resuming from {names[-1]} in {store.uri}")
    return staging / names[-1]


def _repoint_best_checkpoint(checkpoint: Path, staging: Path) -> None:
    """trainer_state.json records the best checkpoint as an absolute path from the attempt that wrote it."""
    state_path = checkpoint / "trainer_state.json"
    if not state_path.is_file():
        return
    state = json.loads(state_path.read_text(encoding="utf-8"))
    best = state.get("best_model_checkpoint")
    if best:
        state["best_model_checkpoint"] = str(staging / Path(best).name)
        state_path.write_text(json.dumps(state, indent=2), encoding="utf-8")


def mirror_callback(store: CheckpointStore, progress: Callable[[str], None]):
    """A TrainerCallback that mirrors each new checkpoint and drops the ones the trainer rotated out."""
    from transformers import TrainerCallback

    class MirrorCheckpoints(TrainerCallback):
        mirrored: str | None = None  # the newest checkpoint completely mirrored by this run

        def on_save(self, args, state, control, **kwargs):
            staging = Path(args.output_dir)
            newest = staging / f"{CHECKPOINT_PREFIX}{state.global_step}"
            if newest.is_dir():
                try:
                    store.upload(newest)
                except Exception as exc:  # noqa: BLE001 - a failed mirror must not kill a healthy training run
                    progress(f"warning: could not mirror {newest.name} to {store.uri}: {type(exc).__name__}: {exc}")
                    return control
                self.mirrored = newest.name
            local = {p.name for p in staging.iterdir() if is_checkpoint_name(p.name)}
            for name in store.complete():
                if name not in local:
                    store.delete(name)
            return control

    return MirrorCheckpoints()
