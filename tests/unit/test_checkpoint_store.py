"""The checkpoint store (components/modeling/checkpoints.py) on its own: no training.

A directory store on tmp_path, and the gs:// store against an in-memory stand-in for the
google-cloud-storage client (tests/unit/test_finetune_engine.py runs it against a fake GCS server).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ftloop.components.config import RunConfig
from ftloop.components.errors import FtloopError
from ftloop.components.modeling import checkpoints as ck
from ftloop.components.modeling.checkpoints import (
    COMPLETE_MARKER,
    DirectoryStore,
    GcsStore,
    checkpoint_step,
    is_checkpoint_name,
    open_store,
    restore_latest,
    training_fingerprint,
)


def make_checkpoint(root: Path, step: int, best: str | None = None) -> Path:
    d = root / f"checkpoint-{step}"
    (d / "sub").mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"w%d" % step)
    (d / "sub" / "optimizer.pt").write_bytes(b"o")
    if best is not None:
        (d / "trainer_state.json").write_text(json.dumps({"best_model_checkpoint": best, "global_step": step}))
    return d


def test_checkpoint_names_and_steps():
    assert checkpoint_step("checkpoint-120") == 120
    assert is_checkpoint_name("checkpoint-7")
    assert not is_checkpoint_name("checkpoint-")
    assert not is_checkpoint_name("checkpoint-7a")
    assert not is_checkpoint_name("runs")
    assert not is_checkpoint_name("xcheckpoint-7")


# ------------------------------------------------------------ directory store


def test_directory_store_round_trip_sorted_by_step(tmp_path):
    store = DirectoryStore(tmp_path / "store" / "fp")
    assert store.uri == str(tmp_path / "store" / "fp") and store.complete() == []
    for step in (10, 9, 100):
        store.upload(make_checkpoint(tmp_path / "local", step))
    (store.root / "checkpoint-200").mkdir()  # cut off before its marker: never offered
    (store.root / "notes").mkdir()
    (store.root / "notes" / COMPLETE_MARKER).write_text("complete\n")  # not a checkpoint name
    assert store.complete() == ["checkpoint-9", "checkpoint-10", "checkpoint-100"]
    assert not list(store.root.glob(".*partial"))

    store.download("checkpoint-10", tmp_path / "back")
    files = sorted(p.relative_to(tmp_path / "back").as_posix() for p in (tmp_path / "back").rglob("*") if p.is_file())
    assert files == ["adapter_model.safetensors", "sub/optimizer.pt"]  # the marker stays in the store
    assert (tmp_path / "back" / "adapter_model.safetensors").read_bytes() == b"w10"

    store.delete("checkpoint-10")
    assert store.complete() == ["checkpoint-9", "checkpoint-100"] and not (store.root / "checkpoint-10").exists()
    store.delete("checkpoint-10")  # deleting twice is fine


def test_directory_store_upload_replaces_an_older_copy_and_download_replaces_the_target(tmp_path):
    store = DirectoryStore(tmp_path / "store")
    local = make_checkpoint(tmp_path / "a", 5)
    store.upload(local)
    (local / "adapter_model.safetensors").write_bytes(b"newer")
    (local / "sub" / "optimizer.pt").unlink()
    store.upload(local)
    assert (store.root / "checkpoint-5" / "adapter_model.safetensors").read_bytes() == b"newer"
    assert not (store.root / "checkpoint-5" / "sub" / "optimizer.pt").exists()
    assert (store.root / "checkpoint-5" / COMPLETE_MARKER).read_text() == "complete\n"
    target = tmp_path / "target"
    (target / "stale").mkdir(parents=True)
    store.download("checkpoint-5", target)
    assert not (target / "stale").exists() and (target / "adapter_model.safetensors").read_bytes() == b"newer"


def test_directory_store_that_cannot_be_created_names_the_setting(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FtloopError, match=r"train\.checkpoint_uri: cannot create .*file/fp"):
        DirectoryStore(tmp_path / "file" / "fp")


def test_open_store_by_uri(tmp_path, monkeypatch):
    store = open_store(str(tmp_path / "ckpt"), "abc123")
    assert isinstance(store, DirectoryStore) and store.root == tmp_path / "ckpt" / "abc123" and store.root.is_dir()
    with pytest.raises(FtloopError, match=r"train\.checkpoint_uri: 's3://b/x': only gs:// URIs and directories"):
        open_store("s3://b/x", "abc123")
    import google.cloud.storage

    monkeypatch.setattr(google.cloud.storage, "Client", FakeClient)
    gcs = open_store("gs://bucket/runs/", "abc123")
    assert isinstance(gcs, GcsStore) and gcs.uri == "gs://bucket/runs/abc123" and gcs._prefix == "runs/abc123"


# ------------------------------------------------------------------ gs:// store


class FakeBlob:
    def __init__(self, client, name):
        self.client, self.name = client, name

    def upload_from_filename(self, path, retry=None):
        self.client.log.append(("upload", self.name))
        self.client.blobs[self.name] = Path(path).read_bytes()

    def upload_from_string(self, data, retry=None):
        self.client.log.append(("upload", self.name))
        self.client.blobs[self.name] = data.encode() if isinstance(data, str) else data

    def download_to_filename(self, path, retry=None):
        Path(path).write_bytes(self.client.blobs[self.name])

    def exists(self, retry=None):
        return self.name in self.client.blobs

    def delete(self, retry=None):
        self.client.log.append(("delete", self.name))
        del self.client.blobs[self.name]


class FakeClient:
    """The few google-cloud-storage calls GcsStore makes, over a dict of blob name -> bytes."""

    def __init__(self, *args, **kwargs):
        self.blobs: dict[str, bytes] = {}
        self.log: list[tuple[str, str]] = []

    def bucket(self, name):
        assert name, "a bucket needs a name"
        self.bucket_name = name
        return SimpleNamespace(name=name, blob=lambda key: FakeBlob(self, key))

    def list_blobs(self, bucket, prefix="", retry=None):
        assert bucket is not None and bucket.name == self.bucket_name, bucket
        return [FakeBlob(self, n) for n in sorted(self.blobs) if n.startswith(prefix)]


@pytest.mark.parametrize("uri, prefix", [("gs://bucket/runs/fp", "runs/fp/"), ("gs://bucket", "")])
def test_gcs_store_round_trip(tmp_path, uri, prefix):
    client = FakeClient()
    store = GcsStore(uri, client=client)
    assert store.uri == uri.rstrip("/")
    for step in (20, 3):
        store.upload(make_checkpoint(tmp_path / "local", step))
    assert client.log[-1] == ("upload", f"{prefix}checkpoint-3/{COMPLETE_MARKER}")  # the marker goes last
    assert f"{prefix}checkpoint-3/sub/optimizer.pt" in client.blobs
    client.blobs[f"{prefix}checkpoint-50/adapter_model.safetensors"] = b"cut off"  # no marker
    client.blobs[f"{prefix}checkpoint-60/deeper/{COMPLETE_MARKER}"] = b"complete\n"  # a marker not at the top
    client.blobs[f"{prefix}other/{COMPLETE_MARKER}"] = b"complete\n"
    assert store.complete() == ["checkpoint-3", "checkpoint-20"]

    target = tmp_path / "back"
    (target / "stale").mkdir(parents=True)
    store.download("checkpoint-20", target)
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert files == ["adapter_model.safetensors", "sub/optimizer.pt"] and not (target / "stale").exists()
    assert (target / "adapter_model.safetensors").read_bytes() == b"w20"

    client.log.clear()
    store.delete("checkpoint-20")
    assert client.log[0] == ("delete", f"{prefix}checkpoint-20/{COMPLETE_MARKER}")  # first: never half "complete"
    assert not [n for n in client.blobs if n.startswith(f"{prefix}checkpoint-20/")]
    assert f"{prefix}checkpoint-3/{COMPLETE_MARKER}" in client.blobs
    store.delete("checkpoint-50")  # no marker: the rest still goes
    assert not [n for n in client.blobs if n.startswith(f"{prefix}checkpoint-50/")]


def test_gcs_store_needs_a_bucket():
    with pytest.raises(FtloopError, match=r"train\.checkpoint_uri: 'gs:///x' names no bucket"):
        GcsStore("gs:///x", client=FakeClient())


# ------------------------------------------------------------------- resuming


def test_restore_latest_copies_every_checkpoint_and_repoints_the_best(tmp_path):
    store = DirectoryStore(tmp_path / "store")
    store.upload(make_checkpoint(tmp_path / "old-attempt", 10, best="/old/pod/path/checkpoint-10"))
    store.upload(make_checkpoint(tmp_path / "old-attempt", 20, best="/old/pod/path/checkpoint-10"))
    messages: list[str] = []
    staging = tmp_path / "staging"
    newest = restore_latest(store, staging, messages.append)
    assert newest == staging / "checkpoint-20"
    assert sorted(p.name for p in staging.iterdir()) == ["checkpoint-10", "checkpoint-20"]
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state == {"best_model_checkpoint": str(staging / "checkpoint-10"), "global_step": 20}
    assert messages == [f"resuming from checkpoint-20 in {store.uri}"]


def test_restore_latest_without_checkpoints_or_state(tmp_path):
    store = DirectoryStore(tmp_path / "store")
    messages: list[str] = []
    assert restore_latest(store, tmp_path / "staging", messages.append) is None and messages == []
    store.upload(make_checkpoint(tmp_path / "a", 1))  # no trainer_state.json
    assert restore_latest(store, tmp_path / "staging", messages.append) == tmp_path / "staging" / "checkpoint-1"
    store.upload(make_checkpoint(tmp_path / "b", 2, best=None))
    (tmp_path / "b" / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"best_model_checkpoint": None}))
    store.upload(tmp_path / "b" / "checkpoint-2")
    restore_latest(store, tmp_path / "staging2", messages.append)
    assert json.loads((tmp_path / "staging2" / "checkpoint-2" / "trainer_state.json").read_text()) == {"best_model_checkpoint": None}


def test_mirror_callback_uploads_new_checkpoints_and_drops_rotated_ones(tmp_path):
    store = DirectoryStore(tmp_path / "store")
    staging = tmp_path / "run"
    messages: list[str] = []
    callback = ck.mirror_callback(store, messages.append)
    args = SimpleNamespace(output_dir=str(staging))
    make_checkpoint(staging, 10)
    control = object()
    callback.on_save(args, SimpleNamespace(global_step=10), control)
    assert store.complete() == ["checkpoint-10"] and callback.mirrored == "checkpoint-10"
    make_checkpoint(staging, 20)
    import shutil

    shutil.rmtree(staging / "checkpoint-10")  # the trainer rotated it out
    callback.on_save(args, SimpleNamespace(global_step=20), control)
    assert store.complete() == ["checkpoint-20"] and callback.mirrored == "checkpoint-20"
    assert messages == []


def test_a_failed_mirror_warns_and_keeps_training(tmp_path):
    class Broken(DirectoryStore):
        def upload(self, local_dir):
            raise OSError("disk full")

    store = Broken(tmp_path / "store")
    store_ok = DirectoryStore(tmp_path / "store")
    store_ok.upload(make_checkpoint(tmp_path / "earlier", 5))  # already mirrored, no longer local
    staging = tmp_path / "run"
    make_checkpoint(staging, 10)
    messages: list[str] = []
    callback = ck.mirror_callback(store, messages.append)
    control = object()
    assert callback.on_save(SimpleNamespace(output_dir=str(staging)), SimpleNamespace(global_step=10), control) is control
    assert messages == [f"warning: could not mirror checkpoint-10 to {store.uri}: OSError: disk full"]
    assert callback.mirrored is None
    assert store.complete() == ["checkpoint-5"]  # nothing was deleted after the failure


# ---------------------------------------------------------------- fingerprint


def config(**train) -> RunConfig:
    return RunConfig.model_validate({"seed": 1, "data": {"questions": "q.jsonl"}, "train": train})


def test_fingerprint_depends_on_what_is_trained_only():
    base = training_fingerprint(config(), "sha")
    assert len(base) == 16 and int(base, 16) >= 0
    assert training_fingerprint(config(), "sha") == base
    for same in ({"checkpoint_uri": "/tmp/x"}, {"keep_checkpoints": 5}, {"export_merged": True}, {"logging_steps": 3}):
        assert training_fingerprint(config(**same), "sha") == base, same
    assert training_fingerprint(config(learning_rate=0.123), "sha") != base
    assert training_fingerprint(config(), "other-data") != base
    assert training_fingerprint(RunConfig.model_validate({"seed": 2, "data": {"questions": "q.jsonl"}}), "sha") != base
    lora = RunConfig.model_validate({"seed": 1, "data": {"questions": "q.jsonl"}, "lora": {"r": 4}})
    assert training_fingerprint(lora, "sha") != base
    model = RunConfig.model_validate({"seed": 1, "data": {"questions": "q.jsonl"}, "model": {"dtype": "float32"}})
    assert training_fingerprint(model, "sha") != base
    fmt = RunConfig.model_validate({"seed": 1, "data": {"questions": "q.jsonl"}, "format": {"system_prompt": "x {labels}"}})
    assert training_fingerprint(fmt, "sha") != base


# ------------------------------------------------- transient gs:// failures are retried


class FlakyBlob(FakeBlob):
    """Each call fails once with a transient 503 and is then served, but only when it is retried with the
    retry policy the store passes (google-cloud-storage retries an upload only when told to)."""

    def _call(self, op, retry, fn):
        return self.client.call(op, self.name, retry, fn)

    def upload_from_filename(self, path, retry=None):
        return self._call("upload_from_filename", retry, lambda: FakeBlob.upload_from_filename(self, path))

    def upload_from_string(self, data, retry=None):
        return self._call("upload_from_string", retry, lambda: FakeBlob.upload_from_string(self, data))

    def download_to_filename(self, path, retry=None):
        return self._call("download_to_filename", retry, lambda: FakeBlob.download_to_filename(self, path))

    def exists(self, retry=None):
        return self._call("exists", retry, lambda: FakeBlob.exists(self))

    def delete(self, retry=None):
        return self._call("delete", retry, lambda: FakeBlob.delete(self))


class FlakyClient(FakeClient):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.policies: list[tuple[str, object]] = []  # (operation, the retry= it was given)
        self.failed: list[str] = []

    def bucket(self, name):
        super().bucket(name)
        return SimpleNamespace(name=name, blob=lambda key: FlakyBlob(self, key))

    def call(self, op, name, retry, fn):
        from google.api_core.exceptions import ServiceUnavailable

        self.policies.append((op, retry))
        first = [True]

        def attempt():
            if first[0]:
                first[0] = False
                self.failed.append(f"{op} {name}")
                raise ServiceUnavailable(f"transient: {op} {name}")
            return fn()

        return retry(attempt)() if retry is not None else attempt()

    def list_blobs(self, bucket, prefix="", retry=None):
        assert bucket is not None and bucket.name == self.bucket_name, bucket
        return self.call("list_blobs", prefix, retry, lambda: [FlakyBlob(self, n) for n in sorted(self.blobs) if n.startswith(prefix)])


def test_gcs_store_retries_every_call_with_the_library_default_policy(tmp_path, monkeypatch):
    """Uploads included: the library retries only conditional uploads unless given retry=, and a preempted
    run must not lose a checkpoint to one 503."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    monkeypatch.setattr("time.sleep", lambda seconds: None)  # the backoff between tries
    client = FlakyClient()
    store = GcsStore("gs://bucket/runs/fp", client=client)
    store.upload(make_checkpoint(tmp_path / "local", 7))
    store.upload(make_checkpoint(tmp_path / "local", 8))
    assert store.complete() == ["checkpoint-7", "checkpoint-8"]
    store.download("checkpoint-7", tmp_path / "back")
    assert (tmp_path / "back" / "adapter_model.safetensors").read_bytes() == b"w7"
    store.delete("checkpoint-7")
    assert store.complete() == ["checkpoint-8"]
    ops = {op for op, _ in client.policies}
    assert ops == {"upload_from_filename", "upload_from_string", "list_blobs", "download_to_filename", "exists", "delete"}
    assert all(policy is DEFAULT_RETRY for _, policy in client.policies), client.policies
    assert len(client.failed) == len(client.policies)  # every call failed once and was retried


@pytest.mark.parametrize(
    "change",
    [
        {"train": {"epochs": 2}},
        {"train": {"batch_size": 8}},
        {"train": {"gradient_accumulation_steps": 2}},
        {"train": {"max_length": 128}},
        {"train": {"warmup_ratio": 0.1}},
        {"train": {"weight_decay": 0.01}},
        {"train": {"lr_scheduler": "cosine"}},
        {"train": {"max_grad_norm": 0.5}},
        {"train": {"eval_every_steps": 5}},
        {"train": {"early_stopping_patience": 1}},
        {"train": {"share_prompt_prefix": False}},
        {"lora": {"alpha": 8}},
        {"lora": {"dropout": 0.0}},
        {"lora": {"target_modules": ["q_proj"]}},
        {"model": {"quantization": "nf4"}},
        {"model": {"name_or_path": "/models/other"}},
    ],
)
def test_fingerprint_changes_with_each_setting_that_shapes_the_weights(change):
    base = RunConfig.model_validate({"seed": 1, "data": {"questions": "q.jsonl"}})
    changed = RunConfig.model_validate({"seed": 1, "data": {"questions": "q.jsonl"}, **change})
    assert training_fingerprint(changed, "sha") != training_fingerprint(base, "sha")


@pytest.mark.parametrize(
    "change",
    [
        {"eval": {"batch_size": 8}},
        {"augment": {"max_per_class": 3}},
        {"name": "other"},
        {"cluster": {"spot": True}},
        {"data": {"questions": "elsewhere.jsonl"}},  # the data's hash counts, not its path
    ],
)
def test_fingerprint_ignores_settings_outside_training(change):
    base = RunConfig.model_validate({"seed": 1, "data": {"questions": "q.jsonl"}})
    changed = RunConfig.model_validate({"seed": 1, "data": {"questions": "q.jsonl"}, **change})
    assert training_fingerprint(changed, "sha") == training_fingerprint(base, "sha")


def test_gcs_store_keeps_to_its_bucket_and_prefix_and_writes_the_marker_text(tmp_path):
    """Prefixes ending in X: a strip of the wrong characters shows; a neighbour prefix must never be listed."""
    client = FakeClient()
    store = GcsStore("gs://bucket/Xruns/fpX/", client=client)
    assert (store.uri, store._prefix, client.bucket_name) == ("gs://bucket/Xruns/fpX", "Xruns/fpX", "bucket")
    local = make_checkpoint(tmp_path / "local", 4)
    (local / "deep" / "er").mkdir(parents=True)
    (local / "deep" / "er" / "a.bin").write_bytes(b"a")  # listed first: its parents do not exist yet
    (local / "sub" / "second.pt").write_bytes(b"s")  # two files in one folder
    store.upload(local)
    assert client.blobs[f"Xruns/fpX/checkpoint-4/{COMPLETE_MARKER}"] == b"complete\n"
    client.blobs[f"Xruns/fpY/checkpoint-9/{COMPLETE_MARKER}"] = b"complete\n"  # another run's prefix, same length
    assert store.complete() == ["checkpoint-4"]
    store.download("checkpoint-4", tmp_path / "back")
    files = sorted(p.relative_to(tmp_path / "back").as_posix() for p in (tmp_path / "back").rglob("*") if p.is_file())
    assert files == ["adapter_model.safetensors", "deep/er/a.bin", "sub/optimizer.pt", "sub/second.pt"]
    store.delete("checkpoint-4")
    assert store.complete() == [] and f"Xruns/fpY/checkpoint-9/{COMPLETE_MARKER}" in client.blobs


def test_open_store_strips_only_slashes(monkeypatch):
    import google.cloud.storage

    monkeypatch.setattr(google.cloud.storage, "Client", FakeClient)
    assert open_store("gs://bucket/runX/", "fp").uri == "gs://bucket/runX/fp"


def test_directory_store_upload_clears_a_partial_copy_left_by_a_killed_upload(tmp_path):
    store = DirectoryStore(tmp_path / "store")
    (store.root / ".checkpoint-3.partial" / "junk").mkdir(parents=True)
    store.upload(make_checkpoint(tmp_path / "local", 3))
    assert store.complete() == ["checkpoint-3"] and not (store.root / "checkpoint-3" / "junk").exists()
    assert not (store.root / ".checkpoint-3.partial").exists()


def test_directory_store_error_names_the_reason_not_the_errno(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FtloopError) as err:
        DirectoryStore(tmp_path / "file" / "fp")
    assert str(err.value) == f"train.checkpoint_uri: cannot create {tmp_path / 'file' / 'fp'}: Not a directory"
